"""EG3D's `TriPlaneGenerator`: mapping -> backbone -> tri-planes -> renderer -> super-resolution.

One model, two paths: the renderer backend ("reference" or "triton") and the precision are
switches on this one module, never a second copy of it.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from .. import cameras
from ..errors import InputError, check_finite
from ..plan import RENDERERS, SKIP_PATHS, UPSAMPLE_CONVS, Renderer, SkipPath, UpsampleConv
from ..profiling import nvtx_range
from ..render import RenderOptions, render_triplanes, sample_rays
from .networks import Backbone, OSGDecoder, SuperResolution, check_noise_mode

if TYPE_CHECKING:
    import numpy as np

    from .networks import RowNoise

# docs/eg3d.md §1.2: the FFHQ rendering_kwargs as stored in the checkpoint.
FFHQ_RENDERING_KWARGS = {
    "image_resolution": 512,
    "disparity_space_sampling": False,
    "clamp_mode": "softplus",
    "superresolution_module": "training.superresolution.SuperresolutionHybrid8XDC",
    "c_gen_conditioning_zero": False,
    "gpc_reg_prob": 0.8,
    "c_scale": 1.0,
    "superresolution_noise_mode": "none",
    "density_reg": 0.25,
    "density_reg_p_dist": 0.004,
    "reg_type": "l1",
    "decoder_lr_mul": 1.0,
    "sr_antialias": True,
    "depth_resolution": 48,
    "depth_resolution_importance": 48,
    "ray_start": 2.25,
    "ray_end": 3.3,
    "box_warp": 1,
    "avg_camera_radius": 2.7,
    "avg_camera_pivot": [0, 0, 0.2],
}


@dataclass(frozen=True)
class GeneratorConfig:
    """Everything that fixes the generator's architecture. Defaults: ffhqrebalanced512-128."""

    z_dim: int = 512
    w_dim: int = 512
    c_dim: int = 25
    mapping_layers: int = 2
    plane_resolution: int = 256
    plane_channels: int = 32
    channel_base: int = 32768
    channel_max: int = 512
    decoder_hidden: int = 64
    decoder_output_dim: int = 32
    neural_rendering_resolution: int = 128
    img_resolution: int = 512
    sr_channels: tuple = (256, 128)
    sr_fp16: bool = True
    rendering_kwargs: dict = field(default_factory=lambda: dict(FFHQ_RENDERING_KWARGS))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sr_channels"] = list(self.sr_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GeneratorConfig":
        if not isinstance(d, dict):
            raise InputError(f"generator config must be a JSON object, got {type(d).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(map(str, set(d) - known))
        if unknown:
            raise InputError(f"generator config has unknown field(s) {unknown}")
        from .config_check import check_config_fields

        # every field typed and range-checked before anything is built (docs/formats.md §3)
        return cls(**check_config_fields(d))


def _tiny_config() -> GeneratorConfig:
    rk = dict(FFHQ_RENDERING_KWARGS)
    rk.update(image_resolution=64, depth_resolution=12, depth_resolution_importance=12)
    return GeneratorConfig(
        z_dim=64, w_dim=64, plane_resolution=32, plane_channels=8, channel_base=1024, channel_max=32,
        decoder_hidden=16, decoder_output_dim=8, neural_rendering_resolution=32, img_resolution=64,
        sr_channels=(16,), rendering_kwargs=rk,
    )


PRESETS = {
    "ffhq512-128": GeneratorConfig,
    # Small enough for CPU tests and the demo: 3x8x32x32 planes, 32x32 rays with 12+12
    # samples, super-resolution to 64.
    "tiny": _tiny_config,
}


class TriPlaneGenerator(nn.Module):
    """EG3D generator. State-dict names and shapes equal the official `G_ema` (docs/eg3d.md App. A)."""

    def __init__(self, config: GeneratorConfig | None = None, renderer: str = "reference", sr_precision: str = "auto"):
        super().__init__()
        config = config or GeneratorConfig()
        self.config = config
        self.rendering_kwargs = dict(config.rendering_kwargs)
        self.render_options = RenderOptions.from_kwargs(self.rendering_kwargs)
        self.neural_rendering_resolution = config.neural_rendering_resolution
        self.register_buffer("dataset_label_std", torch.ones([config.c_dim]))
        self.backbone = Backbone(
            config.z_dim, config.c_dim, config.w_dim, config.plane_resolution, 3 * config.plane_channels,
            mapping_layers=config.mapping_layers, channel_base=config.channel_base, channel_max=config.channel_max,
        )
        self.superresolution = SuperResolution(
            config.decoder_output_dim, config.neural_rendering_resolution, config.img_resolution,
            config.sr_channels, config.w_dim, use_fp16=config.sr_fp16,
            antialias=self.rendering_kwargs.get("sr_antialias", True),
        )
        self.decoder = OSGDecoder(
            config.plane_channels, config.decoder_hidden, config.decoder_output_dim,
            lr_multiplier=self.rendering_kwargs.get("decoder_lr_mul", 1.0),
        )
        self.set_renderer(renderer)
        self.set_sr_precision(sr_precision)
        self.source_sha256: str | None = None

    # ----------------------------------------------------------------- switches
    def set_renderer(self, backend: Renderer) -> "TriPlaneGenerator":
        """Switch the tri-plane renderer: "reference" (PyTorch oracle) or "triton" (fused).
        Normally set by `ExecutionPlan.apply`, which decides which one a run uses."""
        if backend not in RENDERERS:
            raise InputError(f"unknown renderer {backend!r}; expected one of {RENDERERS}")
        self.renderer_backend = backend
        return self

    def set_sr_precision(self, precision: str) -> "TriPlaneGenerator":
        """Super-resolution precision: "auto" (fp16 on CUDA as the official code, else fp32),
        "fp16" (also emulated on CPU) or "fp32"."""
        if precision not in ("auto", "fp16", "fp32"):
            raise InputError(f"sr_precision must be 'auto', 'fp16' or 'fp32', got {precision!r}")
        self.sr_precision = precision
        return self

    # The block-level switches are plain module attributes (the state_dict is unchanged): one
    # name per switch, set on every module that has it.
    _SWITCHES = {"upsample_conv": ("fold_resample", UPSAMPLE_CONVS, "folded"),
                 "skip_path": ("fused_skip", SKIP_PATHS, "triton")}

    def _set_switch(self, name: str, mode: str) -> "TriPlaneGenerator":
        attr, allowed, fast = self._SWITCHES[name]
        if mode not in allowed:
            raise InputError(f"unknown {name} {mode!r}; expected one of {allowed}")
        for m in self.modules():
            if hasattr(m, attr):
                setattr(m, attr, mode == fast)
        return self

    def _switch(self, name: str) -> str:
        attr, allowed, fast = self._SWITCHES[name]
        return fast if any(getattr(m, attr, False) for m in self.modules()) else allowed[0]

    def set_upsample_conv(self, mode: UpsampleConv) -> "TriPlaneGenerator":
        """How the 2x up-convolutions run: "reference" (transposed conv, then the 4x4 FIR, as
        the official code) or "folded" (one transposed conv with the FIR folded into its
        kernel: the same maths, faster on a GPU; eg3d/ops.py conv2d_resample)."""
        return self._set_switch("upsample_conv", mode)

    @property
    def upsample_conv(self) -> UpsampleConv:
        return self._switch("upsample_conv")

    def set_skip_path(self, mode: SkipPath) -> "TriPlaneGenerator":
        """How each synthesis block's skip path (ToRGB bias and clamp, 2x FIR upsampling of the
        image, their sum) runs: "reference" (the official operators) or "triton" (one fused
        kernel, guide_fast.kernels.skip_path.skip_rgb; needs CUDA or the Triton interpreter)."""
        return self._set_switch("skip_path", mode)

    @property
    def skip_path(self) -> SkipPath:
        return self._switch("skip_path")

    def operators(self) -> dict[str, str]:
        """The operator switches (renderer, up-convolutions, skip path): what `set_operators` restores."""
        return {"renderer": self.renderer_backend, "upsample_conv": self.upsample_conv, "skip_path": self.skip_path}

    def set_operators(self, renderer: Renderer, upsample_conv: UpsampleConv, skip_path: SkipPath) -> "TriPlaneGenerator":
        return self.set_renderer(renderer).set_upsample_conv(upsample_conv).set_skip_path(skip_path)

    @property
    def num_ws(self) -> int:
        return self.backbone.num_ws

    @property
    def w_avg(self) -> torch.Tensor:
        return self.backbone.mapping.w_avg

    # ----------------------------------------------------------------- forward parts
    def mapping(self, z: torch.Tensor, c: torch.Tensor, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None) -> torch.Tensor:
        """z [N, z_dim], conditioning camera c [N, 25] -> ws [N, num_ws, w_dim] (docs/eg3d.md §2)."""
        if not torch.is_tensor(z) or z.ndim != 2 or z.shape[1] != self.config.z_dim:
            got = list(z.shape) if torch.is_tensor(z) else type(z).__name__
            raise InputError(f"z must have shape [N, {self.config.z_dim}], got {got}")
        cameras.check_label("c", c, z.shape[0])
        c = c.to(z.device, torch.float32).expand(z.shape[0], -1)
        c = c * self.rendering_kwargs.get("c_scale", 0)
        if self.rendering_kwargs.get("c_gen_conditioning_zero", False):
            c = torch.zeros_like(c)
        return self.backbone.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)

    def as_latents(self, w: "torch.Tensor | np.ndarray | list", name: str = "latents",
                   device: "torch.device | str | None" = None) -> torch.Tensor:
        """Validate W+ latents ([N, num_ws, w_dim], or one [num_ws, w_dim]) -> fp32 on `device`."""
        if not torch.is_tensor(w):
            try:
                w = torch.as_tensor(w)
            except (TypeError, ValueError, RuntimeError):
                raise InputError(f"{name} must be a tensor [N, {self.num_ws}, {self.config.w_dim}], "
                                 f"got {type(w).__name__}") from None
        w = w.detach()
        if w.ndim == 2:
            w = w.unsqueeze(0)
        want = (self.num_ws, self.config.w_dim)
        if w.ndim != 3 or tuple(w.shape[1:]) != want:
            raise InputError(f"{name} has shape {list(w.shape)}, expected [N, {want[0]}, {want[1]}] (W+ latents)")
        if w.shape[0] == 0:
            raise InputError(f"{name} is empty: need at least one identity (N = 0)")
        if not w.is_floating_point():  # a complex latent would lose its imaginary part in the cast below
            raise InputError(f"{name} holds a {str(w.dtype).replace('torch.', '')} tensor; expected floating point "
                             f"W+ latents [N, {want[0]}, {want[1]}]")
        w = w.to(device if device is not None else w.device, torch.float32)
        check_finite(name, w)
        return w

    def check_ws(self, ws: torch.Tensor) -> None:
        want = (self.num_ws, self.config.w_dim)
        if not torch.is_tensor(ws) or ws.ndim != 3 or tuple(ws.shape[1:]) != want:
            got = list(ws.shape) if torch.is_tensor(ws) else type(ws).__name__
            raise InputError(f"ws must have shape [N, {want[0]}, {want[1]}] (W+ latents), got {got}")
        if not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
            check_finite("ws", ws)

    def planes(self, ws: torch.Tensor, noise_mode: str = "random",
               generator: "torch.Generator | RowNoise | None" = None, validate: bool = True) -> torch.Tensor:
        """ws -> tri-planes [N, 3, C, R, R]; a view of the backbone's raw [N, 3C, R, R] output."""
        if validate:
            self.check_ws(ws)
            check_noise_mode(noise_mode)
        raw = self.backbone.synthesis(ws, noise_mode=noise_mode, generator=generator)
        r = self.config.plane_resolution
        return raw.view(raw.shape[0], 3, self.config.plane_channels, r, r)

    def _sr_fp16(self, device) -> bool:
        if self.sr_precision == "fp32" or not self.config.sr_fp16:
            return False
        if self.sr_precision == "fp16":
            return True
        # "auto": the official code runs SR in fp16 on CUDA only; under autocast the
        # autocast dtype governs instead.
        return device.type == "cuda" and not torch.is_autocast_enabled(device.type)

    def synthesis(self, ws: torch.Tensor, c: torch.Tensor, noise_mode: str = "random", render_draws: dict | None = None,
                  planes: torch.Tensor | None = None, generator: "torch.Generator | RowNoise | None" = None,
                  validate: bool = True) -> dict:
        """ws [N, num_ws, w_dim] + rendering camera c [N, 25] -> images (docs/eg3d.md §1.3).

        planes: precomputed tri-planes [N, 3, C, R, R] skip the backbone (the engine caches
        constant ones). render_draws: {"stratified": [N, rays, S, 1], "importance":
        [N*rays, S_imp]} uniforms, for draw-for-draw comparisons; otherwise they are drawn from
        `generator` (or torch's global generator) after the backbone noise, as the official
        code does. Returns {"image", "image_raw", "image_depth"}.
        """
        if validate:
            self.check_ws(ws)
            cameras.check_label("c", c, ws.shape[0])
            check_finite("c", c)
            if planes is not None:
                r = self.config.plane_resolution
                want = (ws.shape[0], 3, self.config.plane_channels, r, r)
                if not torch.is_tensor(planes) or tuple(planes.shape) != want:
                    got = list(planes.shape) if torch.is_tensor(planes) else type(planes).__name__
                    raise InputError(f"planes has shape {got}, expected {list(want)}")
        n = ws.shape[0]
        if planes is None:
            if validate:
                check_noise_mode(noise_mode)
            # ws was validated above: do not check (and sync on) it a second time
            planes = self.planes(ws, noise_mode=noise_mode, generator=generator, validate=False)
        c = c.to(ws.device, torch.float32).expand(n, -1)
        cam2world = c[:, :16].reshape(-1, 4, 4)
        intr = c[:, 16:25].reshape(-1, 3, 3)
        res = self.neural_rendering_resolution
        ray_origins, ray_directions = sample_rays(cam2world, intr, res)
        with nvtx_range("render"):
            features, depth, _ = render_triplanes(
                planes, self.decoder, ray_origins, ray_directions, options=self.render_options,
                render_draws=render_draws, backend=self.renderer_backend, generator=generator, validate=validate,
            )
            feature_image = features.permute(0, 2, 1).reshape(n, features.shape[-1], res, res).contiguous()
            depth_image = depth.permute(0, 2, 1).reshape(n, 1, res, res)
            rgb_image = feature_image[:, :3]
        with nvtx_range("superres"):
            image = self.superresolution(
                rgb_image, feature_image, ws, noise_mode=self.rendering_kwargs["superresolution_noise_mode"],
                fp16=self._sr_fp16(ws.device), generator=generator,
            )
        return {"image": image, "image_raw": rgb_image, "image_depth": depth_image}

    def forward(self, z: torch.Tensor, c: torch.Tensor, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None, **synthesis_kwargs) -> dict:
        """G(z, c): the same camera conditions the mapping and renders (docs/eg3d.md §1.3)."""
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
        return self.synthesis(ws, c, **synthesis_kwargs)

    # ----------------------------------------------------------------- utilities
    def trainable_synthesis_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """GUIDE trains `backbone.synthesis.*` only (docs/guide.md §3.1 step 3)."""
        return [(k, p) for k, p in self.named_parameters() if k.startswith("backbone.synthesis.")]

    def copy(self) -> "TriPlaneGenerator":
        return copy.deepcopy(self)


