"""Typed checks of a generator configuration read from a file (docs/formats.md §3).

Every field of `GeneratorConfig` has a type and a range here; resolutions and channel counts
that the architecture halves or doubles must be powers of two, and the super-resolution
module must be one guide-fast implements. A value outside these bounds is an InputError
naming the field, raised before any module is built, so a file cannot make the generator
allocate gigabytes (a changed w_dim) or render at 100000² (a changed neural rendering
resolution). The bounds are generous multiples of the released EG3D generators (docs/eg3d.md §1).
"""
from __future__ import annotations

import math

from ..errors import InputError

SUPPORTED_SR = ("SuperresolutionHybrid8XDC",)
# the other super-resolution modules of the EG3D code base, and why they are refused
UNSUPPORTED_SR = {
    "SuperresolutionHybrid2X": "ShapeNet cars (shapenetcars128-64): its first block does not upsample "
                               "(SynthesisBlockNoUp) and its rays start/end 'auto', neither of which guide-fast implements",
    "SuperresolutionHybrid4X": "a 256x256 generator whose first block does not upsample (SynthesisBlockNoUp), "
                               "which guide-fast does not implement",
    "SuperresolutionHybrid8X": "an early EG3D variant with a different block layout than SuperresolutionHybrid8XDC",
}

# field: (kind, low, high, power of two)
_INT_FIELDS = {
    "z_dim": (1, 2048, False),
    "w_dim": (1, 2048, False),
    "c_dim": (25, 25, False),             # 16 cam2world + 9 intrinsics (docs/eg3d.md §6)
    "mapping_layers": (1, 16, False),
    "plane_resolution": (4, 1024, True),
    "plane_channels": (1, 256, False),
    "channel_base": (16, 1 << 20, True),
    "channel_max": (4, 2048, True),
    "decoder_hidden": (1, 1024, False),
    "decoder_output_dim": (3, 256, False),
    "neural_rendering_resolution": (8, 512, True),
    "img_resolution": (16, 1024, True),
}

# rendering_kwargs key: (types, check, description)
_NUM = (int, float)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    if isinstance(v, bool) or not isinstance(v, _NUM):
        return False
    return abs(v) < 1e300 if isinstance(v, int) else math.isfinite(v)  # huge ints would overflow a float


def _plain(v, depth: int = 0) -> bool:
    if v is None or isinstance(v, bool) or _is_num(v):
        return True
    if isinstance(v, str):
        return len(v) <= 200
    if isinstance(v, (list, tuple)) and depth < 2:
        return len(v) <= 64 and all(_plain(x, depth + 1) for x in v)
    return False


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def _bad(field: str, value, expected: str) -> InputError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return InputError(f"generator config field {field!r} is {shown}; expected {expected}")


def check_rendering_kwargs(rk) -> dict:
    """A copy of rendering_kwargs with the keys the generator reads type- and range-checked."""
    if not isinstance(rk, dict) or not all(isinstance(k, str) for k in rk):
        raise _bad("rendering_kwargs", type(rk).__name__, "a dict with string keys")
    out = {}
    for k, v in rk.items():
        where = f"rendering_kwargs.{k}"
        if k in ("depth_resolution", "depth_resolution_importance"):
            # 4x the released generators' 48: a file cannot make one render need tens of GB
            if not _is_int(v) or not (0 <= v <= 192) or (k == "depth_resolution" and v < 1):
                raise _bad(where, v, "an integer number of samples per ray in 1..192 (0..192 for importance)")
        elif k in ("ray_start", "ray_end"):
            if v == "auto":
                raise InputError(f"generator config field {where!r} is 'auto' (ShapeNet-style rays), which "
                                 "guide-fast does not implement; only the FFHQ/AFHQ generators are supported")
            if not _is_num(v) or not (0 < v <= 1e3):
                raise _bad(where, v, "a finite distance in (0, 1000]")
        elif k in ("box_warp", "decoder_lr_mul", "avg_camera_radius"):
            if not _is_num(v) or not (1e-3 <= v <= 1e3):
                raise _bad(where, v, "a finite number in [0.001, 1000]")
        elif k in ("c_scale", "density_noise"):
            if not _is_num(v) or not (-1e3 <= v <= 1e3) or (k == "density_noise" and v < 0):
                raise _bad(where, v, "a finite number")
        elif k in ("sr_antialias", "c_gen_conditioning_zero", "white_back", "disparity_space_sampling"):
            if not isinstance(v, bool):
                raise _bad(where, v, "true or false")
        elif k == "clamp_mode":
            if v != "softplus":
                raise _bad(where, v, "'softplus' (the only density clamp of the EG3D generators)")
        elif k == "superresolution_noise_mode":
            if v not in ("random", "const", "none"):
                raise _bad(where, v, "'random', 'const' or 'none'")
        elif k == "superresolution_module":
            check_sr_module(v)
        elif k == "avg_camera_pivot":
            if not isinstance(v, (list, tuple)) or len(v) != 3 or not all(_is_num(x) for x in v):
                raise _bad(where, v, "a list of 3 finite numbers")
            v = list(v)
        else:  # keys only training reads (gpc_reg_prob may be None, reg_type a string, ...): kept as
            # plain JSON values, never used by the generator
            if not _plain(v):
                raise _bad(where, v, "a plain number, string, boolean or a short list of them")
            v = list(v) if isinstance(v, tuple) else v
        out[k] = v
    for k in ("ray_start", "ray_end", "depth_resolution", "depth_resolution_importance", "box_warp"):
        if k not in out:
            raise InputError(f"generator config field 'rendering_kwargs.{k}' is missing")
    if not out["ray_end"] > out["ray_start"]:
        raise _bad("rendering_kwargs.ray_end", out["ray_end"], f"a distance beyond ray_start ({out['ray_start']})")
    return out


