"""`guide-fast unlearn` and `guide-fast demo`."""
from __future__ import annotations

import contextlib
from pathlib import Path

from ._common import check_positive, check_precision, check_renderer, resolve_device, seed_type

DEMO_ITERATIONS = 24
DEMO_LR = 2e-4
DEMO_SEED = 7
DEMO_VIEWS = 5
DEMO_SCORER = "CurricularFace IR-101 (random weights)"
DEMO_OUT = "demo_out"


def add_commands(sub) -> None:
    p = sub.add_parser("unlearn", help="make the generator forget one or more identities (GUIDE)",
                       description="Fine-tune EG3D's tri-plane synthesis network so that it no longer produces the "
                                   "given identities (GUIDE, docs/guide.md §3), and write the unlearned checkpoint, the "
                                   "weight delta, report.json and grid.png to --out.")
    p.add_argument("--generator", required=True,
                   help="EG3D checkpoint (official .pkl or guide-fast .safetensors), or a preset name "
                        "('tiny', 'ffhq512-128') for random weights")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--seed", type=seed_type(), nargs="+", help="identity seed(s): z ~ N(0, I) mapped with a frontal camera")
    src.add_argument("--latent", help="W+ latents file (.pt, .safetensors or .npy): [N, num_ws, w_dim], [num_ws, w_dim] or [w_dim]")
    src.add_argument("--image", nargs="+",
                     help="photo(s) of the person(s) to forget (aligned and inverted first), or a folder of photos "
                          "of one person (see --target-index)")
    p.add_argument("--others", help="folder of other photos of the same person: aligned and inverted too, and "
                                    "saved as w_others for `guide-fast evaluate --run` (ID_others, docs/guide.md §4.3)")
    p.add_argument("--id-weights", help="ArcFace IR-SE50 weights (model_ir_se50.pth) for the identity loss")
    p.add_argument("--lpips-weights", help="torchvision VGG16 weights (vgg16-397923af.pth) for LPIPS")
    p.add_argument("--lpips-heads", help="LPIPS v0.1 linear heads (vgg.pth); default: the copy in the lpips package")
    p.add_argument("--random-nets", action="store_true",
                   help="use randomly initialised identity/LPIPS networks (pipeline testing only)")
    p.add_argument("--scorer-weights", help="identity network for the report's before/after similarity "
                                            "(CurricularFace IR-101 or IR-SE50 file)")
    p.add_argument("--align", choices=["mtcnn", "crop"], default="mtcnn",
                   help="face preprocessing for the report's similarity (default mtcnn, as GUIDE's evaluation)")
    p.add_argument("--out", required=True, help="output folder (a new or empty one; see --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the contents of an --out folder that already holds files (an earlier run) as a whole")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--fast", dest="path", action="store_const", const="fast", help="fast loop (default)")
    mode.add_argument("--reference", dest="path", action="store_const", const="reference",
                      help="reference loop: eager fp32, batch 1, the official order of operations")
    p.set_defaults(path="fast")
    p.add_argument("--iters", type=int, default=1000, help="optimisation steps (paper: 1000)")
    p.add_argument("--target", choices=["extra", "average"], default=None,
                   help="UFO target: extra (the paper's extrapolated face; the default) or average (the average face)")
    p.add_argument("--baseline", action="store_true",
                   help="the README baseline: average-face target, local loss only (not with --target extra)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--run-seed", type=seed_type(), default=0, help="seed of the run's random draws (0 <= seed < 2**63)")
    p.add_argument("--renderer", choices=["auto", "reference", "triton"], default="auto",
                   help="tri-plane renderer (auto: triton on CUDA for the fast path, else reference; triton needs CUDA)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 on CUDA for the fast path, else fp32; bf16 needs CUDA and the fast path")
    p.add_argument("--no-graph", action="store_true", help="do not capture the step in a CUDA graph")
    p.add_argument("--upsample-conv", choices=["auto", "reference", "folded"], default="auto",
                   help="2x up-convolutions: FIR folded into the kernel (auto: on the fast path) or the official two passes")
    p.add_argument("--skip-path", choices=["auto", "reference", "triton"], default="auto",
                   help="fast path: each synthesis block's ToRGB bias + clamp, 2x FIR upsampling and sum as one Triton "
                        "kernel (triton, needs CUDA) or the official operators (auto: reference until measured faster)")
    p.add_argument("--channels-last", action="store_true", help="fast path: NHWC generator activations")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="fast path: torch.compile (Inductor) of the backbone, super-resolution, LPIPS and identity "
                        "networks (auto: the execution plan's choice, off until measured faster); a compile failure "
                        "falls back to eager and report.json says why")
    p.add_argument("--compile-mode", choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                   default="default", help="with --compile on: Inductor's mode (reduce-overhead replaces the "
                                           "engine's own CUDA-graph capture by Inductor's)")
    p.add_argument("--noise-passes", choices=["shared", "separate"], default="shared",
                   help="fast path: one backbone pass serves the tri-plane MSE and the image (shared, the default) "
                        "or the MSE gets its own passes with independent noise (separate, as the official code)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--invert-steps", type=int, default=None,
                   help="optimisation steps of the photo inversion without --encoder (default 300)")
    p.add_argument("--encoder", metavar="FILE",
                   help="GOAE encoder weights (encoder_FFHQ.pt): each --image photo is encoded in one batch and "
                        "w_u = GOAE(photo) + w_avg, GUIDE's inversion (no optimisation unless --refine-steps)")
    p.add_argument("--encoder-mode", choices=["eval", "official"], default=None,
                   help="with --encoder: eval (default: deterministic, as GOAE's own inference) or official "
                        "(train mode, as GUIDE's unlearn.py leaves it; its dropout draws follow --run-seed)")
    p.add_argument("--refine-steps", type=int, default=None,
                   help="with --encoder: Adam steps refining the GOAE latent against the photo (default 0)")
    p.add_argument("--target-index", type=int, default=None,
                   help="GUIDE's out-of-domain protocol: of the --image photos (a folder, sorted by name, or several "
                        "files) the K-th is the person to forget and the others are kept as w_others for ID_others "
                        "(default 0 when --image is a folder)")
    p.add_argument("--w-avg", metavar="FILE",
                   help="average latent file (GUIDE's w_avg_ffhqrebalanced512-128.pt, [14, 512]): the centre of the "
                        "UFO target, the GOAE offset and the optimisation start (default: the generator's mapping "
                        "buffer); report.json says which was used")
    p.add_argument("--face-index", type=int, default=None,
                   help="which face of each --image to use (0 = largest, the default)")
    p.add_argument("--strict", action="store_true", help="refuse a photo with several faces (and list them)")
    p.add_argument("--refine-camera", action="store_true", help="learn yaw and pitch during the inversion")
    p.add_argument("--pre-aligned", action="store_true",
                   help="the --image files are already in EG3D framing (square crops): skip face alignment")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--distributed", action="store_true",
                   help="shard the identities over the processes torchrun started (RANK, WORLD_SIZE, LOCAL_RANK, "
                        "MASTER_ADDR, MASTER_PORT; NCCL on cuda:LOCAL_RANK, gloo on the CPU); implied under torchrun: "
                        "torchrun --nproc_per_node K -m guide_fast unlearn ... --seed 1 2 ... N")
    p.add_argument("--dist-timeout", type=float, default=600.0,
                   help="distributed runs: seconds a rank waits for the others at any collective before the job "
                        "fails (default 600)")
    p.set_defaults(func=_unlearn_entry)

    p = sub.add_parser("demo", help="the whole pipeline on the built-in tiny generator with RANDOM weights (CPU, < 2 min)")
    p.add_argument("--out", default=None,
                   help=f"output folder (default {DEMO_OUT}: replaced when it holds an earlier demo run; another "
                        "folder must be new or empty, or see --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the contents of an --out folder that already holds files")
    p.add_argument("--iters", type=int, default=DEMO_ITERATIONS, help=f"optimisation steps (default {DEMO_ITERATIONS})")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.set_defaults(func=_demo)


