"""The reference EG3D generator: names, shapes, counts, semantics, errors (issue: Foundation)."""
import pytest
import torch

from guide_fast import cameras
from guide_fast.eg3d import ops
from guide_fast.eg3d.generator import PRESETS, build_generator, count_parameters
from guide_fast.errors import InputError
from guide_fast.render import make_render_draws
from reference_data import DATA

# The official G_ema parameter names and shapes (facts, no code); tests/test_reference_data.py
# checks this copy against shared/reference/ when that folder is present.
REFERENCE_LISTING = DATA / "eg3d_ffhq512-128_state_dict.txt"


def _reference_listing():
    rows = []
    for line in REFERENCE_LISTING.read_text().splitlines():
        if line.strip():
            kind, name, shape = line.split(" ", 2)
            rows.append((kind, name, tuple(eval(shape))))
    return rows


@pytest.fixture(scope="module")
def ffhq():
    return build_generator("ffhq512-128", seed=0)


def test_ffhq_state_dict_equals_reference_listing(ffhq):
    rows = _reference_listing()
    sd = ffhq.state_dict()
    assert [n for _, n, _ in rows] == list(sd), "names or order differ from the official listing"
    for kind, name, shape in rows:
        assert tuple(sd[name].shape) == shape, name
    params = dict(ffhq.named_parameters())
    assert {n for k, n, _ in rows if k == "P"} == set(params)
    listing_total = sum(torch.Size(s).numel() for k, _, s in rows if k == "P")
    assert listing_total == 30_662_136
    assert count_parameters(ffhq) == listing_total
    assert ffhq.num_ws == 14 and ffhq.neural_rendering_resolution == 128


