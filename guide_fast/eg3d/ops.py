"""Plain-PyTorch versions of the StyleGAN2 operations EG3D uses (docs/eg3d.md §3.2, §8.2).

The official code runs these through JIT-compiled CUDA plugins (bias_act, upfirdn2d) with a
reference fallback; here there is only the readable reference, which autograd differentiates
and which bf16 autocast handles on a GPU.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SQRT2 = math.sqrt(2.0)
LRELU_SLOPE = 0.2


def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """docs/eg3d.md §2.2: v * rsqrt(mean(v^2) + 1e-8)."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


def bias_act(
    x: torch.Tensor,
    b: torch.Tensor | None = None,
    act: str = "linear",
    gain: float | None = None,
    clamp: float | None = None,
) -> torch.Tensor:
    """Add a per-channel bias (dim 1), apply the activation, multiply by gain, then clamp.

    `lrelu` is leaky ReLU with slope 0.2 and a default gain of sqrt(2); `linear` has gain 1
    (docs/eg3d.md §2.1, §3.2).

    fp16 input is computed in fp32 and rounded to fp16 once, as the official CUDA plugin does
    for EG3D's fp16 super-resolution blocks (docs/eg3d.md §8.2); rounding after each of the
    four operations would differ by an ulp on about a third of the activations.
    """
    if x.dtype == torch.float16:
        y = bias_act(x.float(), None if b is None else b.float(), act=act, gain=gain, clamp=clamp)
        return y.to(torch.float16)
    if b is not None:
        shape = [1] * x.ndim
        shape[1] = -1
        x = x + b.reshape(shape)
    if act == "lrelu":
        x = F.leaky_relu(x, LRELU_SLOPE)
        default_gain = SQRT2
    elif act == "linear":
        default_gain = 1.0
    else:
        raise ValueError(f"bias_act: unknown activation {act!r} (expected 'linear' or 'lrelu')")
    gain = default_gain if gain is None else gain
    if gain != 1:
        x = x * gain
    if clamp is not None and clamp >= 0:
        x = x.clamp(-clamp, clamp)
    return x


def setup_filter(taps=(1, 3, 3, 1)) -> torch.Tensor:
    """The 2-D [1,3,3,1] FIR filter: outer product normalised to sum 1 (docs/eg3d.md Appendix A)."""
    f = torch.as_tensor(taps, dtype=torch.float32)
    f = torch.outer(f, f)
    return f / f.sum()


