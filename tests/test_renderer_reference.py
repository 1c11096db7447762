"""The reference renderer against independent per-ray re-derivations of docs/eg3d.md §4."""
import math

import pytest
import torch

from guide_fast import cameras
from guide_fast.eg3d.networks import OSGDecoder
from guide_fast.errors import InputError
from guide_fast.render import RenderOptions, RenderOutput, render_reference, render_triplanes, sample_rays
from guide_fast.render.reference import importance_depths, project_onto_planes, ray_march, sample_from_planes


def _softplus(x):
    return math.log1p(math.exp(x)) if x <= 20 else x


def naive_march(colors, sigmas, depths):
    """One ray, plain Python floats: MipRayMarcher2 (docs/eg3d.md §4.6)."""
    s = len(depths)
    weights, T = [], 1.0
    for i in range(s - 1):
        delta = depths[i + 1] - depths[i]
        sig = _softplus((sigmas[i] + sigmas[i + 1]) / 2 - 1)
        alpha = 1 - math.exp(-sig * delta)
        weights.append(alpha * T)
        T *= 1 - alpha + 1e-10
    rgb = [sum(w * (colors[i][k] + colors[i + 1][k]) / 2 for i, w in enumerate(weights)) * 2 - 1 for k in range(len(colors[0]))]
    W = sum(weights)
    depth = sum(w * (depths[i] + depths[i + 1]) / 2 for i, w in enumerate(weights)) / W
    return rgb, depth, weights


def naive_importance(depths, weights, u):
    """One ray: smoothing, +0.01, 45-bin support, inverse CDF (docs/eg3d.md §4.7), written as loops."""
    s = len(depths)
    m = [max(weights[k - 1] if k - 1 >= 0 else -math.inf, weights[k] if k < len(weights) else -math.inf) for k in range(s)]
    p = [(m[k] + m[k + 1]) / 2 + 0.01 for k in range(s - 1)]
    mids = [(depths[i] + depths[i + 1]) / 2 for i in range(s - 1)]
    w = [x + 1e-5 for x in p[1:-1]]
    total = sum(w)
    cdf = [0.0]
    for x in w:
        cdf.append(cdf[-1] + x / total)
    out = []
    for uu in u:
        idx = sum(1 for c in cdf if c <= uu)  # searchsorted right=True
        below, above = max(idx - 1, 0), min(idx, len(w))
        denom = cdf[above] - cdf[below]
        denom = 1.0 if denom < 1e-5 else denom
        out.append(mids[below] + (uu - cdf[below]) / denom * (mids[above] - mids[below]))
    return out


def test_compositing_and_importance_match_naive_loops():
    torch.manual_seed(0)
    n, r, s, f = 1, 5, 12, 4
    opts = RenderOptions(depth_resolution=s, depth_resolution_importance=7)
    depths = torch.sort(torch.rand(n, r, s, 1) * 1.0 + 2.25, dim=2).values.double()
    colors = torch.rand(n, r, s, f).double()
    sigmas = (torch.randn(n, r, s, 1) * 3).double()
    feat, depth, weights = ray_march(colors, sigmas, depths)
    u = torch.rand(n * r, 7).double()
    fine = importance_depths(depths, weights, u)
    for i in range(r):
        d = depths[0, i, :, 0].tolist()
        rgb, dep, w = naive_march(colors[0, i].tolist(), sigmas[0, i, :, 0].tolist(), d)
        assert feat[0, i].tolist() == pytest.approx(rgb, rel=1e-9, abs=1e-12)
        assert depth[0, i, 0].item() == pytest.approx(dep, rel=1e-9)
        assert weights[0, i, :, 0].tolist() == pytest.approx(w, rel=1e-9, abs=1e-15)
        # the official smoothing casts the weights to float32 (`.float()`), hence rel 1e-6
        assert fine[0, i, :, 0].tolist() == pytest.approx(naive_importance(d, w, u[i].tolist()), rel=1e-6)
        # the last midpoint interval is unreachable (docs/eg3d.md §4.7 step 5)
        mids = [(d[j] + d[j + 1]) / 2 for j in range(s - 1)]
        assert max(fine[0, i, :, 0].tolist()) <= mids[-2] + 1e-12
    assert opts.depth_resolution == s


def test_planes_xy_xz_zx_quirk_hits_the_right_texels():
    """A texel at (row r, col c) of plane k is hit at the world point of docs/eg3d.md §4.1."""
    C, H = 2, 8
    row, col = 3, 5
    u = (col + 0.5) / H - 0.5
    v = (row + 0.5) / H - 0.5
    other = 0.37  # the coordinate a plane ignores
    points = {0: (u, v, other), 1: (u, other, v), 2: (v, other, u)}  # XY, XZ, ZX
    for k, p in points.items():
        planes = torch.zeros(1, 3, C, H, H)
        planes[0, k, :, row, col] = torch.tensor([1.0, 2.0])
        out = sample_from_planes(planes, torch.tensor([[p]], dtype=torch.float32), box_warp=1.0)
        assert out.shape == (1, 3, 1, C)
        torch.testing.assert_close(out[0, k, 0], torch.tensor([1.0, 2.0]), atol=1e-6, rtol=0)
        others = [j for j in range(3) if j != k]
        assert out[0, others].abs().max() < 1e-6


