"""Small @triton.jit building blocks shared by the fused renderer's kernels.

Everything here computes in fp32: the Triton interpreter gets bf16 arithmetic wrong
(docs/environment.md §2), and fp32 accumulation is the right numerics on a GPU as well, so callers
load bf16 texels and convert them at once. No libdevice: every transcendental is written
from `tl.exp` / `tl.log`, which exist on every backend and in the interpreter.
"""
import triton
import triton.language as tl


@triton.jit
def log1p(y):
    """log(1 + y) for y >= 0, accurate for tiny y (Goldberg's trick, no libdevice).

    `log(1 + y)` alone loses all digits once y is below fp32's epsilon; scaling by
    y / ((1 + y) - 1) cancels the rounding of 1 + y, leaving a few ulp of error.
    """
    one_plus = 1.0 + y
    denom = tl.where(one_plus == 1.0, 1.0, one_plus - 1.0)
    return tl.where(one_plus == 1.0, y, tl.log(one_plus) * (y / denom))


@triton.jit
def softplus(x):
    """torch.nn.Softplus() (beta 1, threshold 20): x if x > 20 else log1p(exp(x)) (docs/eg3d.md §4.3)."""
    safe = tl.minimum(x, 20.0)  # keeps exp finite in the branch that is thrown away
    return tl.where(x > 20.0, x, log1p(tl.exp(safe)))


@triton.jit
def softplus_grad(x):
    """d softplus / dx as torch's softplus_backward: 1 above the threshold, else e^x / (e^x + 1)."""
    z = tl.exp(tl.minimum(x, 20.0))
    return tl.where(x > 20.0, 1.0, z / (z + 1.0))