def test_tiny_outputs_shapes_ranges_and_determinism(tiny_generator):
    g = tiny_generator
    z = torch.randn(2, g.config.z_dim, generator=torch.Generator().manual_seed(0))
    c = cameras.pose_label(torch.tensor([0.1, -0.2]), -0.2)
    ws = g.mapping(z, cameras.frontal_label(2))
    assert ws.shape == (2, g.num_ws, g.config.w_dim)
    draws = make_render_draws(2, 32 * 32, g.render_options, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = g.synthesis(ws, c, noise_mode="const", render_draws=draws)
        b = g.synthesis(ws, c, noise_mode="const", render_draws=draws)
    assert a["image"].shape == (2, 3, 64, 64)
    assert a["image_raw"].shape == (2, 3, 32, 32)
    assert a["image_depth"].shape == (2, 1, 32, 32)
    for k in a:
        assert torch.equal(a[k], b[k]), k
        assert torch.isfinite(a[k]).all()
    # feature image is 2x-1 of composited values in (-0.001, 1.001) with weights summing to <= 1
    assert a["image_raw"].min() >= -1.003 and a["image_raw"].max() <= 1.003
    # depth is clamped to the sampled depth range (docs/eg3d.md §4.6)
    assert a["image_depth"].min() >= 2.25 and a["image_depth"].max() <= 3.3 + 1.05 / 11 + 1e-5


def test_generator_rng_gives_identical_outputs(tiny_generator):
    g = tiny_generator
    ws = g.mapping(torch.randn(1, g.config.z_dim), cameras.frontal_label(1))
    c = cameras.frontal_label(1)
    with torch.no_grad():
        a = g.synthesis(ws, c, generator=torch.Generator().manual_seed(5))["image"]
        b = g.synthesis(ws, c, generator=torch.Generator().manual_seed(5))["image"]
        d = g.synthesis(ws, c, generator=torch.Generator().manual_seed(6))["image"]
    assert torch.equal(a, b)
    assert not torch.equal(a, d)


def test_injected_planes_skip_the_backbone(tiny_generator):
    g = tiny_generator
    ws = g.mapping(torch.randn(2, g.config.z_dim), cameras.frontal_label(2))
    c = cameras.frontal_label(2)
    draws = make_render_draws(2, 1024, g.render_options)
    with torch.no_grad():
        planes = g.planes(ws, noise_mode="const")
        assert planes.shape == (2, 3, 8, 32, 32)
        a = g.synthesis(ws, c, noise_mode="const", render_draws=draws)
        b = g.synthesis(ws, c, planes=planes, render_draws=draws)
        zero = g.synthesis(ws, c, planes=torch.zeros_like(planes), render_draws=draws)
    assert torch.equal(a["image"], b["image"])
    assert not torch.allclose(a["image"], zero["image"])


def test_noise_modes(tiny_generator):
    g = tiny_generator.copy()
    for name, p in g.named_parameters():
        if name.endswith("noise_strength"):
            p.data.fill_(0.5)
    ws = g.mapping(torch.randn(1, g.config.z_dim), cameras.frontal_label(1))
    p_const = [g.planes(ws, "const") for _ in range(2)]
    p_rand = [g.planes(ws, "random") for _ in range(2)]
    p_none = g.planes(ws, "none")
    assert torch.equal(p_const[0], p_const[1])
    assert not torch.equal(p_rand[0], p_rand[1])
    assert not torch.equal(p_none, p_const[0])
    with pytest.raises(InputError, match="noise_mode"):
        g.planes(ws, "sometimes")


def test_train_mode_modconv_equals_eval_mode(tiny_generator):
    """'inference_only' fused_modconv: grouped conv in eval, shared conv in train (docs/eg3d.md §1.1)."""
    g = tiny_generator.copy()
    ws = g.mapping(torch.randn(3, g.config.z_dim), cameras.frontal_label(3))
    with torch.no_grad():
        a = g.eval().planes(ws, "const")
        b = g.train().planes(ws, "const")
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_up_conv_matches_zero_insertion_formulation():
    """conv_transpose2d + FIR (docs/eg3d.md §3.2 step 4) == zero-insert, full 3x3 conv, FIR."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, 7)
    w = torch.randn(4, 5, 3, 3)
    f = ops.setup_filter()
    got = ops.conv2d_resample(x, w, f, up=2, padding=1)
    up = torch.zeros(2, 5, 12, 14)
    up[:, :, ::2, ::2] = x
    full = torch.nn.functional.conv2d(torch.nn.functional.pad(up, [2, 1, 2, 1]), w.flip([2, 3]))  # (2H+1)
    fk = (f * 4)[None, None].repeat(4, 1, 1, 1)
    want = torch.nn.functional.conv2d(torch.nn.functional.pad(full, [1, 1, 1, 1]), fk, groups=4)
    assert got.shape == (2, 4, 12, 14)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("groups", [1, 3])
def test_folded_up_conv_equals_the_two_pass_form(groups):
    """The fast path's folded kernel (FIR folded into the transposed conv) is the same linear
    map as convT + FIR: equal to float64 rounding, per-sample (grouped) weights included, and
    gradients too."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, 9, dtype=torch.float64)
    w = torch.randn(4 * (3 if groups > 1 else 1), 5, 3, 3, dtype=torch.float64, requires_grad=True)
    xin = (x if groups == 1 else x.reshape(1, -1, 7, 9)).requires_grad_(True)
    f = ops.setup_filter().double()
    a = ops.conv2d_resample(xin, w, f, up=2, padding=1, groups=groups)
    b = ops.conv2d_resample(xin, w, f, up=2, padding=1, groups=groups, fold_filter=True)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
    g = torch.randn_like(a)
    ga = torch.autograd.grad(a, (xin, w), g)
    gb = torch.autograd.grad(b, (xin, w), g)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(v, u, rtol=0, atol=1e-11)


def test_generator_folded_up_conv_mode(tiny_generator):
    g = tiny_generator.copy()
    assert g.upsample_conv == "reference"
    ws = g.mapping(torch.randn(2, g.config.z_dim), cameras.frontal_label(2))
    c = cameras.frontal_label(2)
    keys = list(g.state_dict())
    with torch.no_grad():
        g.eval()
        draws = make_render_draws(2, g.neural_rendering_resolution ** 2, g.render_options, generator=torch.Generator().manual_seed(0))
        a = g.synthesis(ws, c, noise_mode="const", render_draws=draws)["image"]
        b = g.set_upsample_conv("folded").synthesis(ws, c, noise_mode="const", render_draws=draws)["image"]
    assert g.upsample_conv == "folded" and list(g.state_dict()) == keys
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    with pytest.raises(InputError, match="upsample_conv"):
        g.set_upsample_conv("fast")


def test_skip_upsampler_is_zero_padded_not_bilinear():
    x = torch.ones(1, 1, 4, 4)
    y = ops.upsample2d(x, ops.setup_filter())
    # interior stays 1, the border row/col sees the zero padding: 0.75 (docs/eg3d.md §3.2)
    assert y[0, 0, 3, 3] == pytest.approx(1.0)
    assert y[0, 0, 0, 3] == pytest.approx(0.75)
    assert y[0, 0, 0, 0] == pytest.approx(0.5625)


def test_sr_fp16_emulation_close_to_fp32_and_clamped(tiny_generator):
    g = tiny_generator.copy()
    ws = g.mapping(torch.randn(1, g.config.z_dim), cameras.frontal_label(1))
    c = cameras.frontal_label(1)
    draws = make_render_draws(1, 1024, g.render_options, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = g.set_sr_precision("fp32").synthesis(ws, c, noise_mode="const", render_draws=draws)["image"]
        b = g.set_sr_precision("fp16").synthesis(ws, c, noise_mode="const", render_draws=draws)["image"]
    assert b.dtype == torch.float32
    err = (a - b).abs().max().item()
    assert 0 < err < 5e-2 * max(1.0, a.abs().max().item())


@pytest.mark.parametrize("act,clamp", [("lrelu", 256.0), ("lrelu", None), ("linear", 1.5)])
def test_fp16_bias_act_rounds_once_like_the_cuda_plugin(act, clamp):
    """docs/eg3d.md §8.2: the official bias_act plugin computes fp16 input in fp32 and rounds once;
    rounding after each operation (the reference fallback) differs by an ulp on many elements."""
    torch.manual_seed(0)
    x = (torch.randn(3, 5, 7, 9) * 300).half().requires_grad_(True)
    b = (torch.randn(5) * 10).half()
    got = ops.bias_act(x, b, act=act, clamp=clamp)
    assert got.dtype == torch.float16
    want = ops.bias_act(x.detach().float(), b.float(), act=act, clamp=clamp).half()
    assert torch.equal(got, want)
    stepwise = x.detach() + b.reshape(1, -1, 1, 1)
    if act == "lrelu":
        stepwise = torch.nn.functional.leaky_relu(stepwise, 0.2) * ops.SQRT2
    if clamp is not None:
        stepwise = stepwise.clamp(-clamp, clamp)
    if act == "lrelu":
        assert (stepwise != got).any()  # the test can tell the two roundings apart
    # the gradient: fp32 mask and gain, rounded to fp16 once
    g = torch.randn(got.shape).half()
    (dx,) = torch.autograd.grad(got, x, g)
    xf = x.detach().float().requires_grad_(True)
    (dxf,) = torch.autograd.grad(ops.bias_act(xf, b.float(), act=act, clamp=clamp), xf, g.float())
    assert dx.dtype == torch.float16 and torch.equal(dx, dxf.half())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_train_mode_modconv_ends_in_one_fused_multiply_add(dtype):
    """docs/eg3d.md §8.2: the non-fused modulated conv with noise ends in the official fma, one
    addcmul (x * dcoefs + noise rounded once), with gradients for x, styles, weight and noise."""
    torch.manual_seed(1)
    x = torch.randn(2, 4, 6, 5).to(dtype).requires_grad_(True)
    weight = torch.randn(3, 4, 3, 3, requires_grad=True)
    styles = (torch.rand(2, 4) + 0.5).requires_grad_(True)
    noise = (torch.randn(2, 1, 6, 5) * 0.3).to(dtype).requires_grad_(True)
    got = ops.modulated_conv2d(x, weight, styles, noise=noise, padding=1, fused_modconv=False)
    conv = ops.modulated_conv2d(x, weight, styles, padding=1, fused_modconv=False, demodulate=False)
    w = weight
    if dtype == torch.float16:  # the fp16 pre-normalisation, as in ops.modulated_conv2d
        w = w * (1 / 6 / w.norm(float("inf"), dim=[1, 2, 3], keepdim=True))
        s = styles / styles.norm(float("inf"), dim=1, keepdim=True)
        conv = ops.modulated_conv2d(x, w, s, padding=1, fused_modconv=False, demodulate=False)
    else:
        s = styles
    d = ((w.unsqueeze(0) * s.reshape(2, 1, -1, 1, 1)).square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()
    d = d.to(dtype).reshape(2, -1, 1, 1)
    # official fma.fma(x, dcoefs, noise) is torch.addcmul(noise, x, dcoefs)
    want = torch.addcmul(noise, conv, d)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    if dtype == torch.float16:  # rounded once, not as the two-step x * dcoefs + noise
        torch.testing.assert_close(got, (conv.float() * d.float() + noise.float()).half(), rtol=0, atol=0)
        assert not torch.equal(got, conv * d + noise)
    g = torch.randn(got.shape).to(dtype)
    grads = torch.autograd.grad(got, (x, weight, styles, noise), g)
    assert all(t is not None and torch.isfinite(t).all() for t in grads)
    torch.testing.assert_close(grads[3], g.sum(1, keepdim=True), rtol=0, atol=0)


def test_mapping_truncation_and_conditioning(tiny_generator):
    g = tiny_generator
    z = torch.randn(4, g.config.z_dim)
    c = cameras.frontal_label(4)
    w1 = g.mapping(z, c)
    w0 = g.mapping(z, c, truncation_psi=0.0)
    torch.testing.assert_close(w0, g.w_avg.expand_as(w0))
    wh = g.mapping(z, c, truncation_psi=0.5, truncation_cutoff=3)
    torch.testing.assert_close(wh[:, :3], g.w_avg + 0.5 * (w1[:, :3] - g.w_avg))
    torch.testing.assert_close(wh[:, 3:], w1[:, 3:])
    side = cameras.pose_label(torch.full((4,), 0.3), 0.0)
    assert not torch.allclose(g.mapping(z, side), w1), "the conditioning camera must reach the mapping"


def test_bad_inputs_give_clear_errors(tiny_generator):
    g = tiny_generator
    with pytest.raises(InputError, match="unknown preset"):
        build_generator("ffhq1024")
    assert set(PRESETS) == {"ffhq512-128", "tiny"}
    ws = g.mapping(torch.randn(1, g.config.z_dim), cameras.frontal_label(1))
    with pytest.raises(InputError, match=r"\[N, 25\]"):
        g.synthesis(ws, torch.zeros(1, 16))
    with pytest.raises(InputError, match="ws must have shape"):
        g.synthesis(ws[:, :3], cameras.frontal_label(1))
    bad = ws.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="non-finite"):
        g.synthesis(bad, cameras.frontal_label(1))
    with pytest.raises(InputError, match="z must have shape"):
        g.mapping(torch.randn(1, 7), cameras.frontal_label(1))
    with pytest.raises(InputError, match="render_draws"):
        g.synthesis(ws, cameras.frontal_label(1), render_draws={"stratified": torch.rand(1, 5, 12, 1), "importance": torch.rand(5, 12)})
    with pytest.raises(InputError, match="planes has shape"):
        g.synthesis(ws, cameras.frontal_label(1), planes=torch.zeros(1, 3, 8, 16, 16))
    with pytest.raises(InputError, match="unknown renderer"):
        g.copy().set_renderer("opengl")


def test_ffhq_forward_shapes(ffhq):
    c = cameras.frontal_label(1)
    z = torch.randn(1, 512, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = ffhq(z, c, noise_mode="const")
    assert out["image"].shape == (1, 3, 512, 512)
    assert out["image_raw"].shape == (1, 3, 128, 128)
    assert out["image_depth"].shape == (1, 1, 128, 128)
    assert torch.isfinite(out["image"]).all()