def check_unlearn_flags(args, device) -> None:
    """Conflicts between flags, named as flags, before anything is built (the engine's own
    messages name UnlearnConfig fields)."""
    from ..errors import InputError

    from ..unlearn.config import MAX_ITERATIONS

    check_positive(args.iters, "--iters", maximum=MAX_ITERATIONS)
    if not args.lr > 0 or args.lr == float("inf"):
        raise InputError(f"--lr must be a positive number, got {args.lr}")
    # checked even in one process: a typo is refused the same way whether or not torchrun launched the run
    if not 0 < args.dist_timeout < float("inf"):
        raise InputError(f"--dist-timeout must be a positive number of seconds, got {args.dist_timeout}")
    if args.seed is not None and len(set(args.seed)) < len(args.seed):
        twice = sorted({s for s in args.seed if args.seed.count(s) > 1})
        raise InputError(f"--seed {' '.join(map(str, twice))} given more than once: each identity is unlearned once "
                         "(a repeated seed would double its weight in the joint loss)")
    if args.baseline and args.target == "extra":
        raise InputError("--baseline is defined by the average-face target (and the local loss only); "
                         "--target extra contradicts it: drop --baseline for GUIDE's extrapolated target, "
                         "or drop --target")
    check_renderer(args.renderer, device)
    check_renderer(getattr(args, "skip_path", "auto"), device, "--skip-path")  # the same rule: triton needs CUDA
    check_precision(args.precision, device)
    if args.path == "reference":
        fast_only = [flag for flag, on in (("--precision bf16", args.precision == "bf16"),
                                           ("--upsample-conv folded", args.upsample_conv == "folded"),
                                           ("--skip-path triton", getattr(args, "skip_path", "auto") == "triton"),
                                           ("--channels-last", args.channels_last),
                                           ("--compile on", getattr(args, "compile", "auto") == "on")) if on]
        if fast_only:
            raise InputError(f"--reference runs the official operators in fp32; {' and '.join(fast_only)} "
                             f"{'is a fast-path option' if len(fast_only) == 1 else 'are fast-path options'} "
                             f"(drop {'it' if len(fast_only) == 1 else 'them'}, or leave --reference out)")


