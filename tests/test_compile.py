"""ExecutionPlan.compile: torch.compile of the fast step's networks (guide_fast/compiled.py).

Inductor's CPU backend generates and compiles C++ for every graph: the whole tiny step takes
minutes of gcc on two cores, so one test runs Inductor itself on one module (a modulated
synthesis layer of the tiny backbone with its noise/bias/activation/clamp chain, forward and
backward), and the step-level tests use the "aot_eager" backend, which traces with
Dynamo and differentiates with AOTAutograd exactly as Inductor's input is built, then runs the
captured graph eagerly (what is tested there is the machinery: tracing, the noise tape, fallback,
the process cache, the engine's wiring)."""
import shutil
import warnings

import pytest
import torch

from guide_fast import compiled
from guide_fast.eg3d.generator import build_generator
from guide_fast.identity import IdentityLoss
from guide_fast.perceptual import LPIPS
from guide_fast.plan import ExecutionPlan
from guide_fast.unlearn.config import UnlearnConfig
from guide_fast.unlearn.engine import Unlearner
from guide_fast.unlearn.steps import sample_draws
from small_nets import SmallFaceNet


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "inductor"))
    yield


class CountingBackend:
    """A torch.compile backend that runs the Dynamo graph as captured and counts compilations."""

    __name__ = "counting"

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def _nets():
    return IdentityLoss(SmallFaceNet()), LPIPS.random(0)


def _session(gen, compile_on, noise="random", iterations=3, **cfg):
    idl, lp = _nets()
    c = UnlearnConfig(iterations=iterations, seed=0, noise_mode=noise, compile="on" if compile_on else "off", **cfg)
    return Unlearner(gen, idl, lp, c).prepare(seeds=[1])


def _one_step_grads(session):
    torch.manual_seed(5)
    draws = sample_draws(session.config, session.layout, session.g_u.config.z_dim, session.device,
                         streams=session.streams, render=(session.stepper.rays, session.g_u.render_options))
    values, _ = session.stepper.forward_backward(draws)
    return values, [p.grad.clone() for p in session.stepper.params]


@pytest.fixture(scope="module")
def gen():
    return build_generator("tiny", seed=0)


def test_plan_and_config_carry_compile():
    assert ExecutionPlan.resolve("cpu").compile is False  # auto: off until measured faster
    assert ExecutionPlan.resolve("cpu", compile="on").compile is True
    cfg = UnlearnConfig(compile=True)
    assert cfg.compile == "on" and cfg.execution_plan("cpu").compile is True
    assert UnlearnConfig().with_plan(ExecutionPlan.resolve("cpu", compile="on")).compile == "on"
    from guide_fast.errors import InputError

    with pytest.raises(InputError, match="compile mode"):
        UnlearnConfig(compile_mode="fastest")
    with pytest.raises(InputError, match="reference path"):
        ExecutionPlan.resolve("cpu", path="reference", compile="on")


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="Inductor's CPU backend needs a C++ compiler")
def test_inductor_synthesis_layer_matches_eager(gen):
    """Inductor (generated C++ on the CPU) on one modulated synthesis layer of the tiny backbone:
    modulation, demodulation, noise, bias, leaky ReLU, gain and clamp, the elementwise chain the
    fast step spends its launches on; forward and gradients (input, weights, styles' affine, noise
    strength, bias). Tolerance 1e-4 relative to each tensor's largest value: Inductor fuses and
    reorders fp32 sums (demodulation, bias/activation chains), so results differ at the
    1e-6..1e-5 level, not more."""
    import copy

    from guide_fast.eg3d.networks import SynthesisLayer

    layer = next(m for m in gen.backbone.synthesis.modules() if isinstance(m, SynthesisLayer) and m.up == 1)
    eager = copy.deepcopy(layer).requires_grad_(True)
    with torch.no_grad():
        eager.noise_strength.fill_(0.3)
    comp = copy.deepcopy(eager)
    report = compiled.CompileReport(backend="inductor")
    compiled.install(comp, "layer", report, key=("test",))
    torch.manual_seed(0)
    x0 = torch.randn(2, layer.in_channels, layer.resolution, layer.resolution)
    w = torch.randn(2, gen.config.w_dim)
    outs, grads = [], []
    for m in (eager, comp):
        x = x0.clone().requires_grad_(True)
        out = m(x, w, noise_mode="const")
        (out.square().mean() + out.mean()).backward()
        outs.append(out.detach())
        grads.append([x.grad] + [p.grad for p in m.parameters()])
    assert report.ok and report.first_call_s["layer"] > 0
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4 * outs[0].abs().max(), rtol=1e-4)
    for a, b in zip(grads[1], grads[0]):
        assert (a is None) == (b is None)  # the same parameters take part
        if b is not None:
            torch.testing.assert_close(a, b, atol=1e-4 * b.abs().max() + 1e-12, rtol=1e-4)
    compiled.uninstall(comp)
    assert not compiled.is_compiled(comp)


