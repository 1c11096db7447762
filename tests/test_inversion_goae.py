"""GUIDE's inversion flow (issue 14 items 2, 3, 6): GOAE encoding (one batch, offsets + w_avg),
the out-of-domain protocol (folder, target index, w_others), refinement, the w_avg file and its
precedence over the mapping buffer, GUIDE's Random-scenario draw order, and the one loss log.

CPU, tiny generator, random weights. The CLI tests stand a small image-dependent encoder in for
GOAE (the official one is 111M parameters); the real GOAE module runs at its tiny size in
test_real_goae_module_encodes_the_batch_as_guide_does.
"""
import json
import types

import numpy as np
import pytest
import torch
from PIL import Image

from small_nets import SmallFaceNet  # noqa: E402
from guide_fast import cameras
from guide_fast.errors import InputError
from guide_fast.identity import IdentityLoss
from guide_fast.inversion import (
    AverageLatent,
    encode_photos,
    invert_images,
    load_w_avg,
    pre_aligned_photo,
    resolve_w_avg,
    w_avg_distance,
)
from guide_fast.losslog import LossLog
from guide_fast.perceptual import LPIPS
from guide_fast import seeds as seeds_module

FAST = dict(lpips_resolution=32)


# ----------------------------------------------------------------- helpers

class StandInEncoder(torch.nn.Module):
    """GOAE's interface at the tiny generator's size: offsets [B, num_ws, w_dim] that depend on
    the image (a fixed projection of its mean colour and contrast), returned as GOAE's (w, base)."""

    def __init__(self, num_ws: int, w_dim: int):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Parameter(torch.randn(6, num_ws * w_dim, generator=g), requires_grad=False)
        self.shape = (num_ws, w_dim)
        self.batches = []

    def forward(self, x):
        self.batches.append(tuple(x.shape))
        feats = torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)
        w = (feats @ self.proj).reshape(x.shape[0], *self.shape)
        return w, w[:, :1].expand_as(w)


