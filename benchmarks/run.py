"""One runner for every benchmark: `python -m benchmarks` (or `python benchmarks/run.py`).

Discovers benchmarks/bench_*.py (render, identity, unlearn, eval, ...), runs each as a
subprocess (`python -m benchmarks.bench_<name> [--quick]`) with a timeout, then collects the
rows they appended to results/results.csv during this run and writes

* results/SUMMARY.md: which benchmarks ran (status, seconds, rows), the rows as one markdown
  table, and a speed-up table pairing each fast row with the reference row of the same
  (benchmark, what, device);
* results/plot_<benchmark>.png: horizontal bars of median ms per row, reference vs fast;

and prints the summary table at the end. Every child shares one commit id (GUIDE_FAST_COMMIT)
and the results folder (GUIDE_FAST_RESULTS_DIR), so their rows agree.

    python -m benchmarks [--quick] [--only eval,render] [--skip unlearn] [--timeout S] [--list]
    python -m benchmarks --summarize-only [--since-commit C]   # summary of rows already written
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402

SUMMARY_COLUMNS = ["benchmark", "what", "path", "shape", "dtype", "median_ms", "p20_ms", "p80_ms", "peak_mb",
                   "device", "extra"]
REFERENCE_PATHS = ("reference", "eager", "baseline")


def discover(bench_dir: Path = HERE) -> list[str]:
    """Benchmark names (bench_<name>.py -> <name>), sorted."""
    return sorted(p.stem[len("bench_"):] for p in bench_dir.glob("bench_*.py"))


def _select(names: list[str], only: str | None, skip: str | None) -> list[str]:
    def split(s):
        return [x.strip() for x in (s or "").split(",") if x.strip()]

    wanted, unwanted = split(only), set(split(skip))
    unknown = [x for x in wanted + sorted(unwanted) if x not in names]
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; available: {names}")
    return [n for n in (wanted or names) if n not in unwanted]


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_one(name: str, *, quick: bool, timeout: float, python: str, env: dict, log_dir: Path) -> dict:
    cmd = [python, "-m", f"benchmarks.bench_{name}"] + (["--quick"] if quick else [])
    log_path = log_dir / f"bench_{name}.log"
    print(f"\n=== bench_{name}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    status = "ok"
    with open(log_path, "w") as log:
        # The child's output is streamed to the console and kept in a log beside the results;
        # a reader thread does the copying so that a silent, hung child still times out.
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)

        def pump():
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                log.write(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=timeout)
            if proc.returncode != 0:
                status = f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            status = f"timed out after {timeout:.0f}s"
        reader.join(timeout=10)
    seconds = time.perf_counter() - t0
    print(f"=== bench_{name}: {status} in {seconds:.1f}s", flush=True)
    return {"benchmark": name, "status": status, "seconds": seconds, "log": str(log_path)}


# ----------------------------------------------------------------------------------- summary
def _cell(value) -> str:
    return str(value if value not in (None, "") else "").replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _ms(row) -> float | None:
    try:
        v = float(row.get("median_ms") or "nan")
    except ValueError:
        return None
    return v if v == v else None


def speedups(rows: list[dict]) -> list[dict]:
    """Each non-reference row against the reference row(s) of the same benchmark, what and
    device (and the same shape when one matches): reference median / fast median."""
    out = []
    refs = [r for r in rows if r.get("path") in REFERENCE_PATHS and _ms(r)]
    for r in rows:
        if r.get("path") in REFERENCE_PATHS or not _ms(r):
            continue
        same = [x for x in refs if (x["benchmark"], x["what"], x["device"]) == (r["benchmark"], r["what"], r["device"])]
        if not same:
            continue
        exact = [x for x in same if x.get("shape") == r.get("shape")]
        ref = (exact or same)[0]
        out.append({"benchmark": r["benchmark"], "what": r["what"], "fast path": r["path"], "shape": r["shape"],
                    "reference ms": f"{_ms(ref):.3f}", "fast ms": f"{_ms(r):.3f}",
                    "speed-up": f"{_ms(ref) / _ms(r):.1f}x", "device": r["device"]})
    return out


def plot(rows: list[dict], out_dir: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots", file=sys.stderr)
        return []
    from guide_fast.io import atomic_path

    written = []
    for bench in sorted({r["benchmark"] for r in rows}):
        sub = [r for r in rows if r["benchmark"] == bench and _ms(r)]
        if not sub:
            continue
        labels = [f"{r['what']} | {r['shape']}"[:70] for r in sub]
        values = [_ms(r) for r in sub]
        colors = ["0.55" if r["path"] in REFERENCE_PATHS else "tab:blue" for r in sub]
        fig, ax = plt.subplots(figsize=(9, 0.35 * len(sub) + 1.4))
        y = range(len(sub))
        ax.barh(list(y), values, color=colors)
        ax.set_yticks(list(y), [f"[{r['path']}] {lab}" for r, lab in zip(sub, labels)], fontsize=7)
        ax.invert_yaxis()
        if max(values) / max(min(values), 1e-9) > 100:
            ax.set_xscale("log")
        for yi, v in zip(y, values):
            ax.text(v, yi, f" {v:.3g}", va="center", fontsize=7)
        devices = sorted({r["device"] for r in sub})
        ax.set_xlabel("median ms (grey: reference path, blue: fast path)")
        ax.set_title(f"bench_{bench} on {', '.join(devices)}", fontsize=9)
        path = out_dir / f"plot_{bench}.png"
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def write_summary(rows: list[dict], runs: list[dict], out_dir: Path, *, commit: str, quick: bool) -> Path:
    from guide_fast.io import write_bytes

    parts = [f"# Benchmark summary\n\ncommit `{commit}`, {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}"
             f"{' (--quick)' if quick else ''}; rows appended to `results.csv`.\n"]
    if runs:
        parts.append("## Runs\n\n" + markdown_table(
            [{**r, "seconds": f"{r['seconds']:.1f}"} for r in runs],
            ["benchmark", "status", "seconds", "rows"]) + "\n")
    parts.append("## Rows\n\n" + (markdown_table(rows, SUMMARY_COLUMNS) if rows else "(no rows)") + "\n")
    sp = speedups(rows)
    if sp:
        parts.append("## Fast vs reference (same benchmark, what and device)\n\n" + markdown_table(
            sp, ["benchmark", "what", "fast path", "shape", "reference ms", "fast ms", "speed-up", "device"]) + "\n")
    plots = sorted(p.name for p in out_dir.glob("plot_*.png"))
    if plots:
        parts.append("## Plots\n\n" + "\n".join(f"![{p}]({p})" for p in plots) + "\n")
    path = out_dir / "SUMMARY.md"
    write_bytes(path, "\n".join(parts).encode())
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Run every benchmarks/bench_*.py and summarise the results.")
    ap.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    ap.add_argument("--only", help="comma-separated benchmark names (e.g. eval,render)")
    ap.add_argument("--skip", help="comma-separated benchmark names to leave out")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per benchmark")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the benchmarks")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    ap.add_argument("--summarize-only", action="store_true", help="run nothing; summarise rows already in "
                    "results.csv (those of --since-commit, default the current commit)")
    ap.add_argument("--since-commit", default=None, help="with --summarize-only: the commit whose rows to show")
    args = ap.parse_args(argv)

    names = discover()
    if args.list:
        print("\n".join(names))
        return 0
    out_dir = common.RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "results.csv"
    commit = os.environ.get("GUIDE_FAST_COMMIT") or common.git_commit()

    runs: list[dict] = []
    if args.summarize_only:
        want = args.since_commit or commit
        rows = [r for r in read_rows(csv_path) if r.get("commit") == want]
    else:
        selected = _select(names, args.only, args.skip)
        env = dict(os.environ, GUIDE_FAST_COMMIT=commit, GUIDE_FAST_RESULTS_DIR=str(out_dir),
                   PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        log_dir = out_dir / "logs"
        log_dir.mkdir(exist_ok=True)
        before = len(read_rows(csv_path))
        for name in selected:
            start = len(read_rows(csv_path))
            run = run_one(name, quick=args.quick, timeout=args.timeout, python=args.python, env=env, log_dir=log_dir)
            run["rows"] = len(read_rows(csv_path)) - start
            runs.append(run)
        rows = read_rows(csv_path)[before:]
    plot(rows, out_dir)
    summary = write_summary(rows, runs, out_dir, commit=commit, quick=args.quick)

    print("\n" + "=" * 100)
    if runs:
        print(markdown_table([{**r, "seconds": f"{r['seconds']:.1f}"} for r in runs],
                             ["benchmark", "status", "seconds", "rows"]))
        print()
    print(markdown_table(rows, ["benchmark", "what", "path", "shape", "dtype", "median_ms", "peak_mb", "device"])
          if rows else "(no rows)")
    sp = speedups(rows)
    if sp:
        print()
        print(markdown_table(sp, ["benchmark", "what", "fast path", "reference ms", "fast ms", "speed-up"]))
    print(f"\nsummary: {summary}")
    return 0 if all(r["status"] == "ok" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