def build_generator(preset: str = "ffhq512-128", seed: int | None = None, renderer: Renderer = "reference",
                    device: torch.device | str | None = None, config: GeneratorConfig | None = None
                    ) -> TriPlaneGenerator:
    """A randomly initialised generator of a preset ("ffhq512-128" or "tiny").

    The mapping network's w_avg is set to the mean of 2000 mapped latents (frontal camera), so
    that UFO targets and truncation behave as with a trained network's tracked average. The
    "tiny" preset (without a `config`) then gets the structured initialisation of
    guide_fast.eg3d.init (an opaque, shaded body whose colours depend on the latent), so that
    its random renders show something; the FFHQ preset keeps the plain random initialisation.
    """
    structured = config is None and preset == "tiny"
    if config is None:
        if preset not in PRESETS:
            raise InputError(f"unknown preset {preset!r}; available: {sorted(PRESETS)}")
        config = PRESETS[preset]()
    fork_devices = []
    with torch.random.fork_rng(devices=fork_devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        gen = TriPlaneGenerator(config, renderer=renderer)
        with torch.no_grad():
            z = torch.randn(2000, config.z_dim)
            c = cameras.frontal_label(1).expand(2000, -1)
            gen.backbone.mapping.w_avg.copy_(gen.mapping(z, c)[:, 0].mean(0))
        if structured:
            from .init import apply_structured_init

            apply_structured_init(gen)
    gen.eval().requires_grad_(False)
    if device is not None:
        gen = gen.to(device)
    return gen


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["GeneratorConfig", "TriPlaneGenerator", "build_generator", "PRESETS", "FFHQ_RENDERING_KWARGS"]
