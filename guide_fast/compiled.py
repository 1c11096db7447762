"""torch.compile (Inductor) for the fast path, chosen by `ExecutionPlan.compile` (docs/performance.md).

What is compiled: the modules whose elementwise chains dominate the fast step's launches
(modulation, demodulation, noise, bias, leaky ReLU, gain, clamp, casts): the generators'
backbone synthesis network and super-resolution, LPIPS and the identity network. The fused
renderer, the mapping network and Adam stay as they are (the renderer is already one Triton
kernel; the others are small). Each module keeps its class, its parameters and its state-dict
names: only its `forward` is replaced by a `CompiledForward`, and `uninstall` puts the class's
own forward back (the engine does so when a run finishes, so that saved checkpoints and later
renders are plain modules).

Graphs are built once per process and reused: one compiled callable per (module class,
mode, backend, key) lives in a small process cache, and the module is an argument of it, not
a constant of it, so a second `Unlearner.unlearn` on a fresh copy of the same generator (the
warm service) finds the graphs already built. Inductor's on-disk cache (FX graph and
AOTAutograd caches) lives under `cache_dir()` (default ~/.cache/guide-fast/inductor, or
$TORCHINDUCTOR_CACHE_DIR when set), so a second process compiles faster.

Compilation is lazy (the first call of each graph compiles it). A failure there falls back to
the module's eager forward for the rest of the process's use of that module, and the reason is
recorded in the `CompileReport` (the engine copies it to result.timings["compile_error"]);
nothing is hidden, and nothing crashes. Modes: "default" (Inductor's generated kernels; composes
with the engine's manual CUDA-graph capture of the whole step), "reduce-overhead" (Inductor's own
CUDA graphs; the engine then does not capture the step itself, the two do not nest),
"max-autotune-no-cudagraphs" (autotuned GEMM/conv templates; long compiles).
"""
from __future__ import annotations

import copy
import os
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import InputError

COMPILE_MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
# "inductor" is the product; "aot_eager" traces and differentiates exactly as Inductor's input
# does but runs the captured graph eagerly (the CPU tests use it for the machinery: Inductor's C++
# compile of a whole step takes minutes on two cores)
COMPILE_BACKENDS: tuple[str, ...] = ("inductor", "aot_eager", "eager")
DEFAULT_CACHE_DIR = Path("~/.cache/guide-fast/inductor")

# the backend compile_step uses when none is given: None = $GUIDE_FAST_COMPILE_BACKEND or "inductor"
# (tests set a checking or counting backend callable here)
DEFAULT_BACKEND = None

_lock = threading.Lock()
_compiled: dict[tuple, object] = {}


def cache_dir() -> Path:
    """Inductor's on-disk cache folder for this process: $TORCHINDUCTOR_CACHE_DIR, else
    ~/.cache/guide-fast/inductor (set in the environment before Inductor first reads it)."""
    env = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if env:
        return Path(env)
    path = DEFAULT_CACHE_DIR.expanduser()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


def check_mode(mode: str) -> str:
    if mode not in COMPILE_MODES:
        raise InputError(f"unknown compile mode {mode!r}; expected one of {', '.join(repr(m) for m in COMPILE_MODES)}")
    return mode


def check_backend(backend) -> str:
    """A backend name of COMPILE_BACKENDS, or a torch.compile backend callable (tests: a checking backend)."""
    if not callable(backend) and backend not in COMPILE_BACKENDS:
        raise InputError(f"unknown compile backend {backend!r}; expected one of "
                         f"{', '.join(repr(b) for b in COMPILE_BACKENDS)}")
    return backend


