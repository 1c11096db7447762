"""GPU-only checks of the fast unlearning path: the fused renderer inside the step, and the
CUDA-graph-captured session. Skipped (with the reason) where no CUDA device exists."""
import pytest
import torch

from guide_fast.eg3d.generator import build_generator
from guide_fast.identity import IdentityLoss, build_backbone
from guide_fast.perceptual import LPIPS
from guide_fast.unlearn.config import UnlearnConfig
from guide_fast.unlearn.engine import Unlearner, latents_from_seeds
from guide_fast.unlearn.steps import FastStep, sample_draws
from guide_fast.unlearn.targets import target_latent

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def parts():
    dev = torch.device("cuda")
    gen = build_generator("tiny", seed=0, device=dev)
    return gen, IdentityLoss(build_backbone("ir_se50", seed=0)).to(dev), LPIPS.random(0).to(dev)


def _step(gen, nets, cfg, w_u, renderer, precision="fp32"):
    g_s = gen.copy().set_renderer(renderer).train().requires_grad_(False)
    g_u = gen.copy().set_renderer(renderer).train().requires_grad_(False)
    for _, p in g_u.trainable_synthesis_parameters():
        p.requires_grad_(True)
    w_t = target_latent(w_u, g_s.w_avg, cfg.target, cfg.target_distance)
    return FastStep(g_u, g_s, *nets, cfg, w_u, w_t, precision=precision)


def test_fused_renderer_inside_the_step_matches_the_reference_renderer(parts):
    gen, *nets = parts
    cfg = UnlearnConfig(iterations=1, noise_mode="const")
    w_u = latents_from_seeds(gen, [3, 4])
    ref = _step(gen, nets, cfg, w_u, "reference")
    fused = _step(gen, nets, cfg, w_u, "triton")
    g = torch.Generator(device="cuda").manual_seed(0)
    draws = sample_draws(cfg, ref.layout, gen.config.z_dim, "cuda", g, render=(ref.rays, gen.render_options))
    e_ref = ref.losses(draws)
    e_fused = fused.losses(draws)
    torch.testing.assert_close(e_fused, e_ref, rtol=2e-3, atol=1e-4)
    e_ref.sum().backward()
    e_fused.sum().backward()
    for (name, a), (_, b) in zip(ref.g_u.named_parameters(), fused.g_u.named_parameters()):
        if a.grad is not None:
            scale = a.grad.abs().max().clamp_min(1e-8)
            assert ((a.grad - b.grad).abs().max() / scale) < 2e-2, name


def test_bf16_fast_step_stays_close_to_fp32(parts):
    gen, *nets = parts
    cfg = UnlearnConfig(iterations=1, noise_mode="const")
    w_u = latents_from_seeds(gen, [5])
    s32 = _step(gen, nets, cfg, w_u, "triton", "fp32")
    s16 = _step(gen, nets, cfg, w_u, "triton", "bf16")
    g = torch.Generator(device="cuda").manual_seed(1)
    draws = sample_draws(cfg, s32.layout, gen.config.z_dim, "cuda", g, render=(s32.rays, gen.render_options))
    with torch.no_grad():
        a, b = s32.losses(draws), s16.losses(draws)
    assert torch.isfinite(b).all()
    assert ((a - b).abs() / a.abs().clamp_min(1e-3)).max() < 0.1


def test_graph_captured_session_runs_learns_and_logs_every_step(parts):
    gen, id_loss, lpips = parts
    cfg = UnlearnConfig(iterations=12, lr=1e-3, log_every=4, seed=0, cuda_graph=True)
    session = Unlearner(gen, id_loss, lpips, cfg).prepare(seeds=[9])
    assert session.use_graph and session.renderer == "triton" and session.precision == "bf16"
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
