"""One loss log for every optimisation loop (the unlearning engine, the photo inversion).

Losses stay on the device, one row per step, and are copied to the host in blocks: a read-back
per step would make the host wait for the GPU every step (and cannot happen inside a captured
CUDA graph). Each read checks that every value is finite, so a diverged run stops at the first
block that shows it, naming the step.

    log = LossLog(steps=1000, row_shape=(5,), device=dev)
    log.record(torch.stack([...]))       # capture-safe: the row index is a device counter
    for step, row in log.read(upto=steps_done, error=lambda step, row: MyError(...)): ...
"""
from __future__ import annotations

import math
from typing import Callable

import torch


def _all_finite(values) -> bool:
    if isinstance(values, (list, tuple)):
        return all(_all_finite(v) for v in values)
    return math.isfinite(values)


class LossLog:
    """A device-side table [steps, *row_shape] written one row per step.

    `record(row)` writes at a device-side step counter (index_copy_, no host sync, so it can be
    captured in a CUDA graph and replayed); `read(upto)` returns the rows written since the last
    read, as (step number counted from 1, row as nested Python lists)."""

    def __init__(self, steps: int, row_shape: tuple[int, ...] | int, device: torch.device | str):
        if isinstance(row_shape, int):
            row_shape = (row_shape,)
        self.row_shape = tuple(int(n) for n in row_shape)
        self.capacity = max(int(steps), 1)
        self.values = torch.zeros(self.capacity, *self.row_shape, device=device)
        self.counter = torch.zeros(1, dtype=torch.long, device=device)
        self.read_upto = 0

    def record(self, row: torch.Tensor) -> None:
        """Write `row` (shape row_shape) at the next step; a step past the capacity overwrites
        the last row rather than writing out of bounds."""
        row = row.detach().to(self.values.dtype).reshape(1, *self.row_shape)
        self.values.index_copy_(0, self.counter.clamp(max=self.capacity - 1), row)
        self.counter.add_(1)

    def read(self, upto: int, error: Callable[[int, list], Exception] | None = None) -> list[tuple[int, list]]:
        """Rows of steps read_upto+1 .. upto (one copy to the host). If a row holds a non-finite
        value, `error(step, row)` is raised for the first such step (default: ValueError)."""
        upto = min(int(upto), self.capacity)
        if upto <= self.read_upto:
            return []
        rows = self.values[self.read_upto:upto].cpu().tolist()
        first = self.read_upto + 1
        out = []
        for j, row in enumerate(rows):
            if not _all_finite(row):
                step = first + j
                raise (error(step, row) if error is not None else ValueError(f"non-finite loss at step {step}"))
            out.append((first + j, row))
        self.read_upto = upto
        return out
