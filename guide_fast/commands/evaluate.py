"""`guide-fast evaluate`: GUIDE's metrics (docs/guide.md §4) for an unlearning run or a pair of generators.

--detector guide (the default) aligns faces for the ID metric with GUIDE's own MTCNN port, as its
evaluate_id.py does (identity/guide_mtcnn.py); --detector facenet uses facenet-pytorch's MTCNN
(landmarks 1-3 px apart). --noise official (the default) renders the before and after sides with
independent noise draws as GUIDE's scripts do; --noise paired gives both sides the same draws.
eval.json records both choices under "settings"."""
from __future__ import annotations

from pathlib import Path

from ._common import check_positive, check_precision, check_renderer, resolve_device, seed_type

# the files `evaluate` writes (eval.json and the plots it can make)
EVAL_FILES = ("eval.json", "id_per_view.png", "loss_curves.png", "diversity.png", "views.png")
# numpy's RandomState draws the paired samples' yaws: it takes seeds below 2**32
EVAL_SEED_LIMIT = 2 ** 32


def add_commands(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="ID, ID_others, preservation, FID_pre, ΔFID_real and diversity of an unlearned generator",
        description="Compare an unlearned generator with its source (docs/guide.md §4). Either --run DIR (the output "
                    "of `guide-fast unlearn`) or --source/--unlearned/--latent. Writes eval.json and PNG plots.",
    )
    p.add_argument("--run", metavar="DIR", help="run directory written by `guide-fast unlearn --out DIR`")
    p.add_argument("--source", metavar="G", help="source generator: checkpoint path, or a preset name "
                   "('tiny', 'ffhq512-128') built with random weights")
    p.add_argument("--unlearned", metavar="U", help="unlearned generator checkpoint (.safetensors or EG3D .pkl)")
    p.add_argument("--latent", metavar="W", help="latents of the unlearned identities [K, num_ws, w_dim] "
                   "(.safetensors, .pt or .npy)")
    p.add_argument("--others", metavar="W", help="latents of other photos of the same person -> ID_others")
    p.add_argument("--id-weights", metavar="PATH", help="CurricularFace IR-101 weights (CurricularFace_Backbone.pth), "
                   "or an exported .onnx")
    p.add_argument("--id-backend", default="auto", choices=["auto", "torch", "onnxruntime", "tensorrt"],
                   help="identity scorer backend (auto: the fastest available)")
    p.add_argument("--inception-weights", metavar="PATH", help="pytorch-fid pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--real-features", metavar="F.npy", help="[N, 2048] Inception features of real images -> ΔFID_real")
    p.add_argument("--samples", type=int, default=5000, help="paired samples for FID_pre (GUIDE: 5000; 0 skips)")
    p.add_argument("--preserve", type=int, default=256, help="random identities scored for preservation (0 skips)")
    p.add_argument("--detector", choices=["guide", "facenet"], default=None,
                   help="MTCNN of the mtcnn alignment: guide (GUIDE's own port, as its evaluate_id.py; the default, "
                        "for numbers comparable with the paper) or facenet (facenet-pytorch's detector)")
    p.add_argument("--noise", choices=["official", "paired"], default="official",
                   help="noise draws of the before/after (and G_s/G_u) renders: official (independent, as GUIDE; "
                        "the default) or paired (the same draws on both sides: lower variance, for comparing runs)")
    p.add_argument("--align", choices=["mtcnn", "crop"], default=None,
                   help="face alignment before IR-101: mtcnn (GUIDE; the default) or the ID-loss crop (the default "
                        "with --random-nets: random renders hold no face MTCNN could find)")
    p.add_argument("--diversity-run", metavar="DIR", action="append", default=[],
                   help="another run directory whose replacement face joins the diversity measure (repeatable)")
    p.add_argument("--random-nets", action="store_true",
                   help="use randomly initialised IR-101 and Inception networks: a pipeline check, the numbers "
                        "mean nothing (for the tiny demo, which has no real weights)")
    p.add_argument("--batch-size", type=int, default=None, help="renders per batch, >= 1 (default 32 on CUDA, 8 on CPU)")
    p.add_argument("--seed", type=seed_type(EVAL_SEED_LIMIT), default=0,
                   help="seed of the paired samples (GUIDE: 0; 0 <= seed < 2**32)")
    p.add_argument("--renderer", choices=["auto", "reference", "triton"], default="auto",
                   help="tri-plane renderer (auto: triton on CUDA, reference on CPU; triton needs CUDA)")
    p.add_argument("--fid-method", choices=["auto", "sqrtm", "eigh", "gram"], default="auto",
                   help="tr sqrt(S1 S2): scipy sqrtm as GUIDE, eigh (faster), gram (exact, for <= 2048 samples); auto picks")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="renders and the IR-101 identity network in fp32 as GUIDE (default), or on CUDA the renders "
                        "under bf16 autocast and IR-101 in bf16 (TensorRT: fp16): faster, not GUIDE's numerics")
    p.add_argument("--upsample-conv", choices=["reference", "folded"], default="reference",
                   help="2x up-convolutions: the official two passes (default) or the FIR folded into the kernel "
                        "(the same maths, rounding aside; faster on a GPU)")
    p.add_argument("--skip-path", choices=["reference", "triton"], default="reference",
                   help="synthesis skip paths: the official operators (default) or the fused Triton kernel "
                        "(fp32 arithmetic; needs CUDA)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile (Inductor) of the generators' backbone synthesis and super-resolution "
                        "(auto: the execution plan's choice, off until measured faster); a failure falls back to "
                        "eager and eval.json's notes say why")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: the run directory, or ./eval_out); "
                   "a new or empty one, see --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier evaluation: in the run directory only its evaluation files "
                        f"({', '.join(EVAL_FILES)}) are replaced, an --out folder's contents as a whole")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    p.set_defaults(func=_evaluate)