def resolve_backend(backend: str | Callable | None = None) -> str | Callable:
    """The backend to compile with: `backend`, else DEFAULT_BACKEND, else $GUIDE_FAST_COMPILE_BACKEND,
    else "inductor". Called only when something is compiled; a bad variable is refused by name
    (the user set it in the environment, not as an argument)."""
    if backend or DEFAULT_BACKEND:
        return check_backend(backend or DEFAULT_BACKEND)
    env = os.environ.get("GUIDE_FAST_COMPILE_BACKEND", "").strip()
    if not env:
        return "inductor"
    if env not in COMPILE_BACKENDS:
        raise InputError(f"environment variable GUIDE_FAST_COMPILE_BACKEND must be one of "
                         f"{', '.join(repr(b) for b in COMPILE_BACKENDS)}, got {env!r}")
    return env


@dataclass
class CompileReport:
    """What compilation did in one run: the modules compiled, the graphs reused from this process's
    cache, the failures (each module falls back to eager) and the first-call wall time of each
    compiled module (its compile time plus one forward)."""

    mode: str = "default"
    backend: object = "inductor"
    cache_dir: str = ""
    modules: list = field(default_factory=list)
    reused: list = field(default_factory=list)
    errors: dict = field(default_factory=dict)
    first_call_s: dict = field(default_factory=dict)
    created: set = field(default_factory=set, repr=False)  # process-cache keys this run added

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        backend = self.backend if isinstance(self.backend, str) else getattr(self.backend, "__name__", "custom")
        return {"mode": self.mode, "backend": backend, "cache_dir": self.cache_dir, "modules": list(self.modules),
                "reused_from_process_cache": list(self.reused), "errors": dict(self.errors),
                "first_call_s": {k: round(v, 3) for k, v in self.first_call_s.items()}}

    def error_text(self) -> str | None:
        if not self.errors:
            return None
        return "; ".join(f"{k}: {v}" for k, v in self.errors.items())[:500]


def compiled_forward(cls: type, mode: str = "default", backend="inductor", key=()) -> tuple[object, tuple, bool]:
    """The process's compiled `cls.forward` for (mode, backend, key) -> (callable, cache key, found?).

    The callable takes the module as its first argument; Dynamo treats the module's parameters
    and buffers as graph inputs, so every instance of `cls` with the same structure shares it."""
    check_mode(mode)
    check_backend(backend)
    k = (cls, mode, backend, key)
    with _lock:
        fn = _compiled.get(k)
        if fn is not None:
            return fn, k, True
        cache_dir()
        # every (layout, plan, grad mode) of one class is a cache entry on the same code object
        # (cls.forward): leave room for a service's few layouts before Dynamo gives up and runs eagerly
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        kwargs = {"backend": backend}
        if backend == "inductor" and mode != "default":
            kwargs["mode"] = mode
        fn = torch.compile(cls.forward, **kwargs)
        _compiled[k] = fn
        return fn, k, False


def clear_process_cache() -> None:
    """Forget the compiled callables (tests; a service that wants to free its graphs)."""
    with _lock:
        _compiled.clear()
    torch._dynamo.reset()


def failure_reason(exc: BaseException) -> str:
    """One line: the exception and, for a wrapped one (Dynamo's BackendCompilerFailed), its root cause."""
    def line(e):
        text = str(e).strip()
        return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")

    root, seen = exc, 0
    while seen < 8:
        nxt = getattr(root, "inner_exception", None) or root.__cause__
        if nxt is None or nxt is root:
            break
        root, seen = nxt, seen + 1
    return (line(exc) if root is exc else f"{line(exc)} <- {line(root)}")[:300]


