"""Fused tri-plane volume renderer (EG3D's ImportanceRenderer) in Triton, forward and backward.

Read top to bottom: the per-sample building blocks, the forward kernel, the depth-finalize
kernel, the backward kernel, the launchers, the autograd Function and `fused_render`.

Semantics are those of `guide_fast.render.reference.render_reference` (docs/eg3d.md §4.1-4.7),
draw for draw, with the same arguments and the same `RenderOutput`; the inputs are checked once,
by `guide_fast.render.render_triplanes`, and trusted here. What differs is where the data lives. A program owns BLOCK_R rays of one image
and marches them; sample points, sampled features and MLP activations exist only in
registers. Global memory sees the inputs, the per-ray outputs and two small per-ray
by-products: the sorted fine depths [N, R, S_imp] (read back by the merge, and by the
backward pass instead of re-running the coarse pass) and the weighted depth sum [N, R] (to
recompute the depth clamp's mask).

Forward, one render = 3 launches (docs/eg3d.md §4.5-4.7):
  1. a channels-last copy of the planes (torch), so one bilinear corner is C contiguous values;
  2. `_triplane_render_forward_kernel`:
     a. coarse pass: sigma only (layer 1 + the sigma row of layer 2) at the S stratified
        depths, marched on the fly into the coarse weights; the pooled importance weights and
        the bin midpoints are kept in [BLOCK_R, S_PAD] registers;
     b. inverse-CDF sampling in registers; since the inverse CDF is monotone in u, ranking
        the uniforms sorts the fine depths, which are stored (then a CTA barrier);
     c. the final march visits the merge of the two sorted lists (coarse by index, fine by
        rank) in depth order, evaluating the full decoder once per sample and compositing
        front to back, so colours are never permuted nor stored;
  3. `_depth_finalize_kernel`: depth = D / W, nan_to_num, clamp to the GLOBAL min/max of the
     batch's sample depths (docs/eg3d.md §4.6 step 5), reduced from per-program partial bounds.

Backward, by recomputation: `_triplane_render_backward_kernel` re-marches the same merged
sample sequence, re-evaluates the decoder per sample, and uses the suffix-sum form of the
transmittance gradient, with the suffix taken from the forward's per-ray totals. The planes
gradient is scattered with fp32 atomics into a channels-last buffer; the decoder gradients
are per-program partial sums added atomically at the end.
"""
from __future__ import annotations

import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from guide_fast.errors import InputError
from guide_fast.render.types import DecoderWeights, RenderOptions, RenderOutput

from ._triton_helpers import linspace_at, sigmoid, softplus, softplus_grad, triplane_features, triplane_scatter


# --------------------------------------------------------------------------- kernels
_DO_NOT_SPECIALIZE = ["R", "PH", "PW", "HID", "F", "S", "S_IMP"]


@triton.jit
def _decode_sample(img_ptr, t, ox, oy, oz, dx, dy, dz, coord_scale, rmask, offs_c, cmask, C, PH, PW,
                   w0t, b0, w1s, b1s, w1ct, b1c, DOT_PRECISION: tl.constexpr):
    """Tri-plane sample + OSGDecoder at depth t of each ray (docs/eg3d.md §4.2-4.3).

    p = o + t d; coords = p * 2 / box_warp; feat = mean of 3 bilinear samples [BLOCK_R, C];
    hpre = feat @ W0^T + b0; a = softplus(hpre); sigma = a . W1[0] + b1[0] (raw);
    colour logits oc = a @ W1[1:]^T + b1[1:]. Returns (feat, hpre, sigma, sigmoid(oc));
    the colour is sigmoid(oc) * 1.002 - 0.001.
    """
    px = (ox + t * dx) * coord_scale
    py = (oy + t * dy) * coord_scale
    pz = (oz + t * dz) * coord_scale
    feat = triplane_features(img_ptr, px, py, pz, rmask, offs_c, cmask, C, PH, PW)
    hpre = tl.dot(feat, w0t, input_precision=DOT_PRECISION) + b0[None, :]
    a = softplus(hpre)
    sigma = tl.sum(a * w1s[None, :], axis=1) + b1s
    oc = tl.dot(a, w1ct, input_precision=DOT_PRECISION) + b1c[None, :]
    return feat, hpre, sigma, sigmoid(oc)

@triton.jit
def _decode_sigma(img_ptr, t, ox, oy, oz, dx, dy, dz, coord_scale, rmask, offs_c, cmask, C, PH, PW,
                  w0t, b0, w1s, b1s, DOT_PRECISION: tl.constexpr):
    """Raw density only: layer 1 and the sigma row of layer 2 (the coarse pass needs no colour)."""
    px = (ox + t * dx) * coord_scale
    py = (oy + t * dy) * coord_scale
    pz = (oz + t * dz) * coord_scale
    feat = triplane_features(img_ptr, px, py, pz, rmask, offs_c, cmask, C, PH, PW)
    a = softplus(tl.dot(feat, w0t, input_precision=DOT_PRECISION) + b0[None, :])
    return tl.sum(a * w1s[None, :], axis=1) + b1s

@triton.jit
def _next_sample(strat_ptr, fine_ptr, gray, rmask, ic, jf, ray_start, ray_end, jitter, S, S_IMP):
    """Depth of the next sample in merged order (docs/eg3d.md §4.7 step 7).

    Both lists are sorted: coarse depths by construction (§4.5), fine depths by rank. The
    merge takes the coarse head at ties, as the stable sort of [coarse, fine] does; a tie
    is a repeated point, so either order composites the same. Returns (t, ic, jf).
    Both heads are gathered from memory (L1-resident): a register-resident list would be
    read with a [BLOCK_R, S_imp] select-and-reduce whose layout Triton then propagates
    into every texel load of the step (three layout conversions per corner, measured in
    the compiled IR).
    """
    has_c = ic < S
    u = tl.load(strat_ptr + gray * S + ic, mask=rmask & has_c, other=0.0)
    t_c = linspace_at(ic, ray_start, ray_end, S) + u * jitter
    t_f = tl.load(fine_ptr + gray * S_IMP + jf, mask=rmask & (jf < S_IMP), other=0.0)
    take_c = has_c & ((jf >= S_IMP) | (t_c <= t_f))
    t = tl.where(take_c, t_c, t_f)
    ic = ic + take_c.to(tl.int32)
    jf = jf + (1 - take_c.to(tl.int32))
    return t, ic, jf

