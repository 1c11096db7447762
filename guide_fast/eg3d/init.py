"""A structured initialisation for the built-in `tiny` preset: random weights whose renders
look like something (an opaque, shaded, head-sized body in front of a backdrop, with colours
that depend on the latent).

Why: a plainly random EG3D renders an almost transparent volume (ray weights sum to a few
percent, docs/eg3d.md §4.6), so every view of every latent looks the same and the demo could not
show that unlearning moves one identity and leaves the others. Only the initial *values* change:
the architecture, the state-dict names and shapes and every code path are the preset's own, and
the FFHQ preset never comes here (build_generator applies this to "tiny" only).

How (ordinary weights of the official layout, so GUIDE fine-tunes them like any others):

* **Fields in the planes.** Channels 0-8 of `b4.const` ("carriers") hold fixed 4x4 patterns:
  ones, one body pattern per plane, two shading patterns and three "tone" patterns (ones).
  `b4.conv1` passes them through unchanged (a centre-tap identity kernel: demodulation cancels
  the style, docs/eg3d.md §3.2), and `b4.torgb` writes them into three prior channels of every
  plane; the skip path's [1,3,3,1] upsampler (§3.2) carries them smoothly to the plane
  resolution. The 4x4 patterns are least-squares fits, through that upsampler, of the wanted
  fields. The later blocks' ToRGBs write nothing into the prior channels.
* **Prior channels**, after the decoder's mean over the three planes (§4.1: the plane axes are
  (x,y), (x,z), (z,x); §4.3): f0, a smooth bump, above 1 inside an ellipsoid of semi-axes
  HEAD_SEMI_AXES (each plane holds its two axes' share of the quadratic); f1 = 1 inside the
  [-0.5, 0.5]^3 box (the last ToRGB's bias: exactly constant in the plane, so it falls to 0 just
  outside the box, where grid_sample's zero padding gives zero features, §4.2); f2 = p . LIGHT.
* **Colour channels** (the other five per plane) carry the latent: the tone carriers enter
  `b4.torgb` through latent-dependent styles (a colour per latent), and the later blocks'
  random ToRGBs add latent-dependent texture (rescaled to TEXTURE_STD on a few latents).
* **Decoder** (`decoder.net`, C -> hidden -> 1 + F): hidden unit 0 = softplus(K_HEAD (f0 - 1))
  (the body), unit 1 = softplus(K_WALL (0.8 - f1)) (a backdrop where rays leave the box: EG3D's
  FFHQ renders have an opaque background too), and pairs softplus(f), softplus(-f) pass f2 ..
  f(C-1) through linearly. Raw density = BODY_GAIN h0 + WALL_GAIN h1 - DENSITY_OFFSET: after
  the marcher's softplus(sigma - 1) (§4.6) that is about 0.02 in empty space and 40-60 inside the
  body and beyond the box, so rays stop at the body's surface or at the backdrop. Colour logits = M (colour features) + SHADE f2 + bias: the
  shade term is Lambertian for a body centred at the origin (its normal is about p/|p|), so
  the body looks lit from LIGHT; the backdrop (zero features) takes the bias colour.
* **Super-resolution** ToRGB weights are scaled by SR_TORGB_SCALE so that the final image is
  mostly the (upsampled) rendered colour rather than the random SR network's own output.

tests/test_demo.py checks the result: the mean ray weight sum of renders of several seeds and
yaws is above OPACITY_BOUND, and different seeds render visibly different images.
"""
from __future__ import annotations

import math

import torch

from ..errors import InputError
from . import ops