# ------------------------------------------------------------------------------------ loaders
def load_latents(path, what: str = "latent file", key=None):
    from ..checkpoints import load_latents as read

    return read(path, what, key)


def _has_tensor(path: Path, key: str) -> bool:
    if not path.is_file():
        return False
    from ..checkpoints import read_safetensors

    return key in read_safetensors(path, "run latents")[0]  # the checked reader, as for every file


def _load_generator(spec, renderer, device, what):
    from ..errors import CheckpointError
    from .generator import resolve_generator

    if spec is None:
        raise CheckpointError(f"no {what} generator given")
    gen, _ = resolve_generator(str(spec), renderer=renderer, device=device)
    return gen


def _load_run(run_dir: Path, renderer, device, notes: list):
    """(source, unlearned, w_source, report) from a `guide-fast unlearn --out DIR` folder.

    The source named in report.json is checked against the delta's fingerprint of its source;
    when it cannot be found (or differs), the source is rebuilt as unlearned - delta, which is
    what the run started from, bit for bit."""
    from ..checkpoints import apply_delta, load_delta, load_generator, state_fingerprint
    from ..errors import CheckpointError
    from ..io import read_json_object
    from .generator import resolve_generator

    if run_dir.is_file():
        raise CheckpointError(f"{run_dir} is a file; --run expects the folder written by `guide-fast unlearn --out`")
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory not found: {run_dir}")
    report_path = run_dir / "report.json"
    if not report_path.is_file():
        raise CheckpointError(f"{run_dir} is not a run directory: report.json is missing")
    report = read_json_object(report_path, "run report")
    unlearned = load_generator(run_dir / "generator.safetensors", renderer=renderer, device=device)
    w_source = load_latents(run_dir / "latents.safetensors", "run latents")
    delta = meta = None
    if (run_dir / "delta.safetensors").is_file():
        delta, meta = load_delta(run_dir / "delta.safetensors")

    source, why = None, None
    spec = report.get("generator")
    if isinstance(spec, dict):  # tolerate {"path": ...} / {"preset": ..., "seed": ...} forms
        spec, seed = spec.get("path") or spec.get("preset"), spec.get("seed", 0)
    else:
        seed = report.get("generator_seed", 0)
    if spec:
        try:
            source, _ = resolve_generator(str(spec), renderer=renderer, device=device, seed=int(seed or 0))
        except Exception as exc:  # missing file, moved checkpoint, ...
            why = f"the source generator {spec!r} named in report.json could not be loaded ({exc})"
    else:
        why = "report.json names no source generator"
    if source is not None and meta and meta.get("source_fingerprint"):
        if state_fingerprint(source) != meta["source_fingerprint"]:
            why = f"the generator {spec!r} named in report.json is not the source this run's delta was made from"
            source = None
    if source is None:
        if delta is None:
            raise CheckpointError(f"{why}; and {run_dir} has no delta.safetensors to rebuild it from: pass --source")
        source = apply_delta(unlearned.copy(), delta, meta, sign=-1)  # checks unlearned is the delta's result
        notes.append(f"{why}; the source was rebuilt as unlearned - delta (bit-exact)")
    return source, unlearned, w_source, report


