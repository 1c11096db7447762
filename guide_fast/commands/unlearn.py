"""`guide-fast unlearn` and `guide-fast demo`."""
from __future__ import annotations

from pathlib import Path

DEMO_ITERATIONS = 24


def add_commands(sub) -> None:
    p = sub.add_parser("unlearn", help="make the generator forget one or more identities (GUIDE)",
                       description="Fine-tune EG3D's tri-plane synthesis network so that it no longer produces the "
                                   "given identities (GUIDE, guide.md §3), and write the unlearned checkpoint, the "
                                   "weight delta, report.json and grid.png to --out.")
    p.add_argument("--generator", required=True,
                   help="EG3D checkpoint (official .pkl or guide-fast .safetensors), or a preset name "
                        "('tiny', 'ffhq512-128') for random weights")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--seed", type=int, nargs="+", help="identity seed(s): z ~ N(0, I) mapped with a frontal camera")
    src.add_argument("--latent", help="W+ latents file (.pt, .safetensors or .npy): [N, num_ws, w_dim], [num_ws, w_dim] or [w_dim]")
    src.add_argument("--image", nargs="+", help="photo(s) of the person(s) to forget (aligned and inverted first)")
    p.add_argument("--others", help="folder of other photos of the same person: aligned and inverted too, and "
                                    "saved as w_others for `guide-fast evaluate --run` (ID_others, guide.md §4.3)")
    p.add_argument("--id-weights", help="ArcFace IR-SE50 weights (model_ir_se50.pth) for the identity loss")
    p.add_argument("--lpips-weights", help="torchvision VGG16 weights (vgg16-397923af.pth) for LPIPS")
    p.add_argument("--lpips-heads", help="LPIPS v0.1 linear heads (vgg.pth); default: the copy in the lpips package")
    p.add_argument("--random-nets", action="store_true",
                   help="use randomly initialised identity/LPIPS networks (pipeline testing only)")
    p.add_argument("--scorer-weights", help="identity network for the report's before/after similarity "
                                            "(CurricularFace IR-101 or IR-SE50 file)")
    p.add_argument("--align", choices=["mtcnn", "crop"], default="mtcnn",
                   help="face preprocessing for the report's similarity (default mtcnn, as GUIDE's evaluation)")
    p.add_argument("--out", required=True, help="output folder")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--fast", dest="path", action="store_const", const="fast", help="fast loop (default)")
    mode.add_argument("--reference", dest="path", action="store_const", const="reference",
                      help="reference loop: eager fp32, batch 1, the official order of operations")
    p.set_defaults(path="fast")
    p.add_argument("--iters", type=int, default=1000, help="optimisation steps (paper: 1000)")
    p.add_argument("--target", choices=["extra", "average"], default="extra", help="UFO target (paper) or average face")
    p.add_argument("--baseline", action="store_true", help="the README baseline: average target, local loss only")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--run-seed", type=int, default=0, help="seed of the run's random draws")
    p.add_argument("--renderer", choices=["auto", "reference", "triton"], default="auto")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--no-graph", action="store_true", help="do not capture the step in a CUDA graph")
    p.add_argument("--upsample-conv", choices=["auto", "reference", "folded"], default="auto",
                   help="2x up-convolutions: FIR folded into the kernel (auto: on the fast path) or the official two passes")
    p.add_argument("--channels-last", action="store_true", help="fast path: NHWC generator activations")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--invert-steps", type=int, default=300, help="optimisation steps of the photo inversion")
    p.add_argument("--face-index", type=int, default=None,
                   help="which face of each --image to use (0 = largest, the default)")
    p.add_argument("--strict", action="store_true", help="refuse a photo with several faces (and list them)")
    p.add_argument("--refine-camera", action="store_true", help="learn yaw and pitch during the inversion")
    p.add_argument("--pre-aligned", action="store_true",
                   help="the --image files are already in EG3D framing (square crops): skip face alignment")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_unlearn)

    p = sub.add_parser("demo", help="the whole pipeline on the built-in tiny generator with RANDOM weights (CPU, < 2 min)")
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--iters", type=int, default=DEMO_ITERATIONS)
    p.add_argument("--device", default=None)
    p.set_defaults(func=_demo)


def _device(spec):
    import torch

    from ..errors import InputError

    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise InputError(f"--device {spec!r} is not a device name (try cuda, cuda:0 or cpu)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA device is available")
    return dev


