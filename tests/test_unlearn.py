"""The GUIDE engine on the tiny preset (CPU): formulas, loss terms, fast == reference, batching,
behaviour of a short run, interruption and bad inputs (issue: the unlearning engine)."""
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from small_nets import SmallFaceNet  # noqa: E402
from guide_fast.eg3d.generator import build_generator
from guide_fast.errors import InputError
from guide_fast.identity import IdentityLoss
from guide_fast.perceptual import LPIPS
from guide_fast.plan import ExecutionPlan
from guide_fast.render import make_render_draws
from guide_fast.unlearn.config import UnlearnConfig
from guide_fast.unlearn.engine import Unlearner, UnlearnError, latents_from_seeds
from guide_fast.unlearn.steps import FastStep, ReferenceStep, sample_draws, step_cameras
from guide_fast.unlearn.targets import adjacency_offsets, target_latent


@pytest.fixture(scope="module")
def nets():
    return IdentityLoss(SmallFaceNet()).eval(), LPIPS.random(0).eval()


@pytest.fixture(scope="module")
def gen():
    g = build_generator("tiny", seed=0)
    with torch.no_grad():  # noise strengths are zero at init: make the noise matter
        for name, p in g.named_parameters():
            if name.endswith("noise_strength"):
                p.fill_(0.1)
    return g


def _cfg(**kw):
    base = dict(iterations=1, noise_mode="const", path="fast", seed=0)
    base.update(kw)
    return UnlearnConfig(**base)


def _session_parts(generator_pair, gen, nets, cfg, w_u, step_cls):
    id_loss, lpips = nets
    g_u, g_s = generator_pair(gen)
    w_t = target_latent(w_u, g_s.w_avg, cfg.target, cfg.target_distance)
    return step_cls(g_u, g_s, id_loss, lpips, cfg, w_u, w_t), g_u, g_s, w_t


