"""The pictures of an unlearning run: grid.png, losses.png and identity.png.

    pictures = prepare_pictures(result, scorer)        # held-out renders + identity scores
    write_pictures(folder, result, pictures)           # the three PNGs (atomic writes)

* grid.png: the evaluation views (columns, yaw in degrees) of each unlearned identity before
  (G_s(w_u)), after (G_u(w_u)) and of its UFO target (G_s(w_t)), then of held-out identities
  (latents that were not unlearned) before (G_s) and after (G_u): the first should change, the
  second should not.
* losses.png: total, local, adjacency and global losses over the steps (raw and smoothed).
* identity.png: identity similarity to the source, before and after, for the unlearned and the
  held-out identities, with the scoring network named; beside it, how far each render moved.

"Similarity to the source" of an identity: the cosine between a render's identity embedding and
the identity's source embedding (the mean embedding of G_s's renders over the evaluation views),
averaged over the views: "before" scores G_s's renders (below 1 only by the views' spread),
"after" G_u's.

"Render change" of a latent: mean |G_u(w) - G_s(w)| per pixel and channel, in units of the
image range (0..1), on the frontal view (yaw 0, the evaluation pitch). It needs no face network,
so it reads the same with random weights. It is measured for the unlearned identities and for
HELD_OUT_CANDIDATES held-out latents (fixed seeds mapped like `--seed` identities; a seed whose
latent equals an unlearned one is skipped).

Which held-out identities the grid shows: the HELD_OUT_SHOWN middle ones of the candidates
ranked by render change (the lower and upper median of 16), i.e. typical held-out identities,
neither the best nor the worst; the report gives every candidate's change, its W+ distance to
the nearest unlearned latent, and the largest. Why not fixed seeds: any one seed can happen to
be a near neighbour of the unlearned latent, which GUIDE's adjacency term moves on purpose
(docs/guide.md §3.5), so a fixed pair says more about that seed than about the run.

Extra cost per run: 2 x (identities + candidates) frontal renders, plus 2 x shown x views
renders and their embeddings (the engine's before/after renders are reused for the unlearned
identities).

matplotlib draws with the Agg backend into memory; the files are written through
guide_fast.io.save_image (temporary name, then rename).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..io import save_image, to_uint8

HELD_OUT_CANDIDATES = tuple(range(1000, 1016))  # seeds of the held-out latents measured
HELD_OUT_SHOWN = 2                               # how many of them the grid and identity chart show
PICTURES = ("grid.png", "losses.png", "identity.png")
LOSS_KEYS = ("total", "local", "adjacency", "global")
_TILE_MIN, _TILE_MAX = 128, 256   # grid tile size in pixels (renders are resized into it)
MAX_GRID_IDENTITIES = 8            # grid.png shows the first 8 unlearned identities (image size bound)


@dataclass
class RunPictures:
    """What the pictures need beyond the result: held-out renders and identity scores."""

    held_out_seeds: list = field(default_factory=list)   # the shown ones
    held_out: dict | None = None          # {"before", "after"}: [H, V, 3, h, w] of the shown ones
    identity: dict | None = None          # see identity_to_source
    change: dict | None = None            # see render_change_summary
    random_weights: bool = False

    def summary(self) -> dict:
        """The report's "pictures" entry."""
        out = {"files": list(PICTURES), "held_out_seeds": list(self.held_out_seeds)}
        if self.change is not None:
            out["render_change"] = self.change
        if self.identity is not None:
            out["identity_to_source"] = self.identity
        return out


# ----------------------------------------------------------------------------- data
def held_out_latents(result, seeds=HELD_OUT_CANDIDATES):
    """(seeds, W+ latents) of identities that were not unlearned: fixed seeds mapped as the
    run maps `--seed` identities; a seed whose latent equals an unlearned one is skipped."""
    from .views import latents_from_seeds

    cfg = result.config
    if not seeds:
        return [], None
    w = latents_from_seeds(result.source, list(seeds), cfg.truncation_psi, cfg.fov_degrees, cfg.lookat, cfg.radius)
    w_u = result.w_source.to(w.device, w.dtype).flatten(1)
    keep = [i for i in range(w.shape[0]) if not torch.isclose(w[i].flatten()[None], w_u, atol=1e-6).all(1).any()]
    if not keep:
        return [], None
    return [list(seeds)[i] for i in keep], w[keep]


