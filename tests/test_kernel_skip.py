"""Parity of the fused skip-path kernel (guide_fast.kernels.skip_path.skip_rgb) with the official operators.

The oracle is eg3d/ops.py's official path in fp32 on the same input values (a bf16 / fp16 ToRGB
output is compared against the fp32 operators applied to its exact values), so what remains is
the kernel's own rounding: fp32 arithmetic everywhere, one rounding of the raw gradient to the
ToRGB output's dtype. Odd sizes throughout (5 channels, 7x9 images) so no power of two hides a
mask. Without a GPU the kernel runs in the Triton interpreter (conftest sets TRITON_INTERPRET=1);
the same tests run unchanged on a GPU.
"""
from __future__ import annotations

import os

import pytest
import torch

from guide_fast.eg3d import ops
from guide_fast.eg3d.generator import build_generator
from guide_fast.errors import InputError
from guide_fast.plan import ExecutionPlan

pytest.importorskip("guide_fast.kernels")
from guide_fast.kernels.skip_path import skip_rgb  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# one rounding to the dtype (the interpreter truncates instead of rounding: one whole ulp)
ULP = {torch.float32: 1e-6, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


def _case(dtype, has_img=True, n=2, c=5, h=7, w=9, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n, c, h, w, generator=g).to(DEVICE) if has_img else None
    raw = (torch.randn(n, c, 2 * h, 2 * w, generator=g) * scale).to(DEVICE, dtype)
    bias = torch.randn(c, generator=g).to(DEVICE)
    grad = torch.randn(n, c, 2 * h, 2 * w, generator=g).to(DEVICE)
    return img, raw, bias, grad


def _grads(fn, img, raw, bias, grad):
    """(output, grad img, grad raw, grad bias) of fn under the upstream gradient `grad`."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (img, raw, bias)]
    out = fn(*leaves)
    torch.autograd.backward(out, grad)
    return (out.detach(),) + tuple(t.grad if t is not None else None for t in leaves)


def _oracle(f, clamp):
    # the official operators in fp32 on the kernel's input values
    return lambda img, raw, bias: ops.skip_rgb(img, raw.float(), bias, f, clamp=clamp, fused=False)


def _check(fused, oracle, raw_dtype, bias_terms):
    out, g_img, g_raw, g_bias = fused
    o_out, o_img, o_raw, o_bias = oracle
    assert out.dtype == torch.float32 and g_raw.dtype == raw_dtype
    torch.testing.assert_close(out, o_out, rtol=1e-6, atol=1e-5)
    if o_img is not None:
        torch.testing.assert_close(g_img, o_img, rtol=1e-6, atol=1e-5)
    else:
        assert g_img is None
    torch.testing.assert_close(g_raw.float(), o_raw.float(), rtol=ULP[raw_dtype], atol=1e-6)
    # the bias gradient sums the rounded raw gradient: at most one ulp of each term
    assert ((g_bias - o_bias).abs() <= ULP[raw_dtype] * bias_terms + 1e-5).all(), (g_bias - o_bias).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("has_img,clamp", [(True, None), (True, 1.5), (False, 1.5), (False, None)])
def test_forward_and_all_gradients_match_the_official_operators(dtype, has_img, clamp):
    f = ops.setup_filter().to(DEVICE)
    img, raw, bias, grad = _case(dtype, has_img)
    fused = _grads(lambda i, r, b: skip_rgb(i, r, b, f, clamp), img, raw, bias, grad)
    oracle = _grads(_oracle(f, clamp), img, raw, bias, grad)
    y = raw.float() + bias.view(1, -1, 1, 1)
    live = (y.abs() <= clamp) if clamp is not None else torch.ones_like(y, dtype=torch.bool)
    if clamp is not None:
        assert 0.2 < live.float().mean() < 0.8  # both sides of the clamp are exercised
    _check(fused, oracle, dtype, (grad.abs() * live).sum(dim=(0, 2, 3)))


def test_any_4x4_filter_is_applied_as_upfirdn2d_applies_it():
    """A non-symmetric filter: the kernel flips it as upfirdn2d's true convolution does."""
    f = torch.rand(4, 4, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    img, raw, bias, grad = _case(torch.float32, seed=1)
    fused = _grads(lambda i, r, b: skip_rgb(i, r, b, f, None), img, raw, bias, grad)
    oracle = _grads(_oracle(f, None), img, raw, bias, grad)
    _check(fused, oracle, torch.float32, grad.abs().sum(dim=(0, 2, 3)))
    assert (fused[0] - ops.skip_rgb(img, raw, bias, f.flip([0, 1]), fused=False)).abs().max() > 1e-3


def test_strided_inputs_and_an_expanded_gradient():
    """channels_last ToRGB output, a sliced (non-contiguous) image and the stride-0 gradient of
    .sum(): the kernel addresses all of them through their strides."""
    f = ops.setup_filter().to(DEVICE)
    img, raw, bias, _ = _case(torch.bfloat16, seed=2)
    raw_cl = raw.contiguous(memory_format=torch.channels_last)
    wide = torch.randn(2, 5, 7, 20, device=DEVICE)
    img_sliced = wide[..., 3:12]
    assert not img_sliced.is_contiguous() and raw_cl.stride(1) == 1
    ones = torch.ones(raw.shape, device=DEVICE).expand(raw.shape)
    fused = _grads(lambda i, r, b: skip_rgb(i, r, b, f, 1.0), img_sliced, raw_cl, bias, torch.ones(()).expand(
        raw.shape))
    oracle = _grads(_oracle(f, 1.0), img_sliced.contiguous(), raw, bias, ones)
    assert fused[0].is_contiguous(memory_format=torch.channels_last)  # the output follows the ToRGB output
    y = raw.float() + bias.view(1, -1, 1, 1)
    _check(fused, oracle, torch.bfloat16, (y.abs() <= 1.0).float().sum(dim=(0, 2, 3)))


def test_nan_and_the_clamp_bounds_behave_as_the_official_bias_act():
    """NaN passes through the clamp and gets no gradient; a value exactly at +-clamp gets none either
    (the official bias_act plugin passes the gradient where |y| < clamp)."""
    f = ops.setup_filter().to(DEVICE)
    img, raw, bias, grad = _case(torch.float32, seed=4)
    bias = torch.zeros_like(bias)
    raw[0, 0, 0, 0] = float("nan")
    raw[0, 1, 2, 3] = 1.5
    raw[1, 2, 4, 5] = -1.5
    fused = _grads(lambda i, r, b: skip_rgb(i, r, b, f, 1.5), img, raw, bias, grad)
    oracle = _grads(_oracle(f, 1.5), img, raw, bias, grad)
    assert torch.isnan(fused[0][0, 0, 0, 0]) and torch.isnan(oracle[0][0, 0, 0, 0])
    assert int(torch.isnan(fused[0]).sum()) == 1
    assert fused[2][0, 0, 0, 0] == 0 and fused[2][0, 1, 2, 3] == 0 and fused[2][1, 2, 4, 5] == 0
    assert fused[2][0, 1, 2, 4] == grad[0, 1, 2, 4] or abs(float(raw[0, 1, 2, 4])) >= 1.5
    probe = torch.tensor([1.5, -1.5], requires_grad=True)
    probe.clamp(-1.5, 1.5).sum().backward()
    if probe.grad.abs().sum() == 0:  # this torch's clamp excludes the bounds too: the reference path agrees
        torch.testing.assert_close(fused[2], oracle[2])
    else:
        keep = torch.ones_like(raw, dtype=torch.bool)
        keep[0, 1, 2, 3] = keep[1, 2, 4, 5] = False
        torch.testing.assert_close(fused[2][keep], oracle[2][keep])
    torch.testing.assert_close(fused[1], oracle[1], rtol=1e-6, atol=1e-5)


def test_torch_compile_traces_the_kernel_as_one_op():
    """Inside a compiled synthesis network the kernel is one opaque custom op: the whole function
    traces without a graph break (fullgraph) and AOTAutograd differentiates it through the op's
    registered backward."""
    f = ops.setup_filter().to(DEVICE)
    img, raw, bias, grad = _case(torch.bfloat16, seed=5)

    def block_tail(i, r, b):
        return ops.skip_rgb(i, r * 1.25, b, f, clamp=2.0, fused=True).square()

    compiled = torch.compile(block_tail, backend="aot_eager", fullgraph=True)
    eager = _grads(block_tail, img, raw, bias, grad)
    traced = _grads(compiled, img, raw, bias, grad)
    for a, b in zip(eager, traced):
        torch.testing.assert_close(b, a)


def test_the_generator_with_the_kernel_equals_the_official_blocks(tiny_generator):
    """The tiny generator's backbone and super-resolution with skip_path "triton": the same
    tri-planes, image and gradients (w.r.t. W+ and every trainable weight) as the official blocks."""
    import copy

    gen = copy.deepcopy(tiny_generator).to(DEVICE).requires_grad_(True)
    ws = torch.randn(2, gen.num_ws, gen.config.w_dim, generator=torch.Generator().manual_seed(6)).to(DEVICE)

    def run(skip_path):
        gen.set_skip_path(skip_path)
        gen.zero_grad(set_to_none=True)
        w = ws.clone().requires_grad_(True)
        planes = gen.backbone.synthesis(w, noise_mode="const")
        rgb = planes[:, :3, ::2, ::2].contiguous()  # a stand-in low-res image for the super-resolution
        img = gen.superresolution(rgb, planes[:, :gen.config.decoder_output_dim, ::2, ::2], w, noise_mode="const")
        (planes.square().mean() + img.square().mean()).backward()
        return planes.detach(), img.detach(), w.grad, {n: p.grad for n, p in gen.named_parameters()
                                                           if p.grad is not None}

    p0, i0, gw0, g0 = run("reference")
    p1, i1, gw1, g1 = run("triton")
    assert gen.skip_path == "triton" and gen.operators()["skip_path"] == "triton"
    torch.testing.assert_close(p1, p0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(i1, i0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw1, gw0, rtol=1e-4, atol=1e-7)
    assert g0.keys() == g1.keys() and any("torgb.bias" in n for n in g0)
    for name in g0:
        scale = g0[name].abs().max().clamp_min(1e-12)
        assert (g1[name] - g0[name]).abs().max() / scale < 1e-4, name
    gen.set_skip_path("reference")


def test_the_plan_decides_the_skip_path(monkeypatch):
    assert ExecutionPlan.resolve("cpu").skip_path == "reference"  # "auto": off until measured on a GPU
    assert ExecutionPlan.reference("cpu").skip_path == "reference"
    plan = ExecutionPlan.resolve("cpu", skip_path="triton")  # the interpreter counts as usable (tests)
    gen = build_generator("tiny", seed=0)
    plan.apply(gen)
    assert gen.skip_path == "triton" and "skip path triton" in plan.describe()
    gen.set_operators(**{"renderer": "reference", "upsample_conv": "reference", "skip_path": "reference"})
    assert gen.skip_path == "reference"
    with pytest.raises(InputError, match="skip_path"):
        gen.set_skip_path("fused")
    with pytest.raises(InputError, match="belong to the fast path"):
        ExecutionPlan.resolve("cpu", path="reference", skip_path="triton")
    with pytest.raises(InputError, match="unknown skip_path"):
        ExecutionPlan.resolve("cpu", skip_path="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="skip_path 'triton' needs a CUDA device"):
            ExecutionPlan.resolve("cpu", skip_path="triton")


def test_cli_skip_path_triton_without_cuda_is_one_line(monkeypatch, capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    from guide_fast.cli import main

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rc = main(["unlearn", "--generator", "tiny", "--random-nets", "--seed", "1", "--iters", "1", "--device", "cpu",
               "--skip-path", "triton", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "--skip-path triton needs a CUDA device" in err[0] and "--skip-path reference" in err[0]
    assert not (tmp_path / "run").exists()
    assert os.environ.get("TRITON_INTERPRET") is None


def test_many_programs_with_a_partial_last_block(monkeypatch):
    """Blocks that straddle planes and a partial last block (the interpreter's blocks made small;
    on a GPU 1024-element blocks already split these 2520 elements so)."""
    import importlib

    module = importlib.import_module("guide_fast.kernels.skip_path")

    monkeypatch.setattr(module, "_INTERPRETER_BLOCK_MAX", 64)
    f = ops.setup_filter().to(DEVICE)
    img, raw, bias, grad = _case(torch.bfloat16, seed=7)
    grid, block = module._launch(raw.numel())
    assert grid[0] > 1 and raw.numel() % block != 0
    fused = _grads(lambda i, r, b: skip_rgb(i, r, b, f, 1.5), img, raw, bias, grad)
    oracle = _grads(_oracle(f, 1.5), img, raw, bias, grad)
    y = raw.float() + bias.view(1, -1, 1, 1)
    _check(fused, oracle, torch.bfloat16, (grad.abs() * (y.abs() < 1.5)).sum(dim=(0, 2, 3)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (FFHQ sizes are too slow for the interpreter)")
def test_ffhq_sizes_on_the_gpu():
    """The backbone's b256 skip path at one identity's batch (31M elements, 30k programs) and the
    super-resolution's last block (fp16, clamp 256), against the fp32 official operators."""
    f = ops.setup_filter().to(DEVICE)
    for c, res, dtype, clamp in ((96, 256, torch.bfloat16, None), (3, 512, torch.float16, 256.0)):
        img, raw, bias, grad = _case(dtype, n=5, c=c, h=res // 2, w=res // 2, scale=100.0)
        fused = _grads(lambda i, r, b: skip_rgb(i, r, b, f, clamp), img, raw, bias, grad)
        oracle = _grads(_oracle(f, clamp), img, raw, bias, grad)
        y = raw.float() + bias.view(1, -1, 1, 1)
        live = (y.abs() < clamp) if clamp is not None else torch.ones_like(y, dtype=torch.bool)
        _check(fused, oracle, dtype, (grad.abs() * live).sum(dim=(0, 2, 3)))


def test_inductor_compiles_a_synthesis_block_around_the_kernel(tiny_generator, tmp_path, monkeypatch):
    """Inductor itself (its C++ backend here, Triton on a GPU) around the custom op: a whole
    synthesis block with the kernel in its skip path, forward and backward, equals the eager block."""
    import copy

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    gen = copy.deepcopy(tiny_generator).to(DEVICE)
    block = gen.backbone.synthesis.b8
    block.fused_skip = True
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, block.in_channels, 4, 4, generator=g).to(DEVICE)
    img = torch.randn(2, block.img_channels, 4, 4, generator=g).to(DEVICE)
    ws = torch.randn(2, 3, gen.config.w_dim, generator=g).to(DEVICE)

    def run(fn):
        xs = x.clone().requires_grad_(True)
        out = fn(xs, img, ws)
        out.square().sum().backward()
        return out.detach(), xs.grad

    def tail(xs, im, w):
        return block(xs, im, w, noise_mode="const", fused_modconv=False)[1]

    eager = run(tail)
    compiled = run(torch.compile(tail, backend="inductor", fullgraph=True))
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-4, atol=1e-5)
