"""Evaluation: ID over 11 views + FID_pre on N paired samples (issue 7; docs/performance.md §5 target:
at most 60 s for N = 5000 on one H100).

Fast path (guide_fast.evaluation): batched renders of both generators, PNG quantisation in
memory, batched Inception and identity features, one Fréchet distance. Reference path (what
GUIDE's evaluate_fid.py does per sample): batch-1 render of each generator with the PyTorch
renderer, PNG written and read back through PIL, Inception on the reloaded images.

Networks have random weights (timing does not depend on them): a perturbed copy of the source
generator stands for the unlearned one, a random IR-101 scores identity with the ID-loss crop
(random renders hold no face MTCNN could find; the GPU machine has no facenet-pytorch anyway),
a random Inception gives the features.

GPU: FFHQ preset (512x512), N = 5000 when the measured per-pair cost says it fits in the time
budget (--budget-s, default 90 s), else as many as fit, with the N = 5000 time extrapolated
linearly and labelled so. CPU: tiny preset (64x64), N = 64 (32 with --quick).

--full-run: N = 5000 on the GPU whatever the calibration says (the real run, never extrapolated).
--operators-ablation (GPU): the measured run again with the fast path's exact-maths operators,
folded up-convolutions and the skip-path kernel (`evaluate --upsample-conv folded --skip-path
triton`); evaluation keeps the official operators by default until this row says they pay.
--compile-ablation: the measured run again with the generators' backbone synthesis and
super-resolution compiled (guide_fast/compiled.py; the compile time is in the row).

    python -m benchmarks.bench_eval [--quick] [--samples N] [--budget-s S] [--renderer auto|reference|triton]
                                    [--full-run] [--operators-ablation] [--compile-ablation]
"""
from __future__ import annotations

import argparse
import io
import sys
import time

import numpy as np
import torch

from . import common

BENCH = "eval"
TARGET_SAMPLES = 5000
TARGET_S = 60.0


def _perturbed(gen, scale=0.05, seed=1):
    out = gen.copy()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if name.startswith("backbone.synthesis."):
                p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=g).to(p.device))
    return out


def _pick_renderer(choice: str, gen, device) -> tuple[str, str]:
    """'auto': the fused Triton renderer on CUDA when it runs, else the reference one."""
    if choice != "auto":
        return choice, ""
    if device.type != "cuda":
        return "reference", ""
    try:
        from guide_fast import cameras

        gen.set_renderer("triton")
        w = gen.mapping(torch.randn(1, gen.config.z_dim, device=device), cameras.frontal_label(1).to(device))
        with torch.no_grad():
            gen.synthesis(w, cameras.frontal_label(1).to(device))
        torch.cuda.synchronize(device)
        return "triton", ""
    except Exception as exc:  # no Triton, kernel failure: measure the reference instead, and say so
        gen.set_renderer("reference")
        return "reference", f"triton renderer unavailable ({type(exc).__name__}: {str(exc)[:120]})"


@torch.no_grad()
def _reference_pairs(source, unlearned, inception, n_pairs: int, camera, device, seed: int = 0) -> float:
    """GUIDE's flow for n pairs: batch-1 renders, PNG encode + decode, Inception in batches of 50.
    Returns seconds per pair."""
    from PIL import Image

    from guide_fast.io import to_uint8

    z_all = torch.randn(n_pairs, source.config.z_dim, generator=torch.Generator().manual_seed(seed))
    yaws = np.random.RandomState(seed).uniform(-camera.yaw_range, camera.yaw_range, size=n_pairs)
    common.reset_peak(device)
    t0 = time.perf_counter()
    reloaded = {"s": [], "u": []}
    for i in range(n_pairs):
        z = z_all[i:i + 1].to(device)
        c = camera.labels(yaws[i:i + 1], device)
        cond = camera.conditioning(1, device)
        for key, gen in (("s", source), ("u", unlearned)):
            img = gen.synthesis(gen.mapping(z, cond), c)["image"]
            buf = io.BytesIO()
            Image.fromarray(to_uint8(img[0])).save(buf, format="PNG")
            buf.seek(0)
            arr = np.asarray(Image.open(buf).convert("RGB"))
            reloaded[key].append(torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0)  # ToTensor
    for key in ("s", "u"):
        imgs = torch.stack(reloaded[key])
        for start in range(0, n_pairs, 50):
            inception(imgs[start:start + 50].to(device)).cpu()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / n_pairs


