"""W+ latent optimisation: the inversion's loop, and `invert_images`, which runs a photo through
framing, the GOAE encoder and/or the optimisation (docs/guide.md §3.3).

Starting point. With an encoder (GUIDE: GOAE, `encoder_FFHQ.pt`) every photo of the call is
encoded in one batch and w = offsets + w_avg, as GUIDE's unlearn.py does; `steps` then defaults
to 0 (GOAE alone, GUIDE's flow) and steps > 0 refines that code. Without an encoder the start is
w_avg and `steps` defaults to 300. w_avg is the file given as `w_avg=` (GUIDE's
w_avg_ffhqrebalanced512-128.pt) or the mapping network's buffer (inversion/average.py).

Optimisation (defaults, `InversionConfig`)
------------------------------------------
Adam (lr 0.01, StyleGAN2-projector schedule: 5 % warm-up, cosine ramp-down over the last 25 %);
per step the loss is 1.0 * MSE + 0.8 * LPIPS + 0.1 * (1 - cos) identity, pSp's encoder weights
(l2 1, lpips 0.8, id 0.1). Renders at the generator's img_resolution with noise_mode "const"
and renderer draws from a seeded generator (a new draw each step, the same sequence every run);
LPIPS is computed at <= 256 px as in StyleGAN/EG3D projectors. The camera is frontal (GUIDE's
FOV and look-at, docs/guide.md §3.2) unless `refine_camera=True`: then yaw and pitch are learnt
as 0.6 * tanh(u) (bounded to +-0.6 rad). How it runs comes from the execution plan
(guide_fast/plan.py): on CUDA's fast path bf16 autocast, the Triton renderer and the folded
up-convolutions; a learnt camera asks the plan for differentiable rays, which means the
reference renderer (the fused kernel gives no gradient for the rays); fp32 with the reference
renderer on the CPU. The generator is not copied: its switches are set for the call and put back.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from .. import cameras
from ..errors import GuideFastError, InputError
from ..losslog import LossLog
from ..plan import PATHS, PRECISIONS, RENDERERS, ExecutionPlan
from .average import resolve_w_avg
from .encode import encode_photos, resolve_encoder
from .framing import EG3D_OUTPUT_SIZE, ALIGN_METHODS, AlignedPhoto, prepare_photos

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from ..eg3d.generator import TriPlaneGenerator
    from ..identity.loss import IdentityLoss
    from ..perceptual import LPIPS
    from .average import AverageLatent
    from .photo import PhotoSource

#: Adam steps of an inversion without an encoder (with one the default is 0: GOAE alone).
DEFAULT_STEPS = 300


class InversionError(GuideFastError):
    """The inversion itself failed (e.g. the loss became non-finite)."""


@dataclasses.dataclass
class InversionConfig:
    """Knobs of the optimisation (module docstring gives the reasons for the defaults)."""

    lr: float = 0.01
    lr_rampup: float = 0.05          # fraction of the steps (StyleGAN2 projector schedule)
    lr_rampdown: float = 0.25
    mse_weight: float = 1.0          # pSp: l2 1.0, lpips 0.8, id 0.1
    lpips_weight: float = 0.8
    id_weight: float = 0.1
    lpips_resolution: int = 256      # LPIPS on renders downsampled to at most this size
    camera_lr: float = 0.01          # Adam lr of the camera's unbounded parameters u, v
    camera_limit: float = 0.6        # |yaw|, |pitch| <= camera_limit (radians), via tanh
    yaw: float = 0.0                 # starting camera (frontal, docs/guide.md §3.2)
    pitch: float = 0.0
    fov_degrees: float = cameras.GUIDE_FOV_DEGREES
    lookat: tuple = cameras.GUIDE_LOOKAT
    radius: float = cameras.DEFAULT_RADIUS
    seed: int = 0                    # renderer draws; the encoder's RNG in GUIDE's train-mode quirk
    path: str = "fast"               # execution plan (guide_fast/plan.py): "fast" or "reference" (the oracle)
    renderer: str = "auto"           # plan: "auto" is triton on CUDA, the reference renderer otherwise
    precision: str = "auto"          # plan: "auto" is bf16 autocast on CUDA, fp32 otherwise
    batch_size: int = 4              # photos optimised together (independent losses, summed)
    align: bool = True               # False: photos are already in EG3D framing
    method: str = "similarity"       # alignment: "similarity" or "eg3d" (module docstring)
    crop_size: int = EG3D_OUTPUT_SIZE
    log_every: int = 10              # progress-bar refresh / loss read-back interval (steps)

    def __post_init__(self):
        self.lookat = tuple(float(v) for v in self.lookat)
        self.validate()

    def validate(self) -> None:
        for key in ("lr", "camera_lr", "camera_limit", "radius"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) > 0):
                raise InputError(f"inversion {key} must be a positive number, got {getattr(self, key)!r}")
        for key in ("mse_weight", "lpips_weight", "id_weight"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) >= 0):
                raise InputError(f"inversion {key} must be >= 0, got {getattr(self, key)!r}")
        if self.mse_weight + self.lpips_weight + self.id_weight <= 0:
            raise InputError("inversion loss weights are all zero: nothing to optimise")
        if not (0 <= self.lr_rampup <= 1 and 0 <= self.lr_rampdown <= 1):
            raise InputError("lr_rampup and lr_rampdown are fractions of the steps, in [0, 1]")
        if self.camera_limit >= math.pi / 2:
            raise InputError(f"camera_limit must be below pi/2 rad, got {self.camera_limit}")
        for key in ("yaw", "pitch"):
            if abs(getattr(self, key)) >= self.camera_limit:
                raise InputError(f"starting {key} {getattr(self, key)} is outside +-camera_limit ({self.camera_limit})")
        if self.path not in PATHS:
            raise InputError(f"unknown inversion path {self.path!r}; expected one of {', '.join(map(repr, PATHS))}")
        if self.renderer not in RENDERERS + ("auto",):
            raise InputError(f"unknown renderer {self.renderer!r}; expected 'auto', 'reference' or 'triton'")
        if self.precision not in PRECISIONS + ("auto",):
            raise InputError(f"unknown precision {self.precision!r}; expected 'auto', 'fp32' or 'bf16'")
        if self.method not in ALIGN_METHODS:
            raise InputError(f"alignment method must be one of {ALIGN_METHODS}, got {self.method!r}")
        for key in ("batch_size", "lpips_resolution", "log_every", "crop_size"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise InputError(f"inversion {key} must be a positive integer, got {getattr(self, key)!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lookat"] = list(self.lookat)
        return d


@dataclasses.dataclass
class CameraEstimate:
    """The camera the photo was inverted with: yaw / pitch offsets from frontal (radians,
    cameras.pose_label convention) and the 25-value label [1, 25]."""

    yaw: float
    pitch: float
    label: torch.Tensor
    refined: bool
    fov_degrees: float
    lookat: tuple
    radius: float

    def to_dict(self) -> dict:
        return {"yaw": self.yaw, "pitch": self.pitch, "refined": self.refined, "fov_degrees": self.fov_degrees,
                "lookat": list(self.lookat), "radius": self.radius,
                "label": [float(v) for v in self.label.detach().cpu().reshape(-1)]}


@dataclasses.dataclass
class InversionResult:
    """One photo inverted: w_plus [1, num_ws, w_dim] (w_u), the camera, the aligned crop, the
    reconstruction (uint8 render at img_resolution), its quality against the crop and the same
    measures at the starting point (w_avg or the encoder's code)."""

    w_plus: torch.Tensor
    camera: CameraEstimate
    aligned: AlignedPhoto
    reconstruction: np.ndarray
    quality: dict
    start_quality: dict
    losses: list
    steps: int
    encoder: bool
    config: InversionConfig
    timings: dict
    w_avg_source: str = "mapping buffer"

    def summary(self) -> dict:
        d = {
            "photo": self.aligned.summary(),
            "camera": self.camera.to_dict(),
            "quality": dict(self.quality),
            "start_quality": dict(self.start_quality),
            "steps": self.steps,
            "start": "encoder" if self.encoder else "w_avg",
            "w_avg": self.w_avg_source,
            "settings": self.config.to_dict(),
            "timings": dict(self.timings),
        }
        if self.losses:
            d["loss_first_last"] = [self.losses[0], self.losses[-1]]
        return d

    def save_images(self, folder: "str | os.PathLike", prefix: str = "") -> list:
        """Write `{prefix}aligned.png` (the crop) and `{prefix}reconstruction.png`, atomically."""
        from ..io import save_image

        folder = Path(folder)
        paths = [folder / f"{prefix}aligned.png", folder / f"{prefix}reconstruction.png"]
        save_image(paths[0], self.aligned.image)
        save_image(paths[1], self.reconstruction)
        return paths


def _lr_factor(t: float, rampup: float, rampdown: float) -> float:
    """StyleGAN2 projector schedule: linear warm-up over `rampup`, cosine decay over the last
    `rampdown` of the run (t in [0, 1])."""
    f = 1.0
    if rampdown > 0:
        f = min(1.0, (1.0 - t) / rampdown)
        f = 0.5 - 0.5 * math.cos(f * math.pi)
    if rampup > 0:
        f *= min(1.0, t / rampup)
    return f


def _uint8_render(images: torch.Tensor) -> np.ndarray:
    from ..io import to_uint8

    return to_uint8(images.float())


class _Inverter:
    """The optimisation for one batch of aligned photos."""

    def __init__(self, gen, id_loss, lpips, cfg: InversionConfig, plan: ExecutionPlan):
        self.gen, self.id_loss, self.lpips, self.cfg, self.plan = gen, id_loss, lpips, cfg, plan
        self.device = plan.device
        self.res = int(gen.config.img_resolution)
        self.rays = gen.neural_rendering_resolution ** 2

    def _lpips_input(self, x: torch.Tensor) -> torch.Tensor:
        r = self.cfg.lpips_resolution
        if x.shape[-1] > r:
            x = F.interpolate(x, size=(r, r), mode="area")
        return x

    def camera(self, u: torch.Tensor, v: torch.Tensor):
        lim = self.cfg.camera_limit
        yaw, pitch = lim * torch.tanh(u), lim * torch.tanh(v)
        label = cameras.pose_label(yaw, pitch, fov_degrees=self.cfg.fov_degrees, lookat=self.cfg.lookat,
                                   radius=self.cfg.radius, device=self.device)
        return yaw, pitch, label

    def render(self, w, label, generator):
        from ..render import make_render_draws

        draws = make_render_draws(w.shape[0], self.rays, self.gen.render_options, self.device, generator)
        return self.gen.synthesis(w, label, noise_mode="const", render_draws=draws, validate=False)["image"]

    def per_photo_losses(self, img, target, target_emb):
        """[n] terms: MSE (in [-1, 1] units), LPIPS and 1 - cos of the identity embeddings."""
        img = img.float()
        mse = (img - target).square().flatten(1).mean(1)
        lp = self.lpips(self._lpips_input(img), self._lpips_input(target)).float().reshape(-1)
        idl = 1.0 - (self.id_loss.embed(img) * target_emb).sum(1)
        return mse, lp, idl

    @torch.no_grad()
    def measure(self, w, label, target, target_emb):
        """Quality of w at the camera: fp32, fixed draws (seed), so start and end compare."""
        g = torch.Generator(device=self.device).manual_seed(self.cfg.seed + 7919)
        # clamped as the saved reconstruction is (the loss itself sees the unclamped render)
        img = self.render(w, label, g).float().clamp(-1, 1)
        mse, lp, idl = self.per_photo_losses(img, target, target_emb)
        q = [{"lpips": float(lp[i]), "identity_similarity": float(1.0 - idl[i]), "mse": float(mse[i])}
             for i in range(w.shape[0])]
        return q, img

    def run(self, w0: torch.Tensor, targets: torch.Tensor, steps: int, refine_camera: bool, bar, names):
        cfg, n = self.cfg, w0.shape[0]
        with torch.no_grad():
            target_emb = self.id_loss.embed(targets).float()
        lim = cfg.camera_limit
        u = torch.full((n,), math.atanh(cfg.yaw / lim), device=self.device)
        v = torch.full((n,), math.atanh(cfg.pitch / lim), device=self.device)
        with torch.no_grad():
            label0 = self.camera(u, v)[2]
        start_q, img = self.measure(w0, label0, targets, target_emb)
        if steps == 0:  # the starting code as it is (GOAE alone): nothing to optimise
            return w0.detach(), *self.camera(u, v)[:2], label0, start_q, start_q, img, [[] for _ in range(n)]

        w = w0.detach().clone().requires_grad_(True)
        params = [w]
        groups = [{"params": [w], "lr": cfg.lr}]
        if refine_camera:
            u.requires_grad_(True), v.requires_grad_(True)
            params += [u, v]
            groups.append({"params": [u, v], "lr": cfg.camera_lr})
        opt = torch.optim.Adam(groups, betas=(0.9, 0.999))
        base_lrs = [g_["lr"] for g_ in opt.param_groups]
        draw_gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        # per step and photo: [weighted total, mse, lpips, identity]
        log = LossLog(steps, (n, 4), self.device)
        losses = [[] for _ in range(n)]
        wm, wl, wi = cfg.mse_weight, cfg.lpips_weight, cfg.id_weight

        def non_finite(step, _row):
            return InversionError(f"{', '.join(names)}: the inversion loss became non-finite at step {step}")

        for step in range(steps):
            f = _lr_factor(step / max(steps, 1), cfg.lr_rampup, cfg.lr_rampdown)
            for group, base in zip(opt.param_groups, base_lrs):
                group["lr"] = base * f
            label = self.camera(u, v)[2] if refine_camera else label0
            with self.plan.autocast():
                img = self.render(w, label, draw_gen)
                mse, lp, idl = self.per_photo_losses(img, targets, target_emb)
            per_photo = wm * mse + wl * lp + wi * idl
            # Summed over photos, so each photo's latent gets exactly its own gradient (Adam is
            # per-element): a batch equals separate runs, up to the renderer draws.
            # autograd.grad: no gradient reaches (or accumulates in) the generator's parameters.
            grads = torch.autograd.grad(per_photo.sum(), params)
            for p, g_ in zip(params, grads):
                p.grad = g_
            opt.step()
            log.record(torch.stack([per_photo, mse, lp, idl], dim=1))
            if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
                rows = log.read(step + 1, error=non_finite)
                for number, row in rows:
                    for i in range(n):
                        losses[i].append({"step": number, "total": row[i][0], "mse": row[i][1],
                                          "lpips": row[i][2], "identity": row[i][3]})
                last = rows[-1][1]
                bar.set_postfix(loss=f"{sum(r[0] for r in last) / n:.4f}", refresh=False)
            bar.update(n)
        w = w.detach()
        with torch.no_grad():
            yaw, pitch, label = self.camera(u.detach(), v.detach())
        end_q, img = self.measure(w, label, targets, target_emb)
        return w, yaw, pitch, label, start_q, end_q, img, losses


def _resolve_device(gen, device):
    gen_device = next(gen.parameters()).device
    if device is None:
        return gen_device
    dev = torch.device(device)
    same_index = dev.index is None or gen_device.index is None or dev.index == gen_device.index
    if dev.type != gen_device.type or not same_index:
        raise InputError(f"device {dev} differs from the generator's device {gen_device}; move the generator first")
    return gen_device


def inversion_plan(cfg: InversionConfig, device: torch.device, refine_camera: bool,
                   plan: ExecutionPlan | None = None) -> ExecutionPlan:
    """The plan the inversion runs with: `plan` if given (checked), else resolved from the
    config's path / renderer / precision. A learnt camera needs differentiable rays. The
    inversion runs eagerly and does not relayout the caller's generator, so graph capture,
    compile and channels_last are left out."""
    if plan is None:
        plan = ExecutionPlan.resolve(device, path=cfg.path, renderer=cfg.renderer, precision=cfg.precision,
                                     differentiable_rays=refine_camera, cuda_graph=False, compile=False)
    elif not isinstance(plan, ExecutionPlan):
        raise InputError(f"plan must be an ExecutionPlan (guide_fast.plan), got {type(plan).__name__}")
    else:
        indices = (plan.device.index, device.index)
        if plan.device.type != device.type or (None not in indices and indices[0] != indices[1]):
            raise InputError(f"the plan is for {plan.device}, the generator is on {device}")
        if refine_camera and plan.renderer == "triton":
            raise InputError("refine_camera needs gradients with respect to the camera, which the Triton renderer "
                             "does not give; use a plan with renderer 'reference'")
    return plan.with_(device=device, memory_format="contiguous", cuda_graph=False, compile=False)


MAX_STEPS = 1_000_000  # the projector runs 1000 (docs/guide.md §3.3); as the unlearning loop's bound


def _check_steps(steps, encoder) -> int:
    if steps is None:
        return 0 if encoder is not None else DEFAULT_STEPS
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise InputError(f"inversion steps must be an integer >= 0, got {steps!r}")
    if steps > MAX_STEPS:  # the loss history is preallocated per step
        raise InputError(f"inversion steps must be <= {MAX_STEPS:,}, got {steps:,}")
    if steps == 0 and encoder is None:
        raise InputError("inversion steps = 0 needs an encoder (otherwise the result would be w_avg)")
    return steps


def invert_images(gen: "TriPlaneGenerator", images: "PhotoSource | Sequence[PhotoSource]", *,
                  id_loss: "IdentityLoss", lpips: "LPIPS", steps: int | None = None,
                  encoder: "str | os.PathLike | Callable[[torch.Tensor], torch.Tensor] | None" = None,
                  encoder_mode: str = "eval", w_avg: "str | os.PathLike | torch.Tensor | AverageLatent | None" = None,
                  refine_camera: bool = False, index: int | None = None, strict: bool = False,
                  progress: bool = False, device: "torch.device | str | None" = None,
                  plan: ExecutionPlan | None = None, config: InversionConfig | None = None,
                  **options) -> list[InversionResult]:
    """Invert photos into the generator's W+ space; one InversionResult per photo, in order.

    gen: a TriPlaneGenerator (not modified; its operator switches are restored afterwards);
    images: a photo, a folder of photos (sorted by name) or a list (paths, PIL images, arrays,
    tensors, or AlignedPhoto from align_photo); id_loss: an IdentityLoss (its .embed gives the
    identity term and the reported identity_similarity); lpips: an LPIPS module.
    encoder: a GOAE state-dict file (`encoder_FFHQ.pt`, loaded with goae.load_encoder in
    `encoder_mode` "eval" or "official") or a callable(img [N, 3, 256, 256] in [-1, 1]) -> W+
    offsets [N, num_ws, w_dim] (or GOAE's (w, features)), used in whatever mode the caller left
    it; all photos go through it in one batch and w = offsets + w_avg. steps: Adam steps
    (default: 0 with an encoder, i.e. GOAE alone; 300 without). w_avg: a w_avg file or tensor
    (default: the mapping buffer; see inversion/average.py). refine_camera: learn yaw and pitch
    too (steps > 0). index / strict: face choice (see align_photo); progress: a tqdm bar; device:
    must be the generator's (default); plan: an ExecutionPlan (default: resolved from the
    config). Remaining keyword options are InversionConfig fields (e.g. align=False for
    pre-aligned photos, lr=, id_weight=, seed=).
    """
    from tqdm.auto import tqdm

    from ..eg3d.generator import TriPlaneGenerator

    if not isinstance(gen, TriPlaneGenerator):
        raise InputError(f"gen must be a TriPlaneGenerator (see load_generator), got {type(gen).__name__}")
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(InversionConfig)})
    if unknown:
        valid = ", ".join(f.name for f in dataclasses.fields(InversionConfig))
        raise InputError(f"unknown inversion option(s) {unknown}; valid: {valid}")
    cfg = dataclasses.replace(config, **options) if config is not None else InversionConfig(**options)
    steps = _check_steps(steps, encoder)
    if refine_camera and steps == 0:
        raise InputError("refine_camera learns the camera during the optimisation; it needs steps > 0")
    dev = _resolve_device(gen, device)
    run_plan = inversion_plan(cfg, dev, refine_camera, plan)
    average = resolve_w_avg(w_avg, gen)

    photos = prepare_photos(images, align=cfg.align, index=index, strict=strict, method=cfg.method,
                            size=cfg.crop_size, device=dev)
    t0 = time.perf_counter()
    starts, encode_s = None, 0.0
    if encoder is not None:
        enc = resolve_encoder(encoder, dev, encoder_mode)
        te = time.perf_counter()
        # GUIDE's OOD protocol: the whole folder through the encoder in one batch
        starts = encode_photos(enc, photos, gen, average, dev, seed=cfg.seed)
        encode_s = time.perf_counter() - te
    previous = gen.operators()
    results = []
    bar = tqdm(total=steps * len(photos), disable=not progress or steps == 0, desc="inverting", unit="step",
               dynamic_ncols=True)
    try:
        run_plan.apply(gen)
        inverter = _Inverter(gen, id_loss, lpips, cfg, run_plan)
        for a in range(0, len(photos), cfg.batch_size):
            batch = photos[a:a + cfg.batch_size]
            tb = time.perf_counter()
            targets = torch.cat([p.tensor(inverter.res, dev) for p in batch])
            if starts is not None:
                w0 = starts[a:a + len(batch)]
            else:
                w0 = average.to(dev).unsqueeze(0).expand(len(batch), -1, -1)
            w, yaw, pitch, label, start_q, end_q, img, losses = inverter.run(
                w0, targets, steps, refine_camera, bar, [p.name for p in batch])
            recon = _uint8_render(img)
            seconds = time.perf_counter() - tb
            for i, photo in enumerate(batch):
                camera = CameraEstimate(yaw=float(yaw[i]), pitch=float(pitch[i]), label=label[i:i + 1].detach(),
                                        refined=bool(refine_camera), fov_degrees=cfg.fov_degrees,
                                        lookat=tuple(cfg.lookat), radius=cfg.radius)
                timings = {"batch_s": seconds, "photos_in_batch": len(batch), "renderer": run_plan.renderer,
                           "precision": run_plan.precision, "upsample_conv": run_plan.upsample_conv,
                           "skip_path": run_plan.skip_path,
                           "device": str(dev)}
                if starts is not None:
                    timings.update(encode_s=encode_s, photos_encoded=len(photos))
                results.append(InversionResult(
                    w_plus=w[i:i + 1].clone(), camera=camera, aligned=photo, reconstruction=recon[i],
                    quality=end_q[i], start_quality=start_q[i], losses=losses[i], steps=steps,
                    encoder=encoder is not None, config=cfg, timings=timings, w_avg_source=average.source,
                ))
    finally:
        bar.close()
        gen.set_operators(**previous)
    total = time.perf_counter() - t0
    for r in results:
        r.timings["total_s"] = total
    return results


def invert_image(gen: "TriPlaneGenerator", image: "PhotoSource", **kwargs) -> InversionResult:
    """One photo -> its InversionResult (invert_images for a single photo; same keywords)."""
    from .photo import expand_photo_sources

    if isinstance(image, (list, tuple)) or len(expand_photo_sources(image)) != 1:
        raise InputError("invert_image takes one photo; use invert_images for several (or a folder)")
    return invert_images(gen, image, **kwargs)[0]
