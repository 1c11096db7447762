"""What every benchmark shares: timing, the environment of a row, and the results file.

Rows go to benchmarks/results/results.csv (appended) with the columns below; a number never
stands alone: each row names the device, versions and the commit measured.
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(os.environ.get("GUIDE_FAST_RESULTS_DIR", Path(__file__).resolve().parent / "results"))
COLUMNS = [
    "benchmark", "what", "path", "shape", "dtype", "median_ms", "p20_ms", "p80_ms", "peak_mb",
    "extra", "device", "torch", "triton", "commit", "date",
]


def device_name(device=None) -> str:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def git_commit() -> str:
    env = os.environ.get("GUIDE_FAST_COMMIT")
    if env:
        return env
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except Exception:
        return "unknown"


def versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "n/a"
    return {"torch": torch.__version__, "triton": triton_version}


def parse_args(parser, argv=None):
    """parser.parse_args(argv); with GUIDE_FAST_CHECK_ARGS=1 that is all: the GPU suite's dry run
    (GPU_SUITE_DRY_RUN=1 benchmarks/gpu_suite.sh) checks every part's flags this way, on any
    machine, before a lent GPU's minutes are spent on a typo."""
    args = parser.parse_args(argv)
    if os.environ.get("GUIDE_FAST_CHECK_ARGS") == "1":
        print(f"arguments ok: {parser.prog} {' '.join(argv) if argv is not None else ''}".rstrip(), flush=True)
        raise SystemExit(0)
    return args


def time_fn(fn, *, warmup: int = 3, repeats: int = 20, device=None, min_time_s: float = 0.0) -> dict:
    """Median / p20 / p80 in milliseconds. CUDA: events around each call; CPU: perf_counter."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        while len(times) < repeats or (time.perf_counter() - start) < min_time_s:
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
    else:
        start = time.perf_counter()
        while len(times) < repeats or (time.perf_counter() - start) < min_time_s:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) >= 2 else [times[0]] * 9
    return {"median_ms": statistics.median(times), "p20_ms": q[1], "p80_ms": q[7], "n": len(times)}


def time_session_steps(session, warm: int, steps: int) -> dict:
    """Median / p20 / p80 ms of `steps` session steps after `warm` untimed ones (on CUDA: the
    eager warm-up steps, the capture and one replay), each synchronised; raises on a non-finite loss."""
    for _ in range(warm):
        session.step()
    session.synchronize()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        session.step()
        session.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    session.read_losses()
    times.sort()
    k = len(times)
    return {"median_ms": statistics.median(times), "p20_ms": times[int(0.2 * (k - 1))],
            "p80_ms": times[int(0.8 * (k - 1))]}


def peak_memory_mb(device=None) -> float | None:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


def reset_peak(device=None) -> None:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def make_row(benchmark: str, what: str, *, path: str = "", shape: str = "", dtype: str = "", timing: dict | None = None,
             peak_mb: float | None = None, extra: str = "", device=None) -> dict:
    timing = timing or {}
    fmt = lambda v: "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
    return {
        "benchmark": benchmark, "what": what, "path": path, "shape": shape, "dtype": dtype,
        "median_ms": fmt(timing.get("median_ms")), "p20_ms": fmt(timing.get("p20_ms")),
        "p80_ms": fmt(timing.get("p80_ms")), "peak_mb": fmt(peak_mb), "extra": extra,
        "device": device_name(device), **versions(), "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def write_rows(rows: list[dict], filename: str = "results.csv") -> Path:
    """Append rows to the results CSV (created with a header if absent) and print them."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / filename
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in COLUMNS})
    for r in rows:
        print(" | ".join(f"{k}={r[k]}" for k in ("benchmark", "what", "path", "shape", "dtype", "median_ms", "peak_mb", "extra") if r.get(k)))
    return path