def check_inversion_flags(args) -> None:
    """The photo-inversion flags against each other (before anything is read or built)."""
    from ..errors import InputError
    from ..unlearn.config import MAX_ITERATIONS

    photos_given = args.image is not None or bool(args.others)
    if not photos_given:  # photo-only flags with --seed / --latent would be silently ignored
        unused = [flag for flag, on in (("--invert-steps", args.invert_steps is not None),
                                        ("--face-index", args.face_index is not None), ("--strict", args.strict),
                                        ("--refine-camera", args.refine_camera), ("--pre-aligned", args.pre_aligned))
                  if on]
        if unused:
            raise InputError(f"{', '.join(unused)} {'applies' if len(unused) == 1 else 'apply'} to photos; "
                             "give --image (and/or --others), or drop "
                             f"{'it' if len(unused) == 1 else 'them'}")
    if args.pre_aligned:
        for flag, on in (("--face-index", args.face_index is not None), ("--strict", args.strict)):
            if on:
                raise InputError(f"{flag} chooses among the faces MTCNN finds; --pre-aligned photos are not "
                                 "detected: drop one of the two")
    if args.encoder is None:
        for flag, value in (("--refine-steps", args.refine_steps), ("--encoder-mode", args.encoder_mode)):
            if value is not None:
                raise InputError(f"{flag} belongs to the GOAE inversion and needs --encoder FILE "
                                 f"(without an encoder, --invert-steps sets the optimisation)")
    else:
        if not photos_given:
            raise InputError("--encoder inverts photos: give --image (and/or --others), not --seed / --latent")
        if args.invert_steps is not None:
            raise InputError("with --encoder the optimisation only refines the GOAE latent: use --refine-steps N "
                             "instead of --invert-steps")
        check_positive(args.refine_steps, "--refine-steps", minimum=0, maximum=MAX_ITERATIONS)
        _check_not_one_step(args.refine_steps, "--refine-steps", "leaves the GOAE latent unchanged")
        if args.refine_camera and not args.refine_steps:
            raise InputError("--refine-camera learns the camera during the optimisation: with --encoder give "
                             "--refine-steps N (N > 0) as well")
        _check_file_flag(args.encoder, "--encoder")
    if args.invert_steps is not None:
        check_positive(args.invert_steps, "--invert-steps", maximum=MAX_ITERATIONS)
        _check_not_one_step(args.invert_steps, "--invert-steps", "returns w_avg itself")
    if args.target_index is not None:
        if args.image is None:
            raise InputError("--target-index picks one of the --image photos; give --image (a folder or several files)")
        if args.target_index < 0:
            raise InputError(f"--target-index must be >= 0, got {args.target_index}")
    if args.w_avg is not None:
        _check_file_flag(args.w_avg, "--w-avg")