def check_sr_module(name) -> None:
    if not isinstance(name, str):
        raise _bad("rendering_kwargs.superresolution_module", name, "a class path")
    cls = name.rsplit(".", 1)[-1]
    if cls in SUPPORTED_SR:
        return
    why = UNSUPPORTED_SR.get(cls, "an unknown module")
    raise InputError(f"unsupported super-resolution module {name!r}: {why}; guide-fast implements "
                     f"{', '.join(SUPPORTED_SR)} (the FFHQ/AFHQ 512 generators)")


def check_config_fields(d: dict) -> dict:
    """The checked keyword arguments of a GeneratorConfig (types normalised: tuples, lists)."""
    if not isinstance(d, dict):
        raise InputError(f"generator config must be a dict, got {type(d).__name__}")
    out = dict(d)
    for name, (lo, hi, pow2) in _INT_FIELDS.items():
        if name not in d:
            continue
        v = d[name]
        if not _is_int(v) or not (lo <= v <= hi) or (pow2 and not _pow2(v)):
            rng = f"{lo}" if lo == hi else f"{lo}..{hi}"
            raise _bad(name, v, f"an integer {'power of two ' if pow2 else ''}in {rng}")
    if "sr_fp16" in d and not isinstance(d["sr_fp16"], bool):
        raise _bad("sr_fp16", d["sr_fp16"], "true or false")
    if "sr_channels" in d:
        ch = d["sr_channels"]
        if (not isinstance(ch, (list, tuple)) or not (1 <= len(ch) <= 6)
                or not all(_is_int(c) and 1 <= c <= 2048 for c in ch)):
            raise _bad("sr_channels", ch, "a list of 1..6 channel counts in 1..2048")
        out["sr_channels"] = tuple(ch)
    if "rendering_kwargs" in d:
        out["rendering_kwargs"] = check_rendering_kwargs(d["rendering_kwargs"])
    img = out.get("img_resolution")
    nrr = out.get("neural_rendering_resolution")
    ch = out.get("sr_channels")
    if img is not None and ch is not None:
        sr_in = img >> len(ch)
        if sr_in < 4 or sr_in << len(ch) != img:
            raise _bad("sr_channels", list(ch), f"at most log2({img}) - 2 blocks (one per factor of two)")
        if nrr is not None and not (sr_in // 4 <= nrr <= sr_in):
            raise _bad("neural_rendering_resolution", nrr,
                       f"a power of two from {sr_in // 4} to the super-resolution input {sr_in} "
                       f"(smaller renders are resized to {sr_in} as the official code does)")
    if out.get("plane_resolution") is not None and out.get("channel_base") is not None:
        if out["channel_base"] // out["plane_resolution"] < 1:
            raise _bad("channel_base", out["channel_base"], "at least the plane resolution")
    return out