@triton.jit
def _load_decoder(w0_ptr, b0_ptr, w1_ptr, b1_ptr, offs_c, offs_h, offs_f, C, HID, F):
    """Effective decoder weights, zero-padded to powers of two so tl.dot is legal.

    w0t [C_PAD, HID_PAD] = W0^T; w1s [HID_PAD] = W1[0]; w1ct [HID_PAD, F_PAD] = W1[1:]^T.
    Padded hidden units see softplus(0) = log 2 but meet zero rows of W1: no effect.
    """
    cm = offs_c < C
    hm = offs_h < HID
    fm = offs_f < F
    w0t = tl.load(w0_ptr + offs_h[None, :] * C + offs_c[:, None], mask=cm[:, None] & hm[None, :], other=0.0)
    b0 = tl.load(b0_ptr + offs_h, mask=hm, other=0.0)
    w1s = tl.load(w1_ptr + offs_h, mask=hm, other=0.0)
    b1s = tl.load(b1_ptr)
    w1ct = tl.load(w1_ptr + (1 + offs_f[None, :]) * HID + offs_h[:, None], mask=hm[:, None] & fm[None, :],
                   other=0.0)
    b1c = tl.load(b1_ptr + 1 + offs_f, mask=fm, other=0.0)
    return w0t.to(tl.float32), b0.to(tl.float32), w1s.to(tl.float32), b1s.to(tl.float32), \
        w1ct.to(tl.float32), b1c.to(tl.float32)

@triton.jit
def _load_rays(origins_ptr, dirs_ptr, gray, rmask):
    """Origin and direction components of the rays `gray` ([N*R, 3] rows; 0 for masked rays)."""
    ox = tl.load(origins_ptr + gray * 3 + 0, mask=rmask, other=0.0)
    oy = tl.load(origins_ptr + gray * 3 + 1, mask=rmask, other=0.0)
    oz = tl.load(origins_ptr + gray * 3 + 2, mask=rmask, other=0.0)
    dx = tl.load(dirs_ptr + gray * 3 + 0, mask=rmask, other=0.0)
    dy = tl.load(dirs_ptr + gray * 3 + 1, mask=rmask, other=0.0)
    dz = tl.load(dirs_ptr + gray * 3 + 2, mask=rmask, other=0.0)
    return ox, oy, oz, dx, dy, dz