# the body: semi-axes (x = width, y = height, z = depth) in box units (the box is [-0.5, 0.5]^3;
# the frontal camera at radius 2.7 sees about +-0.32 at the origin)
HEAD_SEMI_AXES = (0.20, 0.25, 0.22)
# light direction of the baked-in shading (world axes: +y is up in the image, +z faces the
# frontal camera, +x is to the image's right)
LIGHT = (-0.4, 0.55, 0.73)
K_HEAD = 6.0        # steepness of the body's density edge (per unit of f0)
K_WALL = 40.0       # steepness of the backdrop's edge (per unit of f1)
# raw density = BODY_GAIN h0 + WALL_GAIN h1 - DENSITY_OFFSET: about 40 in the body's core and
# 60 beyond the box, so that a ray's optical depth stays below ~20 (its transmittance then
# never reaches fp32's denormal range, which would slow every CPU step down)
BODY_GAIN = 8.0
WALL_GAIN = 4.0
DENSITY_OFFSET = 3.0
SHADE = 10.0        # colour logits per unit of p . LIGHT (|p| ~ 0.2 on the surface)
TONE_STD = 0.6      # spread over latents of the per-latent colour (feature units)
TEXTURE_STD = 1.0   # spread of the latent-dependent texture (feature units, per plane)
TEXTURE_BLOCK_WEIGHTS = {8: 1.0, 16: 0.6, 32: 0.35}  # coarse blobs first, finer detail weaker
SHAPE_STYLE_STD = 0.08  # per-latent variation of the body's proportions (its carriers' styles)
BACKDROP_DROP = 1.0  # how far the box field of planes 1 and 2 drops at the back (the backdrop from z ~ -0.3)
WALL_LEVEL = 0.6     # the backdrop where f1 < WALL_LEVEL
SR_TORGB_SCALE = 0.1
# robustness to fine-tuning: Adam moves every weight by about lr per step, zeros included. The
# carriers are CARRIER_GAIN x their patterns and conv1's identity tap is IDENTITY_TAP (the
# demodulation cancels both), so that what such steps mix into them stays small beside them.
CARRIER_GAIN = 5.0
IDENTITY_TAP = 10.0
SKIN_RGB = (0.76, 0.56, 0.46)     # mean body colour before the latent's tone and texture
BACKDROP_RGB = (0.34, 0.40, 0.50)
OPACITY_BOUND = 0.9  # mean ray weight sum of every render (tests/test_demo.py)
INIT_NAME = "structured-tiny-v1"

_ONES, _BODY, _SHADE, _TONE, _BACK = 0, (1, 2, 3), (4, 5), (6, 7, 8), (9, 10)
_CARRIERS = 11  # b4 channels holding the fixed patterns
_PRIOR = 3     # plane channels 0..2: body, box, shade


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _check_fits(gen) -> None:
    cfg = gen.config
    b4 = gen.backbone.synthesis.b4
    c = cfg.plane_channels
    need_hidden = 2 + 2 * (c - 2)
    problems = []
    if c < 4:
        problems.append(f"plane_channels {c} < 4")
    if b4.const.shape[0] <= _CARRIERS:
        problems.append(f"b4 has {b4.const.shape[0]} channels, needs more than {_CARRIERS}")
    if cfg.decoder_hidden < need_hidden:
        problems.append(f"decoder_hidden {cfg.decoder_hidden} < {need_hidden}")
    if cfg.decoder_output_dim < 3:
        problems.append(f"decoder_output_dim {cfg.decoder_output_dim} < 3")
    if problems:
        raise InputError("the structured initialisation does not fit this generator: " + "; ".join(problems))


def _texel_coords(res: int, device=None) -> torch.Tensor:
    return (torch.arange(res, dtype=torch.float32, device=device) + 0.5) / res - 0.5


def _upsampled_basis(syn) -> torch.Tensor:
    """[16, R, R]: each b4 texel's pattern as the skip path delivers it at the plane resolution."""
    r4 = syn.b4.const.shape[-1]
    x = torch.eye(r4 * r4, device=syn.b4.const.device).reshape(1, r4 * r4, r4, r4)
    for _ in syn.block_resolutions[1:]:
        x = ops.upsample2d(x, syn.b4.resample_filter)
    return x[0]


