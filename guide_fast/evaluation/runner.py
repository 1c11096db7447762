"""GUIDE's evaluation (guide.md §4): is the identity gone, and did nothing else change?

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
  renders of different identities (GUIDE's users saw several identities collapse to near
  identical faces); reported next to the same number before unlearning.

GUIDE writes PNGs and reloads them; here renders stay on the device, but are quantised exactly
as the PNG round trip would (uint8 = trunc(x * 127.5 + 128), reloaded as u / 255), so the
numbers match the file-based pipeline without the disk traffic.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import cameras
from .errors import GuideFastError, InputError

NUM_ID_VIEWS = 11
EVAL_FORMAT = "guide-fast/eval"


# ------------------------------------------------------------------------------------- cameras
@dataclass(frozen=True)
class EvalCamera:
    """The evaluation cameras: GUIDE's conventions (guide.md §3.2, §4.2, §4.4)."""

    yaw_range: float = math.pi / 12
    pitch: float = -0.2
    radius: float = cameras.DEFAULT_RADIUS
    fov_degrees: float = cameras.GUIDE_FOV_DEGREES
    lookat: tuple = cameras.GUIDE_LOOKAT

    @classmethod
    def from_config(cls, config: dict | None) -> "EvalCamera":
        """Take the camera fields of an UnlearnConfig (as a dict) so that evaluation renders the
        views the run trained on; absent fields keep GUIDE's defaults."""
        config = config or {}
        kw = {k: config[k] for k in ("yaw_range", "pitch", "radius", "fov_degrees") if config.get(k) is not None}
        if config.get("lookat") is not None:
            kw["lookat"] = tuple(float(v) for v in config["lookat"])
        return cls(**{k: (float(v) if k != "lookat" else v) for k, v in kw.items()})

    def view_yaws(self) -> torch.Tensor:
        # guide.md §3.6: linspace(-pi/12, pi/12, 11), 1.5 degree steps.
        return torch.linspace(-self.yaw_range, self.yaw_range, NUM_ID_VIEWS)

    def labels(self, yaws, device) -> torch.Tensor:
        return cameras.pose_label(torch.as_tensor(yaws, dtype=torch.float32), self.pitch, fov_degrees=self.fov_degrees,
                                  lookat=self.lookat, radius=self.radius).to(device)

    def conditioning(self, batch: int, device) -> torch.Tensor:
        # guide.md §3.2: the mapping is conditioned on the frontal camera with the same intrinsics.
        return cameras.frontal_label(batch, fov_degrees=self.fov_degrees, lookat=self.lookat,
                                     radius=self.radius).to(device)


# ------------------------------------------------------------------------ metric functions
def quantize_like_png(images: torch.Tensor) -> torch.Tensor:
    """Renders in [-1, 1] -> the uint8 levels GUIDE's PNG files hold, as float (0..255):
    trunc(clamp(x * 127.5 + 128, 0, 255)) (eg3d.md §1.3 save convention)."""
    return (images.float() * 127.5 + 128).clamp(0, 255).floor()