# Sizes that vary from call to call are not specialised on (each value % 16 would be a new
# compilation of ~10 s); C is, so that texel rows are known to be 16-byte aligned.
@triton.jit(do_not_specialize=_DO_NOT_SPECIALIZE)
def _triplane_render_forward_kernel(
    planes_ptr, w0_ptr, b0_ptr, w1_ptr, b1_ptr,
    origins_ptr, dirs_ptr, strat_ptr, imp_ptr,
    feat_out_ptr, wsum_ptr, dsum_ptr, fine_ptr, bounds_ptr,
    R, PH, PW, C, HID, F, S, S_IMP,
    ray_start, ray_end, jitter, coord_scale, white_back,
    S_PAD: tl.constexpr, SI_PAD: tl.constexpr, C_PAD: tl.constexpr, HID_PAD: tl.constexpr,
    F_PAD: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Coarse pass, importance sampling and the final composite for BLOCK_R rays of image n.

    Coarse (§4.5-4.6): t_s = linspace(start, end, S)_s + u_s * jitter; interval i has
    delta_i = t_{i+1} - t_i, sbar_i = softplus((sigma_i + sigma_{i+1}) / 2 - 1),
    alpha_i = 1 - exp(-sbar_i delta_i), T_i = prod_{j<i} (1 - alpha_j + 1e-10), w_i = alpha_i T_i.
    Importance (§4.7): m_k = max(w_{k-1}, w_k), p_k = (m_k + m_{k+1}) / 2, pdf weights
    p_1 .. p_{S-3} (+0.01, then +1e-5), bins = coarse midpoints, cdf = [0, cumsum(pdf)],
    searchsorted(right=True) with the given uniforms, below/above clamps, denom < 1e-5 -> 1.
    Final (§4.6): the same march over all S + S_imp samples in depth order; writes
    rgb = sum w_i cbar_i as 2 rgb - 1 (+ white back), W = sum w_i and D = sum w_i tbar_i.
    """
    pid_r = tl.program_id(0)
    n = tl.program_id(1)
    rays = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rays < R
    gray = n.to(tl.int64) * R + rays  # int64: N * R * S may pass 2^31 for big batches
    img_ptr = planes_ptr + n.to(tl.int64) * (3 * PH * PW * C)

    offs_c = tl.arange(0, C_PAD)
    offs_h = tl.arange(0, HID_PAD)
    offs_f = tl.arange(0, F_PAD)
    offs_s = tl.arange(0, S_PAD)
    offs_i = tl.arange(0, SI_PAD)
    cmask = offs_c < C
    w0t, b0, w1s, b1s, w1ct, b1c = _load_decoder(w0_ptr, b0_ptr, w1_ptr, b1_ptr, offs_c, offs_h, offs_f,
                                                 C, HID, F)

    ox, oy, oz, dx, dy, dz = _load_rays(origins_ptr, dirs_ptr, gray, rmask)

    if S_IMP > 0:
        # ---- a. coarse pass: densities only, marched on the fly (§4.6 on the coarse list)
        mids = tl.zeros([BLOCK_R, S_PAD], dtype=tl.float32)
        pw = tl.zeros([BLOCK_R, S_PAD], dtype=tl.float32)
        u0 = tl.load(strat_ptr + gray * S, mask=rmask, other=0.0)
        t_prev = linspace_at(tl.zeros([BLOCK_R], dtype=tl.int32), ray_start, ray_end, S) + u0 * jitter
        sig_prev = _decode_sigma(img_ptr, t_prev, ox, oy, oz, dx, dy, dz, coord_scale, rmask, offs_c, cmask,
                                 C, PH, PW, w0t, b0, w1s, b1s, DOT_PRECISION)
        trans = tl.full([BLOCK_R], 1.0, tl.float32)
        w_m1 = tl.zeros([BLOCK_R], dtype=tl.float32)  # w_{i-1}
        w_m2 = tl.zeros([BLOCK_R], dtype=tl.float32)  # w_{i-2}
        for s in range(1, S):
            u = tl.load(strat_ptr + gray * S + s, mask=rmask, other=0.0)
            t = linspace_at(s + tl.zeros([BLOCK_R], dtype=tl.int32), ray_start, ray_end, S) + u * jitter
            sig = _decode_sigma(img_ptr, t, ox, oy, oz, dx, dy, dz, coord_scale, rmask, offs_c, cmask,
                                C, PH, PW, w0t, b0, w1s, b1s, DOT_PRECISION)
            sbar = softplus((sig_prev + sig) * 0.5 - 1.0)  # §4.6: activation bias -1
            alpha = 1.0 - tl.exp(-sbar * (t - t_prev))
            w = alpha * trans
            trans = trans * (1.0 - alpha + 1e-10)
            mids = tl.where(offs_s[None, :] == s - 1, (0.5 * (t_prev + t))[:, None], mids)
            # §4.7: p_{i-1} = (max(w_{i-2}, w_{i-1}) + max(w_{i-1}, w_i)) / 2 with i = s - 1;
            # pdf weight j = p_{j+1}, j = s - 3. For s < 3 no column matches (no-op); the
            # -inf padding of max_pool never reaches p_1 .. p_{S-3}.
            p = (tl.maximum(w_m2, w_m1) + tl.maximum(w_m1, w)) / 2.0
            pw = tl.where(offs_s[None, :] == s - 3, ((p + 0.01) + 1e-5)[:, None], pw)
            w_m2 = w_m1
            w_m1 = w
            t_prev = t
            sig_prev = sig

        # ---- b. inverse CDF (§4.7 step 4), all in registers
        n_bins = S - 3
        bmask = offs_s[None, :] < n_bins
        pw = tl.where(bmask, pw, 0.0)
        pdf = pw / tl.sum(pw, axis=1)[:, None]
        cdf_incl = tl.cumsum(pdf, axis=1)  # cdf[j + 1]; cdf[0] = 0 is implicit
        imask = rmask[:, None] & (offs_i[None, :] < S_IMP)
        u_all = tl.load(imp_ptr + gray[:, None] * S_IMP + offs_i[None, :], mask=imask, other=float("inf"))
        fine = tl.zeros([BLOCK_R, SI_PAD], dtype=tl.float32)
        for j in range(0, S_IMP):
            u = tl.load(imp_ptr + gray * S_IMP + j, mask=rmask, other=0.0)
            # searchsorted(cdf, u, right=True) = 1 + #{cdf[1:] <= u} since cdf[0] = 0 <= u
            below = tl.sum(tl.where(bmask & (cdf_incl <= u[:, None]), 1, 0), axis=1)
            above = tl.minimum(below + 1, n_bins)
            cdf_b = tl.sum(tl.where(offs_s[None, :] == below[:, None] - 1, cdf_incl, 0.0), axis=1)
            cdf_a = tl.sum(tl.where(offs_s[None, :] == above[:, None] - 1, cdf_incl, 0.0), axis=1)
            bin_b = tl.sum(tl.where(offs_s[None, :] == below[:, None], mids, 0.0), axis=1)
            bin_a = tl.sum(tl.where(offs_s[None, :] == above[:, None], mids, 0.0), axis=1)
            denom = cdf_a - cdf_b
            denom = tl.where(denom < 1e-5, 1.0, denom)
            t_fine = bin_b + (u - cdf_b) / denom * (bin_a - bin_b)
            # t_fine is non-decreasing in u, so u's rank (ties by index) is t_fine's sorted slot.
            earlier = (u_all < u[:, None]) | ((u_all == u[:, None]) & (offs_i[None, :] < j))
            rank = tl.sum(tl.where(earlier, 1, 0), axis=1)
            fine = tl.where(offs_i[None, :] == rank[:, None], t_fine[:, None], fine)
        tl.store(fine_ptr + gray[:, None] * S_IMP + offs_i[None, :], fine, mask=imask)
        # the merge below reads these depths back, possibly from other threads' stores
        tl.debug_barrier()

    # ---- c. final march over the merged, sorted samples (§4.6 on S + S_imp samples)
    ic = tl.zeros([BLOCK_R], dtype=tl.int32)
    jf = tl.zeros([BLOCK_R], dtype=tl.int32)
    t_prev, ic, jf = _next_sample(strat_ptr, fine_ptr, gray, rmask, ic, jf, ray_start, ray_end, jitter,
                                  S, S_IMP)
    _, _, sig_prev, s_prev = _decode_sample(img_ptr, t_prev, ox, oy, oz, dx, dy, dz, coord_scale, rmask, offs_c,
                                            cmask, C, PH, PW, w0t, b0, w1s, b1s, w1ct, b1c, DOT_PRECISION)
    c_prev = s_prev * 1.002 - 0.001  # §4.3: MipNeRF widened sigmoid
    t_lo = t_prev
    t_hi = t_prev
    trans = tl.full([BLOCK_R], 1.0, tl.float32)
    acc_rgb = tl.zeros([BLOCK_R, F_PAD], dtype=tl.float32)
    acc_w = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc_d = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k in range(1, S + S_IMP):
        t, ic, jf = _next_sample(strat_ptr, fine_ptr, gray, rmask, ic, jf, ray_start, ray_end, jitter,
                                 S, S_IMP)
        _, _, sig, s_col = _decode_sample(img_ptr, t, ox, oy, oz, dx, dy, dz, coord_scale, rmask, offs_c, cmask,
                                          C, PH, PW, w0t, b0, w1s, b1s, w1ct, b1c, DOT_PRECISION)
        col = s_col * 1.002 - 0.001
        sbar = softplus((sig_prev + sig) * 0.5 - 1.0)
        alpha = 1.0 - tl.exp(-sbar * (t - t_prev))
        w = alpha * trans
        trans = trans * (1.0 - alpha + 1e-10)
        acc_rgb += w[:, None] * ((c_prev + col) / 2.0)
        acc_w += w
        acc_d += w * ((t_prev + t) / 2.0)
        t_lo = tl.minimum(t_lo, t)
        t_hi = tl.maximum(t_hi, t)
        t_prev = t
        sig_prev = sig
        c_prev = col

    # §4.6 steps 4-6: white back adds 1 - W; features are scaled to 2 rgb - 1.
    rgb = acc_rgb + white_back * (1.0 - acc_w)[:, None]
    fmask = rmask[:, None] & (offs_f[None, :] < F)
    tl.store(feat_out_ptr + gray[:, None] * F + offs_f[None, :], rgb * 2.0 - 1.0, mask=fmask)
    tl.store(wsum_ptr + gray, acc_w, mask=rmask)
    tl.store(dsum_ptr + gray, acc_d, mask=rmask)
    # Partial bounds of every sample depth of this block; the finalize kernel reduces them.
    part = n * tl.num_programs(0) + pid_r
    tl.store(bounds_ptr + part * 2, tl.min(tl.where(rmask, t_lo, float("inf")), axis=0))
    tl.store(bounds_ptr + part * 2 + 1, tl.max(tl.where(rmask, t_hi, float("-inf")), axis=0))

@triton.jit(do_not_specialize=["n_rays", "n_parts"])
def _depth_finalize_kernel(wsum_ptr, dsum_ptr, bounds_ptr, depth_ptr, lohi_ptr, n_rays, n_parts,
                           BLOCK: tl.constexpr, PART_BLOCK: tl.constexpr):
    """depth = clamp(nan_to_num(D / W, nan=inf), min(all depths), max(all depths)) (§4.6 step 5).

    The bounds are global over the batch, so they need every forward program finished:
    hence this second launch. Each program reduces the (few thousand) partial bounds itself.
    """
    pid = tl.program_id(0)
    lo = tl.full([PART_BLOCK], float("inf"), tl.float32)
    hi = tl.full([PART_BLOCK], float("-inf"), tl.float32)
    for start in range(0, n_parts, PART_BLOCK):
        offs = start + tl.arange(0, PART_BLOCK)
        m = offs < n_parts
        lo = tl.minimum(lo, tl.load(bounds_ptr + offs * 2, mask=m, other=float("inf")))
        hi = tl.maximum(hi, tl.load(bounds_ptr + offs * 2 + 1, mask=m, other=float("-inf")))
    lo_s = tl.min(lo, axis=0)
    hi_s = tl.max(hi, axis=0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n_rays
    wsum = tl.load(wsum_ptr + offs, mask=m, other=1.0)
    dsum = tl.load(dsum_ptr + offs, mask=m, other=0.0)
    d = dsum / wsum
    d = tl.where(d != d, float("inf"), d)  # nan_to_num(nan=inf); +-inf are clamped below anyway
    d = tl.minimum(tl.maximum(d, lo_s), hi_s)
    tl.store(depth_ptr + offs, d, mask=m)
    two = tl.arange(0, 2)
    tl.store(lohi_ptr + two, tl.where(two == 0, lo_s, hi_s), mask=(two < 2) & (pid == 0))

@triton.jit
def _backprop_sample(g_sig, g_col, t, feat, hpre, s_col, ox, oy, oz, dx, dy, dz, coord_scale, rmask,
                     offs_c, cmask, C, PH, PW, gimg_ptr, w0t, w1s, w1ct,
                     dw0, db0, dw1s, db1s, dw1c, db1c,
                     DOT_PRECISION: tl.constexpr, NEED_PGRAD: tl.constexpr, NEED_WGRAD: tl.constexpr):
    """Chain rule through one sample: colour -> decoder -> tri-plane sample (docs/eg3d.md §4.2-4.3).

    g_oc = g_col * 1.002 * s (1 - s); g_a = g_oc W1[1:] + g_sigma W1[0];
    g_hpre = g_a * softplus'(hpre); g_feat = g_hpre W0, scattered as g_feat / 3 into each
    plane's four corners. Weight gradients accumulate in the program's registers.
    """
    g_oc = (g_col * 1.002) * ((1.0 - s_col) * s_col)
    g_a = tl.dot(g_oc, tl.trans(w1ct), input_precision=DOT_PRECISION) + g_sig[:, None] * w1s[None, :]
    g_h = g_a * softplus_grad(hpre)
    if NEED_PGRAD:
        g_feat = tl.dot(g_h, tl.trans(w0t), input_precision=DOT_PRECISION)
        px = (ox + t * dx) * coord_scale
        py = (oy + t * dy) * coord_scale
        pz = (oz + t * dz) * coord_scale
        triplane_scatter(gimg_ptr, px, py, pz, g_feat, rmask, offs_c, cmask, C, PH, PW)
    if NEED_WGRAD:
        a = softplus(hpre)
        dw1c += tl.dot(tl.trans(g_oc), a, input_precision=DOT_PRECISION)
        dw1s += tl.sum(g_sig[:, None] * a, axis=0)
        db1c += tl.sum(g_oc, axis=0)
        db1s += tl.sum(g_sig, axis=0)
        dw0 += tl.dot(tl.trans(g_h), feat, input_precision=DOT_PRECISION)
        db0 += tl.sum(g_h, axis=0)
    return dw0, db0, dw1s, db1s, dw1c, db1c

@triton.jit(do_not_specialize=_DO_NOT_SPECIALIZE)
def _triplane_render_backward_kernel(
    planes_ptr, w0_ptr, b0_ptr, w1_ptr, b1_ptr,
    origins_ptr, dirs_ptr, strat_ptr, fine_ptr,
    feat_out_ptr, wsum_ptr, dsum_ptr, lohi_ptr,
    g_feat_ptr, g_depth_ptr, g_wsum_ptr,
    g_planes_ptr, g_w0_ptr, g_b0_ptr, g_w1_ptr, g_b1_ptr,
    R, PH, PW, C, HID, F, S, S_IMP,
    ray_start, ray_end, jitter, coord_scale, white_back,
    C_PAD: tl.constexpr, HID_PAD: tl.constexpr, F_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
    NEED_PGRAD: tl.constexpr, NEED_WGRAD: tl.constexpr,
):
    """Gradients of the final composite by re-marching the merged samples (docs/eg3d.md §4.6).

    Loss seen by one ray: L = g_rgb . rgb + g_W W + g_D D = sum_i w_i v_i with
    v_i = g_rgb . cbar_i + g_W + g_D tbar_i, where g_rgb = 2 g_features, g_D and g_W come from
    depth = D / W (zero where the clamp or nan_to_num cut the gradient, as torch does) and
    white back adds -2 sum(g_features) to g_W. With T_{i+1} = T_i (1 - alpha_i + 1e-10):
        dL/dalpha_i = T_i v_i - S_i / (1 - alpha_i + 1e-10),   S_i = sum_{k>i} w_k v_k = L - P_i,
    the suffix sum taken from the forward's per-ray totals (L) minus the running prefix P_i.
    Its rounding error (~eps |L|) is divided by 1 - alpha_i but then multiplied by
    d alpha / d sbar = delta exp(-sbar delta) = delta (1 - alpha), so g_sbar stays bounded even
    for saturated samples. Then g_sigma_k = (g_sbar_{k-1} + g_sbar_k) / 2 and
    g_colour_k = g_rgb (w_{k-1} + w_k) / 2: sample k is complete once interval k is known, so
    the march back-propagates sample k - 1 while evaluating sample k.
    """
    pid_r = tl.program_id(0)
    n = tl.program_id(1)
    rays = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rays < R
    gray = n.to(tl.int64) * R + rays
    img_off = n.to(tl.int64) * (3 * PH * PW * C)
    img_ptr = planes_ptr + img_off
    gimg_ptr = g_planes_ptr + img_off

    offs_c = tl.arange(0, C_PAD)
    offs_h = tl.arange(0, HID_PAD)
    offs_f = tl.arange(0, F_PAD)
    cmask = offs_c < C
    fmask = offs_f < F
    w0t, b0, w1s, b1s, w1ct, b1c = _load_decoder(w0_ptr, b0_ptr, w1_ptr, b1_ptr, offs_c, offs_h, offs_f,
                                                 C, HID, F)

    ox, oy, oz, dx, dy, dz = _load_rays(origins_ptr, dirs_ptr, gray, rmask)

    # ---- per-ray upstream gradients and the forward's totals
    rf_mask = rmask[:, None] & fmask[None, :]
    g_feat = tl.load(g_feat_ptr + gray[:, None] * F + offs_f[None, :], mask=rf_mask, other=0.0)
    g_depth = tl.load(g_depth_ptr + gray, mask=rmask, other=0.0)
    g_wsum = tl.load(g_wsum_ptr + gray, mask=rmask, other=0.0)
    feat_out = tl.load(feat_out_ptr + gray[:, None] * F + offs_f[None, :], mask=rf_mask, other=0.0)
    wsum = tl.load(wsum_ptr + gray, mask=rmask, other=1.0)  # 1: no 0/0 on padding rays
    dsum = tl.load(dsum_ptr + gray, mask=rmask, other=0.0)
    lo = tl.load(lohi_ptr)
    hi = tl.load(lohi_ptr + 1)
    d_raw = dsum / wsum
    # torch: clamp passes the gradient where lo <= x <= hi, nan_to_num where x is finite.
    passes = (d_raw >= lo) & (d_raw <= hi)
    g_rgb = 2.0 * g_feat
    g_D = tl.where(passes, g_depth / wsum, 0.0)
    g_W = g_wsum + tl.where(passes, -g_depth * (d_raw / wsum), 0.0) - white_back * 2.0 * tl.sum(g_feat, axis=1)
    rgb = (feat_out + 1.0) * 0.5 - white_back * (1.0 - wsum)[:, None]
    total = tl.sum(g_rgb * rgb, axis=1) + g_W * wsum + g_D * dsum

    dw0 = tl.zeros([HID_PAD, C_PAD], dtype=tl.float32)
    db0 = tl.zeros([HID_PAD], dtype=tl.float32)
    dw1s = tl.zeros([HID_PAD], dtype=tl.float32)
    db1s = tl.sum(tl.zeros([BLOCK_R], dtype=tl.float32), axis=0)
    dw1c = tl.zeros([F_PAD, HID_PAD], dtype=tl.float32)
    db1c = tl.zeros([F_PAD], dtype=tl.float32)

    ic = tl.zeros([BLOCK_R], dtype=tl.int32)
    jf = tl.zeros([BLOCK_R], dtype=tl.int32)
    t_prev, ic, jf = _next_sample(strat_ptr, fine_ptr, gray, rmask, ic, jf, ray_start, ray_end, jitter,
                                  S, S_IMP)
    feat_prev, hpre_prev, sig_prev, s_prev = _decode_sample(
        img_ptr, t_prev, ox, oy, oz, dx, dy, dz, coord_scale, rmask, offs_c, cmask, C, PH, PW,
        w0t, b0, w1s, b1s, w1ct, b1c, DOT_PRECISION)
    trans = tl.full([BLOCK_R], 1.0, tl.float32)
    prefix = tl.zeros([BLOCK_R], dtype=tl.float32)
    gsb_prev = tl.zeros([BLOCK_R], dtype=tl.float32)
    w_prev = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k in range(1, S + S_IMP):
        t, ic, jf = _next_sample(strat_ptr, fine_ptr, gray, rmask, ic, jf, ray_start, ray_end, jitter,
                                 S, S_IMP)
        feat, hpre, sig, s_col = _decode_sample(
            img_ptr, t, ox, oy, oz, dx, dy, dz, coord_scale, rmask, offs_c, cmask, C, PH, PW,
            w0t, b0, w1s, b1s, w1ct, b1c, DOT_PRECISION)
        delta = t - t_prev
        x = (sig_prev + sig) * 0.5 - 1.0
        ext = tl.exp(-softplus(x) * delta)
        alpha = 1.0 - ext
        w = alpha * trans
        cbar = ((s_prev * 1.002 - 0.001) + (s_col * 1.002 - 0.001)) / 2.0
        v = tl.sum(g_rgb * cbar, axis=1) + g_W + g_D * ((t_prev + t) / 2.0)
        prefix += w * v
        keep = 1.0 - alpha + 1e-10
        g_alpha = trans * v - (total - prefix) / keep
        gsb = g_alpha * delta * ext * softplus_grad(x)
        trans = trans * keep
        # sample k - 1 now has both neighbouring intervals: finish it.
        g_sig = (gsb_prev + gsb) * 0.5
        g_col = g_rgb * ((w_prev + w) * 0.5)[:, None]
        dw0, db0, dw1s, db1s, dw1c, db1c = _backprop_sample(
            g_sig, g_col, t_prev, feat_prev, hpre_prev, s_prev, ox, oy, oz, dx, dy, dz, coord_scale, rmask,
            offs_c, cmask, C, PH, PW, gimg_ptr, w0t, w1s, w1ct, dw0, db0, dw1s, db1s, dw1c, db1c,
            DOT_PRECISION, NEED_PGRAD, NEED_WGRAD)
        gsb_prev = gsb
        w_prev = w
        t_prev = t
        feat_prev = feat
        hpre_prev = hpre
        sig_prev = sig
        s_prev = s_col
    # the last sample has only the interval before it
    dw0, db0, dw1s, db1s, dw1c, db1c = _backprop_sample(
        gsb_prev * 0.5, g_rgb * (w_prev * 0.5)[:, None], t_prev, feat_prev, hpre_prev, s_prev,
        ox, oy, oz, dx, dy, dz, coord_scale, rmask, offs_c, cmask, C, PH, PW, gimg_ptr, w0t, w1s, w1ct,
        dw0, db0, dw1s, db1s, dw1c, db1c, DOT_PRECISION, NEED_PGRAD, NEED_WGRAD)

    if NEED_WGRAD:
        hm = offs_h < HID
        tl.atomic_add(g_w0_ptr + offs_h[:, None] * C + offs_c[None, :], dw0,
                      mask=hm[:, None] & cmask[None, :], sem="relaxed")
        tl.atomic_add(g_b0_ptr + offs_h, db0, mask=hm, sem="relaxed")
        tl.atomic_add(g_w1_ptr + offs_h, dw1s, mask=hm, sem="relaxed")
        tl.atomic_add(g_w1_ptr + (1 + offs_f[:, None]) * HID + offs_h[None, :], dw1c,
                      mask=fmask[:, None] & hm[None, :], sem="relaxed")
        tl.atomic_add(g_b1_ptr + 1 + offs_f, db1c, mask=fmask, sem="relaxed")
        one = tl.arange(0, 2)
        tl.atomic_add(g_b1_ptr + one, tl.where(one == 0, db1s, 0.0), mask=one == 0, sem="relaxed")


# --------------------------------------------------------------------------- launchers
# @triton.jit chose interpreter or compiler when the kernels above were defined (it reads
# TRITON_INTERPRET then): a fact about these objects, read back here, not a second reading of
# the variable. The dispatcher compares it with the device at call time.
INTERPRETED = not isinstance(_triplane_render_forward_kernel, JITFunction)
_FINALIZE_BLOCK = 1024


def _pow2(x: int, floor: int) -> int:
    return max(floor, 1 << max(0, int(x) - 1).bit_length())


def _is_pow2(v: int) -> bool:
    return v > 0 and not v & (v - 1)


def _env_int(name: str, expected: str, ok: Callable[[int], bool]) -> int | None:
    """The integer in environment variable `name`, None when unset or empty (a tuning sweep
    clears a variable by setting it to ""). Garbage is refused naming the variable: it would
    otherwise surface as int()'s ValueError, or as a block_rays/num_warps error that names
    neither the variable nor where the value came from."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise InputError(f"environment variable {name} must be {expected}, got {raw!r}")
    return value


def _launch_config(n_rays: int, block_rays: int | None = None) -> dict:
    """Block size, warps and pipeline stages: the default config, chosen from the problem size
    (on a GPU `_tuned_config` times a few others once per problem and may replace BLOCK_R / num_warps).

    num_stages=1: Triton's software pipeliner would stage every gather load of the sample
    loops in shared memory, num_stages deep (~120 KB at 32 rays), leaving one program per SM.
    In the interpreter the cost is per op and per program, so big blocks are cheapest
    (docs/environment.md §2). On an H200 (triton 3.6, num_stages 3) 16 rays per program beat 32 by
    1.7x forward and 3x forward+backward (benchmarks/bench_render.py --sweep). `block_rays` (or the
    GUIDE_FAST_RENDER_BLOCK / _WARPS / _STAGES / _MAXNREG variables) overrides the choice for
    tuning and tests.
    """
    if block_rays is None:
        block_rays = _env_int("GUIDE_FAST_RENDER_BLOCK", "a power of two >= 16", lambda v: v >= 16 and _is_pow2(v))
    if block_rays is not None and (block_rays < 16 or block_rays & (block_rays - 1)):
        raise InputError(f"block_rays must be a power of two >= 16 (tl.dot needs M >= 16), got {block_rays}")
    if INTERPRETED:
        default = min(256, _pow2(n_rays, 16))
    else:
        default = 16
    warps = _env_int("GUIDE_FAST_RENDER_WARPS", "a power of two in 1..32", lambda v: 1 <= v <= 32 and _is_pow2(v))
    stages = _env_int("GUIDE_FAST_RENDER_STAGES", "an integer >= 1", lambda v: v >= 1)
    maxnreg = _env_int("GUIDE_FAST_RENDER_MAXNREG", "an integer in 1..255", lambda v: 1 <= v <= 255)
    cfg = {
        "BLOCK_R": int(block_rays or default),
        "num_warps": 4 if warps is None else warps,
        "num_stages": 1 if stages is None else stages,
    }
    if maxnreg is not None and not INTERPRETED:
        cfg["maxnreg"] = maxnreg  # caps registers to fit more programs per SM
    return cfg


# --------------------------------------------------------------------------- autotuning
# On a GPU, (BLOCK_R, num_warps) is timed over a few candidates once per problem (sizes, plane
# dtype, which gradients) and the fastest kept for the process: triton.autotune itself cannot be
# used as the grid and the depth-bounds scratch depend on BLOCK_R, and the backward accumulates
# with atomics (each timing launch would add to the gradients). Off in the interpreter (CPU tests
# stay fast and deterministic), under an explicit block/warps choice, inside a CUDA-graph capture
# (a capture replays the cached choice, or the default before any), and with
# GUIDE_FAST_RENDER_AUTOTUNE=0. A candidate that fails to compile (registers, shared memory) is
# skipped; if all fail, the default config is used. TUNING_LOG says what was measured.
# few candidates: each is one more Triton compile of a large kernel in a cold process (the Triton
# disk cache keeps them for the next one); the batch size is left out of the key, so one tuning
# serves every batch of a problem size
TUNE_CANDIDATES = ((16, 4), (16, 2), (32, 4))
TUNING_LOG: dict = {}
_tuned: dict = {}


def autotune_enabled(block_rays: int | None = None) -> bool:
    env = os.environ
    autotune = env.get("GUIDE_FAST_RENDER_AUTOTUNE", "").strip() or "1"
    if autotune not in ("0", "1"):  # "off" or "false" must not quietly mean on
        raise InputError(f"environment variable GUIDE_FAST_RENDER_AUTOTUNE must be 0 or 1, got {autotune!r}")
    if INTERPRETED or block_rays is not None or autotune == "0":
        return False
    return not (env.get("GUIDE_FAST_RENDER_BLOCK") or env.get("GUIDE_FAST_RENDER_WARPS"))


def _tuned_config(kind: str, key: tuple, n_rays: int, block_rays: int | None, launch) -> tuple[dict, bool]:
    """-> (launch config, whether candidates were launched now). launch(cfg) runs the kernel once."""
    cfg = _launch_config(n_rays, block_rays)
    if not autotune_enabled(block_rays):
        return cfg, False
    k = (kind,) + tuple(key)
    if k in _tuned:
        return dict(cfg, **_tuned[k]), False
    if torch.cuda.is_current_stream_capturing():
        return cfg, False
    from triton.testing import do_bench

    times = {}
    for br, warps in TUNE_CANDIDATES:
        cand = dict(cfg, BLOCK_R=br, num_warps=warps)
        try:
            times[(br, warps)] = do_bench(lambda c=cand: launch(c), warmup=3, rep=15)
        except Exception as exc:  # e.g. out of registers / shared memory for this block size
            times[(br, warps)] = f"{type(exc).__name__}"
    measured = {c: t for c, t in times.items() if isinstance(t, float)}
    best = min(measured, key=measured.get) if measured else None
    _tuned[k] = {"BLOCK_R": best[0], "num_warps": best[1]} if best else {}
    TUNING_LOG[k] = {"ms": {f"{b}x{w}": t for (b, w), t in times.items()}, "chosen": best}
    return dict(cfg, **_tuned[k]), True


def _launch_options(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k != "BLOCK_R"}


def _new_buffer(shape, device) -> torch.Tensor:
    """An output or scratch buffer the kernels overwrite entirely (tests fill these with NaN)."""
    return torch.empty(shape, dtype=torch.float32, device=device)


def _dot_precision(planes_dtype) -> str:
    # fp32 planes: three-pass TF32 (about fp32 accuracy) so the fp32 parity tests hold on a GPU;
    # bf16 / fp16 planes already carry ~3e-3 relative error, far above one-pass TF32's ~5e-4.
    return "tf32x3" if planes_dtype == torch.float32 else "tf32"


def _scalars(opts) -> dict:
    s = opts.depth_resolution
    return {
        "ray_start": float(opts.ray_start),
        "ray_end": float(opts.ray_end),
        # docs/eg3d.md §4.5: jitter width (end - start) / (S - 1), computed in double as the reference does
        "jitter": (float(opts.ray_end) - float(opts.ray_start)) / (s - 1),
        "coord_scale": 2.0 / float(opts.box_warp),  # §4.2
        "white_back": 1.0 if opts.white_back else 0.0,
    }


def render_forward(planes_cl: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                   ray_origins: torch.Tensor, ray_directions: torch.Tensor, stratified: torch.Tensor,
                   importance: torch.Tensor, opts: RenderOptions, block_rays: int | None = None) -> tuple:
    """Launch the forward and depth-finalize kernels on canonical inputs.

    planes_cl [N, 3, H, W, C] channels-last (fp32 / bf16 / fp16); w0 [HID, C], b0 [HID],
    w1 [1+F, HID], b1 [1+F] fp32; rays [N, R, 3], stratified [N, R, S], importance [N*R, S_imp]
    fp32, all contiguous. Returns (features [N,R,F], depth [N,R,1], weight_sum [N,R,1],
    depth_sum [N,R], fine_depths [N,R,S_imp] sorted, bounds [2] = global min/max depth).
    """
    n, _, ph, pw, c = planes_cl.shape
    r = ray_origins.shape[1]
    hid = w0.shape[0]
    f = w1.shape[0] - 1
    s, s_imp = opts.depth_resolution, opts.depth_resolution_importance
    dev = planes_cl.device
    features = _new_buffer((n, r, f), dev)
    depth = _new_buffer((n, r, 1), dev)
    weight_sum = _new_buffer((n, r, 1), dev)
    depth_sum = _new_buffer((n, r), dev)
    # a zero-size buffer has no valid pointer; with S_imp = 0 nothing touches it anyway
    fine = _new_buffer((n, r, max(s_imp, 1)), dev)
    bounds = _new_buffer((2,), dev)
    sc = _scalars(opts)

    def launch(cfg, part_bounds=None):
        br = cfg["BLOCK_R"]
        if part_bounds is None:
            part_bounds = _new_buffer((n * triton.cdiv(r, br), 2), dev)
        _triplane_render_forward_kernel[(triton.cdiv(r, br), n)](
            planes_cl, w0, b0, w1, b1, ray_origins, ray_directions, stratified, importance,
            features, weight_sum, depth_sum, fine, part_bounds,
            r, ph, pw, c, hid, f, s, s_imp,
            sc["ray_start"], sc["ray_end"], sc["jitter"], sc["coord_scale"], sc["white_back"],
            S_PAD=_pow2(s, 16), SI_PAD=_pow2(s_imp, 16), C_PAD=_pow2(c, 16), HID_PAD=_pow2(hid, 16),
            F_PAD=_pow2(f, 16), BLOCK_R=br, DOT_PRECISION=_dot_precision(planes_cl.dtype),
            **_launch_options(cfg),
        )
        return part_bounds

    key = (r, ph, pw, c, hid, f, s, s_imp, str(planes_cl.dtype))
    cfg, _ = _tuned_config("forward", key, r, block_rays, launch)
    n_rblocks = triton.cdiv(r, cfg["BLOCK_R"])
    part_bounds = launch(cfg, _new_buffer((n * n_rblocks, 2), dev))
    _depth_finalize_kernel[(triton.cdiv(n * r, _FINALIZE_BLOCK),)](
        weight_sum, depth_sum, part_bounds, depth, bounds, n * r, n * n_rblocks,
        BLOCK=_FINALIZE_BLOCK, PART_BLOCK=1024, num_warps=4,
    )
    return features, depth, weight_sum, depth_sum, fine[..., :s_imp], bounds


def render_backward(planes_cl: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                    ray_origins: torch.Tensor, ray_directions: torch.Tensor, stratified: torch.Tensor,
                    fine: torch.Tensor, features: torch.Tensor, weight_sum: torch.Tensor, depth_sum: torch.Tensor,
                    bounds: torch.Tensor, g_features: torch.Tensor, g_depth: torch.Tensor,
                    g_weight_sum: torch.Tensor, opts: RenderOptions, need_planes_grad: bool = True,
                    need_decoder_grad: bool = True, block_rays: int | None = None) -> tuple:
    """Launch the backward kernel. Returns (g_planes_cl fp32 [N,3,H,W,C] or None, (g_w0, g_b0, g_w1, g_b1) or None)."""
    n, _, ph, pw, c = planes_cl.shape
    r = ray_origins.shape[1]
    hid = w0.shape[0]
    f = w1.shape[0] - 1
    s, s_imp = opts.depth_resolution, opts.depth_resolution_importance
    dev = planes_cl.device
    # Accumulated with atomics, so they start at zero (never poisoned).
    g_planes = torch.zeros(planes_cl.shape if need_planes_grad else (1,), dtype=torch.float32, device=dev)
    g_dec = [torch.zeros(t.shape if need_decoder_grad else (1,), dtype=torch.float32, device=dev)
             for t in (w0, b0, w1, b1)]
    if s_imp == 0:
        fine = torch.zeros((1,), dtype=torch.float32, device=dev)
    sc = _scalars(opts)

    def launch(cfg):
        br = cfg["BLOCK_R"]
        _triplane_render_backward_kernel[(triton.cdiv(r, br), n)](
            planes_cl, w0, b0, w1, b1, ray_origins, ray_directions, stratified, fine,
            features, weight_sum, depth_sum, bounds,
            g_features, g_depth, g_weight_sum,
            g_planes, *g_dec,
            r, ph, pw, c, hid, f, s, s_imp,
            sc["ray_start"], sc["ray_end"], sc["jitter"], sc["coord_scale"], sc["white_back"],
            C_PAD=_pow2(c, 16), HID_PAD=_pow2(hid, 16), F_PAD=_pow2(f, 16),
            BLOCK_R=br, DOT_PRECISION=_dot_precision(planes_cl.dtype),
            NEED_PGRAD=bool(need_planes_grad), NEED_WGRAD=bool(need_decoder_grad),
            **_launch_options(cfg),
        )

    key = (r, ph, pw, c, hid, f, s, s_imp, str(planes_cl.dtype), bool(need_planes_grad), bool(need_decoder_grad))
    cfg, tuned_now = _tuned_config("backward", key, r, block_rays, launch)
    if tuned_now:  # the timing launches accumulated into the gradients: start again from zero
        for t in (g_planes, *g_dec):
            t.zero_()
    launch(cfg)
    return (g_planes if need_planes_grad else None), (tuple(g_dec) if need_decoder_grad else None)


# --------------------------------------------------------------------------- autograd
class FusedTriplaneRender(torch.autograd.Function):
    """Autograd wrapper of the fused renderer: backward by recomputation.

    Saved for backward: the inputs (planes in their own dtype and layout, decoder weights,
    rays, stratified draws) and per-ray results only: the sorted fine depths [N, R, S_imp],
    features [N, R, F], weight sum and weighted depth sum [N, R], the two global depth bounds.
    Nothing per sample is kept: about 34 MB per 128x128 image with fp32 256^2 x 32 planes,
    25 of which are the planes themselves (the reference keeps ~1-2 GB).

    The channels-last copy of the planes is made again in backward rather than saved: it
    costs one 25 MB copy and keeps the saved set at the inputs. The planes gradient is
    accumulated in fp32 (atomics) and cast to the planes' dtype at the end. Ray origins,
    directions and the random draws get no gradient (None): the official renderer samples
    fine depths under no_grad and EG3D never differentiates with respect to the camera.
    Double backward is not supported.
    """

    @staticmethod
    def forward(ctx, planes, w0, b0, w1, b1, ray_origins, ray_directions, stratified, importance, opts, block_rays):
        planes_cl = planes.permute(0, 1, 3, 4, 2).contiguous()
        features, depth, weight_sum, depth_sum, fine, bounds = render_forward(
            planes_cl, w0, b0, w1, b1, ray_origins, ray_directions, stratified, importance, opts, block_rays)
        ctx.save_for_backward(planes, w0, b0, w1, b1, ray_origins, ray_directions, stratified, fine,
                              features, weight_sum, depth_sum, bounds)
        ctx.opts = opts
        ctx.block_rays = block_rays
        return features, depth, weight_sum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_features, g_depth, g_weight_sum):
        (planes, w0, b0, w1, b1, ray_origins, ray_directions, stratified, fine,
         features, weight_sum, depth_sum, bounds) = ctx.saved_tensors
        need_p = ctx.needs_input_grad[0]
        need_w = any(ctx.needs_input_grad[1:5])
        if not (need_p or need_w):
            return (None,) * 11
        # Upstream gradients may be expanded (stride 0) or in another dtype: canonicalise.
        g_features = g_features.float().contiguous()
        g_depth = g_depth.float().contiguous()
        g_weight_sum = g_weight_sum.float().contiguous()
        planes_cl = planes.permute(0, 1, 3, 4, 2).contiguous()
        g_planes_cl, g_dec = render_backward(
            planes_cl, w0, b0, w1, b1, ray_origins, ray_directions, stratified, fine, features, weight_sum,
            depth_sum, bounds, g_features, g_depth, g_weight_sum, ctx.opts,
            need_planes_grad=need_p, need_decoder_grad=need_w, block_rays=ctx.block_rays)
        g_planes = None
        if need_p:
            # one copy does both the layout change and the cast to the planes' dtype
            g_planes = torch.empty_like(planes, memory_format=torch.contiguous_format)
            g_planes.copy_(g_planes_cl.permute(0, 1, 4, 2, 3))
        g_w = g_dec if need_w else (None,) * 4
        return (g_planes, *g_w, None, None, None, None, None, None)