CHANGE_METRIC = "mean |G_u - G_s| per pixel and channel, image range 0..1, frontal view"


def render_change(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Renders [N, V, 3, h, w] in [-1, 1] -> [N] mean absolute change in units of the image
    range (0..1)."""
    return (after.float().cpu() - before.float().cpu()).abs().mean(dim=(1, 2, 3, 4)) / 2


def _frontal_change(result, w: torch.Tensor) -> torch.Tensor:
    from .views import render_views

    dev_s = next(result.source.parameters()).device
    dev_u = next(result.generator.parameters()).device
    before = render_views(result.source, w.to(dev_s), result.config, yaws=[0.0])
    after = render_views(result.generator, w.to(dev_u), result.config, yaws=[0.0])
    return render_change(before, after)


def middle_ranks(values, k: int) -> list:
    """Indices of the k middle values by rank (the lower and upper median for k = 2 of an even
    count), in ascending order of value."""
    order = sorted(range(len(values)), key=lambda i: (values[i], i))
    k = min(k, len(order))
    start = (len(order) - k) // 2
    return order[start:start + k]


def render_change_summary(seeds: list, held: torch.Tensor, forgotten: torch.Tensor, distance: torch.Tensor,
                          shown: list) -> dict:
    """The report's "render_change": per unlearned identity and per held-out candidate (seed,
    change, W+ distance to the nearest unlearned latent), their median / mean / max, and which
    candidates the pictures show."""
    h = [float(x) for x in held]
    top = max(range(len(h)), key=lambda i: h[i])
    return {
        "metric": CHANGE_METRIC,
        "forgotten": [float(x) for x in forgotten],
        "held_out": [{"seed": int(s), "change": c, "w_distance": float(d)} for s, c, d in zip(seeds, h, distance)],
        "held_out_median": float(np.median(h)),
        "held_out_mean": float(np.mean(h)),
        "held_out_max": {"seed": int(seeds[top]), "change": h[top], "w_distance": float(distance[top])},
        "shown": [int(seeds[i]) for i in shown],
        "shown_rule": f"the {len(shown)} middle of {len(h)} held-out identities ranked by render change",
    }


def _embed_views(scorer, renders: torch.Tensor) -> torch.Tensor:
    """renders [K, V, 3, h, w] -> embeddings [K, V, D] (float64, NaN rows where no face)."""
    from ..evaluation.views import embed

    k, v = renders.shape[:2]
    return embed(scorer, renders.reshape(k * v, *renders.shape[2:])).reshape(k, v, -1)


def _to_source(before: torch.Tensor, after: torch.Tensor) -> list:
    """Per identity {"before", "after"}: mean cosine of each view's embedding to the identity's
    source embedding (the mean of the before embeddings over the views)."""
    out = []
    for b, a in zip(before, after):
        ok = torch.isfinite(b).all(-1)
        if not ok.any():
            out.append({"before": None, "after": None})
            continue
        ref = b[ok].mean(0)
        ref = ref / ref.norm()

        def score(e):
            good = torch.isfinite(e).all(-1)
            if not good.any():
                return None
            e = e[good]
            return float((e @ ref / e.norm(dim=-1)).mean())

        out.append({"before": score(b), "after": score(a)})
    return out


def identity_to_source(scorer, renders: dict, held_out: dict | None, held_out_seeds) -> dict:
    """Identity similarity to the source before and after (see the module docstring)."""
    forgotten = _to_source(_embed_views(scorer, renders["before"]), _embed_views(scorer, renders["after"]))
    held = []
    if held_out is not None:
        held = _to_source(_embed_views(scorer, held_out["before"]), _embed_views(scorer, held_out["after"]))
    return {
        "scorer": getattr(scorer, "description", type(scorer).__name__),
        "what": "mean over the evaluation views of cos(embedding, source embedding); the source embedding is "
                "the mean embedding of G_s's renders of that identity over the views",
        "forgotten": [dict(identity=i, **s) for i, s in enumerate(forgotten)],
        "held_out": [dict(seed=int(seed), **s) for seed, s in zip(held_out_seeds, held)],
    }


def prepare_pictures(result, scorer=None, held_out_seeds=HELD_OUT_CANDIDATES, shown: int = HELD_OUT_SHOWN,
                     random_weights: bool = False) -> RunPictures:
    """Measure the render change of the unlearned and the held-out candidates, render the
    `shown` typical held-out identities with G_s and G_u (the engine's evaluation views and
    draws) and score identities when a scorer is given."""
    from .views import render_views

    pics = RunPictures(random_weights=bool(random_weights))
    if result.renders is None:
        return pics
    seeds, w = held_out_latents(result, held_out_seeds)
    if w is not None:
        held = _frontal_change(result, w)
        forgotten = _frontal_change(result, result.w_source)
        w_u = result.w_source.to(w.device, w.dtype).flatten(1)
        distance = torch.cdist(w.flatten(1).double(), w_u.double()).min(dim=1).values
        pick = middle_ranks(held.tolist(), shown)
        pics.change = render_change_summary(seeds, held, forgotten, distance, pick)
        seeds, w = [seeds[i] for i in pick], w[pick]
    pics.held_out_seeds = seeds
    if w is not None and len(seeds):
        pics.held_out = {"before": render_views(result.source, w, result.config),
                         "after": render_views(result.generator, w.to(next(result.generator.parameters()).device),
                                               result.config)}
    if scorer is not None:
        pics.identity = identity_to_source(scorer, result.renders, pics.held_out, seeds)
    return pics


# ----------------------------------------------------------------------------- drawing
def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _figure_pixels(fig) -> np.ndarray:
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., :3])


def _finish(plt, fig, title: str, random_weights: bool) -> np.ndarray:
    """A chart's title (flagged when the networks are random), laid out, as pixels; closes fig."""
    if random_weights:
        title = "RANDOM WEIGHTS  ·  " + title
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    pixels = _figure_pixels(fig)
    plt.close(fig)
    return pixels


