"""The skip path of a StyleGAN2 synthesis block, fused: ToRGB's bias and clamp, the 2x FIR
upsampling of the running image, and their sum, in one pass (forward) and two (backward).

The official block (docs/eg3d.md §3.1-3.2) computes, per resolution,

    img = upsample2d(img, f) + clamp(torgb_conv(x) + b, -c, c)

as five or more separate passes: the zero-insertion and padding copies of upfirdn2d, a
depthwise 4x4 convolution (PyTorch runs it on a generic, non-tensor-core kernel), the bias add,
the clamp, a cast to fp32 and the add. torch.compile cannot fuse the depthwise convolution
(Inductor hands convolutions to cuDNN), so this is the one part of the block written by hand
(docs/performance.md §7). Every output pixel of a 2x upsampling with a 4x4 filter reads only
2x2 input pixels (the zero-inserted ones contribute nothing): out[2i+p, 2j+q] = sum over
t, u in {0, 1} of g[p+2t, q+2u] * img[i+p+t-1, j+q+u-1], with g = 4 * f flipped (upfirdn2d's
gain and true convolution) and zeros outside the image. The backward is the adjoint: each
input pixel gathers the 4x4 output pixels it fed, grad_img[i, j] = sum over ky, kx of
g[ky, kx] * grad[2i+2-ky, 2j+2-kx].

Arithmetic is fp32 whatever the storage: the ToRGB output may be bf16 / fp16 (loaded and
converted at once, as the Triton interpreter needs, docs/environment.md §2), the image and the
result are fp32 as in the official block. Tensors are addressed through their strides, so
channels_last activations need no copy.

`skip_rgb` is a `torch.library` custom op with its own autograd: torch.compile keeps it as one
opaque node inside a compiled synthesis network, and CUDA-graph capture records its launches.
"""
# no `from __future__ import annotations`: torch.library reads the custom ops' annotations as
# objects (a string annotation would rely on each torch version's evaluation of it)
import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction


