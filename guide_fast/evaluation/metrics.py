"""The evaluation's measurements (docs/guide.md §4): renders of both generators, identity
embeddings, and ID, ID_others, preservation, diversity, FID_pre and ΔFID_real from them.

GUIDE writes PNGs and reloads them; here renders stay on the device, but are quantised exactly
as the PNG round trip would (uint8 = trunc(x * 127.5 + 128), reloaded as u / 255), so the
numbers match the file-based pipeline without the disk traffic.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import InputError
from ..plan import ExecutionPlan
from .noise import side_generators
from .views import NUM_ID_VIEWS, EvalCamera, embed, nanmean, paired_cosine, view_scores

if TYPE_CHECKING:
    from ..identity.scorer import IdentityScorer


# ------------------------------------------------------------------------------------ images
def quantize_like_png(images: torch.Tensor) -> torch.Tensor:
    """Renders in [-1, 1] -> the uint8 levels GUIDE's PNG files hold, as float (0..255):
    trunc(clamp(x * 127.5 + 128, 0, 255)) (docs/eg3d.md §1.3 save convention)."""
    return (images.float() * 127.5 + 128).clamp(0, 255).floor()


def to_pm1(levels: torch.Tensor) -> torch.Tensor:
    # What ToTensor + Normalize(0.5, 0.5) make of the PNG: u / 127.5 - 1.
    return levels / 127.5 - 1


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------ identity networks
def fastest_identity_backend(device: "torch.device | str", precision: str = "bf16") -> str:
    """The fastest IdentityScorer backend usable here at `precision`.

    On CUDA: for "bf16", TensorRT (an fp16 engine) when it works, else torch (bf16 + CUDA graph);
    for "fp32", torch in fp32 (GUIDE's numerics; TensorRT builds fp16 engines only). On a CPU
    onnxruntime when installed (faster than eager torch for the IR nets), else torch; both fp32."""
    from ..identity.scorer import available_backends

    if precision not in ("fp32", "bf16"):
        raise InputError(f"identity precision must be 'fp32' or 'bf16', got {precision!r}")
    usable = available_backends()
    if torch.device(device).type == "cuda":
        return "tensorrt" if (precision == "bf16" and "tensorrt" in usable) else "torch"
    return "onnxruntime" if "onnxruntime" in usable else "torch"


def make_scorer(weights: "str | os.PathLike | torch.nn.Module", device: "torch.device | str", batch_size: int = 64,
                backend: str | None = None, precision: str = "fp32") -> "IdentityScorer":
    """An IdentityScorer for the evaluation network (CurricularFace IR-101) from a weight file,
    an exported .onnx, or a backbone module, on the fastest backend available unless one is named.

    precision "fp32" (the default) runs the network as GUIDE's id_sim.py does, in fp32, so that
    ID, ID_others and preservation are comparable with the paper's; "bf16" lets it run in bf16
    (torch, CUDA graph) or fp16 (TensorRT) on CUDA, faster but not GUIDE's numerics (docs/guide.md §4).
    On a CPU the network runs in fp32 either way."""
    from ..identity.scorer import IdentityScorer

    backend = backend or fastest_identity_backend(device, precision)
    torch_precision = "fp32" if precision == "fp32" else "auto"  # "auto": bf16 on CUDA, fp32 on a CPU
    return IdentityScorer(weights, backend=backend, device=device, batch_size=batch_size, precision=torch_precision)


class FaceEmbedder:
    """Renders (PNG levels) -> identity embeddings, aligned as the evaluation asks.

    align "crop": the scorer's ID-loss crop. align "mtcnn" + detector "facenet": the scorer's own
    MTCNN alignment (facenet-pytorch). align "mtcnn" + detector "guide": GUIDE's own MTCNN and
    cv2 warp (identity/guide_mtcnn.py) on the uint8 levels, exactly the PNG GUIDE reloads, then
    the scorer on the aligned 112x112 crops. NaN rows where no face is found."""

    def __init__(self, scorer, align: str, detector: str, device):
        self.scorer, self.align, self.detector, self.device = scorer, align, detector, torch.device(device)

    def __call__(self, levels: torch.Tensor) -> torch.Tensor:
        if self.align == "mtcnn" and self.detector == "guide":
            return self._guide(levels)
        return embed(self.scorer, to_pm1(levels), self.align)

    def _guide(self, levels: torch.Tensor) -> torch.Tensor:
        from ..identity import guide_mtcnn
        from ..identity.preprocess import normalize_uint8

        arrays = list(levels.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
        aligned = guide_mtcnn.align(arrays, device=self.device)
        found = torch.tensor([a is not None for a in aligned], dtype=torch.bool)
        out = None
        if bool(found.any()):
            # ToTensor + Normalize(0.5, 0.5) of the aligned PIL crop, as GUIDE's IDSimNet
            crops = normalize_uint8(np.stack([a.image for a in aligned if a is not None]))
            emb = embed(self.scorer, crops, "none")
            out = torch.full((len(arrays), emb.shape[1]), float("nan"), dtype=torch.float64)
            out[found] = emb
        else:
            out = torch.full((len(arrays), getattr(self.scorer, "embedding_dim", 512)), float("nan"),
                             dtype=torch.float64)
        return out


# ------------------------------------------------------------------------------------ renders
@torch.no_grad()
def render_pairs(source, unlearned, ws_s, ws_u, labels, *, plan: ExecutionPlan, noise: str, noise_seed: int,
                 noise_mode: str):
    """One batch from both generators, as PNG levels. The noise generators come from the noise
    scheme: "official" draws independently for the two sides, "paired" identically."""
    device = ws_s.device
    images = []
    for gen, ws, rng in zip((source, unlearned), (ws_s, ws_u), side_generators(noise, noise_seed, device)):
        with plan.autocast(), plan.backend_flags():
            img = gen.synthesis(ws, labels, noise_mode=noise_mode, generator=rng)["image"]
        images.append(quantize_like_png(img))
    return images[0], images[1]


@torch.no_grad()
def view_embeddings(source, unlearned, latents: torch.Tensor, camera: EvalCamera, embedder, *, plan: ExecutionPlan,
                    batch_size: int, noise: str, noise_seed: int, noise_mode: str, keep_images: int = 0):
    """Render every latent at the 11 views from both generators and embed them.

    Returns (before [K*11, D], after [K*11, D], kept) with kept the uint8 renders of the first
    `keep_images` latents (for the before/after grid); embeddings None without an embedder."""
    device = latents.device
    k = latents.shape[0]
    all_labels = camera.labels(camera.view_yaws().repeat(k), device)  # identity-major: latent i, view v
    all_ws = latents.repeat_interleave(NUM_ID_VIEWS, dim=0)
    before, after, kept_s, kept_u = [], [], [], []
    for start in range(0, all_ws.shape[0], batch_size):
        ws = all_ws[start:start + batch_size]
        img_s, img_u = render_pairs(source, unlearned, ws, ws, all_labels[start:start + batch_size], plan=plan,
                                    noise=noise, noise_seed=noise_seed + start, noise_mode=noise_mode)
        if embedder is not None:
            before.append(embedder(img_s))
            after.append(embedder(img_u))
        limit = keep_images * NUM_ID_VIEWS - start
        if limit > 0:
            kept_s.append(img_s[:limit].to("cpu", torch.uint8))
            kept_u.append(img_u[:limit].to("cpu", torch.uint8))
    cat = lambda xs: torch.cat(xs) if xs else None  # noqa: E731
    return cat(before), cat(after), (cat(kept_s), cat(kept_u))


@torch.no_grad()
def paired_samples(source, unlearned, n: int, *, n_fid: int, n_keep: int, camera: EvalCamera, seed: int,
                   batch_size: int, plan: ExecutionPlan, inception, embedder, noise: str, noise_mode: str,
                   log=lambda msg: None) -> dict:
    """n paired samples (docs/guide.md §4.4): z from the CPU RNG and yaw ~ U(±yaw_range) from numpy,
    both seeded with `seed` and drawn up front, so the pairs do not depend on the batch size.
    Each generator maps z with its own mapping network (frontal conditioning, psi = 1)."""
    out = {"feat_s": [], "feat_u": [], "emb_s": [], "emb_u": []}
    if n == 0:
        return {k: None for k in out}
    device = plan.device
    z_all = torch.randn(n, source.config.z_dim, generator=torch.Generator().manual_seed(int(seed)))
    yaw_all = np.random.RandomState(int(seed)).uniform(-camera.yaw_range, camera.yaw_range, size=n)
    next_log = time.perf_counter() + 10
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        z = z_all[start:stop].to(device)
        labels = camera.labels(yaw_all[start:stop], device)
        cond = camera.conditioning(stop - start, device)
        ws_s = source.mapping(z, cond, truncation_psi=1.0)
        ws_u = unlearned.mapping(z, cond, truncation_psi=1.0)
        img_s, img_u = render_pairs(source, unlearned, ws_s, ws_u, labels, plan=plan, noise=noise,
                                    noise_seed=seed * 7919 + 1_000_003 + start, noise_mode=noise_mode)
        if start < n_fid:
            m = min(stop, n_fid) - start
            # ToTensor of the PNG: u / 255 in [0, 1], the Inception's input convention.
            out["feat_s"].append(inception(img_s[:m] / 255.0).double().cpu())
            out["feat_u"].append(inception(img_u[:m] / 255.0).double().cpu())
        if start < n_keep:
            m = min(stop, n_keep) - start
            out["emb_s"].append(embedder(img_s[:m]))
            out["emb_u"].append(embedder(img_u[:m]))
        if time.perf_counter() > next_log:
            log(f"paired samples {stop}/{n}")
            next_log = time.perf_counter() + 10
    return {k: (torch.cat(v).numpy() if k.startswith("feat") else torch.cat(v)) if v else None for k, v in out.items()}


# ------------------------------------------------------------------------------------ metrics
def identity_metrics(target_before, target_after, others_before=None, others_after=None) -> dict:
    """ID over the target's views, ID_others over the other photos' views, and ID_avg over every
    pair of both (GUIDE's evaluate_id.py: idsims, idsims_others, idsims_avg)."""
    out = {"id": view_scores(target_before, target_after), "id_others": None, "id_avg": None}
    if others_before is not None:
        out["id_others"] = view_scores(others_before, others_after)
        all_cos = np.concatenate([paired_cosine(target_before, target_after).numpy(),
                                  paired_cosine(others_before, others_after).numpy()])
        out["id_avg"] = nanmean(all_cos)
    return out


def preservation(emb_s, emb_u) -> dict:
    """Identity kept by held-out random identities: cosine of G_s and G_u renders of the same z."""
    cos = paired_cosine(emb_s, emb_u).numpy()
    finite = cos[np.isfinite(cos)]
    return {"samples": int(cos.size), "scored": int(finite.size), "mean": nanmean(cos),
            "min": float(finite.min()) if finite.size else None,
            "p10": float(np.percentile(finite, 10)) if finite.size else None}


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
            matrix[i, j] = nanmean(per_view[:, i, j].numpy()) if i != j else 1.0
    upper = matrix[np.triu_indices(k, 1)]
    finite = upper[np.isfinite(upper)]
    return {
        "identities": k,
        "mean_pairwise_cosine": float(finite.mean()) if finite.size else None,
        "max_pairwise_cosine": float(finite.max()) if finite.size else None,
        "matrix": [[None if not np.isfinite(v) else float(v) for v in row] for row in matrix],
    }


def diversity(before_all: torch.Tensor, after_all: torch.Tensor) -> dict:
    """Diversity of the replacement faces [K, V, D] after, next to the same before unlearning."""
    after_div = pairwise_identity_similarity(after_all)
    before_div = pairwise_identity_similarity(before_all)
    return {
        "identities": after_div["identities"],
        "mean_pairwise_cosine_after": after_div["mean_pairwise_cosine"],
        "mean_pairwise_cosine_before": before_div["mean_pairwise_cosine"],
        "max_pairwise_cosine_after": after_div["max_pairwise_cosine"],
        "matrix_after": after_div["matrix"],
        "matrix_before": before_div["matrix"],
    }


class FidComputer:
    """FIDs between named feature sets, each set's statistics computed once (the real set's
    covariance is needed twice for ΔFID_real). Errors are recorded, not raised: pytorch-fid
    raises on an imaginary sqrtm, and that must not lose the other metrics."""

    def __init__(self, features: dict, notes: list):
        self.features, self.notes, self.stats = features, notes, {}

    def _stats(self, key):
        from ..fid import feature_statistics

        if key not in self.stats:
            self.stats[key] = feature_statistics(self.features[key])
        return self.stats[key]

    def __call__(self, a: str, b: str, method: str, what: str) -> float | None:
        from ..fid import fid_from_features, frechet_distance

        try:
            if method == "gram":
                return fid_from_features(self.features[a], self.features[b], method="gram")
            return frechet_distance(*self._stats(a), *self._stats(b), method=method)
        except InputError as exc:
            self.notes.append(f"{what} not computed: {exc}")
            return None


def fid_metrics(feat_s, feat_u, real, fid_method: str, inception, notes: list) -> dict:
    """FID_pre (G_s vs G_u samples) and, with real features, ΔFID_real = FID(real, G_u) - FID(real, G_s)."""
    from ..fid import resolve_fid_method

    n = feat_s.shape[0]
    method = resolve_fid_method(fid_method, n, n)
    fid = {"samples": n, "method": method,
           "inception_weights": {"path": getattr(inception, "weights_path", None),
                                 "sha256": getattr(inception, "weights_sha256", None),
                                 "standard": bool(getattr(inception, "standard_weights", False))}}
    compute = FidComputer({"source": feat_s, "unlearned": feat_u, "real": real}, notes)
    fid["fid_pre"] = compute("source", "unlearned", method, "FID_pre")
    fid["real"] = None
    if real is not None:
        method_real = resolve_fid_method(fid_method, real.shape[0], n)
        fid_rs = compute("real", "source", method_real, "FID(real, source)")
        fid_ru = compute("real", "unlearned", method_real, "FID(real, unlearned)")
        fid["real"] = {"samples": int(real.shape[0]), "method": method_real, "fid_real_source": fid_rs,
                       "fid_real_unlearned": fid_ru,
                       "delta_fid_real": None if fid_rs is None or fid_ru is None else fid_ru - fid_rs}
    if n < 2048:
        notes.append(f"FID on {n} samples (< 2048 feature dimensions): the covariances are rank-deficient; "
                     "only compare FIDs computed at the same sample count (GUIDE uses 5000)")
    if not fid["inception_weights"]["standard"]:
        notes.append("the FID Inception weights are not the standard pt_inception-2015-12-05 file: FID values "
                     "are not comparable with published ones")
    return fid


def real_features(real) -> np.ndarray | None:
    """Real-image Inception features [N >= 2, 2048] from an array or a .npy path (checked)."""
    if real is None:
        return None
    if isinstance(real, (str, Path)):
        from ..checkpoints import read_npy_file

        real = read_npy_file(real, "real-image features")
    from ..fid import FEATURE_DIM

    feats = np.asarray(real, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[1] != FEATURE_DIM or feats.shape[0] < 2:
        raise InputError(f"real-image features must be an [N >= 2, {FEATURE_DIM}] array of Inception pool3 "
                         f"features (GUIDE's ffhq_real_feat.npy), got shape {list(feats.shape)}")
    if not np.isfinite(feats).all():
        raise InputError("real-image features contain non-finite values")
    return feats


__all__ = ["quantize_like_png", "fastest_identity_backend", "make_scorer", "FaceEmbedder", "render_pairs",
           "view_embeddings", "paired_samples", "identity_metrics", "preservation", "pairwise_identity_similarity",
           "diversity", "fid_metrics", "real_features"]
