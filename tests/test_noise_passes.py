"""UnlearnConfig.noise_passes: "shared" (one backbone pass per latent serves the tri-plane MSE and
the image) vs "separate" (the MSE's own backbone passes with independent noise, as the official
code and the reference step run it; docs/guide.md §3.5)."""
import pytest
import torch

from guide_fast.eg3d.generator import build_generator
from guide_fast.identity import IdentityLoss
from guide_fast.perceptual import LPIPS
from guide_fast.unlearn.config import UnlearnConfig
from guide_fast.unlearn.engine import Unlearner
from guide_fast.unlearn.steps import sample_draws
from small_nets import SmallFaceNet


@pytest.fixture(scope="module")
def gen():
    g = build_generator("tiny", seed=0)
    with torch.no_grad():  # EG3D initialises noise strengths to 0: make the noise matter
        for m in g.modules():
            if hasattr(m, "noise_strength"):
                m.noise_strength.fill_(0.3)
    return g


def _session(gen, **cfg):
    c = UnlearnConfig(iterations=2, seed=0, adjacency_samples=1, global_samples=1, **cfg)
    return Unlearner(gen, IdentityLoss(SmallFaceNet()), LPIPS.random(0), c).prepare(seeds=[1, 2])


def _record_backbone(session):
    """Every backbone pass of one step: (generator, batch, output)."""
    calls = []
    for name, g in (("u", session.g_u), ("s", session.g_s)):
        g.backbone.synthesis.register_forward_hook(
            lambda mod, args, out, name=name: calls.append((name, out.shape[0], out.detach().clone())))
    return calls


def _step(session):
    draws = sample_draws(session.config, session.layout, session.g_u.config.z_dim, session.device,
                         streams=session.streams, render=(session.stepper.rays, session.g_u.render_options))
    values, _ = session.stepper.forward_backward(draws)
    return values, [p.grad.clone() for p in session.stepper.params]


@pytest.mark.parametrize("cache", ["on", "off"])
def test_constant_noise_separate_equals_shared(gen, cache):
    """Without random noise the separate MSE passes compute the same tri-planes: same loss and gradients."""
    runs = {}
    for passes in ("shared", "separate"):
        runs[passes] = _step(_session(gen, noise_mode="const", noise_passes=passes, cache_target_planes=cache))
    (v0, g0), (v1, g1) = runs["shared"], runs["separate"]
    torch.testing.assert_close(v1, v0, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max() + 1e-12)


def test_random_noise_separate_runs_the_official_structure(gen):
    """Reference step (per entry): MSE passes P_u, P_s, then the image passes, each with its own
    draw. Separate fast step: batched MSE passes over the n_unlearn entries and image passes over
    all entries, the MSE planes with noise independent of the image's. Shared: image passes only."""
    n, k_adj, k_glob = 2, 1, 1
    n_unlearn, total = n + n * k_adj, n + n * k_adj + n * k_glob

    shared = _session(gen, noise_mode="random", noise_passes="shared")
    calls = _record_backbone(shared)
    _step(shared)
    assert [(who, b) for who, b, _ in calls] == [("u", total), ("s", total)]

    sep = _session(gen, noise_mode="random", noise_passes="separate")
    calls = _record_backbone(sep)
    _step(sep)
    assert [(who, b) for who, b, _ in calls] == [("u", n_unlearn), ("s", n_unlearn), ("u", total), ("s", total)]
    mse_u, img_u = calls[0][2], calls[2][2][:n_unlearn]
    # the same latents and weights; only the noise differs, drawn independently for the two passes
    assert not torch.allclose(mse_u, img_u)

    ref = _session(gen, noise_mode="random", path="reference", renderer="reference", precision="fp32")
    calls = _record_backbone(ref)
    _step(ref)
    # per unlearning entry: MSE u, MSE s, image u, image s; per global entry: image u, image s
    want = []
    for e in range(total):
        want += ([("u", 1), ("s", 1)] if e < n_unlearn else []) + [("u", 1), ("s", 1)]
    assert [(who, b) for who, b, _ in calls] == want
    # as many independent backbone draws per generator as the separate fast step makes
    for who in ("u", "s"):
        assert sum(b for w, b, _ in calls if w == who) == n_unlearn + total


def test_separate_is_finite_and_reported(gen):
    res = Unlearner(gen, IdentityLoss(SmallFaceNet()), LPIPS.random(0),
                    UnlearnConfig(iterations=2, seed=0, noise_passes="separate")).unlearn(seeds=[1], render=False)
    assert res.timings["noise_passes"] == "separate" and len(res.losses) == 2
    assert res.config.noise_passes == "separate"
    from guide_fast.errors import InputError

    with pytest.raises(InputError, match="noise_passes"):
        UnlearnConfig(noise_passes="both")


def test_cached_target_planes_under_random_noise_do_not_depend_on_the_pass(gen):
    """cache_target_planes="on" with random noise freezes one noise draw of P_s(w_t) per identity,
    from that identity's own "target-planes" stream: the same whether it shares a pass or not."""
    planes = {}
    for per in (0, 1):
        s = _session(gen, noise_mode="random", cache_target_planes="on", identities_per_pass=per)
        planes[per] = torch.cat([p.planes_target for p in s.stepper.passes])
    # batched-conv rounding only (another draw differs at the noise's own scale)
    torch.testing.assert_close(planes[1], planes[0], rtol=1e-4, atol=1e-5 * float(planes[0].abs().max()))
    assert not torch.allclose(planes[0][0], planes[0][1])  # two identities, two draws
