"""Seconds per GUIDE step and peak memory: reference loop vs fast loop, N identities.

GPU (default preset ffhq512-128): reference (eager fp32, batch 1, term by term) vs fast (batched,
planes reused for the MSE, bf16, fused renderer, folded up-convs, CUDA graph); single-identity variants
(--ablations: channels_last, unfolded up-convs, no graph, reference renderer); then, with the
fastest single-identity settings, a full 1000-step run of one identity when the time budget
allows, and N = 4, 16 identities. Each row is written to the results file as soon as it exists.
CPU (tiny preset): the same comparison; the ratio there is what batching and caching alone
give (no bf16, no fused kernel, no graph).

The loss networks have random weights: speed does not depend on the weight values.

Three rows head the results (issue 12, "time what a user runs"), at paper settings (1000 steps,
default noise and caching, `--seed` identity, random weights in the FFHQ 512/128 layout):
  (a) "loop": the 1000-step loop of a warm `Unlearner.unlearn` (UnlearnSession.run's loop_s);
  (b) "cold process": `python -m guide_fast unlearn ... --random-nets` in a subprocess, from
      process start to written outputs (loading, compile and warm-up, capture, 1000 steps, final
      renders, report, checkpoint and delta writes);
  (c) "warm service": a second `Unlearner.unlearn` in the same process (after a short warm-up
      run of the same layout), start of the call to its result.
Every step row reports achieved TFLOP/s against docs/performance.md §2's 7.4 TFLOP per step and
identity (FFHQ preset; the tiny preset has no such count). Then the per-step micro-benchmarks:
reference vs fast, compile on/off (--compile-ablation), noise_passes shared/separate
(--noise-ablation), operator variants, N identities.
    python -m benchmarks.bench_unlearn [--quick] [--budget-s 240] [--ablations all|operators|none]
    python -m benchmarks.bench_unlearn --smoke        # CPU, tiny preset, seconds: every code path once
"""
from __future__ import annotations

import argparse
import time
import traceback

import torch

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import make_row, parse_args, peak_memory_mb, reset_peak, time_session_steps, write_rows

# docs/performance.md §2: work per GUIDE step and identity at the FFHQ 512/128 settings
TFLOP_PER_STEP = {"ffhq512-128": 7.4}
PEAK_BF16_TFLOPS = 790.0  # docs/performance.md §3: a large bf16 GEMM on an H100/H200


def tflops(preset: str, step_ms: float, n: int = 1) -> str:
    """'achieved_tflops=X (Y% of the 790 TFLOP/s bf16 peak)' for a step of n identities, or ''."""
    work = TFLOP_PER_STEP.get(preset)
    if work is None or not step_ms or step_ms != step_ms:
        return ""
    rate = work * n / (step_ms / 1e3)
    return f"achieved_tflops={rate:.1f} ({100 * rate / PEAK_BF16_TFLOPS:.1f}% of {PEAK_BF16_TFLOPS:.0f} bf16 peak)"


def build(preset: str, device):
    from guide_fast.eg3d.generator import build_generator
    from guide_fast.identity import IdentityLoss, build_backbone
    from guide_fast.perceptual import LPIPS

    gen = build_generator(preset, seed=0, device=device)
    return gen, IdentityLoss(build_backbone("ir_se50", seed=0)).to(device), LPIPS.random(0).to(device)


def time_steps(nets, cfg_kwargs, seeds, steps: int, device) -> dict:
    """Prepare a session, run warm-up (incl. graph capture), then time `steps` steps."""
    from guide_fast.unlearn.config import UnlearnConfig
    from guide_fast.unlearn.engine import Unlearner

    gen, id_loss, lpips = nets
    cfg = UnlearnConfig(**cfg_kwargs)
    warm = cfg.warmup_steps + 2 if cfg.path == "fast" else 1
    cfg.iterations = warm + steps
    reset_peak(device)
    t0 = time.perf_counter()
    session = Unlearner(gen, id_loss, lpips, cfg).prepare(seeds=seeds)
    setup = time.perf_counter() - t0
    timing = time_session_steps(session, warm, steps)
    return {
        "timing": timing,
        "peak_mb": peak_memory_mb(device), "setup_s": setup, "capture_s": session.timings.get("capture_s"),
        "renderer": session.plan.renderer, "precision": session.plan.precision, "graph": session.use_graph,
        "upsample_conv": session.plan.upsample_conv, "memory_format": session.plan.memory_format,
        "skip_path": session.plan.skip_path,
        "cached_target_planes": getattr(session.stepper, "cache_target", False),
        "noise_passes": cfg.noise_passes, "compile": session.plan.compile,
        "compile_error": session.compile_report.error_text(),
        # a fallback is part of what was timed: a row says when the run left its plan
        "kernel_error": session.timings.get("kernel_error"), "graph_error": session.timings.get("graph_error"),
    }


