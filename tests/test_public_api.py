"""Public API (issue 11 item 6): what `guide_fast` exports carries type hints, and errors a caller
can trigger through the model's constructors and options are GuideFastError subclasses
(InputError, which the CLI turns into one line and exit code 2)."""
from __future__ import annotations

import importlib
import inspect

import pytest
import torch

import guide_fast
from guide_fast.errors import GuideFastError, InputError


def _unhinted(fn) -> list[str]:
    sig = inspect.signature(fn)
    missing = [n for n, p in sig.parameters.items() if n not in ("self", "cls")
               and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.annotation is inspect.Parameter.empty]
    if sig.return_annotation is inspect.Signature.empty and fn.__name__ != "__init__":
        missing.append("return")
    return missing


PACKAGES = ["guide_fast"] + [f"guide_fast.{p}" for p in
                              ("checkpoints", "eg3d", "evaluation", "identity", "inversion", "render", "unlearn")]


def _public_callables(obj, qualname: str):
    """The function itself, or a guide_fast class's public methods (and __init__ / __call__)."""
    if inspect.isfunction(obj):
        yield qualname, obj
    elif inspect.isclass(obj) and obj.__module__.startswith("guide_fast"):
        for attr, value in vars(obj).items():
            if attr.startswith("_") and attr not in ("__init__", "__call__"):
                continue
            if attr == "__init__" and hasattr(obj, "__dataclass_fields__"):
                continue  # written by @dataclass from the annotated fields
            fn = value.__func__ if isinstance(value, (classmethod, staticmethod)) else value
            fn = fn.fget if isinstance(fn, property) else fn
            if inspect.isfunction(fn):
                yield f"{qualname}.{attr}", fn


def test_exported_functions_have_type_hints():
    """What guide_fast and each package's __init__ export: functions and the public methods of
    its classes carry parameter and return annotations."""
    problems = {}
    for package in PACKAGES:
        module = importlib.import_module(package)
        for name in getattr(module, "__all__", []):
            for qualname, fn in _public_callables(getattr(module, name), f"{package}.{name}"):
                if _unhinted(fn):
                    problems[qualname] = _unhinted(fn)
    assert not problems, problems


def test_the_hint_check_can_fail():
    def bare(x, y: int = 1):
        return x

    assert _unhinted(bare) == ["x", "return"]


def test_inversion_names_are_exported_lazily():
    from guide_fast import inversion

    assert guide_fast.invert_images is inversion.invert_images
    assert guide_fast.invert_image is inversion.invert_image
    assert guide_fast.load_encoder is inversion.load_encoder


def test_model_option_errors_are_input_errors():
    from guide_fast.eg3d.networks import SuperResolution, SynthesisNetwork
    from guide_fast.inversion.swin import SwinV2Backbone

    cases = [
        (lambda: SynthesisNetwork(w_dim=8, img_resolution=6, img_channels=3), "power of two"),
        (lambda: SuperResolution(8, 16, 48, [], 8), "one block per factor of two"),
        (lambda: SwinV2Backbone(depths=(2, 2, 2)), "four stages"),
    ]
    for build, fragment in cases:
        with pytest.raises(InputError, match=fragment):
            build()


def test_unknown_noise_mode_is_an_input_error(tiny_generator):
    gen = tiny_generator
    ws = gen.w_avg.detach().reshape(1, 1, -1).expand(1, gen.num_ws, -1)
    c = torch.zeros(1, 25)
    with pytest.raises(InputError, match="noise_mode must be one of") as info:
        gen.synthesis(ws, c, noise_mode="loud")
    assert isinstance(info.value, GuideFastError)