def paired_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of [N, D] embeddings; NaN where either row is missing (NaN)."""
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise InputError(f"paired embeddings must both be [N, D], got {list(a.shape)} and {list(b.shape)}")
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    return cos


def _nanmean(x) -> float | None:
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else None


def view_scores(before: torch.Tensor, after: torch.Tensor, num_views: int = NUM_ID_VIEWS) -> dict:
    """ID-style scores of paired embeddings laid out identity-major: [K * num_views, D] each.

    Returns per_identity [K][num_views] cosines (None where a face was not found), per_view
    means over identities, per-identity means, and the mean over every scored pair (GUIDE's ID
    is the mean over the 11 views of the target; with several identities, of all their pairs).
    """
    cos = paired_cosine(before, after)
    if cos.numel() % num_views:
        raise InputError(f"{cos.numel()} pairs do not split into views of {num_views}")
    grid = cos.reshape(-1, num_views).numpy()
    clean = lambda row: [None if not np.isfinite(v) else float(v) for v in row]  # noqa: E731
    return {
        "mean": _nanmean(grid),
        "per_view": [_nanmean(grid[:, v]) for v in range(num_views)],
        "per_identity_mean": [_nanmean(row) for row in grid],
        "per_identity": [clean(row) for row in grid],
        "pairs": int(grid.size),
        "pairs_scored": int(np.isfinite(grid).sum()),
    }


def pairwise_identity_similarity(embeddings: torch.Tensor) -> dict:
    """Diversity across identities. embeddings [K, V, D]: K identities seen from the same V
    views. Entry (i, j) of the matrix is the mean over views of cos(e[i, v], e[j, v]); the
    summary is the mean (and max) over pairs i < j. A value near 1 means the identities look
    like the same person (collapse); distinct people score far lower."""
    e = torch.as_tensor(embeddings, dtype=torch.float64)
    if e.ndim != 3:
        raise InputError(f"embeddings must be [identities, views, dim], got {list(e.shape)}")
    k = e.shape[0]
    if k < 2:
        raise InputError("diversity needs at least 2 identities")
    e = e / e.norm(dim=-1, keepdim=True)
    per_view = torch.einsum("ivd,jvd->vij", e, e)  # NaN rows (faces not found) stay NaN
    matrix = np.full((k, k), np.nan)
    for i in range(k):
        for j in range(k):
            matrix[i, j] = _nanmean(per_view[:, i, j].numpy()) if i != j else 1.0
    upper = matrix[np.triu_indices(k, 1)]
    finite = upper[np.isfinite(upper)]
    return {
        "identities": k,
        "mean_pairwise_cosine": float(finite.mean()) if finite.size else None,
        "max_pairwise_cosine": float(finite.max()) if finite.size else None,
        "matrix": [[None if not np.isfinite(v) else float(v) for v in row] for row in matrix],
    }


# ------------------------------------------------------------------------------ identity nets
def fastest_identity_backend(device) -> str:
    """The fastest IdentityScorer backend usable here: TensorRT on CUDA when it works, else torch
    (bf16 + CUDA graph); on a CPU onnxruntime when installed (faster than eager torch for the IR
    nets), else torch."""
    from .identity.scorer import available_backends

    usable = available_backends()
    if torch.device(device).type == "cuda":
        return "tensorrt" if "tensorrt" in usable else "torch"
    return "onnxruntime" if "onnxruntime" in usable else "torch"


def make_scorer(weights, device, batch_size: int = 64, backend: str | None = None):
    """An IdentityScorer for the evaluation network (CurricularFace IR-101) from a weight file,
    an exported .onnx, or a backbone module, on the fastest backend available unless one is named."""
    from .identity.scorer import IdentityScorer

    backend = backend or fastest_identity_backend(device)
    return IdentityScorer(weights, backend=backend, device=device, batch_size=batch_size)


def _embed(scorer, images: torch.Tensor, align: str) -> torch.Tensor:
    """[N,3,H,W] in [-1,1] -> [N,512] float64 CPU, NaN rows where no face was found.

    Uses `embed_detailed` (embeddings + found mask) when the scorer has it, else `embed`, whose
    contract is NaN rows for missing faces; the shape is checked so that a scorer mismatch cannot
    produce a plausible-looking ID."""
    if hasattr(scorer, "embed_detailed"):
        out = scorer.embed_detailed(images, align=align)
        emb, found = out.embeddings, out.found
    else:
        emb, found = scorer.embed(images, aligned=align), None
    emb = torch.as_tensor(emb).detach().to("cpu", torch.float64)
    if emb.ndim != 2 or emb.shape[0] != images.shape[0]:
        raise GuideFastError(f"identity scorer returned {list(emb.shape)} for {images.shape[0]} images")
    if found is not None:
        found = torch.as_tensor(found, dtype=torch.bool).reshape(-1).cpu()
        emb = emb.clone()
        emb[~found] = float("nan")
    return emb


# ------------------------------------------------------------------------------------ renders
def _noise_generator(device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)


@torch.no_grad()
def _render_pairs(source, unlearned, ws_s, ws_u, labels, *, noise_seed: int, noise_mode: str,
                  precision: str = "fp32"):
    """One batch from both generators. The noise generator is re-seeded identically for each
    side, so G_s and G_u see the same noise and the same renderer draws: the difference between
    the two images comes from the weights alone."""
    device = ws_s.device
    images = []
    for gen in (source, unlearned):
        with _autocast(device, precision):
            img = gen.synthesis(ws_s if gen is source else ws_u, labels, noise_mode=noise_mode,
                                generator=_noise_generator(device, noise_seed))["image"]
        images.append(quantize_like_png(img))
    return images[0], images[1]


def _autocast(device, precision: str):
    import contextlib

    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to_pm1(levels: torch.Tensor) -> torch.Tensor:
    # What ToTensor + Normalize(0.5, 0.5) make of the PNG: u / 127.5 - 1.
    return levels / 127.5 - 1


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _view_embeddings(source, unlearned, latents: torch.Tensor, camera: EvalCamera, scorer, *, align, batch_size,
                     noise_seed, noise_mode, keep_images: int = 0, precision: str = "fp32"):
    """Render every latent at the 11 views from both generators and embed them.

    Returns (before [K*11, 512], after [K*11, 512], kept) with kept the uint8 renders of the
    first `keep_images` latents (for the before/after grid)."""
    device = latents.device
    k = latents.shape[0]
    yaws = camera.view_yaws()
    all_labels = camera.labels(yaws.repeat(k), device)  # identity-major: latent i, view v
    all_ws = latents.repeat_interleave(NUM_ID_VIEWS, dim=0)
    before, after, kept_s, kept_u = [], [], [], []
    for start in range(0, all_ws.shape[0], batch_size):
        ws = all_ws[start:start + batch_size]
        img_s, img_u = _render_pairs(source, unlearned, ws, ws, all_labels[start:start + batch_size],
                                     noise_seed=noise_seed + start, noise_mode=noise_mode, precision=precision)
        if scorer is not None:
            before.append(_embed(scorer, _to_pm1(img_s), align))
            after.append(_embed(scorer, _to_pm1(img_u), align))
        limit = keep_images * NUM_ID_VIEWS - start
        if limit > 0:
            kept_s.append(img_s[:limit].to("cpu", torch.uint8))
            kept_u.append(img_u[:limit].to("cpu", torch.uint8))
    cat = lambda xs: torch.cat(xs) if xs else None  # noqa: E731
    return cat(before), cat(after), (cat(kept_s), cat(kept_u))


# ------------------------------------------------------------------------------------ helpers
def _as_latents(name: str, w, gen, device) -> torch.Tensor:
    if w is None:
        return None
    if not torch.is_tensor(w):
        w = torch.as_tensor(np.asarray(w))
    return gen.as_latents(w, name, device)


def _as_real_features(real_features) -> np.ndarray | None:
    if real_features is None:
        return None
    if isinstance(real_features, (str, Path)):
        from .checkpoints import read_npy_file

        real_features = read_npy_file(real_features, "real-image features")
    feats = np.asarray(real_features, dtype=np.float64)
    from .fid import FEATURE_DIM

    if feats.ndim != 2 or feats.shape[1] != FEATURE_DIM or feats.shape[0] < 2:
        raise InputError(f"real-image features must be an [N >= 2, {FEATURE_DIM}] array of Inception pool3 "
                         f"features (GUIDE's ffhq_real_feat.npy), got shape {list(feats.shape)}")
    if not np.isfinite(feats).all():
        raise InputError("real-image features contain non-finite values")
    return feats


def _load_report(run_report) -> dict | None:
    if run_report is None or isinstance(run_report, dict):
        return run_report
    path = Path(run_report)
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        raise InputError(f"run report not found: {path}")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read run report {path}: {exc}") from exc


# ------------------------------------------------------------------------------------ evaluate
def evaluate(source, unlearned, *, w_source, scorer=None, inception=None, others=None, num_fid_samples: int = 5000,
             real_features=None, preserve_samples: int = 256, diversity_generators=None, align: str = "mtcnn",
             batch_size: int = 16, seed: int = 0, device=None, out_dir=None, run_report=None,
             camera: EvalCamera | None = None, noise_mode: str = "random", fid_method: str = "auto",
             precision: str = "fp32", verbose: bool = False, notes: list[str] | None = None) -> dict:
    """Evaluate an unlearned generator against its source (guide.md §4). Returns the eval dict
    (also written to out_dir/eval.json with PNG plots when out_dir is given).

    source, unlearned: TriPlaneGenerator; their renderer setting is used as is. device: where to
        run (default: the source generator's device); generators not already there are moved
        there in place (nn.Module.to).
    w_source: the unlearned identities' latents [K, num_ws, w_dim] (or [num_ws, w_dim]).
    scorer: an IdentityScorer, or a path to the IR-101 weights (built on the fastest backend);
        None skips the identity metrics. align: "mtcnn" (GUIDE's evaluation) or "crop" (the
        ID-loss crop; for renders in which MTCNN finds no face, e.g. random-weight generators).
    inception: an FIDInception or a path to pt_inception-2015-12-05-6726825d.pth; None skips FID.
    others: latents of other photos of the same person [M, num_ws, w_dim] -> ID_others.
    num_fid_samples: paired samples for FID_pre (0 skips it). preserve_samples: how many of the
        paired random samples also score identity preservation (0 skips it).
    real_features: [N, 2048] Inception features of real images (array or .npy path) -> ΔFID_real.
    diversity_generators: [(unlearned generator, its w_source), ...] from other runs; together
        with the identities of this run they give the diversity of the replacement faces.
    run_report: report.json of the unlearning run (dict or path): loss curves, and the camera
        of its config when `camera` is not given.
    fid_method: "sqrtm" (scipy, as GUIDE), "eigh" (same value, faster), "gram" (exact for
        few samples), "auto" (gram up to 2048 samples, else sqrtm when scipy imports, else eigh).
    precision: "fp32" (GUIDE's numerics: fp32 generator, its SR in fp16 on CUDA as the official
        code) or "bf16" (renders under bf16 autocast on CUDA: faster, not GUIDE's numerics; the
        identity and Inception networks are unaffected).
    notes: caller's notes (e.g. "random-weight networks"), recorded first in eval.json.
    """
    t_start = time.perf_counter()
    device = torch.device(device) if device is not None else next(source.parameters()).device
    if precision not in ("fp32", "bf16"):
        raise InputError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    if precision == "bf16" and device.type != "cuda":
        raise InputError("precision 'bf16' needs a CUDA device; use 'fp32' on the CPU")
    if align not in ("mtcnn", "crop"):
        raise InputError(f"align must be 'mtcnn' or 'crop', got {align!r}")
    if noise_mode not in ("random", "const", "none"):
        raise InputError(f"noise_mode must be 'random', 'const' or 'none', got {noise_mode!r}")
    for name, value in (("num_fid_samples", num_fid_samples), ("preserve_samples", preserve_samples)):
        if not isinstance(value, (int, np.integer)) or value < 0:
            raise InputError(f"{name} must be a non-negative integer, got {value!r}")
    if num_fid_samples == 1:
        raise InputError("num_fid_samples must be 0 (skip FID) or at least 2 (a covariance needs 2 samples)")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    if source.config != unlearned.config:
        raise InputError("source and unlearned generators have different architectures (configs differ)")
    from .fid import resolve_fid_method

    resolve_fid_method(fid_method)  # validates the name early
    report = _load_report(run_report)
    if camera is None:
        camera = EvalCamera.from_config((report or {}).get("config"))
    source = source.to(device).eval()
    unlearned = unlearned.to(device).eval()
    w_source = _as_latents("w_source", w_source, source, device)
    others = _as_latents("others", others, source, device)
    real = _as_real_features(real_features)
    if isinstance(scorer, (str, Path)):
        scorer = make_scorer(scorer, device, batch_size=max(batch_size, 32))
    if isinstance(inception, (str, Path)):
        from .fid import load_inception

        inception = load_inception(inception, device=device)
    elif inception is not None:
        inception = inception.to(device).eval()
    diversity_generators = list(diversity_generators or [])
    notes, timings = list(notes or []), {}

    def log(msg):
        if verbose:
            print(f"[evaluate {time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    result = {
        "format": EVAL_FORMAT,
        "format_version": 1,
        # every metric key is always present; None = not computed (see "notes" for why)
        "metrics": {k: None for k in ("id", "id_others", "id_avg", "preservation", "fid_pre", "delta_fid_real",
                                      "diversity_cosine_after", "diversity_cosine_before")},
        "settings": {
            "align": align, "seed": seed, "batch_size": batch_size, "noise_mode": noise_mode,
            "camera": {**asdict(camera), "lookat": list(camera.lookat)},
            "view_yaws": [float(v) for v in camera.view_yaws()], "device": str(device),
            "renderer": getattr(source, "renderer_backend", None), "png_quantisation": True,
            "identity_backend": getattr(scorer, "backend", None) if scorer is not None else None,
            "fid_method": fid_method, "precision": precision,
        },
        # per-metric details; None where the metric was not computed
        "id": None, "id_others": None, "preservation": None, "fid": None, "diversity": None,
    }

    # ---- ID (target) and ID_others: 11 views each (guide.md §4.2, §4.3) --------------------------
    if scorer is None:
        notes.append("identity metrics skipped: no identity scorer (IR-101 weights) given")
    t0 = time.perf_counter()
    target_before, target_after, kept = _view_embeddings(
        source, unlearned, w_source, camera, scorer, align=align, batch_size=batch_size,
        noise_seed=seed * 7919 + 1, noise_mode=noise_mode, precision=precision, keep_images=1)
    if scorer is not None:
        result["id"] = view_scores(target_before, target_after)
        result["metrics"]["id"] = result["id"]["mean"]
        others_scores = None
        if others is not None:
            ob, oa, _ = _view_embeddings(source, unlearned, others, camera, scorer, align=align, batch_size=batch_size,
                                         noise_seed=seed * 7919 + 2, noise_mode=noise_mode, precision=precision)
            others_scores = view_scores(ob, oa)
            result["id_others"] = others_scores
            result["metrics"]["id_others"] = others_scores["mean"]
            all_cos = np.concatenate([paired_cosine(target_before, target_after).numpy(),
                                      paired_cosine(ob, oa).numpy()])
            result["metrics"]["id_avg"] = _nanmean(all_cos)
        else:
            notes.append("ID_others undefined: no latents of other photos of the person given (guide.md §4.3)")
        _note_missing_faces(notes, "ID", result["id"])
        if others_scores is not None:
            _note_missing_faces(notes, "ID_others", others_scores)
    _sync(device)
    timings["id_views_s"] = time.perf_counter() - t0
    log(f"ID over {w_source.shape[0]} x {NUM_ID_VIEWS} views: {result['metrics'].get('id')}")

    # ---- diversity of the replacement faces across identities ---------------------------------
    t0 = time.perf_counter()
    if scorer is not None:
        after_sets = [target_after.reshape(w_source.shape[0], NUM_ID_VIEWS, -1)]
        before_sets = [target_before.reshape(w_source.shape[0], NUM_ID_VIEWS, -1)]
        for i, entry in enumerate(diversity_generators):
            try:
                gen_u, w_u = entry
            except (TypeError, ValueError):
                raise InputError("diversity_generators must be a list of (unlearned generator, w_source) pairs") from None
            if gen_u.config != source.config:
                raise InputError(f"diversity_generators[{i}] has a different architecture from the source")
            gen_u = gen_u.to(device).eval()
            w_u = _as_latents(f"diversity_generators[{i}] latents", w_u, source, device)
            b, a, _ = _view_embeddings(source, gen_u, w_u, camera, scorer, align=align, batch_size=batch_size,
                                       noise_seed=seed * 7919 + 3 + i, noise_mode=noise_mode,
                                       precision=precision)
            after_sets.append(a.reshape(w_u.shape[0], NUM_ID_VIEWS, -1))
            before_sets.append(b.reshape(w_u.shape[0], NUM_ID_VIEWS, -1))
        after_all, before_all = torch.cat(after_sets), torch.cat(before_sets)
        if after_all.shape[0] >= 2:
            after_div = pairwise_identity_similarity(after_all)
            before_div = pairwise_identity_similarity(before_all)
            result["diversity"] = {
                "identities": after_div["identities"],
                "mean_pairwise_cosine_after": after_div["mean_pairwise_cosine"],
                "mean_pairwise_cosine_before": before_div["mean_pairwise_cosine"],
                "max_pairwise_cosine_after": after_div["max_pairwise_cosine"],
                "matrix_after": after_div["matrix"],
                "matrix_before": before_div["matrix"],
            }
            result["metrics"]["diversity_cosine_after"] = after_div["mean_pairwise_cosine"]
            result["metrics"]["diversity_cosine_before"] = before_div["mean_pairwise_cosine"]
        else:
            notes.append("diversity undefined: one unlearned identity (give several, or diversity_generators)")
    timings["diversity_s"] = time.perf_counter() - t0

    # ---- paired random samples: FID_pre, ΔFID_real, preservation (guide.md §4.4) --------------
    n_fid = num_fid_samples if inception is not None else 0
    n_keep = preserve_samples if scorer is not None else 0
    if inception is None and num_fid_samples:
        notes.append("FID skipped: no FID Inception weights given")
    t0 = time.perf_counter()
    samples = _paired_samples(source, unlearned, max(n_fid, n_keep), n_fid=n_fid, n_keep=n_keep, camera=camera,
                              seed=seed, batch_size=batch_size, device=device, inception=inception,
                              scorer=scorer, align=align, noise_mode=noise_mode, log=log,
                              precision=precision)
    _sync(device)
    timings["paired_samples_s"] = time.perf_counter() - t0

    if n_keep:
        cos = paired_cosine(samples["emb_s"], samples["emb_u"]).numpy()
        finite = cos[np.isfinite(cos)]
        result["preservation"] = {
            "samples": n_keep, "scored": int(finite.size), "mean": _nanmean(cos),
            "min": float(finite.min()) if finite.size else None,
            "p10": float(np.percentile(finite, 10)) if finite.size else None,
        }
        result["metrics"]["preservation"] = result["preservation"]["mean"]
        if finite.size < n_keep:
            notes.append(f"preservation: faces found in both renders of {finite.size} of {n_keep} samples")

    t0 = time.perf_counter()
    if n_fid:
        method = resolve_fid_method(fid_method, n_fid, n_fid)
        fid = {"samples": n_fid, "method": method,
               "inception_weights": {"path": getattr(inception, "weights_path", None),
                                     "sha256": getattr(inception, "weights_sha256", None),
                                     "standard": bool(getattr(inception, "standard_weights", False))}}
        compute = _FidComputer({"source": samples["feat_s"], "unlearned": samples["feat_u"], "real": real}, notes)
        fid["fid_pre"] = compute("source", "unlearned", method, "FID_pre")
        result["metrics"]["fid_pre"] = fid["fid_pre"]
        if real is not None:
            method_real = resolve_fid_method(fid_method, real.shape[0], n_fid)
            fid_rs = compute("real", "source", method_real, "FID(real, source)")
            fid_ru = compute("real", "unlearned", method_real, "FID(real, unlearned)")
            fid["real"] = {"samples": int(real.shape[0]), "method": method_real, "fid_real_source": fid_rs,
                           "fid_real_unlearned": fid_ru,
                           "delta_fid_real": None if fid_rs is None or fid_ru is None else fid_ru - fid_rs}
            result["metrics"]["delta_fid_real"] = fid["real"]["delta_fid_real"]
        else:
            fid["real"] = None
        if n_fid < 2048:
            notes.append(f"FID on {n_fid} samples (< 2048 feature dimensions): the covariances are rank-deficient; "
                         "only compare FIDs computed at the same sample count (GUIDE uses 5000)")
        if not fid["inception_weights"]["standard"]:
            notes.append("the FID Inception weights are not the standard pt_inception-2015-12-05 file: FID values "
                         "are not comparable with published ones")
        result["fid"] = fid
    timings["frechet_s"] = time.perf_counter() - t0

    timings["total_s"] = time.perf_counter() - t_start
    result["timings_s"] = timings
    result["notes"] = notes
    if report is not None:
        result["run"] = {k: report.get(k) for k in ("generator", "config", "random_weights") if k in report}
        if report.get("random_weights"):
            notes.insert(0, "the unlearning run used RANDOM-WEIGHT networks (report.json): it unlearned nobody real")
    if out_dir is not None:
        result["files"] = write_outputs(result, out_dir, kept=kept, report=report)
    log(f"done: {json.dumps(result['metrics'])}")
    return result


def _note_missing_faces(notes: list, what: str, scores: dict) -> None:
    if scores["pairs_scored"] < scores["pairs"]:
        notes.append(f"{what}: a face was found in both renders of {scores['pairs_scored']} of {scores['pairs']} "
                     "pairs; the others are left out of the mean (as pSp/GUIDE's ID evaluation skips them)")


class _FidComputer:
    """FIDs between named feature sets, each set's statistics computed once (the real set's
    covariance is needed twice for ΔFID_real). Errors are recorded, not raised: pytorch-fid
    raises on an imaginary sqrtm, and that must not lose the other metrics."""

    def __init__(self, features: dict, notes: list):
        self.features, self.notes, self.stats = features, notes, {}

    def _stats(self, key):
        from .fid import feature_statistics

        if key not in self.stats:
            self.stats[key] = feature_statistics(self.features[key])
        return self.stats[key]

    def __call__(self, a: str, b: str, method: str, what: str) -> float | None:
        from .fid import fid_from_features, frechet_distance

        try:
            if method == "gram":
                return fid_from_features(self.features[a], self.features[b], method="gram")
            return frechet_distance(*self._stats(a), *self._stats(b), method=method)
        except InputError as exc:
            self.notes.append(f"{what} not computed: {exc}")
            return None


@torch.no_grad()
def _paired_samples(source, unlearned, n: int, *, n_fid: int, n_keep: int, camera: EvalCamera, seed: int,
                    batch_size: int, device, inception, scorer, align: str, noise_mode: str, log,
                    precision: str = "fp32") -> dict:
    """n paired samples (guide.md §4.4): z from the CPU RNG and yaw ~ U(±yaw_range) from numpy,
    both seeded with `seed` and drawn up front, so the pairs do not depend on the batch size.
    Each generator maps z with its own mapping network (frontal conditioning, psi = 1)."""
    out = {"feat_s": [], "feat_u": [], "emb_s": [], "emb_u": []}
    if n == 0:
        return out
    z_dim = source.config.z_dim
    z_all = torch.randn(n, z_dim, generator=torch.Generator().manual_seed(int(seed)))
    yaw_all = np.random.RandomState(int(seed)).uniform(-camera.yaw_range, camera.yaw_range, size=n)
    next_log = time.perf_counter() + 10
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        z = z_all[start:stop].to(device)
        labels = camera.labels(yaw_all[start:stop], device)
        cond = camera.conditioning(stop - start, device)
        ws_s = source.mapping(z, cond, truncation_psi=1.0)
        ws_u = unlearned.mapping(z, cond, truncation_psi=1.0)
        img_s, img_u = _render_pairs(source, unlearned, ws_s, ws_u, labels, noise_seed=seed * 7919 + 1_000_003 + start,
                                     noise_mode=noise_mode, precision=precision)
        if start < n_fid:
            m = min(stop, n_fid) - start
            # ToTensor of the PNG: u / 255 in [0, 1], the Inception's input convention.
            out["feat_s"].append(inception(img_s[:m] / 255.0).double().cpu())
            out["feat_u"].append(inception(img_u[:m] / 255.0).double().cpu())
        if start < n_keep:
            m = min(stop, n_keep) - start
            out["emb_s"].append(_embed(scorer, _to_pm1(img_s[:m]), align))
            out["emb_u"].append(_embed(scorer, _to_pm1(img_u[:m]), align))
        if time.perf_counter() > next_log:
            log(f"paired samples {stop}/{n}")
            next_log = time.perf_counter() + 10
    return {k: (torch.cat(v).numpy() if k.startswith("feat") else torch.cat(v)) if v else None for k, v in out.items()}


# ------------------------------------------------------------------------------------- outputs
def write_outputs(result: dict, out_dir, *, kept=(None, None), report: dict | None = None) -> list[str]:
    """eval.json and the PNG plots, each written atomically. Returns the file names written."""
    from .io import write_json

    out_dir = Path(out_dir)
    files = []
    try:
        import matplotlib

        matplotlib.use("Agg")
        have_mpl = True
    except ImportError:
        have_mpl = False
        result.setdefault("notes", []).append("plots skipped: matplotlib is not installed")
    if have_mpl:
        if result.get("id"):
            files.append(_plot_id_per_view(result, out_dir / "id_per_view.png"))
        if report and report.get("losses"):
            path = _plot_losses(report["losses"], out_dir / "loss_curves.png")
            if path:
                files.append(path)
        if result.get("diversity"):
            files.append(_plot_diversity(result["diversity"], out_dir / "diversity.png"))
    if kept[0] is not None:
        files.append(_save_view_grid(kept, result["settings"]["view_yaws"], out_dir / "views.png"))
    files.append("eval.json")
    result["files"] = files
    write_json(out_dir / "eval.json", result)
    return files


def _savefig(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    from .io import atomic_path

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

    series: dict[str, list] = {}
    for step, entry in enumerate(losses):
        if not isinstance(entry, dict):
            continue
        for key, value in entry.items():
            if key in ("step", "iteration", "time", "time_s"):
                continue
            if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
                value = float(np.mean(value))  # per-identity values of a many-identity run
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(key, []).append((entry.get("step", step), float(value)))
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
    ax.set_title("unlearning losses (guide.md §3.5)", fontsize=9)
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

    from .io import save_image

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


__all__ = ["evaluate", "EvalCamera", "view_scores", "pairwise_identity_similarity", "paired_cosine",
           "quantize_like_png", "fastest_identity_backend", "make_scorer", "write_outputs", "NUM_ID_VIEWS"]