@pytest.fixture(scope="module")
def step_pair(gen):
    """(eager values, eager grads, compiled values, compiled grads, compiled session) of one step on the same draws."""
    compiled.clear_process_cache()
    mp = pytest.MonkeyPatch()
    mp.setattr(compiled, "DEFAULT_BACKEND", "aot_eager")
    try:
        eager = _session(gen, False)
        v0, g0 = _one_step_grads(eager)
        comp = _session(gen, True)
        v1, g1 = _one_step_grads(comp)
    finally:
        mp.undo()
    return v0, g0, v1, g1, comp


def test_compiled_step_matches_eager(step_pair):
    """Random backbone noise included: the noise tape draws what the eager layers draw, in their
    order, so both steps see the same numbers. AOTAutograd's decompositions (e.g. of the
    modulated conv's demodulation, LPIPS's normalisation) reorder fp32 arithmetic: losses agree to
    1e-5 relative, gradients to 1e-4 of each tensor's largest entry."""
    v0, g0, v1, g1, comp = step_pair
    report = comp.compile_report
    assert report.ok, report.errors
    assert set(report.modules) == {"G_u.backbone.synthesis", "G_s.backbone.synthesis", "G_u.superresolution",
                                   "G_s.superresolution", "lpips", "identity"}
    assert all(compiled.is_compiled(m) for m in comp.compiled_modules())
    torch.testing.assert_close(v1, v0, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, atol=1e-4 * b.abs().max() + 1e-12, rtol=1e-4)


def test_noise_tape_serves_the_eager_draws(gen):
    synthesis = gen.backbone.synthesis
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    tape = compiled.NoiseTape.draw(g1, synthesis, 2, "cpu")
    ws = torch.randn(2, gen.num_ws, gen.config.w_dim)
    with torch.no_grad():
        a = synthesis(ws, noise_mode="random", generator=tape)
        b = synthesis(ws, noise_mode="random", generator=g2)
    assert tape.i == len(tape.tensors) > 0
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compile_failure_falls_back_to_eager_with_the_reason(gen, monkeypatch):
    compiled.clear_process_cache()

    def refuse(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", refuse)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = Unlearner(gen, *_nets(), UnlearnConfig(iterations=1, seed=0, compile="on")).unlearn(
            seeds=[1], render=False)
    ref = Unlearner(gen, *_nets(), UnlearnConfig(iterations=1, seed=0)).unlearn(seeds=[1], render=False)
    assert "no compiler here" in res.timings["compile_error"]
    assert res.timings["plan"]["compile"] is True  # asked for, and the report says why it did not run
    assert [r["total"] for r in res.losses] == [r["total"] for r in ref.losses]


def test_a_backend_failure_at_first_call_falls_back(gen, monkeypatch):
    compiled.clear_process_cache()

    def broken(gm, example_inputs):
        raise RuntimeError("backend exploded")

    broken.__name__ = "broken"
    monkeypatch.setattr(compiled, "DEFAULT_BACKEND", broken)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = Unlearner(gen, *_nets(), UnlearnConfig(iterations=1, seed=0, compile="on")).unlearn(
            seeds=[1], render=False)
    assert "backend exploded" in res.timings["compile_error"]
    assert len(res.losses) == 1 and all(torch.isfinite(torch.tensor(r["total"])) for r in res.losses)
    assert not any(compiled.is_compiled(m) for m in (res.generator.backbone.synthesis, res.generator.superresolution))


