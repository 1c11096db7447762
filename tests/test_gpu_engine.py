"""GPU-only checks of the fast unlearning path: the fused renderer inside the step, bf16 gradients
against fp32 (the flash-attention rule of the kernel tests), and the CUDA-graph-captured session
against an eager session step by step on the same draws. Skipped (with the reason) where no
CUDA device exists."""
import dataclasses

import pytest
import torch

from guide_fast.eg3d.generator import build_generator
from guide_fast.identity import IdentityLoss, build_backbone
from guide_fast.perceptual import LPIPS
from guide_fast.plan import ExecutionPlan
from guide_fast.unlearn.config import UnlearnConfig
from guide_fast.unlearn.engine import Unlearner, latents_from_seeds
from guide_fast.unlearn.steps import FastStep, StepDraws, sample_draws
from guide_fast.unlearn.targets import target_latent

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def parts():
    dev = torch.device("cuda")
    gen = build_generator("tiny", seed=0, device=dev)
    return gen, IdentityLoss(build_backbone("ir_se50", seed=0)).to(dev), LPIPS.random(0).to(dev)


def _plan(renderer: str, precision: str) -> ExecutionPlan:
    return ExecutionPlan.resolve("cuda", renderer=renderer, precision=precision, cuda_graph=False)


def _step(generator_pair, gen, nets, cfg, w_u, plan: ExecutionPlan) -> FastStep:
    g_u, g_s = generator_pair(gen, plan)
    w_t = target_latent(w_u, g_s.w_avg, cfg.target, cfg.target_distance)
    return FastStep(g_u, g_s, *nets, cfg, w_u, w_t, plan=plan)


def _draws(step: FastStep, cfg, seed: int) -> StepDraws:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return sample_draws(cfg, step.layout, step.g_u.config.z_dim, "cuda", g,
                        render=(step.rays, step.g_u.render_options))


def _grads(step: FastStep, draws: StepDraws):
    """Entry losses and the gradient of their sum for every trainable parameter."""
    entry = step.losses(draws)
    entry.sum().backward()
    grads = {name: p.grad.detach().float().clone() for name, p in step.g_u.named_parameters()
             if p.grad is not None}
    return entry.detach().float(), grads


def test_fused_renderer_inside_the_step_matches_the_reference_renderer(parts, generator_pair):
    gen, *nets = parts
    cfg = UnlearnConfig(iterations=1, noise_mode="const")
    w_u = latents_from_seeds(gen, [3, 4])
    ref = _step(generator_pair, gen, nets, cfg, w_u, _plan("reference", "fp32"))
    fused = _step(generator_pair, gen, nets, cfg, w_u, _plan("triton", "fp32"))
    draws = _draws(ref, cfg, seed=0)
    e_ref, g_ref = _grads(ref, draws)
    e_fused, g_fused = _grads(fused, draws)
    torch.testing.assert_close(e_fused, e_ref, rtol=2e-3, atol=1e-4)
    assert set(g_ref) == set(g_fused) and len(g_ref) > 10
    for name, a in g_ref.items():
        scale = a.abs().max().clamp_min(1e-8)
        assert ((a - g_fused[name]).abs().max() / scale) < 2e-2, name


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_bf16_fast_step_gradients_follow_the_flash_attention_rule(parts, generator_pair):
    """bf16 fast step (fused renderer) vs the fp32 reference-renderer step, on the same draws:

        max |fast_bf16 - ref32| <= 2 max |torch_bf16 - ref32| + floor

    for the entry losses and the gradients, where torch_bf16 is the same step in plain PyTorch
    under the same bf16 autocast (reference renderer). The rule is applied per weight tensor of
    >= 1024 elements and to all the smaller tensors (biases, styles, noise strengths) together:
    the max over a handful of elements is too noisy for a factor of 2. floor = 1e-5 x scale."""
    gen, *nets = parts
    cfg = UnlearnConfig(iterations=1, noise_mode="const")
    w_u = latents_from_seeds(gen, [5, 6])
    ref32 = _step(generator_pair, gen, nets, cfg, w_u, _plan("reference", "fp32"))
    torch16 = _step(generator_pair, gen, nets, cfg, w_u, _plan("reference", "bf16"))
    fast16 = _step(generator_pair, gen, nets, cfg, w_u, _plan("triton", "bf16"))
    assert fast16.plan.precision == "bf16" and fast16.g_u.renderer_backend == "triton"
    draws = _draws(ref32, cfg, seed=1)
    e32, g32 = _grads(ref32, draws)
    e_t, g_t = _grads(torch16, draws)
    e_f, g_f = _grads(fast16, draws)
    assert torch.isfinite(e_f).all()

    def check(what, ref, torch_half, fast_half):
        floor = 1e-5 * max(ref.abs().max().item(), 1e-3)
        err_t, err_f = _max_err(torch_half, ref), _max_err(fast_half, ref)
        print(f"{what:>60}: fast bf16 {err_f:.3e}, torch bf16 {err_t:.3e}, scale {ref.abs().max().item():.3e}")
        assert err_f <= 2 * err_t + floor, f"{what}: fast bf16 error {err_f:.3e} > 2 x torch bf16's {err_t:.3e}"

    check("entry losses", e32, e_t, e_f)
    assert set(g32) == set(g_t) == set(g_f)
    small = sorted(name for name, g in g32.items() if g.numel() < 1024)
    for name in sorted(set(g32) - set(small)):
        assert torch.isfinite(g_f[name]).all(), name
        check(name, g32[name], g_t[name], g_f[name])
    cat = lambda grads: torch.cat([grads[n].reshape(-1) for n in small])  # noqa: E731
    check(f"{len(small)} small tensors together", cat(g32), cat(g_t), cat(g_f))


