"""The evaluation's files: eval.json and its PNG plots (ID per view, loss curves, diversity,
the before/after view grid), each written atomically."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from .config import EvalResult


def write_outputs(result: "EvalResult", out_dir: "str | os.PathLike", *,
                  kept: "tuple[torch.Tensor | None, torch.Tensor | None]" = (None, None),
                  report: dict | None = None) -> list[str]:
    """eval.json and the PNG plots, each written atomically; sets result.files. Returns the file names."""
    from ..io import write_json

    out_dir = Path(out_dir)
    files = []
    try:
        import matplotlib

        matplotlib.use("Agg")
        have_mpl = True
    except ImportError:
        have_mpl = False
        result.notes.append("plots skipped: matplotlib is not installed")
    if have_mpl:
        if result.id:
            files.append(_plot_id_per_view(result.to_dict(), out_dir / "id_per_view.png"))
        if report and report.get("losses"):
            path = _plot_losses(report["losses"], out_dir / "loss_curves.png")
            if path:
                files.append(path)
        if result.diversity:
            files.append(_plot_diversity(result.diversity, out_dir / "diversity.png"))
    if kept[0] is not None:
        files.append(_save_view_grid(kept, result.settings["view_yaws"], out_dir / "views.png"))
    files.append("eval.json")
    result.files = files
    write_json(out_dir / "eval.json", result.to_dict())
    return files


def _savefig(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    from ..io import atomic_path

    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path.name


def _plot_id_per_view(result: dict, path: Path) -> str:
    import matplotlib.pyplot as plt

    yaws_deg = np.degrees(result["settings"]["view_yaws"])
    fig, ax = plt.subplots(figsize=(7, 4))
    nan = lambda xs: [np.nan if v is None else v for v in xs]  # noqa: E731
    rows = result["id"]["per_identity"]
    for i, row in enumerate(rows):
        ax.plot(yaws_deg, nan(row), color="tab:red", alpha=0.35 if len(rows) > 1 else 0.9, lw=1,
                marker="o" if len(rows) == 1 else None, label="target" if i == 0 and len(rows) == 1 else None)
    if len(rows) > 1:
        ax.plot(yaws_deg, nan(result["id"]["per_view"]), color="tab:red", lw=2.5, marker="o",
                label=f"targets (mean of {len(rows)})")
    if result.get("id_others"):
        ax.plot(yaws_deg, nan(result["id_others"]["per_view"]), color="tab:orange", lw=2, ls="--", marker="s",
                label="other photos (ID_others)")
    pres = (result.get("preservation") or {}).get("mean")
    if pres is not None:
        ax.axhline(pres, color="tab:green", ls=":", lw=2, label=f"held-out identities (preservation {pres:.3f})")
    ax.axhline(1.0, color="0.6", lw=0.8)
    ax.set_xlabel("yaw (degrees), pitch %.2f rad" % result["settings"]["camera"]["pitch"])
    ax.set_ylabel("cosine(before, after)")
    ax.set_title(f"ID per view: identity similarity of source vs unlearned renders (lower = erased); "
                 f"mean {result['id']['mean']:.3f}" if result["id"]["mean"] is not None else "ID per view",
                 fontsize=9)
    ax.set_ylim(min(-0.2, ax.get_ylim()[0]), 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return _savefig(fig, path)


def _plot_losses(losses: list, path: Path) -> str | None:
    import matplotlib.pyplot as plt

    def number(v) -> bool:  # the report is a file: plot only finite numbers from it
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    series: dict[str, list] = {}
    if not isinstance(losses, list):
        return None
    for step, entry in enumerate(losses):
        if not isinstance(entry, dict):
            continue
        x = entry.get("step", step)
        x = x if number(x) else step
        for key, value in entry.items():
            if key in ("step", "iteration", "time", "time_s"):
                continue
            if isinstance(value, (list, tuple)) and value and all(number(v) for v in value):
                value = float(np.mean(value))  # per-identity values of a many-identity run
            if number(value):
                series.setdefault(str(key), []).append((x, float(value)))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    positive = all(v > 0 for pts in series.values() for _, v in pts)
    for key, pts in series.items():
        xs, ys = zip(*pts)
        ax.plot(xs, ys, lw=2 if key == "total" else 1.2, label=key)
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("unlearning losses (docs/guide.md §3.5)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _savefig(fig, path)


def _plot_diversity(div: dict, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.8))
    for ax, key, title in ((axes[0], "matrix_before", "source renders"), (axes[1], "matrix_after", "unlearned renders")):
        m = np.array([[np.nan if v is None else v for v in row] for row in div[key]], dtype=float)
        im = ax.imshow(m, vmin=-0.2, vmax=1.0, cmap="viridis")
        mean = div["mean_pairwise_cosine_after" if key == "matrix_after" else "mean_pairwise_cosine_before"]
        ax.set_title(f"{title}: mean pairwise {mean:.3f}" if mean is not None else title, fontsize=9)
        ax.set_xlabel("identity")
        ax.set_ylabel("identity")
    fig.colorbar(im, ax=axes, shrink=0.8, label="cosine across identities (1 = same face)")
    return _savefig(fig, path)


def _save_view_grid(kept, yaws, path: Path, tile: int = 192, label_width: int = 72) -> str:
    """Two rows (source, unlearned) x 11 views of the first target, tiles at most `tile` px,
    with a label column."""
    import torch.nn.functional as F
    from PIL import Image, ImageDraw

    from ..io import save_image

    rows = []
    for levels, label in zip(kept, ("source", "unlearned")):
        x = levels.float()
        if x.shape[-1] > tile:
            x = F.interpolate(x, size=(tile, tile), mode="bilinear", antialias=True, align_corners=False)
        row = torch.cat(list(x.round().clamp(0, 255)), dim=-1).to(torch.uint8).permute(1, 2, 0).numpy()
        tag = Image.new("RGB", (label_width, row.shape[0]), (255, 255, 255))
        ImageDraw.Draw(tag).text((4, row.shape[0] // 2 - 6), label, fill=(0, 0, 0))
        rows.append(np.concatenate([np.asarray(tag), row], axis=1))
    save_image(path, np.concatenate(rows, axis=0))
    return path.name


__all__ = ["write_outputs"]