def _check_distinct_photos(sources, others=()) -> None:
    """The same file twice among --image (two paths, or a file and its folder) would be forgotten
    twice, or be both the person to forget and one of the w_others photos (also from --others)."""
    from ..errors import InputError

    seen = {}
    for src in sources:
        key = Path(src).resolve()
        if key in seen:
            raise InputError(f"--image: {src} is given more than once"
                             f"{'' if str(seen[key]) == str(src) else f' (also as {seen[key]})'}; "
                             "list each photo once")
        seen[key] = src
    for other in others:
        key = Path(other).resolve()
        if key in seen:
            raise InputError(f"--others: {other} is also an --image photo ({seen[key]}); a photo of the person to "
                             "forget cannot also be one of the held-out photos that measure ID_others")


def _check_not_one_step(steps, flag: str, effect: str) -> None:
    """The inversion's learning rate ramps up from 0 (StyleGAN2 projector schedule, t = step /
    steps): a 1-step run takes its only step at lr 0 and so does nothing."""
    from ..errors import InputError

    if steps == 1:
        raise InputError(f"{flag} 1 {effect}: the learning rate ramps up from 0 at the first step "
                         f"(StyleGAN2 projector schedule); give {flag} 2 or more")


def _check_file_flag(path, flag: str) -> None:
    from ..errors import InputError

    p = Path(path)
    if p.is_dir():
        raise InputError(f"{flag} {path} is a folder; expected a file")
    if not p.is_file():
        raise InputError(f"{flag} {path}: no such file")


def _target_index(args, count: int):
    """GUIDE's OOD protocol: the person to forget among the --image photos (None: each photo is
    its own identity). A folder without --target-index means index 0, as GUIDE's --target_idx."""
    from ..errors import InputError

    k = args.target_index
    if k is None and any(Path(x).is_dir() for x in args.image):
        k = 0
    if k is not None and k >= count:
        raise InputError(f"--target-index {k} is out of range: --image gives {count} photo"
                         f"{'' if count == 1 else 's'} (indices 0 to {count - 1}, sorted by file name)")
    return k


def _w_avg(args, gen):
    from ..inversion import load_w_avg, resolve_w_avg

    return load_w_avg(args.w_avg, gen, "--w-avg file") if args.w_avg else resolve_w_avg(None, gen)


def _encoder(args, device, gen):
    if args.encoder is None:
        return None
    from ..errors import InputError
    from ..inversion.encode import resolve_encoder

    encoder = resolve_encoder(args.encoder, device, args.encoder_mode or "eval")
    # GOAE's head writes [14, 512] whatever its file; refused here, before any photo goes through
    out = getattr(encoder, "output_layout", None)
    layout = (int(gen.num_ws), int(gen.config.w_dim))
    if out is not None and tuple(out) != layout:
        raise InputError(f"--encoder: GOAE writes W+ latents {list(out)} (EG3D FFHQ 512); this generator takes "
                         f"{list(layout)}: leave out --encoder to invert by optimisation")
    return encoder