def load_latents(path, gen):
    """A latents file -> [N, num_ws, w_dim] (W latents [N, w_dim] are broadcast to all layers)."""
    from ..checkpoints import load_latents as read

    w = read(path, "--latent file")
    if w.ndim == 1:
        w = w[None, None].expand(1, gen.num_ws, -1)
    elif w.ndim == 2 and w.shape[0] != gen.num_ws:
        w = w[:, None].expand(-1, gen.num_ws, -1)
    return w.contiguous()


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
    from ..unlearn.config import UnlearnConfig
    from ..unlearn.engine import Unlearner
    from .generator import resolve_generator

    if args.iters < 1:
        raise InputError(f"--iters must be >= 1, got {args.iters}")
    device = _device(args.device)
    photos, others = None, None
    if args.image is not None:
        from ..invert import prepare_photos

        if args.invert_steps < 1:
            raise InputError(f"--invert-steps must be >= 1, got {args.invert_steps}")
        # Photos are read and aligned before any network is built: a bad photo fails in seconds.
        photos = prepare_photos(args.image, align=not args.pre_aligned, index=args.face_index, strict=args.strict,
                                device=device)
    other_photos = None
    if args.others:
        from ..invert import list_photos, prepare_photos

        files = list_photos(args.others)
        other_photos = prepare_photos(files, align=not args.pre_aligned, device=device)
        others = {"folder": str(args.others), "photos": [p.name for p in files]}
    gen, random_gen = resolve_generator(args.generator, device=device)
    id_loss, lpips = build_loss_networks(args, device, args.random_nets)
    cfg_kwargs = dict(iterations=args.iters, lr=args.lr, target=args.target, path=args.path, renderer=args.renderer,
                      precision=args.precision, cuda_graph=not args.no_graph, seed=args.run_seed,
                      upsample_conv=args.upsample_conv,
                      memory_format="channels_last" if args.channels_last else "contiguous")
    cfg = UnlearnConfig.baseline(**cfg_kwargs) if args.baseline else UnlearnConfig(**cfg_kwargs)
    scorer = _scorer(args, device)
    unl = Unlearner(gen, id_loss, lpips, cfg)
    kwargs = {}
    if args.seed is not None:
        kwargs["seeds"] = args.seed
    elif args.latent is not None:
        kwargs["latents"] = load_latents(args.latent, gen)
    else:
        # Inverted here rather than through unlearn(images=...) so that the inversion gets its own
        # progress bar; the result is the same (the inversion draws from its own seeded generator).
        from ..invert import invert_images

        inversion = invert_images(gen, photos, id_loss=id_loss, lpips=lpips, steps=args.invert_steps,
                                  refine_camera=args.refine_camera, progress=not args.no_progress,
                                  renderer=args.renderer, precision=args.precision)
        kwargs["latents"] = torch.cat([r.w_plus for r in inversion])
    result = unl.unlearn(progress=not args.no_progress, **kwargs)
    if args.image is not None:
        result.inversion = inversion
    if other_photos is not None:
        from ..invert import invert_images

        inverted = invert_images(gen, other_photos, id_loss=id_loss, lpips=lpips, steps=max(args.invert_steps, 1),
                                 refine_camera=args.refine_camera, progress=not args.no_progress,
                                 renderer=args.renderer, precision=args.precision)
        result.w_others = torch.cat([r.w_plus for r in inverted])
        others["inverted"] = [r.summary() for r in inverted]
    extra = {"others": others} if others else None
    out = result.save(args.out, generator_spec=args.generator, random_weights=random_gen or args.random_nets,
                      scorer=scorer, extra=extra)
    _print_summary(result, out, random_gen or args.random_nets)
    return 0


def _scorer(args, device):
    if not getattr(args, "scorer_weights", None):
        return None
    from ..identity import IdentityScorer

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
    from ..unlearn.config import UnlearnConfig
    from ..unlearn.engine import Unlearner

    device = _device(args.device)
    print("guide-fast demo: GUIDE unlearning on the built-in 'tiny' EG3D generator.")
    print("  RANDOM WEIGHTS: generator, ArcFace IR-SE50 and LPIPS-VGG are randomly initialised; the run exercises the")
    print("  whole pipeline (UFO target, local + adjacency + global losses, Adam on backbone.synthesis) but forgets")
    print("  nobody real. For a real run: guide-fast unlearn --generator ffhqrebalanced512-128.pkl ...")
    gen = build_generator("tiny", seed=0, device=device)
    id_loss = IdentityLoss(build_backbone("ir_se50", seed=0)).to(device)
    lpips = LPIPS.random(0).to(device)
    cfg = UnlearnConfig(iterations=args.iters, lr=1e-3, seed=0, eval_views=5)
    result = Unlearner(gen, id_loss, lpips, cfg).unlearn(seeds=[7], progress=True)
    scorer = IdentityScorer(build_backbone("ir101", seed=1), backend="torch", device=device, align="crop")
    out = result.save(args.out, generator_spec="tiny", random_weights=True, scorer=scorer,
                      extra={"demo": {"lr_note": "lr 1e-3 (paper: 1e-4) so that a few demo steps visibly move the "
                                                 "generator", "iterations": args.iters}})
    _print_summary(result, out, True)
    return 0

