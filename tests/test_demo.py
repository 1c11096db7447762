"""The demo's pictures and the tiny preset's structured initialisation (issue 16): renders that
are opaque, shaded, 3D-consistent and differ between seeds; the FFHQ preset's initialisation
untouched; grid.png, losses.png and identity.png written by every run's save."""
import hashlib
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from guide_fast import cameras
from guide_fast.eg3d.generator import PRESETS, GeneratorConfig, TriPlaneGenerator, build_generator
from guide_fast.eg3d.init import OPACITY_BOUND
from guide_fast.render import make_render_draws, render_triplanes, sample_rays
from guide_fast.unlearn.engine import latents_from_seeds

YAWS = (-math.pi / 12, 0.0, math.pi / 12)
PITCH = -0.2


def _render(gen, ws, yaws=YAWS, seed=0):
    """(images [N, V, 3, h, w], raw [N, V, 3, r, r], depth [N, V, r, r], weight sums [N, V, rays])."""
    c = cameras.pose_label(torch.tensor(yaws), PITCH)
    res = gen.neural_rendering_resolution
    out = {k: [] for k in ("image", "raw", "depth", "wsum")}
    with torch.no_grad():
        for w in ws:
            w = w[None].expand(len(yaws), -1, -1)
            draws = make_render_draws(len(yaws), res * res, gen.render_options, None, torch.Generator().manual_seed(seed))
            img = gen.synthesis(w, c, noise_mode="const", render_draws=draws)
            planes = gen.planes(w, noise_mode="const")
            ro, rd = sample_rays(c[:, :16].reshape(-1, 4, 4), c[:, 16:].reshape(-1, 3, 3), res)
            wsum = render_triplanes(planes, gen.decoder, ro, rd, options=gen.render_options, render_draws=draws,
                                    backend="reference")[2]
            out["image"].append(img["image"])
            out["raw"].append(img["image_raw"])
            out["depth"].append(img["image_depth"][:, 0])
            out["wsum"].append(wsum[..., 0])
    return {k: torch.stack(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def renders(tiny_generator):
    ws = latents_from_seeds(tiny_generator, [0, 1, 2, 3])
    return _render(tiny_generator, ws)


def test_tiny_renders_are_opaque(renders):
    per_render = renders["wsum"].mean(-1)          # [seeds, yaws]
    assert per_render.min() > OPACITY_BOUND, per_render


def test_tiny_opaque_for_other_generator_seeds():
    for seed in (1, 5):
        gen = build_generator("tiny", seed=seed)
        r = _render(gen, latents_from_seeds(gen, [3, 11]), yaws=(-math.pi / 12, math.pi / 12))
        assert r["wsum"].mean(-1).min() > OPACITY_BOUND, (seed, r["wsum"].mean(-1))


def test_tiny_has_a_head_sized_body_in_front_of_a_backdrop(renders):
    depth = renders["depth"]                       # ray distances; the camera is 2.7 from the origin
    body = depth < 2.7                             # surfaces in front of the origin
    frac = body.float().mean((-1, -2))
    assert frac.min() > 0.2 and frac.max() < 0.75, frac   # a head-sized share of the picture
    assert depth[body].median() < 2.6              # the body's front, not the box's back
    assert depth[~body].median() > 3.0             # the backdrop behind it
    r = depth.shape[-1]
    centre = body[..., r // 2 - 2:r // 2 + 2, r // 2 - 2:r // 2 + 2]
    corners = body[..., :3, :3]
    assert centre.all() and not corners.any()


def test_tiny_renders_are_shaded(renders):
    """Lit from the upper left (eg3d/init.py LIGHT): on the body, the upper-left half is brighter."""
    raw, depth = renders["raw"], renders["depth"]
    lum = raw.mean(2)                              # [seeds, yaws, r, r]
    r = lum.shape[-1]
    i, j = torch.meshgrid(torch.arange(r), torch.arange(r), indexing="ij")
    upper_left, lower_right = (i + j) < r - 1, (i + j) > r - 1
    body = depth < 2.7
    for s in range(lum.shape[0]):
        for v in range(lum.shape[1]):
            b = body[s, v]
            lit = lum[s, v][b & upper_left].mean()
            dark = lum[s, v][b & lower_right].mean()
            assert lit > dark + 0.1, (s, v, float(lit), float(dark))


def test_tiny_yaw_is_3d_consistent(renders):
    """The body is mirror-symmetric in x: the depth seen from yaw +a is the mirror image of the
    depth from -a, while the two views differ."""
    depth, body = renders["depth"], renders["depth"] < 2.7
    left, right = depth[:, 0], depth[:, 2].flip(-1)
    both = body[:, 0] & body[:, 2].flip(-1)
    assert both.float().mean() > 0.2
    assert (left - right)[both].abs().median() < 0.02
    assert (renders["image"][:, 0] - renders["image"][:, 2]).abs().mean() > 0.02


def test_tiny_seeds_differ_visibly(renders):
    img = renders["image"][:, 1]                   # frontal view of each seed
    n = img.shape[0]
    for a in range(n):
        for b in range(a + 1, n):
            diff = (img[a] - img[b]).abs().mean()
            assert diff > 0.05, (a, b, float(diff))  # images in [-1, 1]


def _checksum(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        if name == "backbone.mapping.w_avg":
            continue  # set by build_generator from mapped latents
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_ffhq_preset_keeps_the_plain_random_init():
    gen = build_generator("ffhq512-128", seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        plain = TriPlaneGenerator(GeneratorConfig())
    assert _checksum(gen) == _checksum(plain)


def test_tiny_structured_init_is_only_the_preset_path():
    structured = build_generator("tiny", seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        plain = TriPlaneGenerator(PRESETS["tiny"]())
    # an explicit config takes the plain random path, equal to the bare constructor
    explicit = build_generator("tiny", seed=0, config=PRESETS["tiny"]())
    assert _checksum(explicit) == _checksum(plain)
    assert _checksum(structured) != _checksum(plain)
    # same architecture: names and shapes
    a, b = structured.state_dict(), plain.state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    # the mapping network (and so w_avg) is untouched
    for k in a:
        if k.startswith("backbone.mapping."):
            assert torch.equal(a[k], b[k]) or k.endswith("w_avg"), k
    assert torch.allclose(structured.w_avg, build_generator("tiny", seed=0, config=PRESETS["tiny"]()).w_avg)


# ------------------------------------------------------------------------------------ pictures
class PixelScorer:
    """A stand-in identity scorer: downsampled pixels as the embedding."""

    description = "test scorer (8x8-pooled pixels)"

    def embed(self, images, **kw):
        return F.adaptive_avg_pool2d(images.float(), 8).flatten(1)


def _png(path):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def test_every_run_writes_the_three_pictures(tmp_path, tiny_generator):
    from small_nets import SmallFaceNet
    from guide_fast.identity import IdentityLoss
    from guide_fast.perceptual import LPIPS
    from guide_fast.unlearn.config import UnlearnConfig
    from guide_fast.unlearn.engine import Unlearner
    from guide_fast.unlearn.plots import HELD_OUT_CANDIDATES, HELD_OUT_SHOWN

    cfg = UnlearnConfig(iterations=3, lr=1e-3, seed=0, eval_views=3, noise_mode="const")
    unl = Unlearner(tiny_generator, IdentityLoss(SmallFaceNet()).eval(), LPIPS.random(0).eval(), cfg)
    result = unl.unlearn(seeds=[7])
    out = result.save(tmp_path / "run", random_weights=True, scorer=PixelScorer())
    names = {p.name for p in out.iterdir()}
    assert {"grid.png", "losses.png", "identity.png", "report.json"} <= names
    w, h = _png(out / "grid.png")
    rows = 3 + 2 * HELD_OUT_SHOWN              # id 0 before/after/target, held-out before/after
    assert w >= 3 * 128 and h >= rows * 128, (w, h)
    for name in ("losses.png", "identity.png"):
        w, h = _png(out / name)
        assert 400 <= w <= 2000 and 300 <= h <= 1500, (name, w, h)
    report = json.loads((out / "report.json").read_text())
    assert {"grid.png", "losses.png", "identity.png"} <= set(report["files"])
    ident = report["pictures"]["identity_to_source"]
    assert ident["scorer"] == PixelScorer.description
    assert len(ident["forgotten"]) == 1 and len(ident["held_out"]) == HELD_OUT_SHOWN
    for entry in ident["forgotten"] + ident["held_out"]:
        assert -1 <= entry["before"] <= 1 and -1 <= entry["after"] <= 1
    # the held-out identities were not trained on: G_u changes them less than the forgotten one
    held_after = min(e["after"] for e in ident["held_out"])
    assert ident["forgotten"][0]["after"] < held_after
    # render change: every candidate measured, the shown ones are the middle two by change, and
    # the forgotten identity moved further than the typical held-out one
    change = report["pictures"]["render_change"]
    held = change["held_out"]
    assert [e["seed"] for e in held] == list(HELD_OUT_CANDIDATES)
    values = sorted(e["change"] for e in held)
    shown = [next(e["change"] for e in held if e["seed"] == s) for s in change["shown"]]
    assert shown == values[len(values) // 2 - 1:len(values) // 2 + 1]
    assert [e["seed"] for e in ident["held_out"]] == change["shown"] == report["pictures"]["held_out_seeds"]
    assert change["held_out_median"] == pytest.approx(float(np.median(values)))
    assert change["held_out_max"]["change"] == values[-1]
    assert all(e["w_distance"] > 0 for e in held)
    assert 0 <= change["held_out_median"] < change["forgotten"][0] <= 1


def test_render_change_and_middle_ranks():
    from guide_fast.unlearn.plots import middle_ranks, render_change

    before = torch.zeros(2, 3, 3, 4, 4)
    after = before.clone()
    after[1] += 0.5                              # +0.5 in [-1, 1] = a quarter of the range
    assert render_change(before, after).tolist() == [0.0, 0.25]
    vals = [5.0, 1.0, 4.0, 2.0, 3.0, 6.0]
    assert middle_ranks(vals, 2) == [4, 2]       # 3.0 and 4.0, ascending
    assert middle_ranks(vals, 1) == [4]
    assert middle_ranks([1.0, 1.0, 1.0], 2) == [0, 1]   # ties by position
    assert middle_ranks([2.0], 2) == [0]


def test_pictures_without_renders_or_scorer(tmp_path, tiny_generator):
    from small_nets import SmallFaceNet
    from guide_fast.identity import IdentityLoss
    from guide_fast.perceptual import LPIPS
    from guide_fast.unlearn.config import UnlearnConfig
    from guide_fast.unlearn.engine import Unlearner

    cfg = UnlearnConfig(iterations=1, seed=0, eval_views=1, noise_mode="const")
    result = Unlearner(tiny_generator, IdentityLoss(SmallFaceNet()).eval(), LPIPS.random(0).eval(),
                       cfg).unlearn(seeds=[3], render=False)
    out = result.save(tmp_path / "run")
    names = {p.name for p in out.iterdir()}
    assert "grid.png" not in names and {"losses.png", "identity.png"} <= names
    _png(out / "identity.png")
    files = json.loads((out / "report.json").read_text())["files"]
    assert "grid.png" not in files and {"losses.png", "identity.png"} <= set(files)


def test_smooth_follows_the_trend():
    from guide_fast.unlearn.plots import smooth

    x = [1.0] * 10 + [0.0] * 40
    s = smooth(x, window=5)
    assert s[0] == 1.0 and s[-1] < 0.01 and all(a >= b for a, b in zip(s, s[1:]))


def test_demo_prints_identity_similarity_and_pictures(tmp_path, capsys):
    from guide_fast.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--iters", "2", "--out", str(out), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in text
    assert "identity similarity to the source" in text and "IR-101" in text
    assert "forgotten" in text and "held-out" in text
    assert str(out / "grid.png") in text
    assert "render change" in text and "held-out identities: median" in text
    report = json.loads((out / "report.json").read_text())
    assert report["random_weights"] is True and "RANDOM WEIGHTS" in report["warning"]
    assert report["demo"]["iterations"] == 2 and report["demo"]["generator_init"] == "structured-tiny-v1"
    for name in ("grid.png", "losses.png", "identity.png"):
        _png(out / name)


def test_a_saved_run_embeds_each_render_batch_once(tmp_path, tiny_generator):
    """The report (before vs after, after vs target) and the pictures (similarity to the
    source) score the same forgotten renders: each batch goes through the scorer once."""
    from small_nets import SmallFaceNet
    from guide_fast.identity import IdentityLoss
    from guide_fast.perceptual import LPIPS
    from guide_fast.unlearn.config import UnlearnConfig
    from guide_fast.unlearn.engine import Unlearner

    class Counting(PixelScorer):
        def __init__(self):
            self.batches = []

        def embed(self, images, **kw):
            self.batches.append((images.data_ptr(), tuple(images.shape)))
            return super().embed(images, **kw)

    cfg = UnlearnConfig(iterations=1, seed=0, eval_views=3, noise_mode="const")
    result = Unlearner(tiny_generator, IdentityLoss(SmallFaceNet()).eval(), LPIPS.random(0).eval(), cfg).unlearn(seeds=[7])
    scorer = Counting()
    out = result.save(tmp_path / "run", scorer=scorer)
    assert len(scorer.batches) == len(set(scorer.batches)) == 5  # before, after, target, held-out before / after
    report = json.loads((out / "report.json").read_text())
    assert report["identity_similarity"]["scorer"] == PixelScorer.description
