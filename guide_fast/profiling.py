"""NVTX ranges for Nsight Systems. They cost a few microseconds with no profiler attached and
nothing at all where neither CUDA-enabled torch nor the `nvtx` package is usable.

Range names used by the engine (profiling/README.md): step, mapping, backbone, render,
superres, lpips, identity, backward, optimizer.
"""
from __future__ import annotations

import contextlib
import functools


@functools.lru_cache(maxsize=1)
def _backend():
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.nvtx.range_push("guide-fast")
            torch.cuda.nvtx.range_pop()
            return ("torch", torch.cuda.nvtx)
    except Exception:  # CPU builds of torch raise on torch.cuda.nvtx
        pass
    try:
        import nvtx

        return ("nvtx", nvtx)
    except Exception:
        return (None, None)


@contextlib.contextmanager
def nvtx_range(name: str):
    kind, mod = _backend()
    if kind == "torch":
        mod.range_push(name)
        try:
            yield
        finally:
            mod.range_pop()
    elif kind == "nvtx":
        with mod.annotate(name, domain="guide-fast"):
            yield
    else:
        yield
