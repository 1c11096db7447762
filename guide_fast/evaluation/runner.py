"""`evaluate`: GUIDE's evaluation of an unlearned generator against its source (docs/guide.md §4).

Metrics, each between a source (pretrained) generator G_s and an unlearned one G_u:

* **ID** (§4.2, lower = better erasure): cosine similarity of the identity embeddings of
  G_s(w_u) and G_u(w_u), same latent and camera, over 11 views (yaw linspace(-pi/12, pi/12, 11),
  pitch -0.2); per view, per identity, and the mean.
* **ID_others** (§4.3, lower = better): the same for other photos of the same person (their
  inverted latents, never unlearned): does the erasure generalise?
* **Preservation** (higher = better): the same cosine for held-out random identities, which
  should keep their identity.
* **FID_pre** (§4.4, lower = better): FID between N samples of G_s and N of G_u with the same z
  (CPU RNG) and the same random yaw per sample; Inception features are computed in memory.
* **ΔFID_real** (§4.4): FID(real, G_u) - FID(real, G_s) from real-image features [M, 2048].
* **Diversity** of the replacement faces: the mean pairwise cosine between the unlearned
  renders of different identities, next to the same number before unlearning.

By default the identity metrics align faces with GUIDE's own MTCNN (`detector="guide"`) and the
two sides of every comparison render with independent noise (`noise="official"`), as GUIDE's
scripts do; see EvalConfig for the alternatives.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import InputError
from .config import EvalConfig, EvalResult
from .metrics import (
    FaceEmbedder,
    diversity,
    fid_metrics,
    identity_metrics,
    make_scorer,
    paired_samples,
    preservation,
    real_features as read_real_features,
    sync,
    view_embeddings,
)
from .views import NUM_ID_VIEWS, EvalCamera

if TYPE_CHECKING:
    from collections.abc import Sequence

    import numpy as np

    from ..eg3d.generator import TriPlaneGenerator
    from ..fid import FIDInception
    from ..identity.scorer import IdentityScorer


def evaluate(source: "TriPlaneGenerator", unlearned: "TriPlaneGenerator", *, w_source: torch.Tensor,
             scorer: "IdentityScorer | str | os.PathLike | None" = None,
             inception: "FIDInception | str | os.PathLike | None" = None, others: torch.Tensor | None = None,
             real_features: "np.ndarray | str | os.PathLike | None" = None,
             diversity_generators: "Sequence[tuple[TriPlaneGenerator, torch.Tensor]] | None" = None,
             run_report: "dict | str | os.PathLike | None" = None, out_dir: "str | os.PathLike | None" = None,
             notes: list[str] | None = None, config: EvalConfig | None = None, **settings) -> EvalResult:
    """Evaluate an unlearned generator against its source. Returns an EvalResult (also written to
    out_dir/eval.json with PNG plots when out_dir is given).

    source, unlearned: TriPlaneGenerator. Generators not on the device are moved there in place
        (nn.Module.to); a config plan is applied to both (renderer, up-convolutions).
    w_source: the unlearned identities' latents [K, num_ws, w_dim] (or [num_ws, w_dim]).
    scorer: an IdentityScorer, or a path to the IR-101 weights (built on the fastest backend);
        None skips the identity metrics.
    inception: an FIDInception or a path to pt_inception-2015-12-05-6726825d.pth; None skips FID.
    others: latents of other photos of the same person [M, num_ws, w_dim] -> ID_others.
    real_features: [N, 2048] Inception features of real images (array or .npy path) -> ΔFID_real.
    diversity_generators: [(unlearned generator, its w_source), ...] from other runs; together
        with the identities of this run they give the diversity of the replacement faces.
    run_report: report.json of the unlearning run (dict or path): loss curves, and the camera
        of its config when the config has none.
    notes: caller's notes (e.g. "random-weight networks"), recorded first in eval.json.
    config / settings: an EvalConfig, and/or its fields by name (num_fid_samples=..., noise=...).
    """
    t_start = time.perf_counter()
    cfg = EvalConfig.build(config, **settings)
    plan = cfg.resolve_plan(source)
    device = plan.device
    if source.config != unlearned.config:
        raise InputError("source and unlearned generators have different architectures (configs differ)")
    report = _load_report(run_report)
    camera = cfg.camera or EvalCamera.from_config((report or {}).get("config"))
    source, unlearned = (_prepare(g, plan, cfg.plan is not None) for g in (source, unlearned))
    w_source = _as_latents("w_source", w_source, source, device)
    others = _as_latents("others", others, source, device)
    real = read_real_features(real_features)
    if isinstance(scorer, (str, Path)):
        scorer = make_scorer(scorer, device, batch_size=max(cfg.batch_size, 32), precision=plan.precision)
    if isinstance(inception, (str, Path)):
        from ..fid import load_inception

        inception = load_inception(inception, device=device)
    elif inception is not None:
        inception = inception.to(device).eval()
    embedder = FaceEmbedder(scorer, cfg.align, cfg.detector, device) if scorer is not None else None
    result = EvalResult(settings=_settings(cfg, camera, plan, source, scorer), notes=list(notes or []))
    notes, timings = result.notes, result.timings_s

    def log(msg):
        if cfg.verbose:
            print(f"[evaluate {time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    render = dict(plan=plan, batch_size=cfg.batch_size, noise=cfg.noise, noise_mode=cfg.noise_mode)
    seed = cfg.seed

    # ---- ID (target) and ID_others: 11 views each (docs/guide.md §4.2, §4.3) ----------------------
    if scorer is None:
        notes.append("identity metrics skipped: no identity scorer (IR-101 weights) given")
    t0 = time.perf_counter()
    target_before, target_after, kept = view_embeddings(source, unlearned, w_source, camera, embedder,
                                                        noise_seed=seed * 7919 + 1, keep_images=1, **render)
    if scorer is not None:
        ob = oa = None
        if others is not None:
            ob, oa, _ = view_embeddings(source, unlearned, others, camera, embedder, noise_seed=seed * 7919 + 2,
                                        **render)
        else:
            notes.append("ID_others undefined: no latents of other photos of the person given (docs/guide.md §4.3)")
        scores = identity_metrics(target_before, target_after, ob, oa)
        result.id, result.id_others = scores["id"], scores["id_others"]
        result.metrics["id"] = scores["id"]["mean"]
        if scores["id_others"] is not None:
            result.metrics["id_others"] = scores["id_others"]["mean"]
            result.metrics["id_avg"] = scores["id_avg"]
        _note_missing_faces(notes, "ID", result.id)
        if result.id_others is not None:
            _note_missing_faces(notes, "ID_others", result.id_others)
    sync(device)
    timings["id_views_s"] = time.perf_counter() - t0
    log(f"ID over {w_source.shape[0]} x {NUM_ID_VIEWS} views: {result.metrics['id']}")

    # ---- diversity of the replacement faces across identities ---------------------------------
    t0 = time.perf_counter()
    if scorer is not None:
        after_sets = [target_after.reshape(w_source.shape[0], NUM_ID_VIEWS, -1)]
        before_sets = [target_before.reshape(w_source.shape[0], NUM_ID_VIEWS, -1)]
        for i, (gen_u, w_u) in enumerate(_diversity_runs(diversity_generators, source, plan, cfg)):
            b, a, _ = view_embeddings(source, gen_u, w_u, camera, embedder, noise_seed=seed * 7919 + 3 + i, **render)
            after_sets.append(a.reshape(w_u.shape[0], NUM_ID_VIEWS, -1))
            before_sets.append(b.reshape(w_u.shape[0], NUM_ID_VIEWS, -1))
        after_all, before_all = torch.cat(after_sets), torch.cat(before_sets)
        if after_all.shape[0] >= 2:
            result.diversity = diversity(before_all, after_all)
            result.metrics["diversity_cosine_after"] = result.diversity["mean_pairwise_cosine_after"]
            result.metrics["diversity_cosine_before"] = result.diversity["mean_pairwise_cosine_before"]
        else:
            notes.append("diversity undefined: one unlearned identity (give several, or diversity_generators)")
    timings["diversity_s"] = time.perf_counter() - t0

    # ---- paired random samples: FID_pre, ΔFID_real, preservation (docs/guide.md §4.4) ----------
    n_fid = cfg.num_fid_samples if inception is not None else 0
    n_keep = cfg.preserve_samples if scorer is not None else 0
    if inception is None and cfg.num_fid_samples:
        notes.append("FID skipped: no FID Inception weights given")
    t0 = time.perf_counter()
    samples = paired_samples(source, unlearned, max(n_fid, n_keep), n_fid=n_fid, n_keep=n_keep, camera=camera,
                             seed=seed, inception=inception, embedder=embedder, log=log, **render)
    sync(device)
    timings["paired_samples_s"] = time.perf_counter() - t0
    if n_keep:
        result.preservation = preservation(samples["emb_s"], samples["emb_u"])
        result.metrics["preservation"] = result.preservation["mean"]
        if result.preservation["scored"] < n_keep:
            notes.append(f"preservation: faces found in both renders of {result.preservation['scored']} of "
                         f"{n_keep} samples")
    t0 = time.perf_counter()
    if n_fid:
        result.fid = fid_metrics(samples["feat_s"], samples["feat_u"], real, cfg.fid_method, inception, notes)
        result.metrics["fid_pre"] = result.fid["fid_pre"]
        if result.fid["real"] is not None:
            result.metrics["delta_fid_real"] = result.fid["real"]["delta_fid_real"]
    timings["frechet_s"] = time.perf_counter() - t0

    timings["total_s"] = time.perf_counter() - t_start
    if report is not None:
        result.run = {k: report.get(k) for k in ("generator", "config", "random_weights") if k in report}
        if report.get("random_weights"):
            notes.insert(0, "the unlearning run used RANDOM-WEIGHT networks (report.json): it unlearned nobody real")
    if out_dir is not None:
        from .plots import write_outputs

        write_outputs(result, out_dir, kept=kept, report=report)
    log(f"done: {json.dumps(result.metrics)}")
    return result


# ------------------------------------------------------------------------------------ helpers
def _prepare(gen, plan, apply_plan: bool):
    gen = gen.to(plan.device).eval()
    return plan.apply(gen) if apply_plan else gen


def _settings(cfg: EvalConfig, camera: EvalCamera, plan, source, scorer) -> dict:
    return {
        "align": cfg.align, "detector": cfg.detector if cfg.align == "mtcnn" else None, "noise": cfg.noise,
        "seed": cfg.seed, "batch_size": cfg.batch_size, "noise_mode": cfg.noise_mode,
        "camera": {**asdict(camera), "lookat": list(camera.lookat)},
        "view_yaws": [float(v) for v in camera.view_yaws()], "device": str(plan.device),
        "renderer": getattr(source, "renderer_backend", None), "png_quantisation": True,
        "identity_backend": getattr(scorer, "backend", None) if scorer is not None else None,
        "identity_precision": getattr(scorer, "precision", None) if scorer is not None else None,
        "fid_method": cfg.fid_method, "precision": plan.precision, "plan": plan.to_dict(),
    }


def _diversity_runs(diversity_generators, source, plan, cfg):
    for i, entry in enumerate(diversity_generators or []):
        try:
            gen_u, w_u = entry
        except (TypeError, ValueError):
            raise InputError("diversity_generators must be a list of (unlearned generator, w_source) pairs") from None
        if gen_u.config != source.config:
            raise InputError(f"diversity_generators[{i}] has a different architecture from the source")
        yield (_prepare(gen_u, plan, cfg.plan is not None),
               _as_latents(f"diversity_generators[{i}] latents", w_u, source, plan.device))


def _note_missing_faces(notes: list, what: str, scores: dict) -> None:
    if scores["pairs_scored"] < scores["pairs"]:
        notes.append(f"{what}: a face was found in both renders of {scores['pairs_scored']} of {scores['pairs']} "
                     "pairs; the others are left out of the mean (as pSp's ID evaluation does; GUIDE's evaluate_id.py "
                     "stops with an error when its MTCNN finds no face)")


def _as_latents(name: str, w, gen, device) -> torch.Tensor | None:
    if w is None:
        return None
    if not torch.is_tensor(w):
        import numpy as np

        w = torch.as_tensor(np.asarray(w))
    return gen.as_latents(w, name, device)


def _load_report(run_report) -> dict | None:
    if run_report is None or isinstance(run_report, dict):
        return run_report
    from ..io import read_json_object

    if not isinstance(run_report, (str, os.PathLike)):
        raise InputError(f"run_report must be a dict, a path or None, got {type(run_report).__name__}")
    path = Path(run_report)
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        raise InputError(f"run report not found: {path}")
    return read_json_object(path, "run report")


__all__ = ["evaluate"]