def upfirdn2d(
    x: torch.Tensor,
    f: torch.Tensor,
    up: int = 1,
    padding: tuple[int, int, int, int] = (0, 0, 0, 0),
    gain: float = 1.0,
) -> torch.Tensor:
    """Upsample by zero insertion, pad (or crop with negative padding), then FIR-filter.

    padding is (x0, x1, y0, y1). The filter is applied as a true convolution (flipped); the
    [1,3,3,1] filter is symmetric so the flip is a no-op, kept for fidelity.
    """
    n, c, h, w = x.shape
    if up > 1:
        x = x.reshape(n, c, h, 1, w, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(n, c, h * up, w * up)
    px0, px1, py0, py1 = padding
    x = F.pad(x, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    x = x[:, :, max(-py0, 0): x.shape[2] - max(-py1, 0), max(-px0, 0): x.shape[3] - max(-px1, 0)]
    fk = (f * (gain ** (f.ndim / 2))).to(x.dtype).flip([0, 1])
    fk = fk[None, None].repeat(c, 1, 1, 1)
    return F.conv2d(x, fk, groups=c)


def fold_fir_into_weight(wt: torch.Tensor, f: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """Transposed-conv weight [I, O, kh, kw] -> [I, O, kh+fh-1, kw+fw-1] such that
    convT(x, K, padding=(fh-1-p, fw-1-p)) == upfirdn2d(convT(x, wt), f, padding=p, gain).

    upfirdn2d convolves with f (flipped) by cross-correlation, so K is the cross-correlation of
    the zero-padded weight with the flipped, gain-scaled filter. Computed in fp32 with autocast
    off (the weight is small), then cast to the activations' dtype by the caller.
    """
    fh, fw = f.shape
    i, o, kh, kw = wt.shape
    dtype = torch.float64 if wt.dtype == torch.float64 else torch.float32
    fk = (f * (gain ** (f.ndim / 2))).flip([0, 1]).to(device=wt.device, dtype=dtype)
    with torch.autocast(wt.device.type, enabled=False):
        k = F.conv2d(F.pad(wt.reshape(i * o, 1, kh, kw).to(dtype), [fw - 1, fw - 1, fh - 1, fh - 1]), fk[None, None])
    return k.reshape(i, o, kh + fh - 1, kw + fw - 1)


def upsample2d(x: torch.Tensor, f: torch.Tensor, up: int = 2) -> torch.Tensor:
    """The skip-image 2x upsampler (docs/eg3d.md §3.2): zero-padded, NOT F.interpolate bilinear."""
    fw = f.shape[-1]
    p = ((fw + up - 1) // 2, (fw - up) // 2)
    return upfirdn2d(x, f, up=up, padding=(p[0], p[1], p[0], p[1]), gain=up * up)


def skip_rgb(img: torch.Tensor | None, raw: torch.Tensor, bias: torch.Tensor, f: torch.Tensor,
             clamp: float | None = None, fused: bool = False) -> torch.Tensor:
    """The skip path of a synthesis block (docs/eg3d.md §3.1-3.2), in fp32:
    upsample2d(img, f) + bias_act(raw, bias, clamp=clamp), or the ToRGB output alone when img is None.

    raw is the ToRGB convolution's output before its bias. fused=False runs the official
    operators (bias and clamp in raw's dtype, then fp32, as the official block). fused=True runs
    the fast path's Triton kernel (guide_fast.kernels.skip_path.skip_rgb: one pass, fp32
    arithmetic, docs/performance.md §7) where it applies: a 4x4 filter, an image of half raw's
    size (always so in EG3D) and fewer than 2^31 elements (its flat index is int32); elsewhere
    the official operators.
    """
    half = img is None or (img.ndim == 4 and 2 * img.shape[2] == raw.shape[2] and 2 * img.shape[3] == raw.shape[3])
    if fused and raw.ndim == 4 and tuple(f.shape) == (4, 4) and half and raw.numel() < 2 ** 31:
        from ..kernels.skip_path import skip_rgb as fused_skip_rgb

        return fused_skip_rgb(img, raw, bias, f, clamp)
    y = bias_act(raw, bias.to(raw.dtype), clamp=clamp).to(torch.float32)
    return y if img is None else upsample2d(img, f) + y


def conv2d_resample(
    x: torch.Tensor,
    w: torch.Tensor,
    f: torch.Tensor | None,
    up: int = 1,
    padding: int = 0,
    groups: int = 1,
    fold_filter: bool = False,
) -> torch.Tensor:
    """3x3 conv, optionally with 2x upsampling, as StyleGAN2's conv2d_resample does it.

    up=2 (docs/eg3d.md §3.2, step 4): a stride-2 transposed convolution with the weight transposed
    but not flipped, giving (2H+1)^2, then the [1,3,3,1] FIR with padding 1 and gain 4.
    up=1: a plain cross-correlation with the given padding.

    fold_filter=True (the fast path) computes the same up=2 result with one transposed
    convolution whose (kh+3)x(kw+3) kernel is the 3x3 weight convolved with the FIR filter:
    both are linear, so FIR(convT(x, w)) = convT(x, w * FIR) in exact arithmetic. It replaces a
    depthwise 4x4 filter pass over the largest activations (e.g. [N, 128, 515, 515] in the
    super-resolution), which PyTorch runs on a slow non-tensor-core kernel, by 4x the MACs of
    the 3x3 transposed conv on tensor cores. Falls back to the two-pass form where the
    paddings are asymmetric (not the case in EG3D).
    """
    if up == 1:
        return F.conv2d(x, w, padding=padding, groups=groups)
    assert up == 2 and f is not None
    out_ch, in_per_group, kh, kw = w.shape
    fw = f.shape[-1]
    px0 = padding + (fw + up - 1) // 2 - (kw - 1)
    px1 = padding + (fw - up) // 2 - (kw - up)
    py0 = padding + (fw + up - 1) // 2 - (kh - 1)
    py1 = padding + (fw - up) // 2 - (kh - up)
    if groups == 1:
        wt = w.transpose(0, 1)
    else:
        wt = w.reshape(groups, out_ch // groups, in_per_group, kh, kw).transpose(1, 2)
        wt = wt.reshape(groups * in_per_group, out_ch // groups, kh, kw)
    if fold_filter and px0 == px1 and py0 == py1 and 0 <= px0 <= fw - 1 and 0 <= py0 <= f.shape[0] - 1:
        return F.conv_transpose2d(x, fold_fir_into_weight(wt, f, gain=up * up).to(x.dtype), stride=up,
                                  padding=[f.shape[0] - 1 - py0, fw - 1 - px0], groups=groups)
    pxt = max(min(-px0, -px1), 0)
    pyt = max(min(-py0, -py1), 0)
    x = F.conv_transpose2d(x, wt, stride=up, padding=[pyt, pxt], groups=groups)
    return upfirdn2d(x, f, padding=(px0 + pxt, px1 + pxt, py0 + pyt, py1 + pyt), gain=up * up)


def modulated_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    noise: torch.Tensor | None = None,
    up: int = 1,
    padding: int = 0,
    resample_filter: torch.Tensor | None = None,
    demodulate: bool = True,
    fused_modconv: bool = True,
    fold_filter: bool = False,
) -> torch.Tensor:
    """StyleGAN2 modulated convolution (docs/eg3d.md §3.2, step 2-5).

    fused_modconv=True builds per-sample weights and runs one grouped convolution (the
    official eval-mode path); False scales the activations before and after one shared-weight
    convolution (the official train-mode path, and the one that batches well). Same maths.
    """
    batch = x.shape[0]
    out_ch, in_ch, kh, kw = weight.shape
    if x.dtype == torch.float16 and demodulate:
        # docs/eg3d.md §3.2: fp16-only pre-normalisation; demodulation cancels it, rounding does not.
        weight = weight * (1 / math.sqrt(in_ch * kh * kw) / weight.norm(float("inf"), dim=[1, 2, 3], keepdim=True))
        styles = styles / styles.norm(float("inf"), dim=1, keepdim=True)
    w = None
    dcoefs = None
    if demodulate or fused_modconv:
        w = weight.unsqueeze(0) * styles.reshape(batch, 1, -1, 1, 1)
    if demodulate:
        dcoefs = (w.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()
    if not fused_modconv:
        x = x * styles.to(x.dtype).reshape(batch, -1, 1, 1)
        x = conv2d_resample(x, weight.to(x.dtype), resample_filter, up=up, padding=padding, fold_filter=fold_filter)
        if demodulate and noise is not None:
            # the official code's fma: one addcmul, rounded once (in fp16 too), and one pass
            return torch.addcmul(noise.to(x.dtype), x, dcoefs.to(x.dtype).reshape(batch, -1, 1, 1))
        if demodulate:
            x = x * dcoefs.to(x.dtype).reshape(batch, -1, 1, 1)
        if noise is not None:
            x = x + noise.to(x.dtype)
        return x
    if demodulate:
        w = w * dcoefs.reshape(batch, -1, 1, 1, 1)
    x = x.reshape(1, -1, *x.shape[2:])
    w = w.reshape(-1, in_ch, kh, kw)
    x = conv2d_resample(x, w.to(x.dtype), resample_filter, up=up, padding=padding, groups=batch,
                        fold_filter=fold_filter)
    x = x.reshape(batch, -1, *x.shape[2:])
    if noise is not None:
        x = x + noise.to(x.dtype)
    return x
