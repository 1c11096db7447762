"""Checks shared by the subcommands: devices, seeds, flag conflicts. Each raises InputError (or,
as an argparse type, ArgumentTypeError) with a message that names the flag, so the CLI exits 2
with one line instead of a traceback from deep inside torch. Nothing heavy is imported at module
level (`guide-fast --help` stays fast)."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Callable

from ..errors import InputError

if TYPE_CHECKING:  # plan.py imports torch: only when a handler runs
    import torch

    from ..plan import ExecutionPlan

SEED_LIMIT = 2 ** 63  # torch.Generator.manual_seed / torch.manual_seed take a signed 64-bit seed


def seed_type(limit: int = SEED_LIMIT, what: str = "seed") -> Callable[[str], int]:
    """argparse type: an integer 0 <= seed < limit."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer {what}, got {text!r}") from None
        if not 0 <= value < limit:
            raise argparse.ArgumentTypeError(f"{what} {text} is out of range; expected 0 <= {what} < {_power(limit)}")
        return value

    parse.__name__ = "seed"
    return parse


def _power(limit: int) -> str:
    n = limit.bit_length() - 1
    return f"2**{n} ({limit})" if limit == 1 << n else str(limit)


def parse_seed_list(text: str, flag: str, limit: int = SEED_LIMIT) -> list[int]:
    """'0,1,2' -> [0, 1, 2], each in range; InputError naming the flag otherwise."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise InputError(f"{flag} must be comma-separated integers, got {text!r}") from None
    bad = [s for s in seeds if not 0 <= s < limit]
    if bad:
        raise InputError(f"{flag}: seed {bad[0]} is out of range; expected 0 <= seed < {_power(limit)}")
    return seeds


def resolve_device(spec: "str | torch.device | None", flag: str = "--device") -> "torch.device":
    """--device value -> torch.device: cpu, cuda or cuda:N (default: cuda when available).

    Refuses names torch does not know (gpu), device types guide-fast does not run on (mps, xpu,
    meta, ...), CUDA when there is none, and CUDA indices past the last device."""
    import torch

    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(str(spec).strip())
    except (RuntimeError, ValueError, TypeError):
        raise InputError(f"{flag} {spec!r} is not a device name; expected cpu, cuda or cuda:N (e.g. cuda:0)") from None
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"{flag} {spec!r}: guide-fast runs on cpu or cuda, not {dev.type}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise InputError(f"{flag} {spec} was asked for but {why}; use --device cpu (or leave --device out)")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise InputError(f"{flag} {spec}: there {'is' if count == 1 else 'are'} only {count} CUDA device(s) "
                             f"(cuda:0 to cuda:{count - 1})")
    return dev


def check_renderer(renderer: str, device: "torch.device", flag: str = "--renderer") -> None:
    """InputError naming the flag when the plan could not run `renderer` on `device`."""
    from ..plan import triton_usable

    if renderer == "triton" and not triton_usable(device):
        raise InputError(f"{flag} triton needs a CUDA device (the device is {device}); use {flag} reference "
                         f"or leave {flag} out")


def check_precision(precision: str, device: "torch.device", flag: str = "--precision") -> None:
    """InputError naming the flag when the plan could not run `precision` on `device`."""
    from ..plan import bf16_usable

    if precision == "bf16" and not bf16_usable(device):
        raise InputError(f"{flag} bf16 needs a CUDA device (the device is {device}); use {flag} fp32")


def resolve_plan(device: "torch.device", *, renderer: str = "auto", precision: str = "auto",
                 renderer_flag: str = "--renderer", precision_flag: str = "--precision",
                 **choices) -> "ExecutionPlan":
    """The command's ExecutionPlan: the flags checked with their names first, then ExecutionPlan.resolve
    (path, upsample_conv, memory_format, cuda_graph, compile pass through as `choices`)."""
    from ..plan import ExecutionPlan

    check_renderer(renderer, device, renderer_flag)
    check_precision(precision, device, precision_flag)
    return ExecutionPlan.resolve(device, renderer=renderer, precision=precision, **choices)


def check_positive(value: "int | float | None", flag: str, minimum: int = 1, maximum: "int | None" = None) -> None:
    """`flag` in [minimum, maximum]: the bound keeps a typo (1e12 steps, samples or views) from a
    run that allocates terabytes or never ends, and names the flag rather than a config field."""
    if value is not None and value < minimum:
        raise InputError(f"{flag} must be >= {minimum}, got {value}")
    if value is not None and maximum is not None and value > maximum:
        raise InputError(f"{flag} must be <= {maximum:,}, got {value:,}")