def _invert_photos(args, gen, id_loss, lpips, photos, other_photos, target_index, encoder, average):
    """(the identities to forget, the other photos of the person), both lists of InversionResult.

    With --encoder every photo (--image and --others) goes through GOAE in one batch, as GUIDE
    encodes its folder; --refine-steps then optimises from there. Without it the --image photos
    and the --others photos are optimised in two calls (--invert-steps each)."""
    from ..inversion import DEFAULT_STEPS, invert_images

    photos, other_photos = list(photos or []), list(other_photos or [])
    common = dict(id_loss=id_loss, lpips=lpips, refine_camera=args.refine_camera, progress=not args.no_progress,
                  w_avg=average, path=args.path, renderer=args.renderer, precision=args.precision,
                  seed=args.run_seed)
    if encoder is not None:
        results = invert_images(gen, photos + other_photos, encoder=encoder, steps=args.refine_steps or 0, **common)
        mine, extra = results[:len(photos)], results[len(photos):]
    else:
        steps = args.invert_steps or DEFAULT_STEPS
        mine = invert_images(gen, photos, steps=steps, **common) if photos else []
        extra = invert_images(gen, other_photos, steps=steps, **common) if other_photos else []
    if target_index is None:
        return mine, extra
    return [mine[target_index]], mine[:target_index] + mine[target_index + 1:] + extra


def load_latents(path, gen):
    """A latents file -> [N, num_ws, w_dim] (W latents [N, w_dim] are broadcast to all layers)."""
    from ..checkpoints import load_latents as read

    w = read(path, "--latent file")
    if w.ndim == 1:
        w = w[None, None].expand(1, gen.num_ws, -1)
    elif w.ndim == 2 and w.shape[0] != gen.num_ws:
        w = w[:, None].expand(-1, gen.num_ws, -1)
    return gen.as_latents(w.contiguous(), f"--latent file {path}")  # shape and values, the file named


def build_loss_networks(args, device, random_nets: bool):
    from ..errors import InputError
    from ..identity import IdentityLoss, build_backbone, load_backbone
    from ..perceptual import LPIPS

    if random_nets:
        return IdentityLoss(build_backbone("ir_se50", seed=0)).to(device), LPIPS.random(0).to(device)
    if not args.id_weights or not args.lpips_weights:
        raise InputError("--id-weights (IR-SE50) and --lpips-weights (VGG16) are required "
                         "(or --random-nets to test the pipeline with random networks)")
    backbone = load_backbone(args.id_weights, device=device)
    if backbone.kind != "ir_se50":
        print(f"note: --id-weights holds {backbone.kind}; GUIDE's identity loss uses IR-SE50")
    return IdentityLoss(backbone), LPIPS.from_files(args.lpips_weights, args.lpips_heads, device=device)