@pytest.fixture(scope="module")
def nets():
    return IdentityLoss(SmallFaceNet()).eval(), LPIPS.random(0).eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Three pre-aligned 64x64 'photos' of one person (distinct colours and textures)."""
    d = tmp_path_factory.mktemp("person")
    rng = np.random.default_rng(0)
    for i, name in enumerate(["c.png", "a.png", "b.png"]):
        base = np.array([60 + 60 * i, 200 - 50 * i, 90 + 30 * i], np.float64)
        img = np.clip(base + rng.normal(0, 10 + 10 * i, (64, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / name)
    (d / "notes.txt").write_text("not a photo")
    return d


def _expected(encoder, paths, w_avg):
    """What GUIDE computes: GOAE(preprocess(photo)) + w_avg, every photo in one batch."""
    from guide_fast.inversion.goae import preprocess_for_goae

    x = preprocess_for_goae([Image.open(p).convert("RGB") for p in paths])
    with torch.no_grad():
        return encoder(x)[0] + w_avg


def _w_avg_file(path, gen, shift=0.25):
    w = gen.w_avg.detach().reshape(1, -1).expand(gen.num_ws, -1).clone() + shift
    torch.save(w, path)
    return w


# ----------------------------------------------------------------- the loss log

def test_loss_log_reads_blocks_and_stops_at_the_first_non_finite_step():
    log = LossLog(steps=5, row_shape=(2, 3), device="cpu")
    for k in range(3):
        log.record(torch.full((2, 3), float(k)))
    rows = log.read(2)
    assert [s for s, _ in rows] == [1, 2] and rows[1][1] == [[1.0] * 3] * 2
    assert log.read(2) == []                       # nothing new
    assert [s for s, _ in log.read(3)] == [3]
    log.record(torch.tensor([[0.0, float("nan"), 0.0], [0.0, 0.0, 0.0]]))
    with pytest.raises(InputError, match="step 4"):
        log.read(4, error=lambda step, row: InputError(f"bad loss at step {step}"))
    # a run longer than planned overwrites the last row instead of writing out of bounds
    small = LossLog(steps=1, row_shape=1, device="cpu")
    small.record(torch.tensor([1.0]))
    small.record(torch.tensor([2.0]))
    assert small.read(5) == [(1, [2.0])]


# ----------------------------------------------------------------- seeds (GUIDE's draw order)

def test_identity_z_replays_guides_draw_order(monkeypatch):
    calls = []
    real = torch.randn

    def recording(*args, **kwargs):
        calls.append((tuple(args[0]), kwargs.get("generator"), str(kwargs.get("device"))))
        return real(*args, **kwargs)

    monkeypatch.setattr(seeds_module.torch, "randn", recording)
    z = seeds_module.identity_z(7, 16, "cpu")
    monkeypatch.undo()
    # the camera sampler's four (1, 1) draws (conditioning camera, front camera), then z
    assert [c[0] for c in calls] == [(1, 1)] * 4 + [(1, 16)]
    assert len({id(c[1]) for c in calls}) == 1 and calls[0][1] is not None  # one generator
    assert {c[2] for c in calls} == {"cpu"}
    g = torch.Generator().manual_seed(7)
    draws = [real((1, 1), generator=g) for _ in range(4)]
    torch.testing.assert_close(z, real((1, 16), generator=g)[0], rtol=0, atol=0)
    assert not torch.equal(z, real(16, generator=torch.Generator().manual_seed(7)))  # the draws advanced it
    assert len(draws) == len(seeds_module.CAMERA_SAMPLER_DRAWS)


def test_official_rng_puts_the_global_generator_where_guide_has_it():
    before = torch.get_rng_state()
    with seeds_module.official_rng(3, "cpu"):
        inside = torch.randn(5)
    torch.testing.assert_close(torch.get_rng_state(), before)  # restored
    torch.manual_seed(3)
    for _ in range(4):
        torch.randn(1, 1)
    torch.testing.assert_close(inside, torch.randn(5))
    torch.set_rng_state(before)


def test_seed_latents_come_from_identity_z(tiny_generator):
    from guide_fast.unlearn.engine import latents_from_seeds

    gen = tiny_generator
    w = latents_from_seeds(gen, [7, 8])
    z = torch.stack([seeds_module.identity_z(s, gen.config.z_dim, "cpu") for s in (7, 8)])
    with torch.no_grad():
        torch.testing.assert_close(w, gen.mapping(z, cameras.frontal_label(2)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the official latent is defined on CUDA")
def test_identity_z_on_cuda_is_guides_latent():
    # GUIDE's unlearn.py, literally: seed, two LookAtPoseSampler.sample calls (2 draws each), z_u
    for seed in (0, 7, 123456789):
        torch.manual_seed(seed)
        torch.cuda.manual_seed(seed)
        for _ in range(2):
            torch.randn((1, 1), device="cuda")
            torch.randn((1, 1), device="cuda")
        official = torch.randn(1, 512, device="cuda")[0]
        ours = seeds_module.identity_z(seed, 512, "cuda")
        assert torch.equal(ours, official), seed


# ----------------------------------------------------------------- w_avg

def test_w_avg_file_shapes_distance_and_errors(tiny_generator, tmp_path):
    gen = tiny_generator
    L, D = gen.num_ws, gen.config.w_dim
    buf = gen.w_avg.detach().float()
    for i, t in enumerate([buf.expand(L, D).clone(), buf.expand(1, L, D).clone(), buf.clone()]):
        torch.save(t, tmp_path / f"ok{i}.pt")
        got = load_w_avg(tmp_path / f"ok{i}.pt", gen)
        assert got.latent.shape == (L, D) and got.source.startswith("file ") and len(got.source) == 5 + 64
        d = w_avg_distance(tmp_path / f"ok{i}.pt", gen)
        assert d["identical"] and d["max_abs"] == 0.0 and d["rel_frobenius"] == 0.0
    shifted = buf.expand(L, D).clone()
    shifted[3] += 0.5
    d = w_avg_distance(shifted, gen)
    assert d["max_abs"] == pytest.approx(0.5) and d["worst_layer"] == 3 and not d["identical"]
    assert d["rel_frobenius"] == pytest.approx(0.5 * D ** 0.5 / float(buf.expand(L, D).norm()), rel=1e-5)
    assert resolve_w_avg(None, gen).source == "mapping buffer"
    bad = {"shape.pt": torch.zeros(3, 3), "int.pt": torch.zeros(L, D, dtype=torch.int64),
           "nan.pt": torch.full((L, D), float("nan")), "dict.pt": {"a": torch.zeros(L, D), "b": torch.zeros(L, D)}}
    for name, obj in bad.items():
        torch.save(obj, tmp_path / name)
    for name, fragment in (("shape.pt", "has shape [3, 3]; expected"), ("int.pt", "expected floating point"),
                           ("nan.pt", "non-finite"), ("dict.pt", "expected one tensor")):
        with pytest.raises(InputError) as info:
            load_w_avg(tmp_path / name, gen)
        assert fragment in str(info.value) and name in str(info.value) and "\n" not in str(info.value)
    # the official layout without a generator (the weight manifest's check)
    torch.save(torch.randn(14, 512), tmp_path / "official.pt")
    assert load_w_avg(tmp_path / "official.pt").latent.shape == (14, 512)


def test_w_avg_file_beats_the_buffer_for_the_ufo_target(tiny_generator, nets, tmp_path):
    from guide_fast.unlearn.config import UnlearnConfig
    from guide_fast.unlearn.engine import Unlearner
    from guide_fast.unlearn.targets import target_latent

    gen = tiny_generator
    file_w = _w_avg_file(tmp_path / "w_avg.pt", gen)
    w_u = gen.w_avg.detach().reshape(1, 1, -1).expand(1, gen.num_ws, -1) + torch.linspace(-1, 1, gen.config.w_dim)
    cfg = UnlearnConfig(iterations=1, use_adjacency=False, use_global=False, seed=0)
    with_file = Unlearner(gen, *nets, cfg, w_avg=tmp_path / "w_avg.pt").prepare(latents=w_u)
    torch.testing.assert_close(with_file.w_target, target_latent(w_u, file_w, "extra", cfg.target_distance))
    plain = Unlearner(gen, *nets, cfg).prepare(latents=w_u)
    torch.testing.assert_close(plain.w_target, target_latent(w_u, gen.w_avg, "extra", cfg.target_distance))
    assert not torch.allclose(plain.w_target, with_file.w_target)
    result = Unlearner(gen, *nets, cfg, w_avg=tmp_path / "w_avg.pt").unlearn(latents=w_u, render=False)
    from guide_fast.unlearn.report import build_report

    report = json.loads(json.dumps(build_report(result), default=str))
    assert report["w_avg"]["source"].startswith("file ") and report["w_avg"]["path"].endswith("w_avg.pt")
    assert build_report(Unlearner(gen, *nets, cfg).unlearn(latents=w_u, render=False))["w_avg"]["source"] == \
        "mapping buffer"


# ----------------------------------------------------------------- the GOAE flow (library)

def test_encoder_flow_one_batch_offsets_plus_w_avg_then_refinement(tiny_generator, nets, folder, tmp_path):
    gen = tiny_generator
    enc = StandInEncoder(gen.num_ws, gen.config.w_dim)
    file_w = _w_avg_file(tmp_path / "w_avg.pt", gen)
    paths = sorted(p for p in folder.iterdir() if p.suffix == ".png")
    # a folder stands for its photos (sorted by name); batch_size=2 does not split the encoder batch
    results = invert_images(gen, folder, id_loss=nets[0], lpips=nets[1], encoder=enc, w_avg=tmp_path / "w_avg.pt",
                            align=False, batch_size=2, **FAST)
    assert [r.aligned.name for r in results] == [str(p) for p in paths]
    assert enc.batches == [(3, 3, 256, 256)]
    torch.testing.assert_close(torch.cat([r.w_plus for r in results]), _expected(enc, paths, file_w))
    r = results[0]
    assert r.steps == 0 and r.losses == [] and r.quality == r.start_quality        # GOAE alone by default
    assert r.summary()["start"] == "encoder" and r.summary()["w_avg"].startswith("file ")
    assert not r.camera.refined and r.timings["photos_encoded"] == 3
    # refinement starts from the GOAE code and moves it
    [refined] = invert_images(gen, paths[0], id_loss=nets[0], lpips=nets[1], encoder=enc, steps=2, align=False,
                              **FAST)
    start = _expected(enc, paths[:1], gen.w_avg.detach())
    assert refined.steps == 2 and len(refined.losses) == 2 and refined.summary()["w_avg"] == "mapping buffer"
    assert not torch.allclose(refined.w_plus, start) and float((refined.w_plus - start).abs().max()) < 0.5
    with pytest.raises(InputError, match="needs steps > 0"):
        invert_images(gen, paths[0], id_loss=nets[0], lpips=nets[1], encoder=enc, refine_camera=True, align=False)


def test_unlearner_out_of_domain_protocol(tiny_generator, nets, folder):
    from guide_fast.unlearn.config import UnlearnConfig
    from guide_fast.unlearn.engine import Unlearner

    gen = tiny_generator
    enc = StandInEncoder(gen.num_ws, gen.config.w_dim)
    cfg = UnlearnConfig(iterations=1, use_adjacency=False, use_global=False, seed=0)
    unl = Unlearner(gen, *nets, cfg)
    result = unl.unlearn(images=str(folder), encoder=enc, target_index=1, align=False, render=False, **FAST)
    paths = sorted(p for p in folder.iterdir() if p.suffix == ".png")
    want = _expected(enc, paths, gen.w_avg.detach())
    torch.testing.assert_close(result.w_source, want[1:2])
    torch.testing.assert_close(result.w_others, want[[0, 2]])
    assert [r.aligned.name for r in result.inversion] == [str(paths[1])]
    with pytest.raises(InputError, match="out of range"):
        unl.unlearn(images=str(folder), encoder=enc, target_index=3, align=False, render=False, **FAST)
    with pytest.raises(InputError, match="images="):
        unl.unlearn(seeds=[1], target_index=0)


def test_real_goae_module_encodes_the_batch_as_guide_does(folder):
    from guide_fast.inversion.goae import GOAEConfig, GOAEncoder, preprocess_for_goae

    enc = GOAEncoder(GOAEConfig.tiny())
    fake_gen = types.SimpleNamespace(num_ws=14, config=types.SimpleNamespace(w_dim=512))
    w_avg = AverageLatent(torch.randn(14, 512, generator=torch.Generator().manual_seed(1)), "tensor")
    paths = sorted(p for p in folder.iterdir() if p.suffix == ".png")
    photos = [pre_aligned_photo(p) for p in paths]
    x = preprocess_for_goae([Image.open(p).convert("RGB") for p in paths])
    enc.eval()
    got = encode_photos(enc, photos, fake_gen, w_avg, "cpu")
    with torch.no_grad():
        torch.testing.assert_close(got, enc(x) + w_avg.latent)
    # GUIDE's train-mode quirk: the draws follow the seed, after the camera sampler's
    enc.train()
    a = encode_photos(enc, photos, fake_gen, w_avg, "cpu", seed=5)
    b = encode_photos(enc, photos, fake_gen, w_avg, "cpu", seed=5)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.no_grad():
        torch.manual_seed(5)
        seeds_module.camera_sampler_draws(None, "cpu")
        torch.testing.assert_close(a, enc(x) + w_avg.latent)
    assert not torch.allclose(a, got)


# ----------------------------------------------------------------- the CLI

@pytest.fixture
def stand_in_goae(monkeypatch, tiny_generator, tmp_path):
    """`--encoder FILE` loads this stand-in (the real loader reads a 441 MB file)."""
    import guide_fast.inversion.goae as goae

    enc = StandInEncoder(tiny_generator.num_ws, tiny_generator.config.w_dim)
    seen = []

    def load_encoder(path, device="cpu", mode="eval", **_):
        seen.append((str(path), mode))
        return enc.train() if mode == "official" else enc.eval()

    monkeypatch.setattr(goae, "load_encoder", load_encoder)
    path = tmp_path / "encoder_FFHQ.pt"
    path.write_bytes(b"stand-in")
    return enc, path, seen


def test_cli_encoder_folder_target_index_w_avg_refine(tiny_generator, folder, stand_in_goae, tmp_path):
    from guide_fast.checkpoints import load_latents
    from guide_fast.cli import main

    enc, enc_path, seen = stand_in_goae
    file_w = _w_avg_file(tmp_path / "w_avg.pt", tiny_generator)
    out = tmp_path / "run"
    rc = main(["unlearn", "--generator", "tiny", "--random-nets", "--image", str(folder), "--pre-aligned",
               "--encoder", str(enc_path), "--w-avg", str(tmp_path / "w_avg.pt"), "--target-index", "2",
               "--refine-steps", "2", "--iters", "1", "--out", str(out), "--no-progress"])
    assert rc == 0
    assert seen == [(str(enc_path), "eval")] and enc.batches == [(3, 3, 256, 256)]
    report = json.loads((out / "report.json").read_text())
    assert report["w_avg"]["source"].startswith("file ") and report["w_avg"]["path"] == str(tmp_path / "w_avg.pt")
    assert report["others"]["target_index"] == 2 and report["others"]["target_photo"].endswith("c.png")
    assert report["others"]["photos"] == ["a.png", "b.png"]
    [inv] = report["inversion"]
    assert inv["start"] == "encoder" and inv["steps"] == 2 and inv["w_avg"].startswith("file ")
    w_others = load_latents(out / "latents.safetensors", key="w_others")
    paths = sorted(p for p in folder.iterdir() if p.suffix == ".png")
    # refined by two steps from GOAE + w_avg (the first at lr 0, the ramp-up): close to it, not equal
    start = _expected(enc, paths, file_w)
    assert w_others.shape == (2, tiny_generator.num_ws, tiny_generator.config.w_dim)
    assert float((w_others - start[:2]).abs().max()) < 0.1


def test_cli_refuses_bad_w_avg_and_inversion_flags(tiny_generator, folder, stand_in_goae, tmp_path, capsys):
    from guide_fast.cli import main

    _, enc_path, _ = stand_in_goae
    L, D = tiny_generator.num_ws, tiny_generator.config.w_dim
    torch.save(torch.zeros(3, 3), tmp_path / "shape.pt")
    torch.save(torch.full((L, D), float("nan")), tmp_path / "nan.pt")
    base = ["unlearn", "--generator", "tiny", "--random-nets", "--iters", "1", "--no-progress"]
    photo = str(sorted(folder.glob("*.png"))[0])
    cases = [
        (["--seed", "1", "--w-avg", str(tmp_path / "shape.pt")], "has shape [3, 3]"),
        (["--seed", "1", "--w-avg", str(tmp_path / "nan.pt")], "non-finite"),
        (["--seed", "1", "--w-avg", str(tmp_path / "missing.pt")], "--w-avg"),
        (["--image", photo, "--pre-aligned", "--refine-steps", "2"], "--refine-steps belongs to the GOAE inversion"),
        (["--image", photo, "--pre-aligned", "--encoder", str(enc_path), "--invert-steps", "5"], "--refine-steps N"),
        (["--seed", "1", "--encoder", str(enc_path)], "--encoder inverts photos"),
        (["--image", str(folder), "--pre-aligned", "--target-index", "3"], "--target-index 3 is out of range"),
        (["--seed", "1", "--target-index", "0"], "--target-index picks one of the --image photos"),
        (["--image", photo, "--pre-aligned", "--encoder", str(enc_path), "--refine-camera"], "--refine-steps N"),
    ]
    for i, (argv, fragment) in enumerate(cases):
        out = tmp_path / f"out{i}"
        rc = main(base + argv + ["--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2, (argv, err)
        assert fragment in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert not out.exists()