def _fit(basis: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The 4x4 pattern whose upsampled field is closest (least squares) to target [R, R]."""
    a = basis.reshape(basis.shape[0], -1).T
    sol = torch.linalg.lstsq(a, target.reshape(-1, 1)).solution[:, 0]
    r4 = int(round(math.sqrt(basis.shape[0])))
    return sol.reshape(r4, r4)


def _sample_planes(fields: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """fields [K, R, R] (the same in each plane) at points [M, 3] projected onto the three
    planes as the renderer does (docs/eg3d.md §4.1-4.2) -> [3, K, M]."""
    import torch.nn.functional as F

    coords = torch.stack([points[:, [0, 1]], points[:, [0, 2]], points[:, [2, 0]]]) * 2  # box_warp 1
    grid = coords[:, None]                                                              # [3, 1, M, 2]
    planes = fields[None].expand(3, -1, -1, -1)
    return F.grid_sample(planes, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, :, 0]


def _body_fields(basis: torch.Tensor, patterns: list) -> torch.Tensor:
    return torch.stack([(basis * p.reshape(-1, 1, 1)).sum(0) for p in patterns])


def _body_extents(basis: torch.Tensor, patterns: list, samples: int = 201) -> list:
    """Where the fitted f0 = mean over the planes falls to 1 along +x, +y and +z."""
    fields = _body_fields(basis, patterns)
    t = torch.linspace(0, 0.5, samples, device=basis.device)
    out = []
    for axis in range(3):
        pts = torch.zeros(samples, 3, device=basis.device)
        pts[:, axis] = t
        s = _sample_planes(fields, pts)
        f0 = torch.stack([s[k, k] for k in range(3)]).mean(0)
        outside = (f0 < 1).nonzero()
        out.append(float(t[outside[0, 0]]) if outside.numel() else 0.5)
    return out


def _fit_body(basis: torch.Tensor, grid: int = 21, rounds: int = 6) -> list:
    """The three planes' 4x4 body patterns whose mean over the planes best fits (ridge least
    squares on a grid of points in the box) f0 = 2 - (x/a)^2 - (y/b)^2 - (z/c)^2, floored at -1
    so that the fit spends itself near the body rather than on the box's corners. (a, b, c)
    are adjusted over a few rounds so that the fitted body (f0 > 1) has HEAD_SEMI_AXES."""
    t = torch.linspace(-0.5, 0.5, grid, device=basis.device)
    pts = torch.stack(torch.meshgrid(t, t, t, indexing="ij"), -1).reshape(-1, 3)
    a = _sample_planes(basis, pts) / 3                       # [3, 16, M]
    a = a.permute(2, 0, 1).reshape(pts.shape[0], -1).cpu().double()
    # planes 1 and 2 see the same two axes, so the system is rank-deficient: a small ridge
    gram = a.T @ a
    gram = gram + 1e-3 * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    r4 = int(round(math.sqrt(basis.shape[0])))
    axes = list(HEAD_SEMI_AXES)
    for _ in range(rounds):
        X, Y, Z = axes
        target = (2 - (pts[:, 0] / X) ** 2 - (pts[:, 1] / Y) ** 2 - (pts[:, 2] / Z) ** 2).clamp_min(-1.0)
        sol = torch.linalg.solve(gram, a.T @ target.cpu().double())
        patterns = [p.reshape(r4, r4).to(basis) for p in sol.reshape(3, -1)]
        got = _body_extents(basis, patterns)
        axes = [min(max(ax * math.sqrt(want / max(g, 1e-3)), 0.05), 0.45) for ax, want, g in zip(axes, HEAD_SEMI_AXES, got)]
    return patterns


@torch.no_grad()
def apply_structured_init(gen, calibration_latents: int = 16) -> None:
    """Overwrite `gen`'s synthesis, decoder and super-resolution weights in place with the
    structured initialisation this module describes.

    Draws from torch's global generator (build_generator seeds and forks it). The mapping network
    is left as it is (w_avg is unaffected); the tone and texture spreads are calibrated on
    `calibration_latents` mapped latents.
    """
    from .. import cameras

    _check_fits(gen)
    cfg = gen.config
    syn = gen.backbone.synthesis
    b4 = syn.b4
    C = cfg.plane_channels
    n_colour = C - _PRIOR
    dev = b4.const.device
    res = cfg.plane_resolution

    # --- the wanted fields at the plane resolution (row = v, column = u)
    t = _texel_coords(res, dev)
    v, u = torch.meshgrid(t, t, indexing="ij")
    lx, ly, lz = LIGHT
    norm = math.sqrt(lx * lx + ly * ly + lz * lz)
    lx, ly, lz = lx / norm, ly / norm, lz / norm
    # plane 0 holds (u, v) = (x, y), plane 1 (x, z) (docs/eg3d.md §4.1); windowed to the
    # body's neighbourhood so that the backdrop (where rays leave the box) is not shaded
    window = torch.exp(-((u**2 + v**2) / 0.4**2) ** 3)
    shade = [3 * (lx * u + ly * v) * window, 3 * lz * v * window]

    # --- b4.const: the carriers' 4x4 patterns, kept positive for conv1's leaky ReLU; the
    # offset goes back through the ones carrier in ToRGB
    basis = _upsampled_basis(syn)
    patterns = {_ONES: torch.ones_like(b4.const[0])}
    for k, pat in zip(_BODY, _fit_body(basis)):
        patterns[k] = pat
    for k, f in zip(_SHADE, shade):
        patterns[k] = _fit(basis, f)
    # the backdrop: the box field of planes 1 and 2 (the two that hold z) drops towards the
    # back, through their 4x4 texels at z = -0.375 (row 0 of plane 1, column 0 of plane 2)
    back = torch.zeros(2, *b4.const.shape[-2:], device=dev)
    edge = torch.tensor([1.6, 1.0, 1.0, 1.6], device=dev)  # stronger at the sides, where zero padding fades it
    back[0, 0, :] = edge
    back[1, :, 0] = edge
    patterns[_BACK[0]], patterns[_BACK[1]] = back[0], back[1]
    offsets = {}
    for k, pat in patterns.items():
        offsets[k] = 0.0 if k == _ONES else float(pat.min()) - 0.1
        b4.const[k] = (pat - offsets[k]) * CARRIER_GAIN
    for k in _TONE:
        b4.const[k] = CARRIER_GAIN
        offsets[k] = 0.0
    # --- b4.conv1: carriers pass through (centre tap only; their styles fixed at 1)
    conv = b4.conv1
    conv.weight[:_CARRIERS] = 0
    for i in range(_CARRIERS):
        conv.weight[i, i, 1, 1] = IDENTITY_TAP
    conv.affine.weight[:_CARRIERS] = 0
    conv.affine.bias[:_CARRIERS] = 1.0
    conv.bias[:_CARRIERS] = 0
    # after conv1 a carrier is sqrt(2) CARRIER_GAIN x its pattern (lrelu gain); ToRGB's style
    # is affine / sqrt(I), so a fixed style of 1 and a weight of coef * unit write coef x the pattern
    rgb = b4.torgb
    n_in = rgb.weight.shape[1]
    unit = math.sqrt(n_in) / (math.sqrt(2.0) * CARRIER_GAIN)
    w_dim = rgb.affine.weight.shape[1]
    rgb.affine.weight[:_CARRIERS] = 0
    rgb.affine.bias[:_CARRIERS] = 1.0
    # the body's proportions vary a little per latent; the tones a lot
    rgb.affine.weight[list(_BODY)] = torch.randn(len(_BODY), w_dim, device=dev) * SHAPE_STYLE_STD
    rgb.affine.weight[list(_TONE)] = torch.randn(len(_TONE), w_dim, device=dev)
    W = torch.zeros_like(rgb.weight[:, :, 0, 0])
    for p in range(3):
        W[p * C + 0, _BODY[p]] = unit
        W[p * C + 0, _ONES] = offsets[_BODY[p]] * unit
        if p < len(_SHADE):
            W[p * C + 2, _SHADE[p]] = unit
            W[p * C + 2, _ONES] = offsets[_SHADE[p]] * unit
        if p > 0:
            W[p * C + 1, _BACK[p - 1]] = -BACKDROP_DROP * unit
            W[p * C + 1, _ONES] = -BACKDROP_DROP * offsets[_BACK[p - 1]] * unit
        W[p * C + _PRIOR:(p + 1) * C, list(_TONE)] = torch.randn(n_colour, len(_TONE), device=dev)
    rgb.weight.copy_(W[:, :, None, None])  # random backbone channels: no colour at b4
    rgb.bias.zero_()
    later = [getattr(syn, f"b{r}") for r in syn.block_resolutions[1:]]
    for blk in later:  # nothing into the prior channels, nothing from the carrier slots
        w = blk.torgb.weight
        for p in range(3):
            w[p * C:p * C + _PRIOR] = 0
        w[:, :_CARRIERS] = 0
        blk.torgb.bias.zero_()

    # --- calibrate the tone and texture spreads on a few latents
    z = torch.randn(calibration_latents, cfg.z_dim, device=dev)
    ws = gen.mapping(z, cameras.frontal_label(calibration_latents, device=dev))
    colour = [p * C + k for p in range(3) for k in range(_PRIOR, C)]
    blocks = [b4] + later
    orig = {b: b.torgb.weight.clone() for b in blocks}

    def contribution(only):  # the colour channels as one block's ToRGB alone writes them
        for b in blocks:
            if b is only:
                b.torgb.weight.copy_(orig[b])
            else:
                b.torgb.weight.zero_()
        return syn(ws, noise_mode="const")[:, colour]

    tone = contribution(b4).mean((2, 3))                          # [N, 3 * n_colour]
    gains = {b4: TONE_STD / tone.std(0).mean().clamp_min(1e-6)}
    mean_tone = (tone.mean(0) * gains[b4]).view(3, n_colour)
    for r, blk in zip(syn.block_resolutions[1:], later):
        part = contribution(blk)
        std = (part - part.mean((0, 2, 3), keepdim=True)).std().clamp_min(1e-6)
        gains[blk] = TEXTURE_STD * TEXTURE_BLOCK_WEIGHTS.get(r, 0.3) / std
    for b in blocks:
        b.torgb.weight.copy_(orig[b])
        b.torgb.weight[colour] *= gains[b]

    # --- decoder (FullyConnectedLayer stores weight / gain: divide the wanted effective values)
    fc0, fc2 = gen.decoder.net[0], gen.decoder.net[2]
    W0 = torch.zeros(fc0.out_features, fc0.in_features, device=dev)
    b0 = torch.zeros(fc0.out_features, device=dev)
    W0[0, 0], b0[0] = K_HEAD, -K_HEAD * 1.0
    W0[1, 1], b0[1] = -K_WALL, K_WALL * WALL_LEVEL
    passthrough = list(range(2, C))  # f2 (shade) and the colour features
    for j, f in enumerate(passthrough):
        W0[2 + 2 * j, f] = 1.0
        W0[3 + 2 * j, f] = -1.0
    out_dim = fc2.out_features - 1
    W2 = torch.zeros(fc2.out_features, fc2.in_features, device=dev)
    b2 = torch.zeros(fc2.out_features, device=dev)
    W2[0, 0], W2[0, 1], b2[0] = BODY_GAIN, WALL_GAIN, -DENSITY_OFFSET
    # colour features -> outputs: RGB mostly from the first three colour features (so that the
    # skin offset below stays small), a little mixing; the other outputs (the SR's extra
    # features) random
    M = torch.randn(out_dim, n_colour, device=dev) / math.sqrt(n_colour)
    M[:3] = torch.eye(3, n_colour, device=dev) + 0.3 * M[:3]
    base = torch.randn(out_dim, device=dev) * 0.5
    base[:3] = torch.tensor([_logit(b) for b in BACKDROP_RGB], device=dev)
    shade_w = torch.randn(out_dim, device=dev) * SHADE / 2
    shade_w[:3] = SHADE
    for j, f in enumerate(passthrough):
        col = shade_w if f == 2 else M[:, f - _PRIOR]
        W2[1:, 2 + 2 * j] = col
        W2[1:, 3 + 2 * j] = -col
    b2[1:] = base
    fc0.weight.copy_(W0 / fc0.weight_gain)
    fc0.bias.copy_(b0 / fc0.bias_gain)
    fc2.weight.copy_(W2 / fc2.weight_gain)
    fc2.bias.copy_(b2 / fc2.bias_gain)
    # the body's colour: colour channels += offset x the body field (so the offset is the
    # body's at its surface, where f0 = 1, and its opposite on the backdrop, where f0 < 0), with
    # M_rgb (offset) = skin logits - backdrop logits; the tone's mean over latents removed
    skin = torch.tensor([_logit(s) - _logit(b) for s, b in zip(SKIN_RGB, BACKDROP_RGB)], device=dev)
    offset = torch.linalg.lstsq(M[:3], skin[:, None]).solution[:, 0]   # [n_colour]
    last = later[-1] if later else b4
    for p in range(3):
        rows = slice(p * C + _PRIOR, (p + 1) * C)
        rgb.weight[rows, _BODY[p], 0, 0] += offset * unit
        rgb.weight[rows, _ONES, 0, 0] += offset * offsets[_BODY[p]] * unit
        last.torgb.bias[rows] = -mean_tone[p]
        last.torgb.bias[p * C + 1] = 1.0                              # the box field f1

    # --- super-resolution: mostly the rendered colour
    for name, m in gen.superresolution.named_modules():
        if name.endswith("torgb"):
            m.weight.mul_(SR_TORGB_SCALE)