def _unlearn(args) -> int:
    import torch

    from ..errors import InputError
    from ..io import check_inputs_outside, check_output_path
    from ..unlearn.config import UnlearnConfig
    from ..unlearn.engine import Unlearner
    from .generator import resolve_generator

    device = resolve_device(args.device)
    # sharded over torchrun's processes (_unlearn_entry): rank 0 alone reads photos and writes --out
    is_main = getattr(args, "dist_context", None) is None or args.dist_context.is_main
    check_unlearn_flags(args, device)
    check_inversion_flags(args)
    # the output folder is checked before any work (it is written only at the very end)
    if is_main:
        check_output_path(args.out, "folder", "--out", overwrite=args.overwrite)
        check_inputs_outside(args.out, [("--image", p) for p in args.image or []] + [
            ("--others", args.others), ("--generator", args.generator), ("--latent", args.latent),
            ("--w-avg", args.w_avg), ("--encoder", args.encoder), ("--id-weights", args.id_weights),
            ("--lpips-weights", args.lpips_weights), ("--lpips-heads", args.lpips_heads),
            ("--scorer-weights", args.scorer_weights)])
    if args.random_nets:
        given = [flag for flag, v in (("--id-weights", args.id_weights), ("--lpips-weights", args.lpips_weights),
                                      ("--lpips-heads", args.lpips_heads)) if v]
        if given:
            raise InputError(f"--random-nets replaces {', '.join(given)}: give one or the other")
    photos, other_photos, others, target_index = None, None, None, None
    if args.image is not None and is_main:
        from ..inversion import expand_photo_sources, list_photos, prepare_photos

        # Photos are read and aligned before any network is built: a bad photo fails in seconds.
        sources = expand_photo_sources(args.image)
        # --others too: one photo both forgotten and kept as w_others would score against itself
        _check_distinct_photos(sources, list_photos(args.others) if args.others else [])
        photos = prepare_photos(sources, align=not args.pre_aligned, index=args.face_index,
                                strict=args.strict, device=device)
        target_index = _target_index(args, len(photos))
    if args.others and is_main:
        from ..inversion import list_photos, prepare_photos

        files = list_photos(args.others)
        other_photos = prepare_photos(files, align=not args.pre_aligned, device=device)
        others = {"folder": str(args.others)}
    gen, random_gen = resolve_generator(args.generator, device=device)
    average = _w_avg(args, gen)
    # loaded once, only where photos are inverted (GOAE: ~440 MB of weights)
    encoder = _encoder(args, device, gen) if (photos is not None or other_photos is not None) else None
    id_loss, lpips = build_loss_networks(args, device, args.random_nets)
    cfg_kwargs = dict(iterations=args.iters, lr=args.lr, path=args.path, renderer=args.renderer,
                      precision=args.precision, cuda_graph=not args.no_graph, seed=args.run_seed,
                      upsample_conv=args.upsample_conv, skip_path=args.skip_path,
                      memory_format="channels_last" if args.channels_last else "contiguous",
                      compile=args.compile, compile_mode=args.compile_mode, noise_passes=args.noise_passes)
    if args.target is not None:  # else: the config's own target (extra; average for the baseline)
        cfg_kwargs["target"] = args.target
    cfg = UnlearnConfig.baseline(**cfg_kwargs) if args.baseline else UnlearnConfig(**cfg_kwargs)
    scorer = _scorer(args, device)
    unl = Unlearner(gen, id_loss, lpips, cfg, w_avg=average)
    kwargs, inversion, inverted_others = {}, None, []
    if args.seed is not None:
        kwargs["seeds"] = args.seed
    elif args.latent is not None:
        kwargs["latents"] = load_latents(args.latent, gen)
    if photos is not None or other_photos is not None:
        # Inverted here rather than through unlearn(images=...) so that the inversion gets its own
        # progress bar; the result is the same (the inversion draws from its own seeded generator).
        inversion, inverted_others = _invert_photos(args, gen, id_loss, lpips, photos, other_photos, target_index,
                                                    encoder, average)
        if inversion:
            kwargs["latents"] = torch.cat([r.w_plus for r in inversion])
    result = unl.unlearn(progress=not args.no_progress, **kwargs)
    if inversion:
        result.inversion = inversion
    if inverted_others:
        result.w_others = torch.cat([r.w_plus for r in inverted_others])
        others = dict(others or {})
        others["photos"] = [Path(r.aligned.name).name for r in inverted_others]
        others["inverted"] = [r.summary() for r in inverted_others]
    if target_index is not None:
        others = dict(others or {})
        others["target_index"] = target_index
        others["target_photo"] = photos[target_index].name
    extra = {"others": others} if others else None
    if "distributed" in result.timings:
        extra = dict(extra or {}, world_size=result.timings["world_size"], distributed=result.timings["distributed"])
    if not is_main:
        return 0
    out = result.save(args.out, generator_spec=args.generator, random_weights=random_gen or args.random_nets,
                      scorer=scorer, extra=extra, overwrite=args.overwrite)
    _print_summary(result, out, random_gen or args.random_nets)
    return 0


def _scorer(args, device):
    if not getattr(args, "scorer_weights", None):
        return None
    from pathlib import Path

    from ..errors import InputError
    from ..identity import IdentityScorer

    if Path(args.scorer_weights).suffix.lower() == ".onnx":
        raise InputError(f"--scorer-weights {args.scorer_weights}: an .onnx model; the report's scorer takes the "
                         "PyTorch weight file (CurricularFace_Backbone.pth or model_ir_se50.pth)")
    return IdentityScorer(args.scorer_weights, backend="torch", device=device, align=args.align)


