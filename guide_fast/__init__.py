"""guide-fast: GUIDE identity unlearning for EG3D, fast.

Public surface: build_generator, load_generator, save_generator, render_triplanes,
IdentityScorer, Unlearner, UnlearnConfig, evaluate (and the `guide-fast` command).
Heavy parts are imported on first use so that `import guide_fast` stays cheap.
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
    "IdentityScorer": ("guide_fast.identity.scorer", "IdentityScorer"),
    "Unlearner": ("guide_fast.unlearn.engine", "Unlearner"),
    "UnlearnConfig": ("guide_fast.unlearn.config", "UnlearnConfig"),
    "evaluate": ("guide_fast.evaluation", "evaluate"),
    "EvalConfig": ("guide_fast.evaluation", "EvalConfig"),
    "EvalResult": ("guide_fast.evaluation", "EvalResult"),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'guide_fast' has no attribute {name!r}")