@triton.jit
def sigmoid(x):
    # exp(-x) overflows to inf for x < -88 and 1 / inf = 0: the right limit, no NaN.
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def linspace_at(i, start, end, steps):
    """Element i (int tensor) of torch.linspace(start, end, steps) in fp32.

    torch computes the first half forwards from `start` and the second half backwards from
    `end` (ATen's linspace kernels); doing the same keeps the coarse depths within an ulp.
    """
    step = (end - start) / (steps - 1)
    fi = i.to(tl.float32)
    back = (steps - 1 - i).to(tl.float32)
    return tl.where(i < steps // 2, start + step * fi, end - step * back)


@triton.jit
def bilinear_corners(plane_ptr, u, v, rmask, C, PH, PW):
    """Corner pointers, validity masks and weights of one bilinear lookup (docs/eg3d.md §4.2).

    grid_sample with align_corners=False unnormalises u (width / columns) and v (height / rows)
    as ix = ((u + 1) W - 1) / 2. ix is clamped to [-2, W + 1] first: a point far outside the
    box still has all four corners out of range (zero padding) and floor() cannot overflow
    int32. Weights follow grid_sample's formula, e.g. nw = (x1 - ix) (y1 - iy).
    Returns the [BLOCK_R] pointers of the north-west corner's channel 0, the offsets of the
    other three corners, their masks (ray mask included) and the four weights.
    """
    ix = ((u + 1.0) * PW - 1.0) / 2.0
    iy = ((v + 1.0) * PH - 1.0) / 2.0
    ix = tl.minimum(tl.maximum(ix, -2.0), PW + 1.0)
    iy = tl.minimum(tl.maximum(iy, -2.0), PH + 1.0)
    fx0 = tl.floor(ix)
    fy0 = tl.floor(iy)
    x0 = fx0.to(tl.int32)
    y0 = fy0.to(tl.int32)
    wx1 = ix - fx0
    wx0 = (fx0 + 1.0) - ix
    wy1 = iy - fy0
    wy0 = (fy0 + 1.0) - iy
    vx0 = (x0 >= 0) & (x0 < PW)
    vx1 = (x0 >= -1) & (x0 < PW - 1)
    vy0 = rmask & (y0 >= 0) & (y0 < PH)
    vy1 = rmask & (y0 >= -1) & (y0 < PH - 1)
    # Masked corners are never dereferenced, so a negative offset there is harmless. Adding
    # the per-corner steps to the pointer keeps the integer work to one [BLOCK_R] row index.
    p_nw = plane_ptr + (y0 * PW + x0) * C
    return p_nw, vx0 & vy0, vx1 & vy0, vx0 & vy1, vx1 & vy1, wx0 * wy0, wx1 * wy0, wx0 * wy1, wx1 * wy1


@triton.jit
def bilinear_sample(plane_ptr, u, v, rmask, offs_c, cmask, C, PH, PW):
    """One plane's bilinear sample from a channels-last plane, [BLOCK_R, C_PAD] fp32 (zeros padding)."""
    p_nw, m_nw, m_ne, m_sw, m_se, w_nw, w_ne, w_sw, w_se = bilinear_corners(plane_ptr, u, v, rmask, C, PH, PW)
    ptr = p_nw[:, None] + offs_c[None, :]
    row = PW * C
    acc = w_nw[:, None] * tl.load(ptr, mask=m_nw[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    acc += w_ne[:, None] * tl.load(ptr + C, mask=m_ne[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    acc += w_sw[:, None] * tl.load(ptr + row, mask=m_sw[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    acc += w_se[:, None] * tl.load(ptr + (row + C), mask=m_se[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    return acc


@triton.jit
def bilinear_scatter(grad_ptr, u, v, g, rmask, offs_c, cmask, C, PH, PW):
    """Adjoint of `bilinear_sample`: atomically add g [BLOCK_R, C_PAD] times each corner weight.

    sem="relaxed": the adds need atomicity only, not ordering (the default acq_rel would fence).
    """
    p_nw, m_nw, m_ne, m_sw, m_se, w_nw, w_ne, w_sw, w_se = bilinear_corners(grad_ptr, u, v, rmask, C, PH, PW)
    ptr = p_nw[:, None] + offs_c[None, :]
    row = PW * C
    tl.atomic_add(ptr, g * w_nw[:, None], mask=m_nw[:, None] & cmask[None, :], sem="relaxed")
    tl.atomic_add(ptr + C, g * w_ne[:, None], mask=m_ne[:, None] & cmask[None, :], sem="relaxed")
    tl.atomic_add(ptr + row, g * w_sw[:, None], mask=m_sw[:, None] & cmask[None, :], sem="relaxed")
    tl.atomic_add(ptr + (row + C), g * w_se[:, None], mask=m_se[:, None] & cmask[None, :], sem="relaxed")


@triton.jit
def triplane_features(img_ptr, px, py, pz, rmask, offs_c, cmask, C, PH, PW):
    """Mean of the three planes' samples at points p (already scaled by 2/box_warp).

    docs/eg3d.md §4.1: plane 0 is (u, v) = (x, y), plane 1 (x, z), plane 2 (z, x) -- the released
    checkpoints' quirk, not (y, z). §4.3: the mean is the sum divided by 3.
    """
    plane_stride = PH * PW * C
    f = bilinear_sample(img_ptr, px, py, rmask, offs_c, cmask, C, PH, PW)
    f += bilinear_sample(img_ptr + plane_stride, px, pz, rmask, offs_c, cmask, C, PH, PW)
    f += bilinear_sample(img_ptr + 2 * plane_stride, pz, px, rmask, offs_c, cmask, C, PH, PW)
    return f / 3.0


@triton.jit
def triplane_scatter(grad_img_ptr, px, py, pz, g_feat, rmask, offs_c, cmask, C, PH, PW):
    """Adjoint of `triplane_features`: each plane receives g_feat / 3 (mean backward)."""
    plane_stride = PH * PW * C
    g = g_feat / 3.0
    bilinear_scatter(grad_img_ptr, px, py, g, rmask, offs_c, cmask, C, PH, PW)
    bilinear_scatter(grad_img_ptr + plane_stride, px, pz, g, rmask, offs_c, cmask, C, PH, PW)
    bilinear_scatter(grad_img_ptr + 2 * plane_stride, pz, px, g, rmask, offs_c, cmask, C, PH, PW)