def test_projection_equals_official_inverse_matrix_form():
    m = torch.tensor([[[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[1, 0, 0], [0, 0, 1], [0, 1, 0]], [[0, 0, 1], [1, 0, 0], [0, 1, 0]]],
                     dtype=torch.float32)
    p = torch.randn(2, 9, 3)
    official = torch.stack([(p @ torch.linalg.inv(m[k]))[..., :2] for k in range(3)], dim=1)
    torch.testing.assert_close(project_onto_planes(p), official)


def test_out_of_box_points_sample_zero_and_decode_bias_only():
    planes = torch.randn(1, 3, 4, 8, 8)
    far = torch.tensor([[[0.9, 0.9, 0.9], [-2.0, 0.0, 0.0]]])
    assert sample_from_planes(planes, far).abs().max() == 0
    dec = OSGDecoder(4, 8, 3)
    rgb, sigma = dec(sample_from_planes(planes, far))
    rgb0, sigma0 = dec(torch.zeros(1, 3, 2, 4))
    torch.testing.assert_close(rgb, rgb0)
    torch.testing.assert_close(sigma, sigma0)


def test_ray_sampler_centre_ray_and_unit_directions():
    c = cameras.frontal_label(1)
    o, d = sample_rays(c[:, :16].reshape(1, 4, 4), c[:, 16:].reshape(1, 3, 3), 4)
    assert o.shape == d.shape == (1, 16, 3)
    torch.testing.assert_close(d.norm(dim=-1), torch.ones(1, 16))
    torch.testing.assert_close(o[0, 0], torch.tensor([0.0, 0.0, 2.7]), atol=1e-5, rtol=0)
    mean_dir = d[0].mean(0)
    assert mean_dir[2] < -0.99  # looking towards -Z
    # pixel (row 0, col 0) is top-left: it points to -x (left) and +y (up) in the world
    assert d[0, 0, 0] < 0 and d[0, 0, 1] > 0


def test_render_triplanes_reference_entry_point():
    torch.manual_seed(0)
    planes = torch.randn(2, 3, 8, 16, 16)
    dec = OSGDecoder(8, 16, 8)
    c = cameras.pose_label(torch.tensor([0.0, 0.1]), -0.2)
    o, d = sample_rays(c[:, :16].reshape(2, 4, 4), c[:, 16:].reshape(2, 3, 3), 6)
    opts = RenderOptions(depth_resolution=10, depth_resolution_importance=6)
    draws = {"stratified": torch.rand(2, 36, 10, 1), "importance": torch.rand(72, 6)}
    feat, depth, wsum = render_triplanes(planes, dec, o, d, options=opts, render_draws=draws, backend="reference")
    ref = render_reference(planes, dec.effective_params(), o, d, draws["stratified"], draws["importance"], opts)
    assert isinstance(ref, RenderOutput)
    assert feat.shape == (2, 36, 8) and depth.shape == wsum.shape == (2, 36, 1)
    assert torch.equal(feat, ref[0]) and torch.equal(depth, ref[1]) and torch.equal(wsum, ref[2])
    assert (wsum <= 1 + 1e-5).all() and (wsum >= 0).all()
    with pytest.raises(InputError, match="planes"):
        render_triplanes(planes[0], dec, o, d, options=opts, backend="reference")
    with pytest.raises(InputError, match="backend"):
        render_triplanes(planes, dec, o, d, options=opts, backend="vulkan")


def test_unsupported_render_options_are_refused_clearly():
    with pytest.raises(InputError, match="clamp_mode"):
        RenderOptions.from_kwargs(dict(ray_start=2.25, ray_end=3.3, depth_resolution=4, depth_resolution_importance=4,
                                       box_warp=1, clamp_mode="relu"))
    with pytest.raises(InputError, match="ray_end"):
        RenderOptions.from_kwargs(dict(ray_start=3.0, ray_end=2.0, depth_resolution=4, depth_resolution_importance=4, box_warp=1))
    with pytest.raises(InputError, match="depth_resolution"):
        RenderOptions(depth_resolution=3, depth_resolution_importance=4).validate()
    with pytest.raises(InputError, match="box_warp"):
        RenderOptions.from_kwargs(dict(ray_start=2.25, ray_end=3.3, depth_resolution=4))


def test_decoder_module_equals_its_official_layers():
    """OSGDecoder.forward (the renderers' functional `decode` on effective_params) is bit for bit
    the official Sequential FC -> softplus -> FC with the widened sigmoid (docs/eg3d.md §4.3)."""
    torch.manual_seed(1)
    dec = OSGDecoder(6, 12, 5, lr_multiplier=0.5)
    with torch.no_grad():
        for p in dec.parameters():
            p.normal_()
    feats = torch.randn(2, 3, 7, 6)
    rgb, sigma = dec(feats)
    x = dec.net(feats.mean(1).reshape(14, 6)).reshape(2, 7, -1)
    assert torch.equal(sigma, x[..., :1])
    assert torch.equal(rgb, torch.sigmoid(x[..., 1:]) * 1.002 - 0.001)
