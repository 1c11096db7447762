"""`EvalConfig` (how to evaluate) and `EvalResult` (what eval.json holds)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from ..errors import InputError
from ..plan import ExecutionPlan
from .noise import NoiseScheme, check_scheme
from .views import EvalCamera

# FID_pre samples (GUIDE: 5000; 50,000 is the usual FID-50k) and identities scored for preservation
MAX_FID_SAMPLES = 100_000
MAX_PRESERVE_SAMPLES = 100_000

if TYPE_CHECKING:
    from ..eg3d.generator import TriPlaneGenerator

EVAL_FORMAT = "guide-fast/eval"
FORMAT_VERSION = 1
ALIGNS = ("mtcnn", "crop")
DETECTORS = ("guide", "facenet")
METRIC_KEYS = ("id", "id_others", "id_avg", "preservation", "fid_pre", "delta_fid_real",
               "diversity_cosine_after", "diversity_cosine_before")


@dataclass(frozen=True)
class EvalConfig:
    """Settings of `evaluate` (docs/guide.md §4).

    num_fid_samples: paired samples for FID_pre (GUIDE: 5000; 0 skips; 1 is refused).
    preserve_samples: how many of those samples also score identity preservation (0 skips).
    align: "mtcnn" (GUIDE's evaluation: detect 5 landmarks, warp to the 112x112 reference points)
        or "crop" (the ID-loss crop; for renders in which no face can be found, e.g. random weights).
    detector: with align "mtcnn", whose MTCNN finds the landmarks: "guide" (the default, GUIDE's own
        port as evaluate_id.py runs it: identity/guide_mtcnn.py, for numbers comparable with the
        paper) or "facenet" (facenet-pytorch's detector through the IdentityScorer; landmarks 1-3 px
        apart from GUIDE's).
    noise: "official" (independent draws for the before and after renders, as GUIDE's scripts)
        or "paired" (the same draws: lower variance, for run-to-run comparisons); evaluation/noise.py.
    noise_mode: the backbone's noise ("random" as GUIDE, "const", "none").
    batch_size: renders per batch. seed: seed of the paired samples and of every noise draw.
    camera: the evaluation cameras (default: the run's config, else GUIDE's).
    fid_method: "sqrtm" (scipy, as GUIDE), "eigh" (same value, faster), "gram" (exact for few
        samples), "auto" (gram up to 2048 samples, else sqrtm when scipy imports, else eigh).
    plan: the ExecutionPlan of the renders (renderer, precision); applied to both generators.
        None: the generators' own renderer, in `precision` on `device`.
    precision: with plan None, "fp32" (GUIDE's numerics: fp32 generator, its SR in fp16 on CUDA as
        the official code) or "bf16" (autocast on CUDA: faster, not GUIDE's numerics; the
        Inception network is unaffected). The plan's precision also chooses how an identity
        network given as a path runs (evaluation.make_scorer): fp32 as GUIDE's id_sim.py, or
        bf16 / TensorRT fp16 on CUDA; a scorer passed in ready-made runs as it was built.
    device: where to run (default: the plan's device, else the source generator's).
    verbose: progress lines on stdout.
    """

    num_fid_samples: int = 5000
    preserve_samples: int = 256
    align: Literal["mtcnn", "crop"] = "mtcnn"
    detector: Literal["guide", "facenet"] = "guide"
    noise: NoiseScheme = "official"
    noise_mode: Literal["random", "const", "none"] = "random"
    batch_size: int = 16
    seed: int = 0
    camera: EvalCamera | None = None
    fid_method: Literal["auto", "sqrtm", "eigh", "gram"] = "auto"
    plan: ExecutionPlan | None = None
    precision: Literal["fp32", "bf16"] = "fp32"
    device: torch.device | str | None = None
    verbose: bool = False

    def __post_init__(self):
        if self.align not in ALIGNS:
            raise InputError(f"align must be 'mtcnn' or 'crop', got {self.align!r}")
        if self.detector not in DETECTORS:
            raise InputError(f"detector must be 'guide' or 'facenet', got {self.detector!r}")
        check_scheme(self.noise)
        if self.noise_mode not in ("random", "const", "none"):
            raise InputError(f"noise_mode must be 'random', 'const' or 'none', got {self.noise_mode!r}")
        for name, most in (("num_fid_samples", MAX_FID_SAMPLES), ("preserve_samples", MAX_PRESERVE_SAMPLES)):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
                raise InputError(f"{name} must be a non-negative integer, got {value!r}")
            if value > most:  # the draws are made up front: 1e12 samples would allocate terabytes
                raise InputError(f"{name} must be <= {most:,}, got {value:,}")
        if self.num_fid_samples == 1:
            raise InputError("num_fid_samples must be 0 (skip FID) or at least 2 (a covariance needs 2 samples)")
        if not isinstance(self.batch_size, (int, np.integer)) or isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.precision not in ("fp32", "bf16"):
            raise InputError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.plan is not None and not isinstance(self.plan, ExecutionPlan):
            raise InputError(f"plan must be an ExecutionPlan, got {type(self.plan).__name__}")
        from ..fid import resolve_fid_method

        resolve_fid_method(self.fid_method)  # validates the name early

    @classmethod
    def build(cls, config: "EvalConfig | None" = None, **settings) -> "EvalConfig":
        """`config` (default EvalConfig()) with some fields replaced; unknown names are refused."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise InputError(f"unknown evaluation setting(s) {unknown}; known: {sorted(names)}")
        base = config if config is not None else cls()
        return replace(base, **settings) if settings else base

    def resolve_plan(self, source: "TriPlaneGenerator") -> ExecutionPlan:
        """The render plan: `plan` as given, else the generator's renderer in `precision`."""
        if self.plan is not None:
            if self.device is not None and torch.device(self.device) != self.plan.device:
                raise InputError(f"device {self.device} differs from the plan's device {self.plan.device}")
            return self.plan
        device = torch.device(self.device) if self.device is not None else next(source.parameters()).device
        renderer = getattr(source, "renderer_backend", "reference") or "reference"
        return ExecutionPlan(device=device, path="fast" if self.precision == "bf16" else "reference",
                             renderer=renderer, precision=self.precision)


@dataclass
class EvalResult:
    """What `evaluate` found; `to_dict()` is eval.json (docs/formats.md).

    metrics: every key of METRIC_KEYS, None where not computed (`notes` says why).
    settings: how the evaluation ran (alignment, detector, noise scheme, cameras, plan, ...).
    id / id_others / preservation / fid / diversity: per-metric details, None where not computed.
    """

    metrics: dict = field(default_factory=lambda: {k: None for k in METRIC_KEYS})
    settings: dict = field(default_factory=dict)
    id: dict | None = None
    id_others: dict | None = None
    preservation: dict | None = None
    fid: dict | None = None
    diversity: dict | None = None
    timings_s: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    run: dict | None = None
    files: list = field(default_factory=list)

    def to_dict(self) -> dict:
        d = {"format": EVAL_FORMAT, "format_version": FORMAT_VERSION, "metrics": dict(self.metrics),
             "settings": self.settings, "id": self.id, "id_others": self.id_others,
             "preservation": self.preservation, "fid": self.fid, "diversity": self.diversity,
             "timings_s": self.timings_s, "notes": list(self.notes)}
        if self.run is not None:
            d["run"] = self.run
        d["files"] = list(self.files)
        return d

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict) -> "EvalResult":
        """An eval.json back as an EvalResult (format checked)."""
        if not isinstance(d, dict) or d.get("format") != EVAL_FORMAT:
            raise InputError(f"not a guide-fast evaluation (format {d.get('format') if isinstance(d, dict) else None!r})")
        keys = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in keys})


__all__ = ["EvalConfig", "EvalResult", "EVAL_FORMAT", "METRIC_KEYS", "ALIGNS", "DETECTORS"]
