"""Every constant of GUIDE in one place; the defaults are the paper's / official code's
(docs/guide.md §3, each field cites its subsection)."""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields, replace

import torch

from ..errors import InputError
from ..plan import MEMORY_FORMATS, PATHS, PRECISIONS, RENDERERS, SKIP_PATHS, UPSAMPLE_CONVS, ExecutionPlan

TARGET_MODES = ("extra", "average")
LOOP_PATHS = PATHS


MAX_ITERATIONS = 1_000_000  # GUIDE runs 1000 steps (docs/guide.md §3.6)
SEED_LIMIT = 2 ** 63  # the CLI's range (commands/_common.py): torch's generators take a signed 64-bit seed


def _is_int(v) -> bool:
    # numpy integers count (they have __index__); bools do not, though Python makes them ints
    return not isinstance(v, bool) and hasattr(type(v), "__index__")


def _is_real(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, numbers.Real)


def _check_int(name: str, v, lo: int, hi: int | None = None) -> None:
    if not _is_int(v):
        raise InputError(f"{name} must be an integer, got {v!r}")
    if v < lo or (hi is not None and v > hi):
        raise InputError(f"{name} must be in {lo}..{hi:,}, got {v:,}" if hi is not None
                         else f"{name} must be >= {lo}, got {v:,}")


def _check_real(name: str, v, lo: float | None = None, *, strict: bool = False) -> None:
    """A finite int or float (not a bool, not a string), >= lo (> lo with strict)."""
    if not _is_real(v) or not math.isfinite(v):
        raise InputError(f"{name} must be a finite number, got {v!r}")
    if lo is not None and (v <= lo if strict else v < lo):
        raise InputError(f"{name} must be {'>' if strict else '>='} {lo}, got {v}")


def _as_tuple(v):
    """`v` as a tuple of floats where it is a sequence of numbers; anything else is left for
    validate() to name (a string is not split into characters, None does not crash here)."""
    if not isinstance(v, Iterable) or isinstance(v, (str, bytes)):
        return v
    return tuple(float(x) if not isinstance(x, bool) and hasattr(type(x), "__float__") else x for x in v)