def _frechet_rows(device, quick: bool, with_sqrtm: bool = True) -> list[dict]:
    """tr sqrt(S1 S2) on 2048-d statistics: scipy sqrtm (GUIDE) vs symmetric eigh. Host-side
    float64 work, independent of N once N > 2048 (skipped sqrtm: --quick on a CPU, ~1 min there)."""
    from guide_fast.fid import feature_statistics, frechet_distance

    rng = np.random.default_rng(0)
    n = 2500
    a = rng.standard_normal((n, 2048)) * 0.3
    b = a[rng.permutation(n)] + 0.05 * rng.standard_normal((n, 2048))
    stats_a, stats_b = feature_statistics(a), feature_statistics(b)
    rows, values = [], {}
    methods = ["eigh"]
    try:
        import scipy.linalg  # noqa: F401

        if with_sqrtm:
            methods.insert(0, "sqrtm")
    except ImportError:
        pass
    for method in methods:
        t = common.time_fn(lambda m=method: values.__setitem__(m, frechet_distance(*stats_a, *stats_b, method=m)),
                           warmup=0, repeats=1 if quick or method == "sqrtm" else 3, device="cpu")
        # sqrtm is GUIDE's computation: the reference of the pair.
        rows.append(common.make_row(BENCH, "frechet distance 2048-d (host)",
                                    path="reference" if method == "sqrtm" else method, shape="2048x2048",
                                    dtype="float64", timing=t, device="cpu",
                                    extra=f"{'scipy.linalg.sqrtm' if method == 'sqrtm' else 'symmetric eigh'}; "
                                          f"value {values[method]:.6f}"))
    if device.type == "cuda":  # name the machine whose host CPU ran the float64 work
        for r in rows:
            r["device"] = f"{r['device']}; host of the {common.device_name(device)} machine"
    if "sqrtm" in values:
        rows[-1]["extra"] += f"; rel. diff vs sqrtm {abs(values['eigh'] - values['sqrtm']) / abs(values['sqrtm']):.2e}"
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller budget and fewer reference pairs")
    ap.add_argument("--preset", default=None, help="generator preset (default ffhq512-128 on CUDA, tiny on CPU)")
    ap.add_argument("--samples", type=int, default=None, help="paired samples (default 5000 on CUDA, 64 on CPU)")
    ap.add_argument("--budget-s", type=float, default=None, help="time allowed for the measured run (with "
                    "--compile-ablation: for the whole benchmark; the compiled run gets what is left) "
                    "(default 90 s, 45 s with --quick)")
    ap.add_argument("--batch-size", type=int, default=None, help="renders per batch (default 32 CUDA, 16 CPU)")
    ap.add_argument("--renderer", choices=["auto", "reference", "triton"], default="auto")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="render precision of the fast path (bf16: autocast, CUDA only)")
    ap.add_argument("--fid-method", choices=["auto", "sqrtm", "eigh", "gram"], default="auto")
    ap.add_argument("--reference-pairs", type=int, default=None, help="pairs timed on the reference path")
    ap.add_argument("--out", default=None, help="results CSV (default benchmarks/results/results.csv)")
    ap.add_argument("--full-run", action="store_true",
                    help="measure N = --samples (5000 on CUDA) whatever the budget: the real run, not extrapolated")
    ap.add_argument("--operators-ablation", action="store_true",
                    help="GPU: repeat the measured run with folded up-convolutions and the skip-path kernel")
    ap.add_argument("--compile-ablation", action="store_true",
                    help="repeat the measured run with torch.compile on the generators (compile time reported)")
    args = common.parse_args(ap, argv)
    if args.out:
        from pathlib import Path

        out = Path(args.out)
        common.RESULTS_DIR = out.parent if out.suffix == ".csv" else out
    filename = (args.out.rsplit("/", 1)[-1] if args.out and args.out.endswith(".csv") else "results.csv")

    from guide_fast.eg3d.generator import build_generator
    from guide_fast.evaluation import EvalCamera, evaluate, fastest_identity_backend, make_scorer
    from guide_fast.evaluation.metrics import FaceEmbedder, view_embeddings
    from guide_fast.plan import ExecutionPlan
    from guide_fast.fid import build_inception
    from guide_fast.identity import build_backbone

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.type == "cuda"
    preset = args.preset or ("ffhq512-128" if on_cuda else "tiny")
    n_wanted = args.samples or (TARGET_SAMPLES if on_cuda else (32 if args.quick else 64))
    budget = args.budget_s or (45.0 if args.quick else 90.0)
    bs = args.batch_size or (32 if on_cuda else 16)
    ref_pairs = args.reference_pairs or (4 if not on_cuda else (8 if args.quick else 16))
    if on_cuda:
        torch.backends.cudnn.benchmark = True

    t_setup = time.perf_counter()
    source = build_generator(preset, seed=0, device=device)
    renderer, renderer_note = _pick_renderer(args.renderer, source, device)
    source.set_renderer(renderer)
    unlearned = _perturbed(source).set_renderer(renderer)
    res = source.config.img_resolution
    # the identity network runs as `guide-fast evaluate --precision` runs it: fp32 by default (GUIDE's)
    backend = fastest_identity_backend(device, args.precision)
    if backend == "onnxruntime":
        backend = "torch"  # the ONNX export costs more than this benchmark's few identity calls save
    scorer = make_scorer(build_backbone("ir101", seed=0), device, batch_size=64, backend=backend,
                         precision=args.precision)
    inception = build_inception(seed=0, device=device)
    from guide_fast import cameras

    w = source.mapping(torch.randn(1, source.config.z_dim, generator=torch.Generator().manual_seed(123)).to(device),
                       cameras.frontal_label(1).to(device))
    camera = EvalCamera()
    # the renders' plan: the renderer picked above, fp32 unless --precision bf16
    plan = ExecutionPlan(device=device, path="fast", renderer=renderer, precision=args.precision)
    kw = dict(w_source=w, scorer=scorer, inception=inception, preserve_samples=0, align="crop", batch_size=bs,
              seed=0, plan=plan, fid_method=args.fid_method)
    print(f"[bench_eval] {preset} {res}x{res} on {common.device_name(device)}, renderer {renderer}, identity "
          f"backend {backend} ({scorer.precision}), setup {time.perf_counter() - t_setup:.1f}s", flush=True)

    # Warm-up: Triton compilation, cuDNN autotuning, the scorer's CUDA graphs; then a calibration
    # run gives the per-pair cost used to size the measured run.
    t0 = time.perf_counter()
    evaluate(source, unlearned, num_fid_samples=bs, **kw)
    warm_s = time.perf_counter() - t0
    calib_n = bs * (2 if on_cuda else 1)
    calib = evaluate(source, unlearned, num_fid_samples=calib_n, **kw).timings_s
    per_pair = calib["paired_samples_s"] / calib_n
    fixed = calib["id_views_s"] + 2.0  # + the host Fréchet distance (timed separately below)
    fit = int((budget - fixed) / per_pair) // bs * bs
    n = n_wanted if args.full_run else max(2 * bs, min(n_wanted, fit))
    print(f"[bench_eval] warm-up {warm_s:.1f}s; calibration {per_pair * 1e3:.2f} ms/pair -> N = {n}", flush=True)

    common.reset_peak(device)
    t0 = time.perf_counter()
    result = evaluate(source, unlearned, num_fid_samples=n, **kw)
    if on_cuda:
        torch.cuda.synchronize(device)
    total = time.perf_counter() - t0
    peak = common.peak_memory_mb(device)
    tm = result.timings_s
    per_pair_meas = tm["paired_samples_s"] / n
    shape = f"N={n} pairs, {preset} {res}x{res}"
    dtype = "bf16 autocast" if args.precision == "bf16" else ("fp32 (SR fp16 on CUDA)" if on_cuda else "fp32")
    rows = []
    extra = (f"1 run; ID 11 views {tm['id_views_s']:.2f}s, paired samples {tm['paired_samples_s']:.2f}s "
             f"({per_pair_meas * 1e3:.2f} ms/pair), frechet[{result.fid['method']}] {tm['frechet_s']:.2f}s; "
             f"renderer {renderer}, batch {bs}")
    if renderer_note:
        extra += f"; {renderer_note}"
    extrapolate = on_cuda and n < TARGET_SAMPLES
    if n >= TARGET_SAMPLES:
        extra += f"; measured at N={TARGET_SAMPLES}: target <= {TARGET_S:.0f}s " + ("met" if total <= TARGET_S else "NOT met")
    elif not on_cuda:
        extra += f"; CPU {preset} preset: not comparable with the {TARGET_S:.0f}s GPU target (no extrapolation)"
    else:
        # The N = 5000 estimate: fixed parts as measured, per-pair cost times 5000, and the
        # Fréchet distance at N >= 2048 (sqrtm/eigh on 2048x2048; timed in the frechet rows).
        extra += (f"; EXTRAPOLATED to N={TARGET_SAMPLES} (linear in N from this run; + frechet at 2048-d from "
                  f"the frechet rows): {tm['id_views_s'] + per_pair_meas * TARGET_SAMPLES:.1f}s + frechet")
    rows.append(common.make_row(BENCH, "ID 11 views + FID_pre", path="fast", shape=shape, dtype=dtype,
                                timing={"median_ms": total * 1e3, "p20_ms": total * 1e3, "p80_ms": total * 1e3},
                                peak_mb=peak, extra=extra, device=device))
    written = []  # rows already in the file (a suite cut at its time limit keeps them)
    if not extrapolate:  # (an extrapolated row gets its estimate at the end)
        common.write_rows(rows[-1:], filename)
        written.append(rows[-1])

    def variant(path_label: str, variant_kw: dict, note: str) -> None:
        """The measured run again with other render settings: the same N when it fits the part's
        budget (the suite's --budget-s), else as many pairs as fit, and the row says so (per-pair
        costs compare either way)."""
        spent = time.perf_counter() - t_setup
        fit_v = int((budget - spent - tm["id_views_s"] - 5) / max(per_pair_meas, 1e-6)) // bs * bs
        n_v = n if fit_v >= n else max(2 * bs, fit_v)
        t0 = time.perf_counter()
        res_v = evaluate(source, unlearned, num_fid_samples=n_v, **variant_kw)
        if on_cuda:
            torch.cuda.synchronize(device)
        total_v = time.perf_counter() - t0
        tv = res_v.timings_s
        ex = (f"1 run; {note}ID 11 views {tv['id_views_s']:.2f}s, paired samples {tv['paired_samples_s']:.2f}s "
              f"({tv['paired_samples_s'] / n_v * 1e3:.2f} ms/pair, vs {per_pair_meas * 1e3:.2f} in the default run: "
              f"{per_pair_meas / (tv['paired_samples_s'] / n_v):.2f}x)")
        if n_v >= TARGET_SAMPLES:
            ex += f"; measured at N={TARGET_SAMPLES}: target <= {TARGET_S:.0f}s " + ("met" if total_v <= TARGET_S else "NOT met")
        rows.append(common.make_row(BENCH, "ID 11 views + FID_pre", path=path_label,
                                    shape=f"N={n_v} pairs, {preset} {res}x{res}", dtype=dtype,
                                    timing={"median_ms": total_v * 1e3}, extra=ex, device=device))
        common.write_rows(rows[-1:], filename)
        written.append(rows[-1])

    if args.operators_ablation and on_cuda:
        # the fast path's exact-maths operators (folded up-convs, the skip-path kernel): rounding
        # aside the same renders as the official operators; evaluate's defaults until this row decides
        plan_ops = plan.with_(upsample_conv="folded", skip_path="triton")
        variant("fast (folded up-convs + skip-path triton)", dict(kw, plan=plan_ops), "")
        # (every later evaluate call applies `plan` again: the official operators)

    if args.compile_ablation:
        from guide_fast.compiled import compile_generators, uninstall_generators

        gens = (source, unlearned)
        t0 = time.perf_counter()
        report = compile_generators(gens, key=("eval", bs))
        evaluate(source, unlearned, num_fid_samples=bs, **kw)  # compiles (one batch)
        compile_s = time.perf_counter() - t0
        variant("fast+compile", kw, f"compile+first batch {compile_s:.1f}s (not included); compiled "
                                    f"{','.join(report.modules)}; errors {report.error_text()}; ")
        uninstall_generators(gens)

    # ID over 11 views alone, repeated.
    embedder = FaceEmbedder(scorer, "crop", "guide", device)
    t = common.time_fn(lambda: view_embeddings(source, unlearned, w, camera, embedder, plan=plan, batch_size=bs,
                                               noise="official", noise_seed=1, noise_mode="random"),
                       warmup=1, repeats=3 if args.quick else 5, device=device)
    rows.append(common.make_row(BENCH, "ID 11 views (1 identity)", path="fast", shape=f"11 pairs, {preset} {res}x{res}",
                                dtype=dtype, timing=t, device=device,
                                extra=f"identity backend {backend} ({scorer.precision}), align crop"))

    # Per pair: fast (batched, in memory) vs reference (batch 1, PNG round trip, PyTorch renderer).
    fast_ms = per_pair_meas * 1e3
    ref_renderer = "reference"
    source.set_renderer(ref_renderer)
    unlearned.set_renderer(ref_renderer)
    _reference_pairs(source, unlearned, inception, 1, camera, device)  # warm-up
    common.reset_peak(device)
    ref_s = _reference_pairs(source, unlearned, inception, ref_pairs, camera, device)
    ref_peak = common.peak_memory_mb(device)
    rows.append(common.make_row(BENCH, "paired sample (2 renders + PNG + Inception)", path="reference",
                                shape=f"batch 1, {preset} {res}x{res}",
                                dtype="fp32 (SR fp16 on CUDA)" if on_cuda else "fp32",
                                timing={"median_ms": ref_s * 1e3, "p20_ms": ref_s * 1e3, "p80_ms": ref_s * 1e3},
                                peak_mb=ref_peak, device=device,
                                extra=f"GUIDE's flow: mean over {ref_pairs} pairs, PyTorch renderer, PNG via PIL"))
    rows.append(common.make_row(BENCH, "paired sample (2 renders + PNG + Inception)", path="fast",
                                shape=f"batch {bs}, {preset} {res}x{res}", dtype=dtype,
                                timing={"median_ms": fast_ms, "p20_ms": fast_ms, "p80_ms": fast_ms}, peak_mb=peak,
                                device=device, extra=f"mean over {n} pairs, renderer {renderer}, in memory; "
                                f"speed-up {ref_s * 1e3 / fast_ms:.1f}x"))
    rows.extend(_frechet_rows(device, quick=args.quick, with_sqrtm=on_cuda or not args.quick))
    if extrapolate:
        fr = {r["path"]: float(r["median_ms"]) / 1e3 for r in rows if r["what"].startswith("frechet")}
        fr_s = fr.get("reference", fr.get("eigh"))  # what evaluate's "auto" uses at N >= 2048
        est = tm["id_views_s"] + per_pair_meas * TARGET_SAMPLES + fr_s
        rows[0]["extra"] = rows[0]["extra"].replace("s + frechet", f"s + frechet {fr_s:.1f}s = {est:.1f}s "
                                                    f"(target {TARGET_S:.0f}s)")
    common.write_rows([r for r in rows if not any(r is w for w in written)], filename)
    return 0


if __name__ == "__main__":
    sys.exit(main())