def cold_process(preset: str, seed: int, iters: int, device, flags: list, timeout_s: float) -> dict:
    """Row (b): `python -m guide_fast unlearn` in a fresh process, start to written outputs."""
    out = Path(tempfile.mkdtemp(prefix="guide_fast_cold_")) / "run"
    cmd = [sys.executable, "-m", "guide_fast", "unlearn", "--generator", preset, "--random-nets", "--seed", str(seed),
           "--iters", str(iters), "--out", str(out), "--no-progress", "--device", str(device),
           # random-weight renders hold no face for MTCNN (and the GPU machine may lack facenet-pytorch):
           # the report's similarity uses the fixed crop
           "--align", "crop", *flags]
    # Triton's on-disk kernel cache before the run: empty on a fresh machine (the row then pays
    # every JIT compile), filled by earlier processes otherwise (a restarted service)
    cache = Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")
    cached = sum(1 for _ in cache.glob("*")) if cache.is_dir() else 0
    triton_cache = f"Triton disk cache {'empty' if not cached else f'{cached} entries'} before"
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=dict(os.environ))
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    import json

    report = json.loads((out / "report.json").read_text())
    written = sorted(p.name for p in out.iterdir())
    return {"wall_s": wall, "timings": report.get("timings", {}), "written": written, "triton_cache": triton_cache}


def fallbacks(timings: dict) -> str:
    """The plan a headline run really ran (renderer, skip path) and any fallback it took, for its row."""
    return (f"renderer={timings.get('renderer')}; skip_path={timings.get('skip_path')}; "
            f"compile_error={timings.get('compile_error')}; kernel_error={timings.get('kernel_error')}; "
            f"graph_error={timings.get('graph_error')}")


