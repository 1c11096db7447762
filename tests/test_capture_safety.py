"""The fast step must be capturable in a CUDA graph: no host synchronisation (.item(), bool(),
int() of a tensor), no data-dependent output shapes, no tensors built from host data (a copy
from host memory cannot be captured). Checked on the CPU by recording every aten op of one whole
step (draws, forward, backward, Adam, loss logging) under a dispatch mode, so the check runs in
CI although the graph itself needs a GPU (tests/test_gpu_engine.py)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from guide_fast.eg3d.generator import build_generator
from guide_fast.identity import IdentityLoss
from guide_fast.perceptual import LPIPS
from guide_fast.unlearn.config import UnlearnConfig
from guide_fast.unlearn.engine import Unlearner
from small_nets import SmallFaceNet

aten = torch.ops.aten
# ops that read device data on the host, have data-dependent shapes, or copy host data in
FORBIDDEN = {
    aten._local_scalar_dense.default: "a host read of a tensor value (.item(), bool(), int(), float())",
    aten.nonzero.default: "a data-dependent shape (nonzero)",
    aten.masked_select.default: "a data-dependent shape (masked_select)",
    aten.repeat_interleave.Tensor: "a data-dependent shape (repeat_interleave without output_size)",
    aten.equal.default: "a host read (torch.equal)",
    aten.lift_fresh.default: "a tensor built from host data (torch.tensor(...) / as_tensor of Python numbers)",
}


class CaptureChecker(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.violations = []
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if func in FORBIDDEN:
            self.violations.append(f"{func}: {FORBIDDEN[func]}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("passes", [0, 1])
def test_fast_step_has_no_capture_breaking_ops(passes):
    gen = build_generator("tiny", seed=0)
    cfg = UnlearnConfig(iterations=3, seed=0, identities_per_pass=passes, noise_mode="random")
    session = Unlearner(gen, IdentityLoss(SmallFaceNet()), LPIPS.random(0), cfg).prepare(seeds=[1, 2])
    session.step()  # the first step initialises Adam's state (outside capture on a GPU too)
    # Adam runs with capturable=True on a GPU (asserted below); that mode exists only for device
    # tensors, and CPU Adam reads its step counter on the host, so its step is left out here.
    optimizer_step = session.stepper.optimizer.step
    session.stepper.optimizer.step = lambda *a, **k: None
    checker = CaptureChecker()
    try:
        with checker:
            session._step_and_log()  # exactly what the engine captures
    finally:
        session.stepper.optimizer.step = optimizer_step
    assert checker.ops > 500, "the checker did not see the step"
    assert not checker.violations, "\n".join(sorted(set(checker.violations)))


def test_checker_catches_a_host_sync():
    checker = CaptureChecker()
    with checker:
        x = torch.ones(3)
        bool(x.sum() > 0)
        torch.tensor([1.0, 2.0])
    assert any("host read" in v for v in checker.violations)
    assert any("host data" in v for v in checker.violations)


def test_graph_sessions_use_capturable_adam():
    from guide_fast.unlearn.steps import FastStep

    gen = build_generator("tiny", seed=0)
    cfg = UnlearnConfig(iterations=1, seed=0)
    session = Unlearner(gen, IdentityLoss(SmallFaceNet()), LPIPS.random(0), cfg).prepare(seeds=[1])
    step = session.stepper
    assert isinstance(step, FastStep)
    assert step.optimizer.defaults["capturable"] is False  # CPU: eager, no graph
    g_s, g_u = step.g_s, step.g_u
    capt = FastStep(g_u, g_s, step.id_loss, step.lpips, cfg, step.w_u, step.w_t, capturable=True)
    assert capt.optimizer.defaults["capturable"] is True and capt.optimizer.defaults["foreach"] is True


def test_compiled_step_is_capture_safe(monkeypatch):
    """The compiled step (ExecutionPlan.compile, guide_fast/compiled.py) under the same rules: the
    graphs AOTAutograd hands to Inductor (forward and backward) hold none of the forbidden ops,
    Dynamo does not split the compiled networks (a graph break is where a host sync would hide;
    the backbone noise comes from a tape, not a torch.Generator), and what runs outside the
    graphs passes the dispatch check above."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.utils import counters

    from guide_fast import compiled

    seen = {"graphs": 0, "bad": []}

    def check(gm, example_inputs):
        seen["graphs"] += 1
        seen["bad"] += [f"{n.target}: {FORBIDDEN[n.target]}" for n in gm.graph.nodes if n.target in FORBIDDEN]
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=check, bw_compiler=check)
    compiled.clear_process_cache()
    monkeypatch.setattr(compiled, "DEFAULT_BACKEND", backend)
    counters.clear()
    gen = build_generator("tiny", seed=0)
    cfg = UnlearnConfig(iterations=3, seed=0, noise_mode="random", compile="on")
    session = Unlearner(gen, IdentityLoss(SmallFaceNet()), LPIPS.random(0), cfg).prepare(seeds=[1, 2])
    session.step()  # compiles forward and backward graphs
    assert session.compile_report.ok, session.compile_report.errors
    assert seen["graphs"] >= 8, "the checking backend did not see the compiled graphs"
    assert not seen["bad"], "\n".join(sorted(set(seen["bad"])))
    breaks = dict(counters["graph_break"])
    assert not breaks, f"graph breaks in the compiled networks: {list(breaks)[:3]}"
    optimizer_step = session.stepper.optimizer.step
    session.stepper.optimizer.step = lambda *a, **k: None
    checker = CaptureChecker()
    try:
        with checker:
            session._step_and_log()
    finally:
        session.stepper.optimizer.step = optimizer_step
    assert not checker.violations, "\n".join(sorted(set(checker.violations)))
    compiled.clear_process_cache()