def _clone_draws(d: StepDraws) -> StepDraws:
    """A copy of one step's draws (the captured graph overwrites its buffers on every replay);
    the per-identity noise streams are dropped: the test runs with constant backbone noise."""
    def clone(x):
        if x is None:
            return None
        if isinstance(x, dict):
            return {k: v.clone() for k, v in x.items()}
        return x.clone()

    return StepDraws(clone(d.yaw), clone(d.adj_z), clone(d.adj_alpha), clone(d.glob_z), clone(d.render_u),
                     clone(d.render_s))


def test_graph_captured_run_equals_an_eager_run_step_by_step(parts):
    """The same run twice, with and without CUDA-graph capture, on the same draws (those of the
    captured run, recorded after each step and fed to the eager run): every step's losses agree
    and the weights end where the eager run's do. The default fast plan (bf16, fused renderer)."""
    gen, id_loss, lpips = parts
    steps = 7  # 2 eager warm-up steps, the capture, then replays
    cfg = UnlearnConfig(iterations=steps, lr=1e-3, log_every=1, seed=0, noise_mode="const", warmup_steps=2)
    graph_cfg, eager_cfg = cfg, dataclasses.replace(cfg, cuda_graph=False)
    captured = Unlearner(gen, id_loss, lpips, graph_cfg).prepare(seeds=[9, 10])
    eager = Unlearner(gen, id_loss, lpips, eager_cfg).prepare(seeds=[9, 10])
    assert captured.use_graph and not eager.use_graph
    assert captured.plan.with_(cuda_graph=False) == eager.plan and eager.plan.precision == "bf16"
    w0 = [p.detach().clone() for _, p in eager.g_u.trainable_synthesis_parameters()]

    # graph run: draws from the default CUDA generator (graph-safe), their values kept per step
    live = {}

    def graph_draws():
        live["draws"] = sample_draws(captured.config, captured.layout, gen.config.z_dim, captured.device,
                                     render=(captured.stepper.rays, gen.render_options))
        return live["draws"]

    captured._draws = graph_draws
    recorded = []
    for _ in range(steps):
        captured.step()
        captured.synchronize()
        recorded.append(_clone_draws(live["draws"]))
    assert captured.graph is not None, "the step was not captured"
    assert not torch.equal(recorded[-1].yaw, recorded[-2].yaw), "replays must draw fresh random numbers"

    feed = iter(recorded)
    eager._draws = lambda: next(feed)
    for _ in range(steps):
        eager.step()
    eager.synchronize()
    lg, le = captured.read_losses(), eager.read_losses()
    assert [r["step"] for r in lg] == [r["step"] for r in le] == list(range(1, steps + 1))
    for a, b in zip(lg, le):
        for key in ("total", "local", "adjacency", "global"):
            assert a[key] == pytest.approx(b[key], rel=2e-3, abs=1e-5), (a["step"], key, a[key], b[key])
    moved = diff = 0.0
    for p0, (_, pg), (_, pe) in zip(w0, captured.g_u.trainable_synthesis_parameters(),
                                    eager.g_u.trainable_synthesis_parameters()):
        moved += float((pe - p0).double().square().sum())
        diff += float((pg - pe).double().square().sum())
    assert moved > 0, "the eager run must move the weights"
    # Adam turns rounding-level gradient differences of near-zero entries into +-lr steps, so the
    # weights are compared in norm: the two runs differ by under 5% of how far they moved
    assert diff ** 0.5 <= 0.05 * moved ** 0.5, (diff ** 0.5, moved ** 0.5)
    result = captured.finish(render=False)
    assert result.timings["cuda_graph"] is True and result.timings["plan"]["cuda_graph"] is True
    assert result.generator.renderer_backend == gen.renderer_backend


def test_graph_captured_session_runs_learns_and_logs_every_step(parts):
    gen, id_loss, lpips = parts
    cfg = UnlearnConfig(iterations=12, lr=1e-3, log_every=4, seed=0, cuda_graph=True)
    session = Unlearner(gen, id_loss, lpips, cfg).prepare(seeds=[9])
    assert session.use_graph and session.plan.renderer == "triton" and session.plan.precision == "bf16"
    snapshots = []
    for i in range(cfg.iterations):
        session.step()
        if i in (5, 11):
            snapshots.append([p.detach().clone() for _, p in session.g_u.trainable_synthesis_parameters()])
    session.synchronize()
    assert session.graph is not None, "the step was not captured"
    losses = session.read_losses()
    assert [r["step"] for r in losses] == list(range(1, 13))
    assert all(torch.isfinite(torch.tensor([r["total"] for r in losses])))
    assert len({round(r["total"], 6) for r in losses}) > 6, "replays must draw fresh random numbers"
    moved = sum(float((a - b).abs().sum()) for a, b in zip(*snapshots))
    assert moved > 0, "graph replays must keep updating the weights"
    result = session.finish(render=False)
    assert result.generator.renderer_backend == gen.renderer_backend


def test_many_identities_in_passes_under_a_graph(parts):
    gen, id_loss, lpips = parts
    cfg = UnlearnConfig(iterations=5, identities_per_pass=2, seed=0)
    result = Unlearner(gen, id_loss, lpips, cfg).unlearn(seeds=[1, 2, 3, 4, 5], render=False)
    assert len(result.identity_losses) == 5 and len(result.identity_losses[0]) == 5
    assert result.timings["cuda_graph"] is True