@dataclass
class UnlearnConfig:
    # §3.1: Adam on backbone.synthesis, lr 1e-4, default betas/eps, 1000 iterations
    iterations: int = 1000
    lr: float = 1e-4
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    # §3.4 UFO: "extra" w_t = w_avg - d (w_u - w_avg)/||w_u - w_avg||_F; "average" w_t = w_avg (README baseline)
    target: str = "extra"
    target_distance: float = 30.0
    # §3.5 which loss blocks run (GUIDE: all three; the README baseline: local only)
    use_local: bool = True
    use_adjacency: bool = True
    use_global: bool = True
    # §3.5(a) local unlearning weights
    local_mse_weight: float = 0.01
    local_lpips_weight: float = 1.0
    local_id_weight: float = 0.1
    # §3.5(b) adjacency-aware unlearning: K samples, alpha ~ U(min, max), summed, then weighted
    adjacency_samples: int = 2
    adjacency_alpha_min: float = 0.0
    adjacency_alpha_max: float = 15.0
    adjacency_mse_weight: float = 0.01
    adjacency_lpips_weight: float = 1.0
    adjacency_id_weight: float = 0.1
    adjacency_weight: float = 1.0
    # §3.5(c) global preservation: K random latents, LPIPS only, summed
    global_samples: int = 2
    global_weight: float = 1.0
    # §3.2 cameras: yaw pi/2 + U(-pi/12, pi/12), pitch -0.2, radius 2.7, FOV 18.837 deg,
    # look-at (0,0,0) (the official code's effective pivot); mapping conditioned frontal
    yaw_range: float = math.pi / 12
    pitch: float = -0.2
    radius: float = 2.7
    fov_degrees: float = 18.837
    lookat: tuple = (0.0, 0.0, 0.0)
    # §3.5 random latents: psi = 1 (no truncation)
    truncation_psi: float = 1.0
    # §3.2 backbone noise during fine-tuning
    noise_mode: str = "random"
    seed: int | None = 0
    # engine choices (not part of GUIDE's maths): the inputs of ExecutionPlan.resolve, which
    # decides every "auto" (guide_fast/plan.py; `execution_plan()` below)
    path: str = "fast"                 # "fast" (batched, cached, bf16, fused, graph) or "reference"
    renderer: str = "auto"             # "reference", "triton" or "auto" (the plan's choice)
    precision: str = "auto"            # "fp32", "bf16" (autocast) or "auto" (the plan's choice)
    cuda_graph: bool = True            # capture the fast step in a CUDA graph where the plan can (fast path, CUDA)
    upsample_conv: str = "auto"        # "reference", "folded" or "auto" (the plan's choice)
    skip_path: str = "auto"            # "reference", "triton" (fused skip-path kernel) or "auto" (the plan's choice)
    memory_format: str = "contiguous"  # fast path: generator activations "contiguous" (NCHW) or "channels_last"
    # fast path: compute the local target's frozen tri-planes P_s(w_t) once per run. "auto" does so
    # only where that is exact (noise_mode "const" or "none"); with random backbone noise GUIDE
    # draws fresh noise for P_s(w_t) every step (docs/guide.md §3.5, §7), so "auto" recomputes it, and
    # "on" freezes one noise draw for the whole run (one backbone pass per identity cheaper), drawn
    # from the identity's own "target-planes" stream (streams.py), whatever else shares its pass.
    cache_target_planes: str = "auto"
    # fast path: torch.compile (Inductor) of the backbone synthesis, super-resolution, LPIPS and the
    # identity network (guide_fast/compiled.py): "auto" (the plan's choice: off until measured
    # faster, docs/performance.md), "on" or "off"; compile_mode: "default" (composes with the
    # engine's own CUDA-graph capture), "reduce-overhead" (Inductor's CUDA graphs instead of the
    # engine's capture) or "max-autotune-no-cudagraphs"
    compile: str = "auto"
    compile_mode: str = "default"
    # fast path: "shared" = one backbone pass per latent serves the tri-plane MSE and the image (one
    # noise draw for both; the same expected gradient, another variance); "separate" = the official
    # structure: the MSE's tri-planes come from their own backbone passes with independent noise
    # (docs/guide.md §3.5). The reference path is always "separate".
    noise_passes: str = "shared"
    warmup_steps: int = 2              # eager steps before capture (they are real steps)
    identities_per_pass: int = 4       # fast path: identities per forward/backward (0 = all); bounds memory
    log_every: int = 25                # how often (steps) device-side losses are read back
    eval_views: int = 11               # §3.6: before/after renders at yaw linspace(-pi/12, pi/12, 11)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.betas = _as_tuple(self.betas)
        self.lookat = _as_tuple(self.lookat)
        if isinstance(self.compile, bool):
            self.compile = "on" if self.compile else "off"
        self.validate()

    def validate(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            values = v if isinstance(v, tuple) else (v,)
            if any(isinstance(x, float) and not math.isfinite(x) for x in values):
                raise InputError(f"{f.name} must be finite, got {v}")
        if self.target not in TARGET_MODES:
            raise InputError(f"unknown target mode {self.target!r}; expected one of {TARGET_MODES}")
        if self.path not in LOOP_PATHS:
            raise InputError(f"unknown path {self.path!r}; expected one of {LOOP_PATHS}")
        for name, allowed in (("renderer", RENDERERS + ("auto",)), ("precision", PRECISIONS + ("auto",)),
                              ("upsample_conv", UPSAMPLE_CONVS + ("auto",)), ("skip_path", SKIP_PATHS + ("auto",)),
                              ("memory_format", MEMORY_FORMATS)):
            value = getattr(self, name)
            if value not in allowed:
                raise InputError(f"unknown {name} {value!r}; expected one of {', '.join(repr(a) for a in allowed)}")
        if not isinstance(self.cuda_graph, bool):
            raise InputError(f"cuda_graph must be True or False, got {self.cuda_graph!r}")
        if self.compile not in ("auto", "on", "off"):
            raise InputError(f"unknown compile {self.compile!r}; expected 'auto', 'on' or 'off'")
        from ..compiled import check_mode

        check_mode(self.compile_mode)
        if self.noise_passes not in ("shared", "separate"):
            raise InputError(f"unknown noise_passes {self.noise_passes!r}; expected 'shared' or 'separate'")
        if self.cache_target_planes not in ("auto", "on", "off"):
            raise InputError(f"unknown cache_target_planes {self.cache_target_planes!r}; expected 'auto', 'on' or 'off'")
        if self.noise_mode not in ("random", "const", "none"):
            raise InputError(f"noise_mode must be 'random', 'const' or 'none', got {self.noise_mode!r}")
        # every number is type-checked here: a string or None would otherwise pass this far and fail
        # mid-run as a raw TypeError (or, for betas/eps, inside Adam at the first step)
        _check_int("iterations", self.iterations, 0, MAX_ITERATIONS)  # the loss log is preallocated per step
        _check_real("lr", self.lr, 0, strict=True)
        if (not isinstance(self.betas, tuple) or len(self.betas) != 2
                or not all(_is_real(b) and 0 <= b < 1 for b in self.betas)):
            raise InputError(f"betas must be 2 numbers in [0, 1) (Adam's), got {self.betas!r}")
        _check_real("eps", self.eps, 0, strict=True)
        for name in ("use_local", "use_adjacency", "use_global"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("local_mse_weight", "local_lpips_weight", "local_id_weight", "adjacency_mse_weight",
                     "adjacency_lpips_weight", "adjacency_id_weight", "adjacency_weight", "global_weight"):
            _check_real(name, getattr(self, name), 0)  # a negative weight would maximise that loss
        _check_int("adjacency_samples", self.adjacency_samples, 0)
        _check_int("global_samples", self.global_samples, 0)
        _check_real("adjacency_alpha_min", self.adjacency_alpha_min, 0)
        _check_real("adjacency_alpha_max", self.adjacency_alpha_max)
        if self.adjacency_alpha_max < self.adjacency_alpha_min:
            raise InputError(f"need 0 <= adjacency_alpha_min <= adjacency_alpha_max, got "
                             f"[{self.adjacency_alpha_min}, {self.adjacency_alpha_max}]")
        _check_real("target_distance", self.target_distance)
        if self.target_distance < 0:
            raise InputError(f"target_distance must be >= 0 (a negative one pulls towards the identity), "
                             f"got {self.target_distance}")
        _check_real("truncation_psi", self.truncation_psi)
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < SEED_LIMIT):
            raise InputError(f"seed must be None or an integer with 0 <= seed < 2**63, got {self.seed!r}")
        _check_int("warmup_steps", self.warmup_steps, 0, MAX_ITERATIONS)
        _check_int("log_every", self.log_every, 1)
        if not (self.use_local or self.use_adjacency or self.use_global):
            raise InputError("at least one of use_local, use_adjacency, use_global must be on")
        if not isinstance(self.lookat, tuple) or len(self.lookat) != 3:
            raise InputError(f"lookat must be 3 numbers, got {self.lookat!r}")
        from ..cameras import check_camera

        check_camera(radius=self.radius, fov_degrees=self.fov_degrees, yaw_range=self.yaw_range, pitch=self.pitch,
                     lookat=self.lookat)
        _check_int("identities_per_pass", self.identities_per_pass, 0)  # 0 = all identities in one pass
        _check_int("eval_views", self.eval_views, 1)
        if not isinstance(self.extra, dict):
            raise InputError(f"extra must be a dict, got {type(self.extra).__name__}")

    def execution_plan(self, device: torch.device | str | None = None) -> ExecutionPlan:
        """The engine fields resolved for `device` (the one place "auto" is decided: ExecutionPlan.resolve).

        cuda_graph=True means "capture where the plan can", i.e. the fast path on CUDA."""
        return ExecutionPlan.resolve(device, path=self.path, renderer=self.renderer, precision=self.precision,
                                     memory_format=self.memory_format, upsample_conv=self.upsample_conv,
                                     skip_path=self.skip_path,
                                     cuda_graph="auto" if self.cuda_graph else False, compile=self.compile)

    def with_plan(self, plan: ExecutionPlan) -> "UnlearnConfig":
        """A copy whose engine fields are those of `plan` (resolved: no "auto" left)."""
        return replace(self, path=plan.path, renderer=plan.renderer, precision=plan.precision,
                       upsample_conv=plan.upsample_conv, skip_path=plan.skip_path, memory_format=plan.memory_format,
                       cuda_graph=plan.cuda_graph, compile="on" if plan.compile else "off")

    @property
    def k_adj(self) -> int:
        return self.adjacency_samples if self.use_adjacency else 0

    @property
    def k_glob(self) -> int:
        return self.global_samples if self.use_global else 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        d["lookat"] = list(self.lookat)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "UnlearnConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise InputError(f"unknown UnlearnConfig field(s): {unknown}")
        return cls(**d)

    @classmethod
    def baseline(cls, **overrides) -> "UnlearnConfig":
        """The official README's baseline: average-face target, local loss only."""
        return cls(**{"target": "average", "use_adjacency": False, "use_global": False, **overrides})