def _print_summary(result, out, random_weights: bool):
    t = result.timings
    k = max(1, min(5, len(result.losses) // 2))
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows) if rows else float("nan")  # noqa: E731
    print(f"unlearned {result.w_source.shape[0]} identit{'y' if result.w_source.shape[0] == 1 else 'ies'} in "
          f"{t.get('loop_s', 0):.1f} s ({t.get('iterations', 0)} steps, {t.get('steady_step_ms', 0):.1f} ms/step, "
          f"{t.get('path')} path, renderer {t.get('renderer')}, {t.get('precision')}, device {t.get('device')})")
    first, last = result.losses[:k], result.losses[-k:]
    print(f"loss (mean of the first / last {k} steps; each step draws new adjacency and global samples): "
          f"total {mean(first, 'total'):.4f} -> {mean(last, 'total'):.4f}, "
          f"local (unlearning) {mean(first, 'local'):.4f} -> {mean(last, 'local'):.4f}")
    print(f"wrote {out}/ ({', '.join(sorted(p.name for p in Path(out).iterdir()))})")
    if random_weights:
        print("NOTE: RANDOM WEIGHTS were used: this run shows the pipeline working, it does not unlearn a real person.")


def _demo(args) -> int:
    from ..eg3d.generator import build_generator
    from ..identity import IdentityLoss, IdentityScorer, build_backbone
    from ..perceptual import LPIPS
    from ..io import check_output_path
    from ..unlearn.config import MAX_ITERATIONS, UnlearnConfig
    from ..unlearn.engine import Unlearner

    device = resolve_device(args.device)
    check_positive(args.iters, "--iters", maximum=MAX_ITERATIONS)
    out_dir, overwrite = _demo_out(args)
    check_output_path(out_dir, "folder", "--out", overwrite=overwrite)
    print("guide-fast demo: GUIDE unlearning on the built-in 'tiny' EG3D generator.")
    print("  RANDOM WEIGHTS: generator, ArcFace IR-SE50 and LPIPS-VGG are randomly initialised; the run exercises the")
    print("  whole pipeline (UFO target, local + adjacency + global losses, Adam on backbone.synthesis) but forgets")
    print("  nobody real. The tiny generator's random weights are structured (eg3d/init.py) so that its renders")
    print("  show an opaque, shaded head-sized body whose colours follow the latent.")
    print("  For a real run: guide-fast unlearn --generator ffhqrebalanced512-128.pkl ...")
    from ..eg3d.init import INIT_NAME

    gen = build_generator("tiny", seed=0, device=device)
    id_loss = IdentityLoss(build_backbone("ir_se50", seed=0)).to(device)
    lpips = LPIPS.random(0).to(device)
    cfg = UnlearnConfig(iterations=args.iters, lr=DEMO_LR, seed=0, eval_views=DEMO_VIEWS)
    result = Unlearner(gen, id_loss, lpips, cfg).unlearn(seeds=[DEMO_SEED], progress=True)
    scorer = IdentityScorer(build_backbone("ir101", seed=1), backend="torch", device=device, align="crop")
    demo = {"iterations": args.iters, "lr": DEMO_LR, "seed": DEMO_SEED, "eval_views": DEMO_VIEWS,
            "generator_init": INIT_NAME, "scorer": DEMO_SCORER,
            "lr_note": f"lr {DEMO_LR:g} (paper: 1e-4) so that {args.iters} demo steps reach the target and the "
                       "adjacency and global losses have pulled the held-out identities back (measured: the first steps "
                       "move every identity, the later ones undo it for all but near neighbours)"}
    out = result.save(out_dir, overwrite=overwrite, generator_spec="tiny", random_weights=True, scorer=scorer,
                      extra={"demo": demo})
    _print_summary(result, out, True)
    _print_identity(out, DEMO_SCORER)
    return 0


def _print_identity(out, scorer_name: str) -> None:
    """The run's identity similarity to the source, before -> after (report.json "pictures")."""
    import json

    pictures = json.loads((Path(out) / "report.json").read_text()).get("pictures", {})
    ident = pictures.get("identity_to_source")
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    change = pictures.get("render_change")
    if change:
        mx = change["held_out_max"]
        dists = [e["w_distance"] for e in change["held_out"]]
        print(f"render change ({change['metric']}; no face network, so it holds with random weights):")
        print(f"  forgotten id 0 (seed {DEMO_SEED}): {change['forgotten'][0]:.3f}")
        print(f"  {len(change['held_out'])} held-out identities: median {change['held_out_median']:.3f}, mean "
              f"{change['held_out_mean']:.3f}, max {mx['change']:.3f} (seed {mx['seed']}, W+ distance "
              f"{mx['w_distance']:.1f} to the forgotten latent; the held-out lie at {min(dists):.1f}-{max(dists):.1f}: "
              "near neighbours move most)")
        print(f"  grid.png shows held-out seeds {', '.join(map(str, change['shown']))} ({change['shown_rule']})")
    if ident:
        print(f"identity similarity to the source, before -> after ({scorer_name}; RANDOM WEIGHTS, so the numbers "
              "show the mechanics, not a real face network's verdict):")
        for e in ident["forgotten"]:
            print(f"  forgotten id {e['identity']} (seed {DEMO_SEED}): {fmt(e['before'])} -> {fmt(e['after'])}")
        for e in ident["held_out"]:
            print(f"  held-out seed {e['seed']}:{' ' * max(1, 13 - len(str(e['seed'])))}{fmt(e['before'])} -> "
                  f"{fmt(e['after'])}")
    print(f"pictures: {Path(out) / 'grid.png'} (renders before / after / target, held-out before / after), "
          f"{Path(out) / 'losses.png'}, {Path(out) / 'identity.png'}")



def _demo_out(args):
    """(folder, overwrite). The demo's own folder demo_out/ (the default, also as `--out demo_out`,
    which `make demo` passes) is replaced when it holds an earlier demo run, so the demo can run
    again; holding anything else it is refused like any output folder. Another --out follows the
    rule of `unlearn --out`: a new or empty folder, or --overwrite."""
    import json

    out = Path(args.out if args.out is not None else DEMO_OUT)
    if args.overwrite or out.resolve() != Path(DEMO_OUT).resolve():
        return out, args.overwrite
    try:
        earlier_demo = "demo" in json.loads((out / "report.json").read_text())
    except (OSError, ValueError, TypeError, RecursionError):
        earlier_demo = False
    return out, earlier_demo


def _unlearn_entry(args) -> int:
    """`unlearn`, in one process, or sharded over torchrun's processes (--distributed, or
    launched by torchrun): every rank runs `_unlearn`, the engine shards the identities
    (guide_fast.unlearn.distributed), and every rank meets the others once more at the end, so
    a failure anywhere (rank 0's --out check, a step on rank 3, rank 0's save) ends every rank
    with the same one line, printed by rank 0, and exit code 2."""
    from ..unlearn import distributed as sharding

    if not (args.distributed or sharding.torchrun_environment()):
        return _unlearn(args)
    import torch.distributed as dist

    args.dist_context, device = sharding.init_from_env(resolve_device(args.device), args.dist_timeout)
    ctx = args.dist_context
    args.device = str(device)
    error = None
    try:
        try:
            _unlearn(args)
        except sharding.DistributedError as exc:  # already agreed on by every rank
            error = exc
        except Exception as exc:
            error = exc
        if not isinstance(error, sharding.DistributedError):
            try:
                ctx.agree(error, "unlearning")
            except sharding.DistributedError as exc:
                error = exc
        if error is not None:
            import sys

            lost = getattr(error, "lost_contact", False)
            if ctx.is_main or lost:  # the job's one line (every rank has the same message)
                print(f"guide-fast {args.command}: error: {error}", file=sys.stderr, flush=True)
            if not lost:
                # no rank exits (and makes torchrun stop the others) before rank 0 has said why
                with contextlib.suppress(Exception):
                    dist.barrier(group=ctx.group)
            return 2
        return 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