class CompiledForward:
    """A module's forward replaced by the process's compiled one, falling back to eager on failure."""

    def __init__(self, module: torch.nn.Module, fn, name: str, report: CompileReport, prepare=None):
        self.module = module
        self.fn = fn
        self.name = name
        self.report = report
        self.prepare = prepare  # (module, args, kwargs) -> (args, kwargs), outside the compiled region
        self.failed = False
        self.calls = 0

    def eager(self, *args, **kwargs):
        return type(self.module).forward(self.module, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        if self.failed:
            return self.eager(*args, **kwargs)
        first = self.calls == 0
        self.calls += 1
        t0 = time.perf_counter()
        if self.prepare is not None:
            args, kwargs = self.prepare(self.module, args, kwargs)
        try:
            out = self.fn(self.module, *args, **kwargs)
        except Exception as exc:  # a compile (or compiled-run) failure: eager from now on, said so
            self.fail(exc)
            return self.eager(*args, **kwargs)
        if first:
            self.report.first_call_s[self.name] = self.report.first_call_s.get(self.name, 0.0) + time.perf_counter() - t0
        return out

    def fail(self, exc: BaseException) -> None:
        self.failed = True
        reason = failure_reason(exc)
        self.report.errors[self.name] = reason
        warnings.warn(f"torch.compile of {self.name} failed ({reason}); it runs eagerly")

    def __deepcopy__(self, memo):
        # a deep copy of the module gets its own binding to the copied module (same compiled graphs)
        return CompiledForward(copy.deepcopy(self.module, memo), self.fn, self.name, self.report, self.prepare)


def install(module: torch.nn.Module, name: str, report: CompileReport, key=()) -> CompiledForward | None:
    """Replace `module.forward` by the process's compiled forward of its class (see compiled_forward)."""
    if isinstance(module.__dict__.get("forward"), CompiledForward):
        uninstall(module)
    try:
        fn, k, found = compiled_forward(type(module), report.mode, report.backend, key)
    except Exception as exc:  # torch.compile itself refused: this module stays eager, said so
        reason = failure_reason(exc)
        report.errors[name] = reason
        warnings.warn(f"torch.compile of {name} failed ({reason}); it runs eagerly")
        return None
    if not found:
        report.created.add(k)
    wrapper = CompiledForward(module, fn, name, report, _PREPARE.get(type(module).__name__))
    module.forward = wrapper
    report.modules.append(name)
    if found and k not in report.created:  # built by an earlier run of this process
        report.reused.append(name)
    return wrapper


def _tape_backbone_noise(module, args, kwargs):
    """SynthesisNetwork.forward(ws, noise_mode="random", fused_modconv=None, generator=None): random
    noise from a torch.Generator, an identity stream or torch's global generator is drawn onto a
    NoiseTape first, so that every caller (the engine, evaluation, renders) gets one graph per pass."""
    names = ("ws", "noise_mode", "fused_modconv", "generator")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    if bound.get("noise_mode", "random") != "random" or isinstance(bound.get("generator"), NoiseTape):
        return args, kwargs
    ws = bound["ws"]
    bound["generator"] = NoiseTape.draw(bound.get("generator"), module, ws.shape[0], ws.device)
    return (), bound


_PREPARE = {"SynthesisNetwork": _tape_backbone_noise}


def uninstall(module: torch.nn.Module) -> None:
    """Put the class's own forward back (a no-op on a module that was not compiled)."""
    if isinstance(module.__dict__.get("forward"), CompiledForward):
        del module.__dict__["forward"]


def is_compiled(module: torch.nn.Module) -> bool:
    return isinstance(module.__dict__.get("forward"), CompiledForward)


def fail_all(modules, exc: BaseException) -> None:
    """A failure that surfaced outside a forward (e.g. the lazily compiled backward): every given
    compiled module falls back to eager, with the reason recorded once."""
    first = True
    for m in modules:
        w = m.__dict__.get("forward")
        if isinstance(w, CompiledForward) and not w.failed:
            if first:
                w.fail(exc)
                first = False
            else:
                w.failed = True


def generator_fingerprint(gen) -> tuple:
    """What fixes the graphs of a generator: its config (shapes, channels, resolutions) and operator switches."""
    cfg = gen.config
    return (repr(cfg),) + tuple(sorted(gen.operators().items()))


def step_modules(g_u, g_s, id_loss, lpips) -> list[tuple[str, torch.nn.Module]]:
    """The fast step's compiled modules, by name (docs/performance.md: where the step's elementwise time goes)."""
    return [("G_u.backbone.synthesis", g_u.backbone.synthesis), ("G_s.backbone.synthesis", g_s.backbone.synthesis),
            ("G_u.superresolution", g_u.superresolution), ("G_s.superresolution", g_s.superresolution),
            ("lpips", lpips), ("identity", id_loss)]


def compile_step(g_u, g_s, id_loss, lpips, plan, layout_key=(), mode: str = "default",
                 backend=None) -> CompileReport:
    """Install compiled forwards on the fast step's modules for `plan` (a no-op report when
    plan.compile is off). layout_key: the batch layout, part of the cache key (one graph per
    layout, no dynamic shapes). backend: default $GUIDE_FAST_COMPILE_BACKEND or "inductor"."""
    if not plan.compile:
        # the loss networks are the caller's objects: a session that was never finished may have left
        # them compiled; a compile-off run runs them eagerly. The backend is not read: a run with
        # compile off must not fail on $GUIDE_FAST_COMPILE_BACKEND, which only matters when compiling.
        uninstall_all(m for _, m in step_modules(g_u, g_s, id_loss, lpips))
        return CompileReport(mode=check_mode(mode), cache_dir=str(cache_dir()))
    report = CompileReport(mode=check_mode(mode), backend=resolve_backend(backend), cache_dir=str(cache_dir()))
    key = (generator_fingerprint(g_u), plan.precision, plan.memory_format, tuple(layout_key))
    for name, module in step_modules(g_u, g_s, id_loss, lpips):
        install(module, name, report, key)
    return report


def uninstall_all(modules) -> None:
    for m in modules:
        uninstall(m)


class NoiseTape:
    """Backbone noise drawn before a compiled backbone pass and served in call order.

    A noise layer draws `torch.randn(..., generator=g)` (or an identity stream's rows): Dynamo
    cannot trace a torch.Generator argument and would split the backbone into one graph per
    layer. The tape draws the same tensors, in the same order and from the same source, before the
    pass (eager), so the compiled pass sees plain inputs and its draws equal the eager pass's."""

    def __init__(self, tensors: list):
        self.tensors = tensors
        self.i = 0

    @staticmethod
    def noise_shapes(synthesis: torch.nn.Module, batch: int) -> list[list[int]]:
        from .eg3d.networks import SynthesisLayer

        # module order is call order: blocks by resolution, conv0 before conv1 (eg3d/networks.py)
        return [[batch, 1, m.resolution, m.resolution] for m in synthesis.modules()
                if isinstance(m, SynthesisLayer) and m.use_noise]

    @classmethod
    def draw(cls, source, synthesis: torch.nn.Module, batch: int, device) -> "NoiseTape":
        rows = getattr(source, "randn_rows", None)
        tensors = [rows(s, device) if rows is not None else torch.randn(s, device=device, generator=source)
                   for s in cls.noise_shapes(synthesis, batch)]
        return cls(tensors)

    def randn_rows(self, shape, device) -> torch.Tensor:
        t = self.tensors[self.i]
        self.i += 1
        if list(t.shape) != list(shape):
            raise ValueError(f"noise tape out of order: layer asks {list(shape)}, tape holds {list(t.shape)}")
        return t


def compile_generators(generators, mode: str = "default", backend=None, key=()) -> CompileReport:
    """Install compiled forwards on generators' backbone synthesis and super-resolution (renders
    without an unlearning step, e.g. evaluation); undo with `uninstall_generators`."""
    report = CompileReport(mode=check_mode(mode), backend=resolve_backend(backend), cache_dir=str(cache_dir()))
    for i, gen in enumerate(generators):
        k = (generator_fingerprint(gen), tuple(key))
        install(gen.backbone.synthesis, f"G{i}.backbone.synthesis", report, k)
        install(gen.superresolution, f"G{i}.superresolution", report, k)
    return report


def uninstall_generators(generators) -> None:
    for gen in generators:
        uninstall_all((gen.backbone.synthesis, gen.superresolution))