@triton.jit
def _split(offs, C, OH, OW):
    """Flat element index of an [N, C, OH, OW] tensor -> (n, c, y, x); int32 (the launcher keeps
    every tensor under 2^31 elements), the pointer arithmetic after it is int64."""
    x = offs % OW
    t = offs // OW
    y = t % OH
    t = t // OH
    return (t // C).to(tl.int64), (t % C).to(tl.int64), y, x


@triton.jit
def _skip_rgb_forward_kernel(img_ptr, raw_ptr, bias_ptr, f_ptr, out_ptr,
                             total, C, OH, OW,
                             s_in, s_ic, s_ih, s_iw, s_rn, s_rc, s_rh, s_rw, s_on, s_oc, s_oh, s_ow,
                             clamp, gain,
                             HAS_IMG: tl.constexpr, HAS_CLAMP: tl.constexpr, BLOCK: tl.constexpr):
    """out = upsample2d(img) + clamp(raw + bias) for BLOCK output elements (flat NCHW order)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    n, c, oy, ox = _split(offs, C, OH, OW)
    raw = tl.load(raw_ptr + n * s_rn + c * s_rc + oy * s_rh + ox * s_rw, mask=mask, other=0.0).to(tl.float32)
    y = raw + tl.load(bias_ptr + c, mask=mask, other=0.0).to(tl.float32)
    if HAS_CLAMP:
        # torch.clamp keeps NaN; min/max alone may not
        y = tl.where(y != y, y, tl.minimum(tl.maximum(y, -clamp), clamp))
    if HAS_IMG:
        ih = OH // 2
        iw = OW // 2
        iy = oy // 2
        ix = ox // 2
        py = oy % 2
        px = ox % 2
        img_base = img_ptr + n * s_in + c * s_ic
        for t in tl.static_range(2):
            i = iy + py + t - 1
            ky = py + 2 * t
            for u in tl.static_range(2):
                j = ix + px + u - 1
                kx = px + 2 * u
                ok = mask & (i >= 0) & (i < ih) & (j >= 0) & (j < iw)
                v = tl.load(img_base + i * s_ih + j * s_iw, mask=ok, other=0.0).to(tl.float32)
                wgt = tl.load(f_ptr + (3 - ky) * 4 + (3 - kx), mask=mask, other=0.0).to(tl.float32)
                y += v * (wgt * gain)
    tl.store(out_ptr + n * s_on + c * s_oc + oy * s_oh + ox * s_ow, y, mask=mask)


@triton.jit
def _skip_rgb_grad_raw_kernel(g_ptr, raw_ptr, bias_ptr, graw_ptr,
                              total, C, OH, OW,
                              s_gn, s_gc, s_gh, s_gw, s_rn, s_rc, s_rh, s_rw,
                              clamp, HAS_CLAMP: tl.constexpr, BLOCK: tl.constexpr):
    """grad_raw = grad where -c < raw + bias < c, else 0: bounds excluded, as the official bias_act
    plugin's gradient (|y| < clamp) and torch.clamp's backward in this project's torch; NaN gets 0."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    n, c, oy, ox = _split(offs, C, OH, OW)
    g = tl.load(g_ptr + n * s_gn + c * s_gc + oy * s_gh + ox * s_gw, mask=mask, other=0.0).to(tl.float32)
    r_off = n * s_rn + c * s_rc + oy * s_rh + ox * s_rw
    if HAS_CLAMP:
        y = tl.load(raw_ptr + r_off, mask=mask, other=0.0).to(tl.float32)
        y += tl.load(bias_ptr + c, mask=mask, other=0.0).to(tl.float32)
        g = tl.where((y > -clamp) & (y < clamp), g, 0.0)
    tl.store(graw_ptr + r_off, g.to(graw_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _skip_rgb_grad_img_kernel(g_ptr, f_ptr, gimg_ptr,
                              total, C, OH, OW,
                              s_gn, s_gc, s_gh, s_gw,
                              gain, BLOCK: tl.constexpr):
    """grad_img[i, j] = sum_{ky, kx} gain * f[3-ky, 3-kx] * grad[2i+2-ky, 2j+2-kx] (the adjoint
    of the forward's upsampling) for BLOCK elements of grad_img (contiguous, flat NCHW order)."""
    ih = OH // 2
    iw = OW // 2
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    n, c, i, j = _split(offs, C, ih, iw)
    g_base = g_ptr + n * s_gn + c * s_gc
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for ky in tl.static_range(4):
        oy = 2 * i + 2 - ky
        for kx in tl.static_range(4):
            ox = 2 * j + 2 - kx
            ok = mask & (oy >= 0) & (oy < OH) & (ox >= 0) & (ox < OW)
            v = tl.load(g_base + oy * s_gh + ox * s_gw, mask=ok, other=0.0).to(tl.float32)
            wgt = tl.load(f_ptr + (3 - ky) * 4 + (3 - kx)).to(tl.float32)  # one scalar per tap
            acc += v * (wgt * gain)
    tl.store(gimg_ptr + offs, acc, mask=mask)


# @triton.jit chose interpreter or compiler when the kernels above were defined
INTERPRETED = not isinstance(_skip_rgb_forward_kernel, JITFunction)
# Elements per program. On a GPU: 1024 (8 per thread at 4 warps, coalesced along W). In the
# interpreter the cost is per program, so one program takes as much as a block may hold
# (2^20 elements, docs/environment.md §2).
_GPU_BLOCK = 1024
_INTERPRETER_BLOCK_MAX = 1 << 20
MAX_ELEMENTS = 2 ** 31 - 1  # the kernels' flat index is int32: eg3d/ops.py runs the official operators above it


def _launch(total: int) -> tuple[tuple[int], int]:
    """(grid, BLOCK) for `total` elements."""
    block = min(_INTERPRETER_BLOCK_MAX, triton.next_power_of_2(max(total, 16))) if INTERPRETED else _GPU_BLOCK
    return (triton.cdiv(total, block),), block


def _clamp_args(clamp: float) -> tuple[float, bool]:
    """clamp < 0 means none (a custom op takes no Optional float in every torch version)."""
    return (float(clamp), True) if clamp >= 0 else (0.0, False)


# The gain of upfirdn2d's 2x upsampling: up * up (docs/eg3d.md §3.2).
_GAIN = 4.0


@torch.library.custom_op("guide_fast::skip_rgb", mutates_args=())
def _skip_rgb(img: torch.Tensor | None, raw: torch.Tensor, bias: torch.Tensor, f: torch.Tensor,
              clamp: float) -> torch.Tensor:
    n, c, oh, ow = raw.shape
    out = torch.empty_like(raw, dtype=torch.float32)
    clamp_v, has_clamp = _clamp_args(clamp)
    src = img if img is not None else raw  # a stand-in pointer, never read without HAS_IMG
    total = raw.numel()
    if total:
        grid, block = _launch(total)
        _skip_rgb_forward_kernel[grid](
            src, raw, bias, f.contiguous(), out, total, c, oh, ow, *src.stride(), *raw.stride(), *out.stride(),
            clamp_v, _GAIN, HAS_IMG=img is not None, HAS_CLAMP=has_clamp, BLOCK=block)
    return out


@_skip_rgb.register_fake
def _skip_rgb_fake(img, raw, bias, f, clamp):
    return torch.empty_like(raw, dtype=torch.float32)


@torch.library.custom_op("guide_fast::skip_rgb_backward", mutates_args=())
def _skip_rgb_backward(grad: torch.Tensor, raw: torch.Tensor, bias: torch.Tensor, f: torch.Tensor, clamp: float,
                       has_img: bool) -> tuple[torch.Tensor, torch.Tensor]:
    n, c, oh, ow = raw.shape
    clamp_v, has_clamp = _clamp_args(clamp)
    g_raw = torch.empty_like(raw)
    g_img = torch.empty((n, c, oh // 2, ow // 2) if has_img else (0,), dtype=torch.float32, device=raw.device)
    if raw.numel():
        grid, block = _launch(raw.numel())
        _skip_rgb_grad_raw_kernel[grid](
            grad, raw, bias, g_raw, raw.numel(), c, oh, ow, *grad.stride(), *raw.stride(), clamp_v,
            HAS_CLAMP=has_clamp, BLOCK=block)
        if has_img:
            grid, block = _launch(g_img.numel())
            _skip_rgb_grad_img_kernel[grid](
                grad, f.contiguous(), g_img, g_img.numel(), c, oh, ow, *grad.stride(), _GAIN, BLOCK=block)
    return g_img, g_raw


@_skip_rgb_backward.register_fake
def _skip_rgb_backward_fake(grad, raw, bias, f, clamp, has_img):
    n, c, oh, ow = raw.shape
    g_img = raw.new_empty((n, c, oh // 2, ow // 2) if has_img else (0,), dtype=torch.float32)
    return g_img, torch.empty_like(raw)


def _setup_context(ctx, inputs, output):
    img, raw, bias, f, clamp = inputs
    ctx.save_for_backward(raw, bias, f)
    ctx.clamp = clamp
    ctx.has_img = img is not None


def _backward(ctx, grad):
    raw, bias, f = ctx.saved_tensors
    g_img, g_raw = _skip_rgb_backward(grad, raw, bias, f, ctx.clamp, ctx.has_img)
    # the bias gradient is the per-channel sum of the clamp-masked gradient (as autograd's
    # broadcast add gives it), accumulated in fp32
    g_bias = g_raw.sum(dim=(0, 2, 3), dtype=torch.float32).to(bias.dtype)
    return (g_img if ctx.has_img else None), g_raw, g_bias, None, None


_skip_rgb.register_autograd(_backward, setup_context=_setup_context)


def skip_rgb(img: torch.Tensor | None, raw: torch.Tensor, bias: torch.Tensor, resample_filter: torch.Tensor,
             clamp: float | None = None) -> torch.Tensor:
    """upsample2d(img, f) + clamp(raw + bias, -clamp, clamp) in fp32, fused (see the module docstring).

    img [N, C, H, W] fp32 (None in a generator's first block: the result is then the clamped
    ToRGB output alone); raw [N, C, 2H, 2W] the ToRGB convolution's output before its bias
    (fp32 / bf16 / fp16, any strides); bias [C]; resample_filter the block's 4x4 FIR filter
    (`setup_filter()`, any 4x4 filter works); clamp the ToRGB conv_clamp or None. Differentiable
    in img, raw and bias. The shapes are the caller's to check (eg3d/ops.py skip_rgb).
    """
    return _skip_rgb(img, raw, bias, resample_filter.to(torch.float32), -1.0 if clamp is None else float(clamp))