# --------------------------------------------------------------------------- entry point
def fused_render(planes: torch.Tensor, decoder: DecoderWeights, ray_origins: torch.Tensor,
                 ray_directions: torch.Tensor, stratified: torch.Tensor, importance: torch.Tensor,
                 options: RenderOptions, *, block_rays: int | None = None) -> RenderOutput:
    """EG3D's importance renderer, fused (docs/eg3d.md §4.1-4.7), with the random draws supplied.

    The arguments and the result of `guide_fast.render.reference.render_reference`: planes
    [N, 3, C, H, W] fp32 / bf16 / fp16; decoder the OSGDecoder's effective weights; ray_origins
    and ray_directions [N, R, 3]; stratified [N, R, S, 1] and importance [N*R, S_imp] uniforms in
    [0, 1); options a RenderOptions. Returns a RenderOutput in fp32. Differentiable with respect
    to planes and the decoder weights only. The inputs are trusted: `render_triplanes` checks
    them (shapes, dtypes, one device, CUDA or the interpreter) before calling this.
    """
    n, r = ray_origins.shape[:2]
    s = options.depth_resolution
    # Canonical layouts and dtypes. The casts of the weights are differentiable torch ops, so
    # their gradients flow back in the caller's dtype.
    w0, b0, w1, b1 = (t.float().contiguous() for t in decoder)
    ray_origins = ray_origins.detach().float().contiguous()
    ray_directions = ray_directions.detach().float().contiguous()
    stratified = stratified.detach().reshape(n, r, s).float().contiguous()
    importance = importance.detach().float().contiguous()
    return RenderOutput(*FusedTriplaneRender.apply(planes.contiguous(), w0, b0, w1, b1, ray_origins, ray_directions,
                                                   stratified, importance, options, block_rays))