def _tiles(imgs: torch.Tensor, size: int) -> np.ndarray:
    """[V, 3, h, w] in [-1, 1] -> one uint8 row [size, V * size, 3]."""
    imgs = imgs.float()
    if imgs.shape[-1] != size:
        mode = "area" if imgs.shape[-1] > size else "nearest"
        imgs = torch.nn.functional.interpolate(imgs, size=(size, size), mode=mode)
    return np.concatenate(list(to_uint8(imgs)), axis=1)


def grid_rows(result, pictures: RunPictures) -> list:
    """[(label, renders [V, 3, h, w])] in the grid's order."""
    rows = []
    r = result.renders
    for i in range(min(r["before"].shape[0], MAX_GRID_IDENTITIES)):
        rows += [(f"id {i} before", r["before"][i]), (f"id {i} after", r["after"][i]),
                 (f"id {i} target", r["target"][i])]
    if pictures.held_out is not None:
        changes = {e["seed"]: e["change"] for e in (pictures.change or {}).get("held_out", [])}
        for j, seed in enumerate(pictures.held_out_seeds):
            moved = f"\n(change {changes[seed]:.3f})" if seed in changes else ""
            rows += [(f"held-out {seed} before", pictures.held_out["before"][j]),
                     (f"held-out {seed} after{moved}", pictures.held_out["after"][j])]
    return rows