def _evaluate(args) -> int:
    import json

    from ..errors import InputError
    from ..evaluation import EvalConfig, evaluate, make_scorer
    from ..io import check_output_path, staged_folder

    device = resolve_device(args.device)
    check_renderer(args.renderer, device)
    check_renderer(args.skip_path, device, "--skip-path")  # the same rule: triton needs CUDA
    check_precision(args.precision, device)
    check_positive(args.batch_size, "--batch-size")
    from ..evaluation.config import MAX_FID_SAMPLES, MAX_PRESERVE_SAMPLES

    if args.samples < 0 or args.samples == 1:
        raise InputError(f"--samples must be 0 (skip FID_pre) or >= 2 (a covariance needs 2 samples), got {args.samples}")
    check_positive(args.samples, "--samples", minimum=0, maximum=MAX_FID_SAMPLES)
    if args.preserve < 0:
        raise InputError(f"--preserve must be >= 0 (0 skips preservation), got {args.preserve}")
    check_positive(args.preserve, "--preserve", minimum=0, maximum=MAX_PRESERVE_SAMPLES)
    if args.run and (args.unlearned or args.latent):
        raise InputError("give either --run DIR or --unlearned/--latent, not both")
    if args.detector is not None and (args.align or ("crop" if args.random_nets else "mtcnn")) == "crop":
        raise InputError(f"--detector {args.detector} picks the MTCNN of --align mtcnn, but the alignment is crop"
                         f"{'' if args.align else ' (the default with --random-nets)'}: no detector runs; "
                         "drop --detector or give --align mtcnn")
    # Output: into the run directory (the default with --run: the evaluation's files join the
    # run's), or a folder of its own (--out, else ./eval_out) written as a whole. Checked before
    # any work; an earlier evaluation in the run directory is looked for once the inputs are read.
    run_dir = Path(args.run) if args.run else None
    out = Path(args.out) if args.out else (run_dir if run_dir is not None else Path("eval_out"))
    in_run = run_dir is not None and out.resolve() == run_dir.resolve()
    if in_run:
        if run_dir.is_dir():
            check_output_path(out, "folder", "--out" if args.out else "--run", keep_contents=True)
    else:
        check_output_path(out, "folder", "--out", overwrite=args.overwrite)
        from ..io import check_inputs_outside

        check_inputs_outside(out, [("--run", args.run), ("--source", args.source), ("--unlearned", args.unlearned),
                                   ("--latent", args.latent), ("--others", args.others),
                                   ("--id-weights", args.id_weights), ("--inception-weights", args.inception_weights),
                                   ("--real-features", args.real_features)]
                             + [("--diversity-run", d) for d in args.diversity_run])
    from ..plan import ExecutionPlan

    # the renders' execution: the chosen renderer, fp32 (GUIDE's numerics) unless --precision bf16;
    # the official operators unless --upsample-conv / --skip-path say otherwise, and no graph
    # capture (evaluation renders each batch once)
    plan = ExecutionPlan.resolve(device, path="fast", renderer=args.renderer, precision=args.precision,
                                 upsample_conv=args.upsample_conv, skip_path=args.skip_path, cuda_graph=False,
                                 compile=args.compile)
    renderer = plan.renderer
    notes: list[str] = []
    if args.run:
        source, unlearned, w_source, report = _load_run(run_dir, renderer, device, notes)
        if args.source:  # an explicit source overrides report.json
            source = _load_generator(args.source, renderer, device, "source")
    else:
        missing = [flag for flag, v in (("--source", args.source), ("--unlearned", args.unlearned),
                                        ("--latent", args.latent)) if not v]
        if missing:
            raise InputError(f"missing {', '.join(missing)} (or give --run DIR)")
        source = _load_generator(args.source, renderer, device, "source")
        unlearned = _load_generator(args.unlearned, renderer, device, "unlearned")
        w_source = load_latents(args.latent, "latent file")
        report = None
    others = load_latents(args.others, "--others latent file") if args.others else None
    if others is None and args.run and _has_tensor(Path(args.run) / "latents.safetensors", "w_others"):
        # `guide-fast unlearn --others DIR` inverted the other photos of the person (docs/guide.md §4.3)
        others = load_latents(Path(args.run) / "latents.safetensors", "run latents", key="w_others")
        notes.append(f"ID_others from the {others.shape[0]} other photo(s) inverted by the unlearning run")

    batch_size = args.batch_size if args.batch_size is not None else (32 if device.type == "cuda" else 8)
    backend = None if args.id_backend == "auto" else args.id_backend
    scorer = inception = None
    if args.random_nets:
        if args.id_weights or args.inception_weights:
            raise InputError("--random-nets replaces --id-weights/--inception-weights; give one or the other")
        from ..fid import build_inception
        from ..identity.backbones import build_backbone

        scorer = make_scorer(build_backbone("ir101", seed=0), device, batch_size=max(batch_size, 32), backend=backend,
                             precision=args.precision)
        inception = build_inception(seed=0)
        notes.append("RANDOM-WEIGHT identity and Inception networks (--random-nets): a pipeline check; the "
                     "numbers mean nothing")
    else:
        if not args.id_weights and not args.inception_weights:
            raise InputError("give --id-weights (IR-101) and/or --inception-weights (pt_inception-2015-12-05), "
                             "or --random-nets for a pipeline check without real weights")
        if args.id_weights:
            from ..errors import CheckpointError

            if not Path(args.id_weights).is_file():
                raise CheckpointError(f"identity weights not found: {args.id_weights}")
            scorer = make_scorer(args.id_weights, device, batch_size=max(batch_size, 32), backend=backend,
                                 precision=args.precision)
        if args.inception_weights:
            from ..fid import load_inception

            inception = load_inception(args.inception_weights, device=device)
    align = args.align or ("crop" if args.random_nets else "mtcnn")
    diversity = []
    for d in args.diversity_run:
        _, gen_u, w_u, _ = _load_run(Path(d), renderer, device, notes)
        diversity.append((gen_u, w_u))

    if plan.compile:  # the CLI's own generator objects: compiled in place (guide_fast/compiled.py)
        from ..compiled import compile_generators

        compiled_report = compile_generators([source, unlearned] + [g for g, _ in diversity],
                                             key=("evaluate", batch_size))
        notes.append(f"torch.compile ({compiled_report.backend}, mode {compiled_report.mode}) of "
                     f"{len(compiled_report.modules)} generator modules; Inductor cache {compiled_report.cache_dir}")
        if compiled_report.errors:
            notes.append(f"compile failed, eager instead: {compiled_report.error_text()}")
    if in_run:
        earlier = [name for name in EVAL_FILES if (out / name).exists()]
        if earlier and not args.overwrite:
            raise InputError(f"{'--out' if args.out else '--run'} {out} already holds an evaluation "
                             f"({', '.join(earlier)}); pass --overwrite to replace it (the run's own files are "
                             f"kept), or write this one elsewhere with --out DIR")
        staging = staged_folder(out, flag="--out" if args.out else "--run", replace=EVAL_FILES)
    else:
        staging = staged_folder(out, flag="--out", overwrite=args.overwrite)
    with staging as stage:  # the files appear together once all are written
        config = EvalConfig(num_fid_samples=args.samples, preserve_samples=args.preserve, align=align,
                            detector=args.detector or "guide", noise=args.noise, batch_size=batch_size, seed=args.seed,
                            fid_method=args.fid_method, plan=plan, verbose=not args.quiet)
        result = evaluate(source, unlearned, w_source=w_source, scorer=scorer, inception=inception, others=others,
                          real_features=args.real_features, diversity_generators=diversity, out_dir=stage,
                          run_report=report, notes=notes, config=config)
    print(json.dumps(result.metrics, indent=2))
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote {', '.join(str(out / f) for f in result.files)}")
    return 0
