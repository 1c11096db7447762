"""guide-fast: GUIDE identity unlearning for EG3D, fast.

Public surface (every name below, from `guide_fast` itself): the generator (build_generator,
load_generator, save_generator, TriPlaneGenerator, GeneratorConfig), the renderer
(render_triplanes, RenderOptions, make_render_draws), the loss networks (IdentityLoss,
load_backbone, LPIPS), identity scoring (IdentityScorer), photo inversion (invert_image,
invert_images, load_encoder for the GOAE encoder), unlearning (Unlearner, UnlearnConfig),
evaluation (evaluate, EvalConfig, EvalResult), the execution plan (ExecutionPlan) and the errors
(GuideFastError, InputError, CheckpointError); plus the `guide-fast` command. Heavy parts are
imported on first use so that `import guide_fast` stays cheap.
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "build_generator": ("guide_fast.eg3d.generator", "build_generator"),
    "TriPlaneGenerator": ("guide_fast.eg3d.generator", "TriPlaneGenerator"),
    "GeneratorConfig": ("guide_fast.eg3d.generator", "GeneratorConfig"),
    "load_generator": ("guide_fast.checkpoints", "load_generator"),
    "save_generator": ("guide_fast.checkpoints", "save_generator"),
    "render_triplanes": ("guide_fast.render", "render_triplanes"),
    "RenderOptions": ("guide_fast.render", "RenderOptions"),
    "make_render_draws": ("guide_fast.render", "make_render_draws"),
    "IdentityLoss": ("guide_fast.identity.loss", "IdentityLoss"),
    "load_backbone": ("guide_fast.identity.backbones", "load_backbone"),
    "LPIPS": ("guide_fast.perceptual", "LPIPS"),
    "ExecutionPlan": ("guide_fast.plan", "ExecutionPlan"),
    "GuideFastError": ("guide_fast.errors", "GuideFastError"),
    "InputError": ("guide_fast.errors", "InputError"),
    "CheckpointError": ("guide_fast.errors", "CheckpointError"),
    "IdentityScorer": ("guide_fast.identity.scorer", "IdentityScorer"),
    "invert_image": ("guide_fast.inversion", "invert_image"),
    "invert_images": ("guide_fast.inversion", "invert_images"),
    "load_encoder": ("guide_fast.inversion", "load_encoder"),
    "Unlearner": ("guide_fast.unlearn.engine", "Unlearner"),
    "UnlearnConfig": ("guide_fast.unlearn.config", "UnlearnConfig"),
    "evaluate": ("guide_fast.evaluation", "evaluate"),
    "EvalConfig": ("guide_fast.evaluation", "EvalConfig"),
    "EvalResult": ("guide_fast.evaluation", "EvalResult"),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'guide_fast' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