def _draws(step, cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    return sample_draws(cfg, step.layout, step.g_u.config.z_dim, "cpu", g,
                        render=(step.rays, step.g_u.render_options))


def assert_same_adam_update(name, a, b, grad_rtol=3e-4):
    """Two runs of one step on the same draws give the same update.

    The gradients must agree to `grad_rtol` of the tensor's largest gradient (fp32 summation
    order differs between batched and per-term evaluation; scalar noise strengths sum a whole
    feature map and show the largest relative rounding, ~1e-4). The Adam step itself is compared
    only where the gradient is well above that rounding: Adam's first step is lr * g / (|g| + eps),
    so a gradient at rounding level (|g| ~ 1e-7 * max, larger than eps) can flip sign and move
    the weight by up to 2 * lr in either run; that is rounding, not a different step."""
    ga, gb = a.grad, b.grad
    assert (ga is None) == (gb is None), f"{name}: gradient in one run only"
    if gb is None:
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
        return
    scale = float(gb.abs().max())
    torch.testing.assert_close(ga, gb, rtol=0, atol=grad_rtol * scale + 1e-12, msg=lambda m: f"{name} grad: {m}")
    stable = gb.abs() > 30 * grad_rtol * scale
    # one Adam step moves each weight by about lr*sign(grad): compare at lr/10
    torch.testing.assert_close(a[stable], b[stable], rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_ufo_target_formula():
    torch.manual_seed(0)
    w_u = torch.randn(3, 8, 16)
    w_avg = torch.randn(16)
    w_t = target_latent(w_u, w_avg, "extra", 30.0)
    for i in range(3):
        d = w_u[i] - w_avg
        want = w_avg - 30.0 * d / torch.sqrt((d ** 2).sum())  # Frobenius over all layers (docs/guide.md §3.4)
        torch.testing.assert_close(w_t[i], want)
        # unlearn.py's own order, w_avg - w_id / w_id.norm(p=2) * target_d, to the last bit
        assert torch.equal(w_t[i], w_avg - d / d.norm(p=2) * 30.0)
        assert torch.linalg.norm(w_t[i] - w_avg) == pytest.approx(30.0, rel=1e-5)
    torch.testing.assert_close(target_latent(w_u, w_avg, "average"), w_avg.expand(3, 8, 16))
    with pytest.raises(InputError, match="target mode"):
        target_latent(w_u, w_avg, "opposite")


def test_adjacency_offsets_formula():
    torch.manual_seed(1)
    w_u, w_r, alpha = torch.randn(2, 4, 6), torch.randn(2, 3, 4, 6), torch.rand(2, 3) * 15
    delta = adjacency_offsets(w_r, w_u, alpha)
    for i in range(2):
        for k in range(3):
            d = w_r[i, k] - w_u[i]
            torch.testing.assert_close(delta[i, k], alpha[i, k] * d / d.norm())
            assert delta[i, k].norm() == pytest.approx(float(alpha[i, k]), rel=1e-5)


def test_each_loss_term_equals_a_direct_computation(gen, nets, generator_pair):
    id_loss, lpips = nets
    cfg = _cfg()
    w_u = latents_from_seeds(gen, [3])
    step, g_u, g_s, w_t = _session_parts(generator_pair, gen, nets, cfg, w_u, FastStep)
    draws = _draws(step, cfg)
    with torch.no_grad():
        entry = step.losses(draws)
    assert entry.shape == (5,)  # 1 local + 2 adjacency + 2 global
    c = step_cameras(cfg, draws.yaw)
    w_r_adj = g_s.mapping(draws.adj_z[0], step.c_cond.expand(2, -1))
    w_r_glob = g_s.mapping(draws.glob_z[0], step.c_cond.expand(2, -1))
    pairs = [(w_u[0], w_t[0])]
    for k in range(2):
        d = w_r_adj[k] - w_u[0]
        delta = draws.adj_alpha[0, k] * d / d.norm()
        pairs.append((w_u[0] + delta, w_t[0] + delta))
    pairs += [(w_r_glob[k], w_r_glob[k]) for k in range(2)]
    rays = step.rays
    with torch.no_grad():
        for e, (wu, ws) in enumerate(pairs):
            sl = lambda d: {"stratified": d["stratified"][e:e + 1], "importance": d["importance"][e * rays:(e + 1) * rays]}  # noqa: E731
            img_u = g_u.synthesis(wu[None], c, noise_mode="const", render_draws=sl(draws.render_u))["image"]
            img_s = g_s.synthesis(ws[None], c, noise_mode="const", render_draws=sl(draws.render_s))["image"]
            want = lpips(img_u, img_s).mean()
            if e < 3:  # local and adjacency: 0.01 MSE(planes) + LPIPS + 0.1 ID (docs/guide.md §3.5)
                mse = F.mse_loss(g_u.planes(wu[None], "const"), g_s.planes(ws[None], "const"))
                want = 0.01 * mse + want + 0.1 * id_loss(img_u, img_s)
            assert entry[e].item() == pytest.approx(want.item(), rel=1e-4, abs=1e-6), f"entry {e}"


def test_adjacency_and_global_terms_are_summed_not_averaged(gen, nets, generator_pair):
    cfg = _cfg()
    w_u = latents_from_seeds(gen, [3])
    step, *_ = _session_parts(generator_pair, gen, nets, cfg, w_u, FastStep)
    with torch.no_grad():
        entry = step.losses(_draws(step, cfg))
    values, per_id = step.summarize(entry)
    total, local, adj, glob = values.tolist()
    assert local == pytest.approx(entry[0].item())
    assert adj == pytest.approx(entry[1].item() + entry[2].item())
    assert glob == pytest.approx(entry[3].item() + entry[4].item())
    assert total == pytest.approx(local + adj + glob)
    assert per_id.tolist() == pytest.approx([total])
    # weights: doubling adjacency_weight doubles the adjacency block only
    cfg2 = _cfg(adjacency_weight=2.0, global_weight=0.5)
    step2, *_ = _session_parts(generator_pair, gen, nets, cfg2, w_u, FastStep)
    with torch.no_grad():
        v2, _ = step2.summarize(step2.losses(_draws(step2, cfg2)))
    assert v2[2].item() == pytest.approx(2 * adj, rel=1e-5)
    assert v2[3].item() == pytest.approx(0.5 * glob, rel=1e-5)
    assert v2[1].item() == pytest.approx(local, rel=1e-5)


def test_fast_step_equals_reference_step_on_the_same_draws(gen, nets, generator_pair):
    cfg = _cfg()
    w_u = latents_from_seeds(gen, [5])
    fast, g_fast, _, _ = _session_parts(generator_pair, gen, nets, cfg, w_u, FastStep)
    ref, g_ref, _, _ = _session_parts(generator_pair, gen, nets, cfg, w_u, ReferenceStep)
    draws = _draws(fast, cfg, seed=3)
    vf, _ = fast.step(draws)
    vr, _ = ref.step(draws)
    torch.testing.assert_close(vf, vr, rtol=1e-4, atol=1e-6)
    before = dict(gen.named_parameters())
    changed = 0
    for (name, pf), (_, pr) in zip(g_fast.named_parameters(), g_ref.named_parameters()):
        if name.startswith("backbone.synthesis."):
            assert_same_adam_update(name, pf, pr)
            changed += int(not torch.equal(pf, before[name]))
        else:
            assert torch.equal(pf, before[name]) and torch.equal(pr, before[name]), f"{name} must stay frozen"
    assert changed > 10


def test_batched_identities_equal_the_single_identity_path(gen, nets, generator_pair):
    cfg = _cfg()
    w2 = latents_from_seeds(gen, [11, 12])
    both, g_both, _, _ = _session_parts(generator_pair, gen, nets, cfg, w2, FastStep)
    d2 = _draws(both, cfg, seed=4)
    entry2 = both.losses(d2)
    entry2.sum().backward()
    lay = both.layout
    rays = both.rays
    for i in range(2):
        one, g_one, _, _ = _session_parts(generator_pair, gen, nets, cfg, w2[i:i + 1], FastStep)
        # the same draws, restricted to identity i (layout: local, adjacency i-major, global i-major)
        idx = [i] + [lay.n_local + i * 2 + k for k in range(2)] + [lay.n_local + lay.n_adj + i * 2 + k for k in range(2)]
        pick = lambda d: {"stratified": d["stratified"][idx],  # noqa: E731
                          "importance": torch.cat([d["importance"][j * rays:(j + 1) * rays] for j in idx])}
        from guide_fast.unlearn.steps import StepDraws

        d1 = StepDraws(d2.yaw[i:i + 1], d2.adj_z[i:i + 1], d2.adj_alpha[i:i + 1], d2.glob_z[i:i + 1],
                       pick(d2.render_u), pick(d2.render_s))
        entry1 = one.losses(d1)
        torch.testing.assert_close(entry1, entry2[idx], rtol=1e-4, atol=1e-6)
        _, per_id = one.summarize(entry1)
        _, per_id2 = both.summarize(entry2.detach())
        assert per_id.item() == pytest.approx(per_id2[i].item(), rel=1e-4)


def test_short_run_forgets_locally_and_preserves_elsewhere(gen, nets):
    cfg = UnlearnConfig(iterations=10, lr=1e-3, noise_mode="const", seed=0, eval_views=3)
    id_loss, lpips = nets
    result = Unlearner(gen, id_loss, lpips, cfg).unlearn(seeds=[21])
    local = [r["local"] for r in result.losses]
    assert len(local) == 10 and all(math.isfinite(v) for v in local)
    assert sum(local[-3:]) / 3 < sum(local[:3]) / 3, f"local loss did not fall: {local}"
    g_u, g_s = result.generator, result.source
    rays = g_s.neural_rendering_resolution ** 2
    draws = make_render_draws(1, rays, g_s.render_options, generator=torch.Generator().manual_seed(9))
    c = step_cameras(cfg, torch.zeros(1))
    img = lambda g, w: g.synthesis(w, c, noise_mode="const", render_draws=draws)["image"]  # noqa: E731
    dist = lambda a, b: (a - b).abs().mean().item()  # noqa: E731
    with torch.no_grad():
        w_u, w_t = result.w_source, result.w_target
        assert dist(img(g_u, w_u), img(g_s, w_t)) < dist(img(g_s, w_u), img(g_s, w_t)), "G_u(w_u) must move toward G_s(w_t)"
        moved = dist(img(g_u, w_u), img(g_s, w_u))
        held = latents_from_seeds(gen, [101, 102, 103, 104, 105])
        drift = [dist(img(g_u, held[j:j + 1]), img(g_s, held[j:j + 1])) for j in range(5)]
        spread = dist(img(g_s, held[0:1]), img(g_s, held[1:2]))
    # Stated bound: every held-out identity moves less than half as far as the unlearned one.
    # (With the structured tiny initialisation, docs/guide.md §3.5's preservation terms run on
    # random loss networks, and ten steps at 10x the paper's lr move held-out identities by
    # 0.35-0.45 of the unlearned one's change, measured: that is the model's and the random
    # networks' limit, not a bound on GUIDE; the old transparent init hid it. An identity-
    # independent change would move them all alike, ratio ~1.)
    assert max(drift) < 0.5 * moved, (drift, moved, spread)
    assert result.renders["before"].shape == (1, 3, 3, 64, 64)
    delta = result.delta()
    assert delta and all(k.startswith("backbone.synthesis.") for k in delta)


def test_interrupted_run_leaves_no_partial_output(gen, nets, tmp_path):
    id_loss, lpips = nets
    unl = Unlearner(gen, id_loss, lpips, _cfg(iterations=4))

    def interrupt(step, session):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        unl.unlearn(seeds=[1], callback=interrupt)
    result = unl.unlearn(seeds=[1], render=True)
    import guide_fast.checkpoints as ck

    def broken(*a, **k):
        raise OSError("disk full")

    orig = ck.save_delta
    ck.save_delta = broken
    from guide_fast.errors import GuideFastError

    try:  # a failed write is one GuideFastError naming the folder (disk full, ...), not a raw OSError
        with pytest.raises(GuideFastError, match="disk full"):
            result.save(tmp_path / "run")
    finally:
        ck.save_delta = orig
    # no files, no staging folder, and not even the output folder the save created
    assert list(tmp_path.iterdir()) == [], "an interrupted save must leave the file system as it was"
    result.save(tmp_path / "run")
    assert {p.name for p in (tmp_path / "run").iterdir()} == {
        "generator.safetensors", "delta.safetensors", "latents.safetensors", "grid.png", "losses.png", "identity.png",
        "report.json"}


class NaNLoss(nn.Module):
    def forward(self, a, b, reduction="mean"):
        out = (a - b).flatten(1).mean(1) * float("nan")
        return out.mean() if reduction == "mean" else out


def test_bad_inputs_and_non_finite_loss(gen, nets):
    id_loss, lpips = nets
    unl = Unlearner(gen, id_loss, lpips, _cfg())
    with pytest.raises(InputError, match="expected"):
        unl.unlearn(latents=torch.randn(1, 3, 64))
    with pytest.raises(InputError, match="N = 0"):
        unl.unlearn(latents=torch.randn(0, gen.num_ws, 64))
    with pytest.raises(InputError, match="N = 0"):
        unl.unlearn(seeds=[])
    with pytest.raises(InputError, match="exactly one"):
        unl.unlearn(seeds=[1], latents=torch.randn(1, gen.num_ws, 64))
    bad = torch.randn(1, gen.num_ws, 64)
    bad[0, 0, 0] = float("inf")
    with pytest.raises(InputError, match="non-finite"):
        unl.unlearn(latents=bad)
    with pytest.raises(InputError, match="target mode"):
        UnlearnConfig(target="opposite")
    with pytest.raises(InputError, match="bf16"):
        Unlearner(gen, id_loss, lpips, _cfg(precision="bf16")).unlearn(seeds=[1])
    with pytest.raises(UnlearnError, match="non-finite at step 1"):
        Unlearner(gen, NaNLoss(), lpips, _cfg(iterations=2)).unlearn(seeds=[1], render=False)


def test_cli_unlearn_writes_checkpoint_delta_report_and_grid(tmp_path, gen):
    from guide_fast.checkpoints import load_delta, load_generator, save_generator
    from guide_fast.cli import main

    gpath = save_generator(gen, tmp_path / "tiny.safetensors")
    torch.save(latents_from_seeds(gen, [4]), tmp_path / "w.pt")
    out = tmp_path / "run"
    rc = main(["unlearn", "--generator", str(gpath), "--random-nets", "--latent", str(tmp_path / "w.pt"),
               "--out", str(out), "--iters", "2", "--no-progress", "--reference"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["iterations"] == 2 and report["config"]["path"] == "reference"
    assert len(report["losses"]) == 2 and report["random_weights"] is True
    assert report["environment"]["torch"] == torch.__version__
    assert report["timings"]["loop_s"] > 0
    g_u = load_generator(out / "generator.safetensors")
    delta, meta = load_delta(out / "delta.safetensors")
    assert set(delta) == {k for k, _ in g_u.named_parameters() if k.startswith("backbone.synthesis.")}
    # the delta names its source: the sha256 of the generator file the run loaded (a freshly built
    # generator has none of its own, so the file's digest is the source's identity)
    assert gen.source_sha256 is None
    file_digest = hashlib.sha256(Path(gpath).read_bytes()).hexdigest()
    assert load_generator(gpath).source_sha256 == file_digest
    assert meta["source_sha256"] == file_digest == report["source_sha256"]
    assert main(["unlearn", "--generator", str(gpath), "--seed", "1", "--out", str(tmp_path / "x"),
                 "--iters", "1"]) == 2  # no loss networks given -> clear error, exit 2
    assert main(["unlearn", "--generator", str(tmp_path / "missing.pkl"), "--random-nets", "--seed", "1",
                 "--out", str(tmp_path / "y"), "--iters", "1"]) == 2
    # the fast path's operator switches reach the engine and the report; the reference loop refuses them
    assert main(["unlearn", "--generator", str(gpath), "--random-nets", "--seed", "1", "--out", str(tmp_path / "f"),
                 "--iters", "1", "--no-progress", "--channels-last", "--upsample-conv", "folded"]) == 0
    fast_report = json.loads((tmp_path / "f" / "report.json").read_text())
    assert fast_report["config"]["memory_format"] == "channels_last"
    assert fast_report["timings"]["upsample_conv"] == "folded"
    assert main(["unlearn", "--generator", str(gpath), "--random-nets", "--seed", "1", "--out", str(tmp_path / "r"),
                 "--iters", "1", "--no-progress", "--reference", "--upsample-conv", "folded"]) == 2
    assert not (tmp_path / "r").exists()


def test_identities_split_into_passes_give_the_same_update(gen, nets, generator_pair):
    """identities_per_pass bounds memory: gradient accumulation over passes == one batched pass."""
    cfg = _cfg()
    w2 = latents_from_seeds(gen, [31, 32, 33])
    id_loss, lpips = nets
    steps = []
    for per in (0, 2):
        g_u, g_s = generator_pair(gen)
        w_t = target_latent(w2, g_s.w_avg, cfg.target, cfg.target_distance)
        steps.append((FastStep(g_u, g_s, id_loss, lpips, cfg, w2, w_t, identities_per_pass=per), g_u))
    assert len(steps[1][0].passes) == 2
    d = _draws(steps[0][0], cfg, seed=2)
    v0, p0 = steps[0][0].step(d)
    v1, p1 = steps[1][0].step(d)
    # at step 1 G_u == G_s, so the global LPIPS terms are ~0 up to batched-conv rounding: atol
    torch.testing.assert_close(v0, v1, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(p0, p1, rtol=1e-4, atol=1e-5)
    for (name, a), (_, b) in zip(steps[0][1].named_parameters(), steps[1][1].named_parameters()):
        assert_same_adam_update(name, a, b)


def test_streamed_render_draws_are_made_per_pass_with_the_same_values(gen, nets):
    """With identity streams the renderer's uniforms (~63 MB per identity at FFHQ settings) are
    drawn per pass, for that pass's identities only; the values are those of one pass over all:
    two passes of one identity give the losses and gradients of one pass of two."""
    id_loss, lpips = nets
    runs = []
    for per in (0, 1):
        cfg = _cfg(noise_mode="random", identities_per_pass=per)
        session = Unlearner(gen, id_loss, lpips, cfg).prepare(seeds=[31, 32])
        assert len(session.stepper.passes) == (1 if per == 0 else 2)
        draws = session._draws()
        assert draws.render_u is None and draws.render_spec is not None  # not drawn for the shard
        part = session.stepper.passes[-1]
        sub = session.stepper._slice(draws, part, whole=per == 0)
        assert sub.render_u["stratified"].shape[0] == part.layout.total
        session = Unlearner(gen, id_loss, lpips, cfg).prepare(seeds=[31, 32])  # fresh streams
        values, per_id = session.stepper.forward_backward(session._draws())
        runs.append((values, per_id, [p.grad.clone() for p in session.stepper.params]))
    (v0, i0, g0), (v1, i1, g1) = runs
    torch.testing.assert_close(v1, v0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(i1, i0, rtol=1e-5, atol=1e-6)
    # batched-conv summation order moves single sums (noise strengths) by ~1e-3 relative: the
    # gradient is compared as one vector (different draws would differ at O(1))
    flat0, flat1 = torch.cat([g.flatten() for g in g0]), torch.cat([g.flatten() for g in g1])
    assert float((flat1 - flat0).norm()) <= 1e-4 * float(flat0.norm()), float((flat1 - flat0).norm() / flat0.norm())


@pytest.mark.parametrize("operators", [dict(upsample_conv="folded"), dict(skip_path="triton")],
                         ids=["folded-up-convs", "skip-path-kernel"])
def test_fast_path_operator_choices_give_the_same_step(gen, nets, generator_pair, operators):
    """The fast path's folded up-convs, its skip-path kernel (Triton; the interpreter here) and
    channels_last activations change no maths: one step with them equals the plain fast step on
    the same draws (fp32, CPU)."""
    cfg = _cfg()
    w_u = latents_from_seeds(gen, [7])
    plain, g_plain, _, _ = _session_parts(generator_pair, gen, nets, cfg, w_u, FastStep)
    id_loss, lpips = nets
    plan = ExecutionPlan.resolve("cpu", memory_format="channels_last", **operators)
    g_u, g_s = generator_pair(gen, plan)
    assert g_u.renderer_backend == "reference"
    assert all(g.operators()[k] == v for g in (g_u, g_s) for k, v in operators.items())
    assert g_u.backbone.synthesis.b8.conv0.weight.is_contiguous(memory_format=torch.channels_last)
    w_t = target_latent(w_u, g_s.w_avg, cfg.target, cfg.target_distance)
    fast = FastStep(g_u, g_s, id_loss, lpips, cfg, w_u, w_t, plan=plan)
    d = _draws(plain, cfg, seed=5)
    e0, e1 = plain.losses(d), fast.losses(d)
    torch.testing.assert_close(e1, e0, rtol=1e-5, atol=1e-6)
    e0.sum().backward()
    e1.sum().backward()
    # gradients, not post-Adam weights: Adam's lr*g/(|g|+eps) turns the summation-order rounding
    # of near-zero gradient entries into O(lr) weight differences
    compared = 0
    for (name, a), (_, b) in zip(g_plain.named_parameters(), g_u.named_parameters()):
        if a.grad is None:
            assert b.grad is None, name
            continue
        scale = a.grad.abs().max().clamp_min(1e-12)
        assert ((b.grad - a.grad).abs().max() / scale) < 5e-3, name
        compared += 1
    assert compared > 10


def test_session_with_channels_last_hands_back_a_plain_generator(gen, nets, tmp_path):
    id_loss, lpips = nets
    cfg = _cfg(iterations=2, memory_format="channels_last", upsample_conv="folded")
    res = Unlearner(gen, id_loss, lpips, cfg).unlearn(seeds=[3], render=False)
    assert res.timings["upsample_conv"] == "folded" and res.timings["memory_format"] == "channels_last"
    assert res.generator.upsample_conv == "reference"  # back to the source generator's choice
    assert all(p.is_contiguous() for p in res.generator.parameters())
    res.save(tmp_path / "run")
    assert (tmp_path / "run" / "delta.safetensors").is_file()
    with pytest.raises(InputError, match="memory_format"):
        _cfg(memory_format="nhwc")
    with pytest.raises(InputError, match="upsample_conv"):
        _cfg(upsample_conv="fast")
    with pytest.raises(InputError, match="fast path"):
        Unlearner(gen, id_loss, lpips, _cfg(path="reference", upsample_conv="folded")).prepare(seeds=[3])


@pytest.mark.parametrize("noise_mode,cache,cached", [("const", "auto", True), ("random", "auto", False),
                                                     ("random", "on", True), ("const", "off", False)])
def test_local_target_planes_are_cached_only_where_exact(gen, nets, noise_mode, cache, cached, generator_pair):
    """docs/guide.md §3.5/§7: with random backbone noise P_s(w_t) gets a fresh draw every step, so the
    fast step caches it only under constant noise (or when told to)."""
    cfg = _cfg(noise_mode=noise_mode, cache_target_planes=cache)
    w_u = latents_from_seeds(gen, [8])
    fast, _, g_s, _ = _session_parts(generator_pair, gen, nets, cfg, w_u, FastStep)
    assert fast.cache_target is cached
    assert (fast.passes[0].planes_target is not None) is cached
    sizes = []
    original = g_s.planes
    g_s.planes = lambda ws, **kw: sizes.append(ws.shape[0]) or original(ws, **kw)
    try:
        fast.losses(_draws(fast, cfg, seed=1))
    finally:
        del g_s.planes
    lay = fast.layout
    assert sizes == [lay.total - lay.n_local if cached else lay.total]


def test_config_rejects_values_that_would_silently_change_guide(gen, nets):
    for bad, match in [(dict(log_every=0), "log_every"), (dict(target_distance=-30.0), "target_distance"),
                       (dict(adjacency_alpha_min=-1.0), "adjacency_alpha_min"),
                       (dict(cache_target_planes="yes"), "cache_target_planes"),
                       (dict(lr=float("inf")), "lr must be finite"), (dict(lr=float("nan")), "lr must be finite")]:
        with pytest.raises(InputError, match=match):
            _cfg(**bad)
    id_loss, lpips = nets
    session = Unlearner(gen, id_loss, lpips, _cfg(iterations=2, upsample_conv="folded")).prepare(seeds=[3])
    session.step()
    res = session.finish(render=False)
    assert res.timings["cached_target_planes"] is True  # noise "const" in _cfg
    assert session.g_s.upsample_conv == session.g_u.upsample_conv == gen.upsample_conv
    with pytest.raises(InputError, match="finished"):
        session.step()


def test_a_given_execution_plan_is_the_one_the_run_uses(gen, nets):
    """Unlearner(plan=...) runs that plan and writes its choices into the config; without one,
    the config's engine fields are resolved once (UnlearnConfig.execution_plan)."""
    id_loss, lpips = nets
    plan = ExecutionPlan.reference("cpu")
    unl = Unlearner(gen, id_loss, lpips, _cfg(iterations=1), plan=plan)
    assert (unl.config.path, unl.config.renderer, unl.config.upsample_conv) == ("reference", "reference", "reference")
    session = unl.prepare(seeds=[3])
    assert session.plan is plan and isinstance(session.stepper, ReferenceStep)
    assert session.g_u.upsample_conv == "reference" and not session.use_graph
    session.step()
    res = session.finish(render=False)
    assert res.timings["plan"] == plan.to_dict() and res.timings["path"] == "reference"
    auto = Unlearner(gen, id_loss, lpips, _cfg()).execution_plan()
    assert auto == ExecutionPlan.resolve("cpu") == _cfg().execution_plan("cpu")
    assert (auto.renderer, auto.precision, auto.upsample_conv, auto.cuda_graph) == ("reference", "fp32", "folded", False)
    with pytest.raises(InputError, match="ExecutionPlan"):
        Unlearner(gen, id_loss, lpips, _cfg(), plan="fast")
    with pytest.raises(InputError, match="generator is on cpu"):
        Unlearner(gen, id_loss, lpips, _cfg(), plan=ExecutionPlan.resolve("cuda"))


def test_the_fast_plan_runs_steps_in_cudnn_benchmark_mode_and_restores_the_callers_flag(gen, nets, monkeypatch):
    """ExecutionPlan.backend_flags: cuDNN's benchmark mode on for the fast path on CUDA, the
    caller's flag back afterwards (also after an exception); a no-op on the reference path and on
    the CPU. Every session step runs inside it (a CUDA plan is built without a GPU: nothing runs)."""
    saved = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        fast_cuda = ExecutionPlan(torch.device("cuda"), path="fast")
        with fast_cuda.backend_flags():
            assert torch.backends.cudnn.benchmark is True
        assert torch.backends.cudnn.benchmark is False
        with pytest.raises(RuntimeError, match="inside"):
            with fast_cuda.backend_flags():
                raise RuntimeError("inside")
        assert torch.backends.cudnn.benchmark is False
        for plan in (ExecutionPlan(torch.device("cuda"), path="reference"), ExecutionPlan.resolve("cpu")):
            with plan.backend_flags():
                assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = saved
    entered = []
    original = ExecutionPlan.backend_flags

    def recording(self):
        entered.append(self)
        return original(self)

    monkeypatch.setattr(ExecutionPlan, "backend_flags", recording)
    id_loss, lpips = nets
    session = Unlearner(gen, id_loss, lpips, _cfg(iterations=2)).prepare(seeds=[3])
    session.step()
    session.step()
    assert entered == [session.plan, session.plan]


def test_a_failing_triton_kernel_falls_back_to_the_reference_operators(gen, nets, monkeypatch):
    """The fused renderer raising inside guide_fast.kernels (as a Triton compile error would on a
    GPU it was not built for): the step is retried with the reference renderer and skip path, the
    reason is in the timings, and the Unlearner's later runs start without the kernels. An error
    raised elsewhere, or an out-of-memory error, is not swallowed."""
    import guide_fast.kernels.triplane_render as tr

    def broken(*args, **kwargs):
        raise RuntimeError("PassManager::run failed (simulated Triton compile error)")

    monkeypatch.setattr(tr, "render_forward", broken)
    id_loss, lpips = nets
    unl = Unlearner(gen, id_loss, lpips, _cfg(iterations=2, renderer="triton", skip_path="triton"))
    session = unl.prepare(seeds=[3])
    assert session.plan.renderer == "triton" and session.g_u.skip_path == "triton"
    with pytest.warns(UserWarning, match="Triton kernels failed"):
        session.step()
    assert session.steps_done == 1 and "simulated Triton compile error" in session.timings["kernel_error"]
    assert (session.plan.renderer, session.plan.skip_path) == ("reference", "reference")
    assert all(g.operators()["renderer"] == "reference" and g.skip_path == "reference"
               for g in (session.g_u, session.g_s))
    session.step()
    res = session.finish(render=False)
    assert res.timings["plan"]["renderer"] == "reference" and "kernel_error" in res.timings
    assert unl.execution_plan().renderer == "reference"  # the next request starts without the kernels

    # not from the kernels: raised as it is
    unl2 = Unlearner(gen, id_loss, lpips, _cfg(iterations=2, renderer="triton"))
    session2 = unl2.prepare(seeds=[3])
    monkeypatch.setattr(session2.stepper, "losses", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("elsewhere")))
    with pytest.raises(RuntimeError, match="elsewhere"):
        session2.step()
    assert unl2.kernel_error is None and session2.plan.renderer == "triton"

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(tr, "render_forward", oom)
    session3 = Unlearner(gen, id_loss, lpips, _cfg(iterations=2, renderer="triton")).prepare(seeds=[3])
    with pytest.raises(torch.OutOfMemoryError):
        session3.step()