def headline(nets, preset: str, device, seed: int, iters: int, cfg_kwargs: dict, warm_iters: int = 3) -> dict:
    """Rows (a) and (c): a short run of the same layout warms the service (compiled graphs,
    cuDNN plans, allocator), then a second `Unlearner.unlearn` at paper settings is timed whole."""
    from guide_fast.unlearn.config import UnlearnConfig
    from guide_fast.unlearn.engine import Unlearner

    gen, id_loss, lpips = nets
    Unlearner(gen, id_loss, lpips, UnlearnConfig(**dict(cfg_kwargs, iterations=warm_iters))).unlearn(
        seeds=[seed], render=False)
    reset_peak(device)
    t0 = time.perf_counter()
    res = Unlearner(gen, id_loss, lpips, UnlearnConfig(**dict(cfg_kwargs, iterations=iters))).unlearn(seeds=[seed])
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "timings": res.timings, "peak_mb": peak_memory_mb(device),
            "final_total": res.losses[-1]["total"] if res.losses else float("nan")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="auto", help="auto (ffhq512-128 on GPU, tiny on CPU), tiny or ffhq512-128")
    ap.add_argument("--identities", default=None, help="comma list of N (default 1,4,16 on GPU, 1,4 on CPU)")
    ap.add_argument("--ref-steps", type=int, default=None)
    ap.add_argument("--fast-steps", type=int, default=None)
    ap.add_argument("--budget-s", type=float, default=240.0,
                    help="wall-clock budget; parts that would not fit are written as NOT RUN rows")
    ap.add_argument("--iters", type=int, default=1000, help="steps of the headline runs (paper: 1000)")
    ap.add_argument("--seed", type=int, default=0, help="the identity of the headline runs (--seed of the CLI)")
    ap.add_argument("--headline", choices=["auto", "yes", "no"], default="auto",
                    help="the three headline rows (auto: on a GPU, and in --smoke)")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                    help="the headline runs' compile setting (auto: the execution plan's default)")
    ap.add_argument("--compile-ablation", choices=["auto", "yes", "all", "no"], default="auto",
                    help="fast step with compile on besides the default; 'all' (and 'auto' on a GPU) also "
                         "Inductor's reduce-overhead mode (its CUDA graphs instead of the engine's capture)")
    ap.add_argument("--noise-ablation", choices=["auto", "yes", "no"], default="auto",
                    help="fast step with noise_passes='separate' besides the default 'shared'")
    ap.add_argument("--kernel-ablation", choices=["auto", "yes", "no"], default="auto",
                    help="fast step with the fused skip-path kernel (skip_path='triton') besides the default "
                         "(auto: on a GPU)")
    ap.add_argument("--micro", choices=["yes", "no"], default="yes", help="the per-step micro-benchmarks")
    ap.add_argument("--full-run", choices=["auto", "yes", "no"], default="no",
                    help="the former in-process 1000-step row (the headline rows replace it)")
    ap.add_argument("--ablations", choices=["operators", "all", "none"], default="all",
                    help="GPU: which single-identity variants to time besides the default fast step: 'operators' "
                         "(channels_last, unfolded up-convs), 'all' (also no graph, reference renderer)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU smoke run: tiny preset, 2-step headline runs, one step per row, every part once")
    args = parse_args(ap, argv)

    start = time.perf_counter()
    if os.environ.get("PART_BUDGET_S"):  # gpu_suite.sh: what the suite gives this part
        args.budget_s = min(args.budget_s, float(os.environ["PART_BUDGET_S"]) - 10)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    if args.smoke:
        # Inductor's C++ compile of the whole step takes minutes on a small CPU: the smoke run's
        # compile row traces and differentiates the same graphs and runs them eagerly (aot_eager)
        if not gpu:
            os.environ.setdefault("GUIDE_FAST_COMPILE_BACKEND", "aot_eager")
        args.preset, args.iters = "tiny", min(args.iters, 2)
        args.identities = args.identities or "1"
        args.ref_steps, args.fast_steps = args.ref_steps or 1, args.fast_steps or 1
        args.ablations = "none"
    preset = args.preset if args.preset != "auto" else ("ffhq512-128" if gpu else "tiny")
    ns = [int(x) for x in (args.identities or ("1,4,16" if gpu else "1,4")).split(",")]
    ref_steps = args.ref_steps or (2 if args.quick else 4)
    fast_steps = args.fast_steps or ((5 if args.quick else 20) if gpu else (2 if args.quick else 4))
    on = lambda flag: flag == "yes" or (flag == "auto" and (gpu or args.smoke))  # noqa: E731
    if gpu:
        torch.backends.cudnn.benchmark = True
    nets = build(preset, device)
    results = {}

    def left() -> float:
        return args.budget_s - (time.perf_counter() - start)

    def emit(row):  # written at once: a suite stopped at its time limit keeps what ran
        write_rows([row])

    def describe(res):
        return (f"upsample_conv={res['upsample_conv']}; skip_path={res.get('skip_path', 'reference')}; "
                f"memory_format={res['memory_format']}; "
                f"cached_target_planes={res['cached_target_planes']}; noise_passes={res.get('noise_passes', 'shared')}; "
                f"compile={res.get('compile', False)}")

    def record(what, path, n, dtype, res=None, extra="", error=None):
        shape = f"N={n} {preset}"
        if error is not None:
            emit(make_row("unlearn", what, path=path, shape=shape, dtype=dtype, extra=f"ERROR: {error}", device=device))
            return
        ex = f"setup_s={res['setup_s']:.2f}; renderer={res['renderer']}; graph={res['graph']}"
        if res.get("capture_s"):
            ex += f"; capture_s={res['capture_s']:.2f}"
        for key in ("compile_error", "kernel_error", "graph_error"):
            if res.get(key):
                ex += f"; {key}={res[key][:120]}"
        ex += f"; per_identity_ms={res['timing']['median_ms'] / n:.1f}"
        rate = tflops(preset, res["timing"]["median_ms"], n)
        ex += (f"; {rate}" if rate else "") + (f"; {extra}" if extra else "")
        emit(make_row("unlearn", what, path=path, shape=shape, dtype=dtype, timing=res["timing"],
                      peak_mb=res["peak_mb"], extra=ex, device=device))

    fast_dtype = "bf16" if gpu else "fp32"
    graph = "+graph" if gpu else ""
    base = dict(seed=0)
    fast = dict(base, path="fast")

    # ---- the three headline rows: what a user runs ------------------------------------------------
    if on(args.headline):
        head_cfg = dict(fast, compile=args.compile)
        flags = ["--compile", args.compile]
        shape = f"N=1 {preset}, {args.iters} steps, --seed {args.seed}"
        # the cold process and the warm run, each ~iters x step (122 ms on an H200 today) + set-up
        est_s = 2.0 * args.iters * (0.125 if gpu else 1.0) + 45
        if args.smoke or args.headline == "yes" or est_s < left():
            try:
                cold = cold_process(preset, args.seed, args.iters, device.type, flags, timeout_s=max(60.0, left()))
                t = cold["timings"]
                emit(make_row(
                    "unlearn", "(b) cold process: guide-fast unlearn, start to written outputs", path="fast",
                    shape=shape, dtype=fast_dtype, timing={"median_ms": cold["wall_s"] * 1e3},
                    extra=(f"wall_s={cold['wall_s']:.1f}; loop_s={t.get('loop_s', float('nan')):.1f}; "
                           f"setup_s={t.get('setup_s', 0):.1f}; first_step_s={t.get('first_step_s', 0):.1f} "
                           f"(Triton JIT + autotune, cuDNN benchmarking; {cold['triton_cache']}); "
                           f"compile_s={t.get('compile_s', 0):.1f}; "
                           f"capture_s={t.get('capture_s', 0):.1f}; render_s={t.get('render_s', 0):.1f}; "
                           f"total_s={t.get('total_s', 0):.1f}; {fallbacks(t)}; "
                           f"written={','.join(cold['written'])}; "
                           f"target_60s={'met' if cold['wall_s'] <= 60 else 'not met'}"),
                    device=device))
            except Exception as exc:
                traceback.print_exc()
                emit(make_row("unlearn", "(b) cold process: guide-fast unlearn, start to written outputs",
                              path="fast", shape=shape, dtype=fast_dtype,
                              extra=f"ERROR: {type(exc).__name__}: {exc}"[:300], device=device))
            try:
                warm = headline(nets, preset, device, args.seed, args.iters, head_cfg)
                t = warm["timings"]
                step_ms = t.get("steady_step_ms", float("nan"))
                rate = tflops(preset, step_ms)
                common = (f"steady_step_ms={step_ms:.1f}; first_step_s={t.get('first_step_s', 0):.2f}; "
                          f"capture_s={t.get('capture_s', 0):.2f}; compile_s={t.get('compile_s', 0):.2f}; "
                          f"compile={t.get('compile', {}).get('modules') != []}; cuda_graph={t.get('cuda_graph')}; "
                          f"noise_passes={t.get('noise_passes')}; final_total_loss={warm['final_total']:.4f}; "
                          f"{fallbacks(t)}"
                          + (f"; {rate}" if rate else ""))
                emit(make_row("unlearn", "(a) loop: 1000-step loop alone (warm process)" if args.iters == 1000 else
                              f"(a) loop: {args.iters}-step loop alone (warm process)", path="fast" + graph,
                              shape=shape, dtype=fast_dtype, timing={"median_ms": t["loop_s"] * 1e3},
                              peak_mb=warm["peak_mb"],
                              extra=f"loop_s={t['loop_s']:.1f}; {common}; "
                                    f"target_30s={'met' if t['loop_s'] <= 30 else 'not met'}", device=device))
                emit(make_row("unlearn", "(c) warm service: second Unlearner.unlearn in one process", path="fast" + graph,
                              shape=shape, dtype=fast_dtype, timing={"median_ms": warm["wall_s"] * 1e3},
                              peak_mb=warm["peak_mb"],
                              extra=(f"wall_s={warm['wall_s']:.1f}; setup_s={t.get('setup_s', 0):.1f}; "
                                     f"loop_s={t['loop_s']:.1f}; render_s={t.get('render_s', 0):.1f}; "
                                     f"reused_graphs={len(t.get('compile', {}).get('reused_from_process_cache', []))}; "
                                     f"{common}; target_30s={'met' if warm['wall_s'] <= 30 else 'not met'}"),
                              device=device))
            except Exception as exc:
                traceback.print_exc()
                emit(make_row("unlearn", "(a)/(c) warm-process runs", path="fast", shape=shape, dtype=fast_dtype,
                              extra=f"ERROR: {type(exc).__name__}: {exc}"[:300], device=device))
            finally:
                if gpu:
                    torch.cuda.empty_cache()
        else:
            emit(make_row("unlearn", "(a)(b)(c) headline runs", path="fast", shape=shape, dtype=fast_dtype,
                          extra=f"NOT RUN (time budget: {left():.0f} s left, about {est_s:.0f} s needed)", device=device))

    # ---- per-step micro-benchmarks ----------------------------------------------------------------
    if args.micro == "no":
        return 0

    def run(key, what, path, n, cfg_kwargs, steps, dtype):
        if left() < 15 and not args.smoke:
            record(what, path, n, dtype, error=f"NOT RUN (time budget: {left():.0f} s left)")
            return
        try:
            res = time_steps(nets, cfg_kwargs, list(range(n)), steps, device)
            results[key] = res
            extra = describe(res) if cfg_kwargs.get("path") == "fast" else ""
            if key != ("reference", 1) and ("reference", 1) in results:
                ref = results[("reference", 1)]["timing"]["median_ms"]
                extra += f"; speedup_vs_reference_per_identity={ref / (res['timing']['median_ms'] / n):.1f}x"
            record(what, path, n, dtype, res, extra)
        except Exception as exc:  # record OOM / capture failures and go on
            traceback.print_exc()
            record(what, path, n, dtype, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        finally:
            if gpu:
                torch.cuda.empty_cache()

    run(("reference", 1), "step", "reference", 1, dict(base, path="reference", precision="fp32", renderer="reference"),
        ref_steps, "fp32")
    run(("fast", 1), "step", "fast" + graph, 1, fast, fast_steps, fast_dtype)
    variants = {"fast": fast}
    if args.kernel_ablation == "yes" or (args.kernel_ablation == "auto" and gpu):
        # the fused skip-path kernel (kernels/skip_path.py), before the slow compile rows
        variants["fast-skip-triton"] = dict(fast, skip_path="triton")
        run(("fast-skip-triton", 1), "step", f"fast{graph} (skip-path triton)", 1, variants["fast-skip-triton"],
            fast_steps, fast_dtype)
    if on(args.noise_ablation):
        run(("fast-separate", 1), "step", f"fast{graph} (noise_passes separate)", 1,
            dict(fast, noise_passes="separate"), fast_steps, fast_dtype)
    if on(args.compile_ablation):  # last of the single-identity rows: Inductor's compile is the slow part
        run(("fast-compiled", 1), "step", f"fast{graph}+compile", 1, dict(fast, compile="on"), fast_steps, fast_dtype)
        if gpu and args.compile_ablation in ("auto", "all"):  # Inductor's own CUDA graphs instead of the engine's capture
            run(("fast-compiled-ro", 1), "step", "fast+compile (reduce-overhead)", 1,
                dict(fast, compile="on", compile_mode="reduce-overhead"), fast_steps, fast_dtype)
    # Single-identity operator variants, timed in the same process: the fastest one runs the
    # N sweep (its settings are written in those rows).
    if gpu and args.ablations != "none":
        variants["fast-channels-last"] = dict(fast, memory_format="channels_last")
        variants["fast-unfolded"] = dict(fast, upsample_conv="reference")
        for key in ("fast-channels-last", "fast-unfolded"):
            run((key, 1), "step", f"fast{graph} ({key[5:]})", 1, variants[key], fast_steps, fast_dtype)
    timed = [k for k in variants if (k, 1) in results]
    best_key = min(timed, key=lambda k: results[(k, 1)]["timing"]["median_ms"]) if timed else "fast"
    best = variants[best_key]

    if args.full_run == "yes":
        from guide_fast.unlearn.config import UnlearnConfig
        from guide_fast.unlearn.engine import Unlearner

        gen, id_loss, lpips = nets
        reset_peak(device)
        t0 = time.perf_counter()
        res = Unlearner(gen, id_loss, lpips, UnlearnConfig(**best)).unlearn(seeds=[0], render=False)
        wall = time.perf_counter() - t0
        t = res.timings
        emit(make_row("unlearn", "full run (1000 steps, 1 identity, no renders)", path="fast", shape=f"N=1 {preset}",
                      dtype=fast_dtype, timing={"median_ms": wall * 1e3}, peak_mb=peak_memory_mb(device),
                      extra=f"wall_s={wall:.1f}; loop_s={t['loop_s']:.1f}; steady_step_ms={t['steady_step_ms']:.1f}; "
                            f"{describe(t)}", device=device))
    for n in ns:
        if n != 1:
            run(("fast", n), "step", "fast" + graph, n, best, fast_steps, fast_dtype)
    if gpu and args.ablations == "all":
        run(("fast-eager", 1), "step", "fast-eager (no graph)", 1, dict(best, cuda_graph=False), fast_steps, fast_dtype)
        run(("fast-reference-renderer", 1), "step", "fast (reference renderer, no graph)", 1,
            dict(best, cuda_graph=False, renderer="reference"), max(3, fast_steps // 4), fast_dtype)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