def test_the_process_cache_reuses_graphs_across_runs(gen, monkeypatch):
    """A second Unlearner run (fresh generator copies, the same layout) compiles nothing."""
    compiled.clear_process_cache()
    counter = CountingBackend()
    monkeypatch.setattr(compiled, "DEFAULT_BACKEND", counter)
    cfg = UnlearnConfig(iterations=2, seed=0, compile="on", noise_mode="const")
    first = Unlearner(gen, *_nets(), cfg).unlearn(seeds=[1], render=False)
    built = counter.graphs
    assert built >= 6 and first.timings["compile"]["reused_from_process_cache"] == []
    second = Unlearner(gen, *_nets(), cfg).unlearn(seeds=[2], render=False)
    assert counter.graphs == built, "the second run recompiled"
    assert sorted(second.timings["compile"]["reused_from_process_cache"]) == sorted(second.timings["compile"]["modules"])
    assert first.timings["compile_s"] >= 0 and second.timings["compile_s"] >= 0
    # the returned generator is a plain module again (checkpoints, renders, deep copies)
    assert not compiled.is_compiled(second.generator.backbone.synthesis)


def test_deep_copy_of_a_compiled_module_binds_the_copy(gen):
    import copy

    sr = copy.deepcopy(gen.superresolution)
    report = compiled.CompileReport(backend=CountingBackend())
    compiled.install(sr, "sr", report, key=("copy",))
    twin = copy.deepcopy(sr)
    assert twin.forward.module is twin and twin.forward.fn is sr.forward.fn


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_gpu_compiled_step_composes_with_capture_and_matches_eager(mode):
    """On CUDA with Inductor: "default" compiles inside the engine's CUDA-graph capture of the
    whole step; "reduce-overhead" replaces that capture by Inductor's own graphs. Constant noise
    and the run seed make both runs draw the same numbers; the losses agree to bf16 accuracy
    (Inductor's fused bf16 kernels round differently from eager's: 2e-2 relative)."""
    compiled.clear_process_cache()
    gen = build_generator("tiny", seed=0, device="cuda")
    runs = {}
    for comp in ("off", "on"):
        idl, lp = IdentityLoss(SmallFaceNet()).cuda(), LPIPS.random(0).cuda()
        cfg = UnlearnConfig(iterations=6, seed=0, noise_mode="const", compile=comp, compile_mode=mode)
        runs[comp] = Unlearner(gen, idl, lp, cfg).unlearn(seeds=[1], render=False)
    t = runs["on"].timings
    assert t["compile_error"] is None, t["compile_error"]
    assert t["compile"]["backend"] == "inductor" and len(t["compile"]["modules"]) == 6
    if mode == "default":
        assert t["cuda_graph"] is True and t.get("graph_error") is None  # captured with compiled kernels inside
    else:
        assert t["inductor_graphs"] is True and t["cuda_graph"] is False
    a = torch.tensor([r["total"] for r in runs["on"].losses])
    b = torch.tensor([r["total"] for r in runs["off"].losses])
    torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-3)
    assert t["compile_s"] > 0


def test_a_compiled_backbone_tapes_generator_noise_itself(gen):
    """Callers outside the engine (evaluation, renders) pass a torch.Generator: the compiled backbone
    draws it onto a tape first, so the pass is one graph and its numbers are the eager pass's."""
    import copy

    from torch._dynamo.utils import counters

    synthesis = copy.deepcopy(gen.backbone.synthesis)
    counter = CountingBackend()
    counters.clear()
    compiled.install(synthesis, "synthesis", compiled.CompileReport(backend=counter), key=("tape",))
    ws = torch.randn(2, gen.num_ws, gen.config.w_dim)
    with torch.no_grad():
        got = synthesis(ws, noise_mode="random", generator=torch.Generator().manual_seed(4))
        want = type(synthesis).forward(synthesis, ws, noise_mode="random", generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert counter.graphs == 1 and not dict(counters["graph_break"])