def grid_figure(result, pictures: RunPictures) -> np.ndarray:
    from .views import view_yaws

    plt = _pyplot()
    rows = grid_rows(result, pictures)
    res = rows[0][1].shape[-1]
    size = min(max(res, _TILE_MIN), _TILE_MAX)
    mosaic = np.concatenate([_tiles(imgs, size) for _, imgs in rows], axis=0)
    yaws = view_yaws(result.config)
    dpi = 100
    left, top, bottom, right = 1.9, 1.1, 0.45, 0.15   # inches of margin
    w_in, h_in = mosaic.shape[1] / dpi, mosaic.shape[0] / dpi
    fig = plt.figure(figsize=(w_in + left + right, h_in + top + bottom), dpi=dpi)
    ax = fig.add_axes([left / (w_in + left + right), bottom / (h_in + top + bottom),
                       w_in / (w_in + left + right), h_in / (h_in + top + bottom)])
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_yticks([size * (k + 0.5) for k in range(len(rows))], [label for label, _ in rows], fontsize=9)
    ax.set_xticks([size * (k + 0.5) for k in range(len(yaws))], [f"{math.degrees(y):+.0f}°" for y in yaws],
                  fontsize=9)
    ax.tick_params(length=0)
    n_total = result.renders["before"].shape[0]
    n_forgotten = min(n_total, MAX_GRID_IDENTITIES)
    for k in range(1, n_forgotten + 1):  # lines between identity groups
        ax.axhline(3 * k * size - 0.5, color="white", linewidth=2)
    held = "held-out: identities not unlearned"
    ch = pictures.change
    if ch is not None and pictures.held_out is not None:
        forgotten = ", ".join(f"{c:.3f}" for c in ch["forgotten"][:n_forgotten])
        mx = ch["held_out_max"]
        held = (f"held-out: typical identities ({ch['shown_rule']})\nrender change (0..1, frontal view): "
                f"forgotten {forgotten}; held-out median {ch['held_out_median']:.3f}, max {mx['change']:.3f} "
                f"(seed {mx['seed']})")
    title = "before = G_s, after = G_u (unlearned), target = UFO target G_s(w_t)\n" + held
    if n_total > n_forgotten:
        title += f" (first {n_forgotten} of {n_total} unlearned identities)"
    if pictures.random_weights:
        title = "RANDOM WEIGHTS (pipeline demo): " + title
    fig.suptitle(title, fontsize=9, y=1 - 0.18 / (h_in + top + bottom))
    fig.text(0.5, 1 - 0.95 / (h_in + top + bottom), f"evaluation views: yaw offsets, pitch {result.config.pitch:+.2f} rad",
             ha="center", fontsize=8, color="0.3")
    pixels = _figure_pixels(fig)
    plt.close(fig)
    return pixels


