"""Writing an unlearning run to disk: checkpoint, delta, latents, report.json and the pictures
(grid.png, losses.png, identity.png: unlearn/plots.py).

Everything is written into a staging folder beside the output folder, which then becomes the
output folder as a whole (guide_fast.io.staged_folder): an interrupted save never leaves a
half-written folder, and an earlier run's files never stay beside the new ones. An output folder
that already holds files is refused unless overwrite=True.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..evaluation.views import score_view_renders, view_yaws
from ..io import write_json

if TYPE_CHECKING:  # the engine imports this module; this one only names its result type
    from .engine import UnlearnResult

OUTPUT_FILES = ("generator.safetensors", "delta.safetensors", "latents.safetensors", "grid.png", "report.json")


def environment() -> dict:
    from .. import __version__

    env = {"guide_fast": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "platform": platform.platform()}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    env["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return env


class EmbeddingMemo:
    """An identity scorer that embeds each batch of images once: the report scores the
    forgotten identities' renders before vs after and after vs target, and the pictures score
    them again against their source; the IR-101 embeddings were most of a small run's saving
    time. Keyed by the tensor's storage, shape, strides and version (renders are not modified
    in place; a modified tensor has a new version), for one save only."""

    def __init__(self, scorer):
        self._scorer = scorer
        self._cache: dict = {}
        self.description = getattr(scorer, "description", type(scorer).__name__)
        for name in ("embed_detailed", "embed"):
            if hasattr(scorer, name):
                setattr(self, name, self._memo(getattr(scorer, name), name))

    def _memo(self, fn, name):
        def call(images, **kw):
            key = (name, images.data_ptr(), tuple(images.shape), tuple(images.stride()), images.dtype,
                   str(images.device), images._version, tuple(sorted(kw.items())))
            if key not in self._cache:
                self._cache[key] = fn(images, **kw)
            return self._cache[key]
        return call

    def __getattr__(self, name):  # anything else: the scorer's own
        return getattr(self._scorer, name)


def identity_similarity(result, scorer) -> dict:
    """Identity similarity of each view rendered before vs after (docs/guide.md §4.2; lower =
    identity removed), and of after vs the UFO target, scored over the views as evaluation does
    (evaluation/views.py)."""
    before, after, target = (result.renders[k] for k in ("before", "after", "target"))
    s_ba = score_view_renders(scorer, before, after)
    s_at = score_view_renders(scorer, after, target)
    return {
        "before_vs_after_per_view": s_ba["per_identity"],
        "before_vs_after_mean": s_ba["mean"],
        "after_vs_target_mean": s_at["mean"],
        "views_without_face": s_ba["pairs"] - s_ba["pairs_scored"],
        "scorer": getattr(scorer, "description", type(scorer).__name__),
    }


def build_report(result: "UnlearnResult", generator_spec=None, random_weights: bool = False, scorer=None,
                 extra=None) -> dict:
    report = {
        "what": "GUIDE identity unlearning (guide-fast)",
        "random_weights": bool(random_weights),
        "generator": None if generator_spec is None else str(generator_spec),
        "source_sha256": getattr(result.source, "source_sha256", None),
        "identities": int(result.w_source.shape[0]),
        # the w_avg of the UFO target (and of any inversion): "file <sha256>" or "mapping buffer"
        "w_avg": getattr(result, "w_avg", None),
        "config": result.config.to_dict(),
        "environment": environment(),
        "timings": result.timings,
        "losses": result.losses,
        "identity_losses": result.identity_losses,
        "views": {"yaw_offsets": view_yaws(result.config.yaw_range, result.config.eval_views),
                  "pitch": result.config.pitch},
        "files": list(OUTPUT_FILES),
    }
    if random_weights:
        report["warning"] = ("RANDOM WEIGHTS: the generator and/or the loss networks are randomly initialised; this run "
                             "demonstrates the pipeline only and unlearns nobody real.")
    if result.losses:
        first, last = result.losses[0], result.losses[-1]
        report["loss_first_last"] = {k: [first[k], last[k]] for k in ("total", "local", "adjacency", "global")}
    if result.inversion:
        report["inversion"] = [r.summary() for r in result.inversion]
    if scorer is not None and result.renders is not None:
        report["identity_similarity"] = identity_similarity(result, scorer)
    report.update(extra or {})
    return report


def save_result(result, out_dir, generator_spec=None, random_weights: bool = False, scorer=None, extra=None,
                overwrite: bool = False) -> Path:
    """Write the run to out_dir as a whole (io.staged_folder): a new or empty folder, or with
    overwrite=True an earlier run's folder, whose old contents are then replaced entirely (no
    stale file of the earlier run stays). A folder that holds files is refused otherwise."""
    from safetensors.torch import save_file

    from ..checkpoints import save_delta, save_generator
    from ..checkpoints.format import history_with
    from ..io import check_output_path, staged_folder

    out_dir = Path(out_dir)
    check_output_path(out_dir, "folder", flag=None, overwrite=overwrite)  # before the report's scoring
    if scorer is not None:  # the report and the pictures score the same renders: embed each once
        scorer = EmbeddingMemo(scorer)
    report = build_report(result, generator_spec, random_weights, scorer, extra)
    # grid.png, losses.png, identity.png: held-out renders and identity scores (unlearn/plots.py)
    from .plots import PICTURES, prepare_pictures, write_pictures

    pictures = prepare_pictures(result, scorer, random_weights=random_weights)
    report["pictures"] = pictures.summary()
    report["files"] = list(dict.fromkeys(list(report.get("files", [])) + list(PICTURES)))
    # the chain of weight fingerprints: the source's history (a generator unlearned before keeps
    # its earlier steps) plus this run, parent -> result (docs/formats.md §3)
    n_ids = int(result.w_source.shape[0])
    result.generator.checkpoint_history = history_with(result.source)
    result.generator.checkpoint_history = history_with(result.generator, action="unlearn", identities=n_ids)
    with staged_folder(out_dir, overwrite=overwrite) as stage:
        save_generator(result.generator, stage / "generator.safetensors",
                       source_sha256=getattr(result.source, "source_sha256", None))
        # the delta's "config" stays the generator's; the run's settings go under "unlearn_config"
        save_delta(result.source, result.generator, stage / "delta.safetensors",
                   extra={"identities": str(n_ids), "unlearn_config": result.config.to_dict()})
        latents = {"w_source": result.w_source, "w_target": result.w_target}
        if result.w_others is not None:
            latents["w_others"] = result.w_others
        save_file({k: v.detach().cpu().contiguous() for k, v in latents.items()}, str(stage / "latents.safetensors"))
        written = write_pictures(stage, result, pictures)
        report["files"] = [f for f in report["files"] if f not in PICTURES or f in written]
        for i, inverted in enumerate(result.inversion or []):
            inverted.save_images(stage, prefix=f"identity{i}_")  # aligned crop + reconstruction
        write_json(stage / "report.json", report)
    return out_dir
