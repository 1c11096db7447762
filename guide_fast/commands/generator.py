"""`guide-fast convert`, `render` and `history`: generator checkpoints, quick renders, provenance."""
from __future__ import annotations

import math


def add_commands(sub) -> None:
    p = sub.add_parser("convert", help="convert an official EG3D pickle to guide-fast's safetensors format "
                       "(no code from the pickle is executed)")
    p.add_argument("src", help="EG3D network pickle (e.g. ffhqrebalanced512-128.pkl) or a guide-fast .safetensors")
    p.add_argument("dst", help="output .safetensors path (replaced if it exists; written atomically)")
    p.set_defaults(func=_convert)

    p = sub.add_parser("render", help="render a generator from several yaws into a PNG grid")
    p.add_argument("--generator", default="tiny",
                   help="checkpoint path, or a built-in preset name with random weights ('tiny', 'ffhq512-128')")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated latent seeds (one row each)")
    p.add_argument("--views", type=int, default=5, help="number of yaws in [-pi/12, pi/12]")
    p.add_argument("--out", default="render.png", help="output image: .png (default render.png), .jpg, .webp, ...")
    p.add_argument("--renderer", choices=["reference", "triton"], default="reference",
                   help="tri-plane renderer (triton needs a CUDA device)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.set_defaults(func=_render)

    p = sub.add_parser("history", help="print a checkpoint's chain of weight fingerprints (source checkpoint, "
                       "each unlearning run: parent -> result)")
    p.add_argument("checkpoint", help="a guide-fast generator .safetensors (or an EG3D pickle: its origin only)")
    p.set_defaults(func=_history)


def _history(args) -> int:
    from ..checkpoints import checkpoint_history
    from ..errors import printable

    info = checkpoint_history(args.checkpoint)
    # every string below comes from the file: printed escaped, one line per step
    print(printable(f"{args.checkpoint}: weights fingerprint {info['fingerprint']}"))
    if info.get("source_sha256"):
        print(printable(f"  original checkpoint sha256 {info['source_sha256']}"))
    for i, step in enumerate(info["history"]):
        extra = ", ".join(f"{k}={v}" for k, v in step.items() if k not in ("action", "parent", "result", "source_sha256"))
        parent = step.get("parent")
        arrow = f"{parent[:16]} -> {step['result'][:16]}" if parent else f"{step['result'][:16]}"
        print(printable(f"  {i}. {step.get('action', '?')}: {arrow}" + (f" ({extra})" if extra else "")))
    return 0


def _convert(args) -> int:
    from ..checkpoints import convert, load_generator, state_fingerprint
    from ..io import check_output_path

    check_output_path(args.dst, "file", "DST", suffixes=[".safetensors"])
    out = convert(args.src, args.dst)
    gen = load_generator(out)
    print(f"wrote {out} (source sha256 {gen.source_sha256[:16]}…, weights fingerprint {state_fingerprint(gen)[:16]}…)")
    return 0


def resolve_generator(spec: str, renderer: str = "reference", device=None, seed: int = 0):
    """A checkpoint path, or a preset name built with random weights."""
    from pathlib import Path

    from ..checkpoints import load_generator
    from ..eg3d.generator import PRESETS, build_generator

    if spec in PRESETS and not Path(spec).is_file():  # a folder that happens to be called "tiny" is no checkpoint
        return build_generator(spec, seed=seed, renderer=renderer, device=device), True
    return load_generator(spec, renderer=renderer, device=device), False


def render_grid(gen, ws, yaws, pitch: float = -0.2, lookat=None, generator=None):
    """Rows = latents, columns = yaws -> uint8 image (H*rows, W*cols, 3)."""
    import numpy as np
    import torch

    from .. import cameras
    from ..io import to_uint8

    lookat = cameras.GUIDE_LOOKAT if lookat is None else lookat
    rows = []
    with torch.no_grad():
        for i in range(ws.shape[0]):
            c = cameras.pose_label(torch.as_tensor(yaws), pitch, lookat=lookat, device=ws.device)
            img = gen.synthesis(ws[i:i + 1].expand(len(yaws), -1, -1), c, noise_mode="const", generator=generator)["image"]
            rows.append(np.concatenate(list(to_uint8(img)), axis=1))
    return np.concatenate(rows, axis=0)


MAX_GRID_RENDERS = 1024  # renders in one `render` grid: at 512 px, 0.8 GB of image


def _render(args) -> int:
    import torch

    from .. import cameras
    from ..errors import InputError
    from ..seeds import identity_z
    from ..io import check_output_path, save_image
    from ._common import check_renderer, parse_seed_list, resolve_device

    seeds = parse_seed_list(args.seeds, "--seeds")
    if not seeds:
        raise InputError("--seeds: need at least one seed")
    if args.views < 1:
        raise InputError(f"--views must be >= 1, got {args.views}")
    # one grid image holds seeds x views renders: bounded so that a typo cannot ask for gigabytes
    if len(seeds) * args.views > MAX_GRID_RENDERS:
        raise InputError(f"--seeds x --views = {len(seeds)} x {args.views:,} renders; one grid holds at most "
                         f"{MAX_GRID_RENDERS} (render several grids instead)")
    check_output_path(args.out, "file", "--out", image=True)
    device = resolve_device(args.device)
    check_renderer(args.renderer, device)
    gen, random_weights = resolve_generator(args.generator, args.renderer, device)
    # the identity of `unlearn --seed N` (GUIDE's draw sequence on the device, guide_fast/seeds.py)
    z = torch.stack([identity_z(s, gen.config.z_dim, device) for s in seeds])
    ws = gen.mapping(z, cameras.frontal_label(len(seeds), device=device))
    yaws = torch.linspace(-math.pi / 12, math.pi / 12, args.views).tolist()
    grid = render_grid(gen, ws, yaws, generator=torch.Generator(device=device).manual_seed(0))
    save_image(args.out, grid)
    note = " (RANDOM WEIGHTS: preset " + args.generator + ", not a trained model)" if random_weights else ""
    print(f"wrote {args.out}: {len(seeds)} latents x {args.views} views{note}")
    return 0
