"""Seconds per GUIDE step and peak memory: reference loop vs fast loop, N identities.

GPU (default preset ffhq512-128): reference (eager fp32, batch 1, term by term) vs fast (batched,
planes reused for the MSE, bf16, fused renderer, folded up-convs, CUDA graph); single-identity variants
(--ablations: channels_last, unfolded up-convs, no graph, reference renderer); then, with the
fastest single-identity settings, a full 1000-step run of one identity when the time budget
allows, and N = 4, 16 identities. Each row is written to the results file as soon as it exists.
CPU (tiny preset): the same comparison; the ratio there is what batching and caching alone
give (no bf16, no fused kernel, no graph).

The loss networks have random weights: speed does not depend on the weight values.
    python -m benchmarks.bench_unlearn [--quick] [--budget-s 240] [--ablations all|operators|none]
"""
from __future__ import annotations

import argparse
import time
import traceback

import torch

from benchmarks.common import make_row, peak_memory_mb, reset_peak, write_rows


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
    for _ in range(warm):
        session.step()
    session.synchronize()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        session.step()
        session.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    session.read_losses()  # raises on a non-finite loss
    times.sort()
    k = len(times)
    return {
        "timing": {"median_ms": times[k // 2], "p20_ms": times[int(0.2 * (k - 1))], "p80_ms": times[int(0.8 * (k - 1))]},
        "peak_mb": peak_memory_mb(device), "setup_s": setup, "capture_s": session.timings.get("capture_s"),
        "renderer": session.renderer, "precision": session.precision, "graph": session.use_graph,
        "upsample_conv": session.upsample_conv, "memory_format": session.memory_format,
        "cached_target_planes": getattr(session.stepper, "cache_target", False),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="auto", help="auto (ffhq512-128 on GPU, tiny on CPU), tiny or ffhq512-128")
    ap.add_argument("--identities", default=None, help="comma list of N (default 1,4,16 on GPU, 1,4 on CPU)")
    ap.add_argument("--ref-steps", type=int, default=None)
    ap.add_argument("--fast-steps", type=int, default=None)
    ap.add_argument("--budget-s", type=float, default=240.0, help="wall-clock budget; the full run is skipped if it would not fit")
    ap.add_argument("--full-run", choices=["auto", "yes", "no"], default="auto")
    ap.add_argument("--ablations", choices=["operators", "all", "none"], default="all",
                    help="GPU: which single-identity variants to time besides the default fast step: 'operators' "
                         "(channels_last, unfolded up-convs), 'all' (also no graph, reference renderer)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)

    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    preset = args.preset if args.preset != "auto" else ("ffhq512-128" if gpu else "tiny")
    ns = [int(x) for x in (args.identities or ("1,4,16" if gpu else "1,4")).split(",")]
    ref_steps = args.ref_steps or (2 if args.quick else 4)
    fast_steps = args.fast_steps or ((5 if args.quick else 20) if gpu else (2 if args.quick else 4))
    if gpu:
        torch.backends.cudnn.benchmark = True
    nets = build(preset, device)
    results = {}

    def emit(row):  # written at once: a suite stopped at its time limit keeps what ran
        write_rows([row])

    def describe(res):
        return (f"upsample_conv={res['upsample_conv']}; memory_format={res['memory_format']}; "
                f"cached_target_planes={res['cached_target_planes']}")

    def record(what, path, n, dtype, res=None, extra="", error=None):
        shape = f"N={n} {preset}"
        if error is not None:
            emit(make_row("unlearn", what, path=path, shape=shape, dtype=dtype, extra=f"ERROR: {error}", device=device))
            return
        ex = f"setup_s={res['setup_s']:.2f}; renderer={res['renderer']}; graph={res['graph']}"
        if res.get("capture_s"):
            ex += f"; capture_s={res['capture_s']:.2f}"
        ex += f"; per_identity_ms={res['timing']['median_ms'] / n:.1f}" + (f"; {extra}" if extra else "")
        emit(make_row("unlearn", what, path=path, shape=shape, dtype=dtype, timing=res["timing"],
                             peak_mb=res["peak_mb"], extra=ex, device=device))

    def run(key, what, path, n, cfg_kwargs, steps, dtype):
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

    base = dict(seed=0)
    run(("reference", 1), "step", "reference", 1, dict(base, path="reference", precision="fp32", renderer="reference"),
        ref_steps, "fp32")
    fast_dtype = "bf16" if gpu else "fp32"
    graph = "+graph" if gpu else ""
    fast = dict(base, path="fast")
    run(("fast", 1), "step", "fast" + graph, 1, fast, fast_steps, fast_dtype)
    # Single-identity operator variants, timed in the same process: the fastest one runs the
    # 1000-step run and the N sweep (its settings are written in those rows).
    variants = {"fast": fast}
    if gpu and args.ablations != "none":
        variants["fast-channels-last"] = dict(fast, memory_format="channels_last")
        variants["fast-unfolded"] = dict(fast, upsample_conv="reference")
        for key in ("fast-channels-last", "fast-unfolded"):
            run((key, 1), "step", f"fast{graph} ({key[5:]})", 1, variants[key], fast_steps, fast_dtype)
    timed = [k for k in variants if (k, 1) in results]
    best_key = min(timed, key=lambda k: results[(k, 1)]["timing"]["median_ms"]) if timed else "fast"
    best = variants[best_key]

    # A full paper-settings run (1000 steps, one identity) if the budget allows it.
    fast1 = results.get((best_key, 1))
    left = args.budget_s - (time.perf_counter() - start)
    want_full = args.full_run == "yes" or (args.full_run == "auto" and gpu and fast1 is not None
                                           and fast1["timing"]["median_ms"] * 1000 / 1e3 + 30 < left)
    if want_full:
        from guide_fast.unlearn.config import UnlearnConfig
        from guide_fast.unlearn.engine import Unlearner

        try:
            gen, id_loss, lpips = nets
            reset_peak(device)
            t0 = time.perf_counter()
            res = Unlearner(gen, id_loss, lpips, UnlearnConfig(**best)).unlearn(seeds=[0], render=False)
            wall = time.perf_counter() - t0
            t = res.timings
            emit(make_row(
                "unlearn", "full run (1000 steps, 1 identity)", path="fast", shape=f"N=1 {preset}", dtype=fast_dtype,
                timing={"median_ms": wall * 1e3}, peak_mb=peak_memory_mb(device),
                extra=(f"wall_s={wall:.1f}; loop_s={t['loop_s']:.1f}; setup_s={t['setup_s']:.1f}; "
                       f"capture_s={t.get('capture_s', 0):.1f}; steady_step_ms={t['steady_step_ms']:.1f}; "
                       f"final_total_loss={res.losses[-1]['total']:.4f}; {describe(t)}; "
                       f"target_30s={'met' if wall <= 30 else 'not met'}"),
                device=device))
        except Exception as exc:
            traceback.print_exc()
            emit(make_row("unlearn", "full run (1000 steps, 1 identity)", path="fast", shape=f"N=1 {preset}",
                                 dtype=fast_dtype, extra=f"ERROR: {type(exc).__name__}: {exc}"[:300], device=device))
    elif gpu:
        est = fast1["timing"]["median_ms"] if fast1 else float("nan")
        emit(make_row("unlearn", "full run (1000 steps, 1 identity)", path="fast", shape=f"N=1 {preset}",
                             dtype=fast_dtype, extra=f"NOT RUN (time budget); estimate from the step time: "
                                                     f"{est:.1f} s + setup", device=device))
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