def smooth(values, window: int | None = None) -> np.ndarray:
    """Exponential moving average with a span of `window` steps (default: a tenth of the run),
    started from the first value (no lag at the start)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return x
    window = window or max(2, x.size // 10)
    alpha = 2.0 / (window + 1)
    out = np.empty_like(x)
    acc = x[0]
    for i, v in enumerate(x):
        acc = alpha * v + (1 - alpha) * acc if np.isfinite(v) else acc
        out[i] = acc
    return out


def losses_figure(result, random_weights: bool = False) -> np.ndarray:
    plt = _pyplot()
    cfg = result.config
    rows = result.losses or []
    fig, axes = plt.subplots(2, 2, figsize=(9, 6), dpi=100, sharex=True)
    used = {"total": True, "local": cfg.use_local, "adjacency": cfg.use_adjacency, "global": cfg.use_global}
    for ax, key in zip(axes.flat, LOSS_KEYS):
        steps = [r.get("step", i) for i, r in enumerate(rows)]
        vals = [r.get(key, float("nan")) for r in rows]
        if rows:
            ax.plot(steps, vals, color="tab:blue", alpha=0.3, linewidth=1, label="per step")
            ax.plot(steps, smooth(vals), color="tab:blue", linewidth=2, label="smoothed")
        else:
            ax.text(0.5, 0.5, "no steps logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(key + ("" if used[key] else " (off in this run)"), fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("step")
    axes[0, 0].legend(fontsize=8)
    title = (f"GUIDE losses: {len(rows)} logged steps, lr {cfg.lr:g}, target {cfg.target}; "
             "adjacency and global draw new samples every step")
    return _finish(plt, fig, title, random_weights)


def _change_panel(ax, change: dict) -> None:
    """Bars of render change: the unlearned identities (red), then every held-out candidate
    in ascending order (green; the ones the grid shows darker, with their seeds)."""
    forgotten = change["forgotten"]
    held = sorted(change["held_out"], key=lambda e: e["change"])
    shown = set(change["shown"])
    values = list(forgotten) + [e["change"] for e in held]
    colours = ["tab:red"] * len(forgotten) + ["darkgreen" if e["seed"] in shown else "tab:green" for e in held]
    x = np.arange(len(values))
    ax.bar(x, values, 0.8, color=colours)
    labels = [f"id {i}" for i in range(len(forgotten))] + [str(e["seed"]) for e in held]
    ax.set_xticks(x, labels, fontsize=7, rotation=90)
    for xi, v in zip(x[:len(forgotten)], forgotten):
        ax.text(xi, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    med = change["held_out_median"]
    ax.axhline(med, color="tab:green", linestyle=":", linewidth=1.5, label=f"held-out median {med:.3f}")
    ax.set_ylabel("render change (0..1)")
    ax.set_xlabel("forgotten (red) and held-out seeds (green; dark: shown in grid.png), by change", fontsize=8)
    ax.set_ylim(0, max(values + [1e-3]) * 1.15)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(change["metric"], fontsize=9)


def identity_figure(pictures: RunPictures) -> np.ndarray:
    plt = _pyplot()
    if pictures.change is not None:
        fig, (ax, ax_change) = plt.subplots(1, 2, figsize=(13, 4.5), dpi=100, gridspec_kw={"width_ratios": [1, 1.2]})
        _change_panel(ax_change, pictures.change)
    else:
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ident = pictures.identity
    if ident is None:
        ax.axis("off")
        ax.text(0.5, 0.5, "no identity scorer was given:\nidentity similarity was not measured\n"
                          "(unlearn --scorer-weights: CurricularFace IR-101 or ArcFace IR-SE50)",
                ha="center", va="center", fontsize=11)
    else:
        groups = [(f"forgotten\nid {s['identity']}", s) for s in ident["forgotten"]]
        groups += [(f"held-out\nseed {s['seed']}", s) for s in ident["held_out"]]
        x = np.arange(len(groups))
        val = lambda s, k: np.nan if s[k] is None else s[k]  # noqa: E731
        before = [val(s, "before") for _, s in groups]
        after = [val(s, "after") for _, s in groups]
        bottom = min([v for v in before + after if np.isfinite(v)] + [0.0]) - 1.0  # bars rise from below the axis
        before_h = [v - bottom for v in before]
        after_h = [v - bottom for v in after]
        ax.bar(x - 0.19, before_h, 0.38, bottom=bottom, label="before (G_s)", color="tab:gray")
        ax.bar(x + 0.19, after_h, 0.38, bottom=bottom, label="after (G_u): red forgotten, green held-out",
               color=["tab:red" if g.startswith("forgotten") else "tab:green" for g, _ in groups])
        for xi, b, a in zip(x, before, after):
            for dx, v in ((-0.19, b), (0.19, a)):
                if np.isfinite(v):
                    ax.text(xi + dx, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x, [g for g, _ in groups], fontsize=9)
        finite = [v for v in before + after if np.isfinite(v)] or [0.0]
        # zoom to the values (a random network's similarities all sit near 1): the axis starts
        # below the lowest value by half its distance to 1 (at least 0.02)
        low = min(finite) - max(0.02, 0.5 * (1 - min(finite)))
        ax.set_ylim(low, 1 + 0.12 * (1 - low))
        if low < 0:
            ax.axhline(0, color="black", linewidth=0.8)
        ax.set_ylabel("identity similarity to the source (axis zoomed)")
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(f"scorer: {ident['scorer']}", fontsize=9)
    title = "Identity similarity to the source: forgotten identities should drop, held-out ones stay"
    if pictures.change is not None:
        title += "  ·  render change: forgotten ones move, held-out ones little"
    return _finish(plt, fig, title, pictures.random_weights)


def write_pictures(folder, result, pictures: RunPictures) -> list:
    """Write grid.png (when the run rendered its views), losses.png and identity.png into
    `folder`; returns the names written."""
    from pathlib import Path

    folder = Path(folder)
    written = []
    if result.renders is not None:
        save_image(folder / "grid.png", grid_figure(result, pictures))
        written.append("grid.png")
    save_image(folder / "losses.png", losses_figure(result, pictures.random_weights))
    written.append("losses.png")
    save_image(folder / "identity.png", identity_figure(pictures))
    written.append("identity.png")
    return written


__all__ = ["HELD_OUT_CANDIDATES", "HELD_OUT_SHOWN", "PICTURES", "render_change", "middle_ranks", "RunPictures", "prepare_pictures", "write_pictures", "identity_to_source",
           "held_out_latents", "smooth", "grid_figure", "losses_figure", "identity_figure"]
