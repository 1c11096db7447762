"""GUIDE's evaluation (docs/guide.md §4) on the tiny preset: metric functions on synthetic inputs,
the whole evaluation end to end with random-weight networks, and the CLI."""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from guide_fast import cameras
from guide_fast.cli import main as cli_main
from guide_fast.eg3d.generator import build_generator
from guide_fast.errors import InputError
from guide_fast.evaluation import (
    NUM_ID_VIEWS,
    EvalCamera,
    EvalConfig,
    EvalResult,
    evaluate,
    paired_cosine,
    pairwise_identity_similarity,
    quantize_like_png,
    view_scores,
)
from guide_fast.fid import build_inception, fid_from_features


# ------------------------------------------------------------------------ helpers
def _perturbed(gen, scale=0.3, seed=1):
    """A stand-in for an unlearned generator: only backbone.synthesis weights change (as GUIDE
    trains only those), by `scale` times each tensor's mean magnitude."""
    out = gen.copy()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if name.startswith("backbone.synthesis."):
                p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=g))
    return out


def _latents(gen, n, seed):
    device = next(gen.parameters()).device
    z = torch.randn(n, gen.config.z_dim, generator=torch.Generator().manual_seed(seed)).to(device)
    with torch.no_grad():
        return gen.mapping(z, cameras.frontal_label(n).to(device))


class ProjectionScorer:
    """A cheap deterministic embedding (a fixed random projection of the pixels, L2-normalised)
    for checks of the pairing logic where the IR-101's cost buys nothing."""

    backend = "projection"

    def __init__(self, dim=64, size=16):
        self.size = size
        self.proj = torch.randn(3 * size * size, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def embed(self, images, aligned=None):
        x = torch.nn.functional.adaptive_avg_pool2d(images.detach().cpu().double(), self.size).flatten(1)
        e = (x - x.mean(1, keepdim=True)) @ self.proj
        return e / e.norm(dim=1, keepdim=True)


@pytest.fixture(scope="module")
def source():
    return build_generator("tiny", seed=0)


@pytest.fixture(scope="module")
def unlearned(source):
    return _perturbed(source)


@pytest.fixture(scope="module")
def inception():
    return build_inception(seed=0)


# ------------------------------------------------------------------------ metric functions
def test_paired_cosine_and_view_scores_on_synthetic_embeddings():
    rng = np.random.default_rng(0)
    k = 2
    before = torch.tensor(rng.standard_normal((k * NUM_ID_VIEWS, 8)))
    # after = cos(t) * before_unit + sin(t) * orthogonal unit: cosine exactly cos(t).
    unit = before / before.norm(dim=1, keepdim=True)
    other = torch.tensor(rng.standard_normal(before.shape))
    other = other - (other * unit).sum(1, keepdim=True) * unit
    other = other / other.norm(dim=1, keepdim=True)
    angles = torch.linspace(0.1, 1.4, k * NUM_ID_VIEWS, dtype=torch.float64)
    after = 3.0 * (torch.cos(angles)[:, None] * unit + torch.sin(angles)[:, None] * other)
    torch.testing.assert_close(paired_cosine(before, after), torch.cos(angles))

    after[3] = float("nan")  # a face not found: left out, counted
    scores = view_scores(before, after)
    expected = torch.cos(angles).reshape(k, NUM_ID_VIEWS).numpy().copy()
    expected[0, 3] = np.nan
    assert scores["pairs"] == k * NUM_ID_VIEWS and scores["pairs_scored"] == k * NUM_ID_VIEWS - 1
    assert scores["mean"] == pytest.approx(np.nanmean(expected))
    assert scores["per_view"][3] == pytest.approx(expected[1, 3])
    assert scores["per_view"][5] == pytest.approx(expected[:, 5].mean())
    assert scores["per_identity"][0][3] is None
    assert scores["per_identity_mean"][1] == pytest.approx(expected[1].mean())
    with pytest.raises(InputError, match="views of 11"):
        view_scores(before[:5], after[:5])


def test_pairwise_identity_similarity_shows_collapse():
    rng = np.random.default_rng(1)
    distinct = torch.tensor(np.linalg.qr(rng.standard_normal((16, 16)))[0][:4]).reshape(4, 1, 16).repeat(1, 3, 1)
    result = pairwise_identity_similarity(distinct)  # orthonormal identities: cosine 0
    assert result["identities"] == 4
    assert result["mean_pairwise_cosine"] == pytest.approx(0.0, abs=1e-12)
    assert result["matrix"][1][1] == 1.0
    collapsed = distinct[:1].repeat(4, 1, 1) * torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(4, 1, 1)
    assert pairwise_identity_similarity(collapsed)["mean_pairwise_cosine"] == pytest.approx(1.0)
    mixed = distinct.clone()
    mixed[1] = distinct[0]
    r = pairwise_identity_similarity(mixed)
    assert r["matrix"][0][1] == pytest.approx(1.0) and r["max_pairwise_cosine"] == pytest.approx(1.0)
    assert r["mean_pairwise_cosine"] == pytest.approx(1 / 6)
    with pytest.raises(InputError, match="at least 2"):
        pairwise_identity_similarity(distinct[:1])


def test_png_quantisation_matches_a_real_png_round_trip(tmp_path):
    images = torch.rand(2, 3, 8, 8) * 2.4 - 1.2  # includes out-of-range values, clamped as on save
    from guide_fast.io import save_image, to_uint8

    levels = quantize_like_png(images)
    np.testing.assert_array_equal(levels.permute(0, 2, 3, 1).numpy().astype(np.uint8), to_uint8(images))
    save_image(tmp_path / "a.png", images[0])
    reloaded = torch.from_numpy(np.array(Image.open(tmp_path / "a.png"))).permute(2, 0, 1).float()
    torch.testing.assert_close(levels[0], reloaded)


def test_eval_camera_views_are_guides():
    cam = EvalCamera()
    yaws = np.linspace(-math.pi / 12, math.pi / 12, 11)  # GUIDE's float64 views
    assert cam.view_yaws().dtype == torch.float64 and cam.view_yaws().tolist() == yaws.tolist()
    labels = cam.labels(cam.view_yaws(), "cpu")
    torch.testing.assert_close(labels, cameras.pose_label(torch.linspace(-math.pi / 12, math.pi / 12, 11), -0.2,
                                                          lookat=cameras.GUIDE_LOOKAT))
    # LookAtPoseSampler.sample(np.pi / 2 + angle_y, np.pi / 2 + angle_p): summed in float64, rounded once
    h = torch.tensor(np.pi / 2 + yaws, dtype=torch.float32)
    v = torch.full((11,), np.pi / 2 - 0.2, dtype=torch.float32)
    assert torch.equal(labels[:, :16].reshape(-1, 4, 4), cameras.look_at_pose(h, v, lookat=cameras.GUIDE_LOOKAT))
    rounded_twice = cameras.look_at_pose(torch.tensor(yaws, dtype=torch.float32) + math.pi / 2, v,
                                         lookat=cameras.GUIDE_LOOKAT)
    assert not torch.equal(labels[:, :16].reshape(-1, 4, 4), rounded_twice)  # the test tells them apart
    custom = EvalCamera.from_config({"pitch": -0.1, "lookat": [0, 0, 0.2], "yaw_range": 0.3, "iterations": 5})
    assert custom.pitch == -0.1 and custom.lookat == (0.0, 0.0, 0.2) and custom.yaw_range == 0.3


# ------------------------------------------------------------------------ end to end
def test_identical_generators_score_perfectly_and_a_changed_one_does_not(source, unlearned, inception):
    """Same z, same camera and the same noise draws on both sides (docs/guide.md §4.4 pairing): a
    generator compared with itself has ID exactly 1 and FID_pre 0; a changed one does not."""
    scorer = ProjectionScorer()
    w = _latents(source, 1, seed=5)
    kw = dict(w_source=w, scorer=scorer, inception=inception, num_fid_samples=4, preserve_samples=4, align="crop",
              batch_size=4, seed=3, noise="paired")
    same = evaluate(source, source.copy(), **kw)
    assert same.metrics["id"] == pytest.approx(1.0, abs=1e-7)
    assert same.metrics["preservation"] == pytest.approx(1.0, abs=1e-7)
    assert abs(same.metrics["fid_pre"]) < 1e-9
    changed = evaluate(source, unlearned, **kw)
    assert changed.metrics["id"] < 0.999
    assert changed.metrics["preservation"] < 0.999
    assert changed.metrics["fid_pre"] > 1e3 * max(abs(same.metrics["fid_pre"]), 1e-12)
    assert len(changed.id["per_view"]) == NUM_ID_VIEWS


def test_evaluate_end_to_end_all_metrics_and_outputs(tmp_path, source, unlearned, inception):
    w = _latents(source, 2, seed=7)
    others = w[:1] + 0.05 * torch.randn(1, *w.shape[1:], generator=torch.Generator().manual_seed(2))
    real = np.random.default_rng(0).standard_normal((12, 2048)) * 0.05
    report = {"generator": "tiny", "config": {"pitch": -0.2, "yaw_range": math.pi / 12},
              "losses": [{"total": 3.0 / (i + 1), "local": 1.0 / (i + 1), "adjacency": 1.5 / (i + 1),
                          "global": 0.5 / (i + 1)} for i in range(20)]}
    out = tmp_path / "eval"
    result = evaluate(source, unlearned, w_source=w, scorer=ProjectionScorer(), inception=inception, others=others,
                      num_fid_samples=6, real_features=real, preserve_samples=4, align="crop", batch_size=11,
                      seed=0, out_dir=out, run_report=report)
    m = result.metrics
    for key in ("id", "id_others", "id_avg", "preservation", "fid_pre", "delta_fid_real",
                "diversity_cosine_after", "diversity_cosine_before"):
        assert m[key] is not None and np.isfinite(m[key]), key
    assert -1 <= m["id"] <= 1 and -1 <= m["id_others"] <= 1
    assert len(result.id["per_identity"]) == 2 and len(result.id["per_identity"][0]) == NUM_ID_VIEWS
    assert result.id["pairs_scored"] == 2 * NUM_ID_VIEWS
    # ID_avg is the mean over every pair, target and others (docs/guide.md §4.2)
    n_t, n_o = 2 * NUM_ID_VIEWS, NUM_ID_VIEWS
    assert m["id_avg"] == pytest.approx((m["id"] * n_t + m["id_others"] * n_o) / (n_t + n_o))
    assert result.diversity["identities"] == 2
    assert m["fid_pre"] > 0
    fid = result.fid
    assert fid["samples"] == 6 and fid["method"] == "gram" and fid["inception_weights"]["standard"] is False
    assert m["delta_fid_real"] == pytest.approx(fid["real"]["fid_real_unlearned"] - fid["real"]["fid_real_source"])
    assert any("rank-deficient" in n for n in result.notes)

    written = json.loads((out / "eval.json").read_text())
    assert written["metrics"] == pytest.approx(m)
    assert written["settings"]["view_yaws"] == pytest.approx(np.linspace(-math.pi / 12, math.pi / 12, 11).tolist())
    for name in ("id_per_view.png", "loss_curves.png", "diversity.png", "views.png"):
        assert name in result.files
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 100
    with Image.open(out / "views.png") as im:  # label column + 11 views of 64 px; rows: source, unlearned
        assert im.size == (72 + 11 * 64, 2 * 64)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_evaluate_rejects_bad_inputs(source, unlearned):
    w = _latents(source, 1, seed=0)
    with pytest.raises(InputError, match="align"):
        evaluate(source, unlearned, w_source=w, align="dlib")
    with pytest.raises(InputError, match=r"w_source has shape \[1, 3, 5\]"):
        evaluate(source, unlearned, w_source=torch.zeros(1, 3, 5))
    with pytest.raises(InputError, match="non-finite"):
        evaluate(source, unlearned, w_source=torch.full_like(w, float("nan")))
    with pytest.raises(InputError, match="at least 2"):
        evaluate(source, unlearned, w_source=w, num_fid_samples=1)
    with pytest.raises(InputError, match="real-image features"):
        evaluate(source, unlearned, w_source=w, real_features=np.zeros((10, 7)))
    with pytest.raises(InputError, match="FID method"):
        evaluate(source, unlearned, w_source=w, fid_method="fast")
    with pytest.raises(InputError, match="precision"):
        evaluate(source, unlearned, w_source=w, precision="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="bf16.*CUDA"):
            evaluate(source, unlearned, w_source=w, precision="bf16")
    other = build_generator("tiny", seed=0, config=dataclasses.replace(source.config, sr_channels=(8,)))
    with pytest.raises(InputError, match="architectures"):
        evaluate(source, other, w_source=w)


# ------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, source, unlearned):
    """A run directory as `guide-fast unlearn --out DIR` writes it (guide-fast unlearn itself is
    the engine's; this test only needs its file layout)."""
    from safetensors.torch import save_file

    from guide_fast.checkpoints import save_delta, save_generator

    d = tmp_path_factory.mktemp("run")
    save_generator(source, d / "source.safetensors")
    save_generator(unlearned, d / "generator.safetensors")
    save_delta(source, unlearned, d / "delta.safetensors")
    save_file({"w_source": _latents(source, 1, seed=11), "w_target": _latents(source, 1, seed=12)},
              str(d / "latents.safetensors"))
    report = {"generator": str(d / "source.safetensors"), "config": {"pitch": -0.2},
              "losses": [{"total": 2.0 - 0.1 * i, "local": 1.0 - 0.05 * i} for i in range(10)]}
    (d / "report.json").write_text(json.dumps(report))
    return d


def test_cli_evaluates_a_run_directory_with_random_ir101_and_inception(run_dir, capsys):
    """The demo's case: no real weights, so random IR-101 (crop alignment: random renders hold
    no detectable face) and a random Inception; eval.json and the plots land in the run dir."""
    rc = cli_main(["evaluate", "--run", str(run_dir), "--random-nets", "--id-backend", "torch", "--align", "crop",
                   "--samples", "3", "--preserve", "2", "--batch-size", "11", "--noise", "paired", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    result = json.loads((run_dir / "eval.json").read_text())
    m = result["metrics"]
    assert -1 <= m["id"] <= 1 and m["preservation"] is not None and np.isfinite(m["fid_pre"])
    assert result["id"]["pairs_scored"] == NUM_ID_VIEWS  # the crop path always yields a face
    assert result["settings"]["identity_backend"] == "torch" and result["settings"]["noise"] == "paired"
    assert result["settings"]["identity_precision"] == "fp32"  # GUIDE's id_sim.py runs IR-101 in fp32
    assert any("RANDOM-WEIGHT" in n for n in result["notes"])
    for name in ("id_per_view.png", "loss_curves.png", "views.png"):
        assert (run_dir / name).is_file()
    assert "eval.json" in out


def test_cli_fast_operators_give_the_official_operators_metrics(run_dir, tmp_path, capsys):
    """--upsample-conv folded --skip-path triton (the interpreter here): the same maths as the
    official operators, so the same metrics up to rounding, and eval.json's plan names them."""
    common = ["evaluate", "--run", str(run_dir), "--random-nets", "--id-backend", "torch", "--align", "crop",
              "--samples", "3", "--preserve", "2", "--batch-size", "11", "--noise", "paired", "--quiet"]
    results = []
    for i, extra in enumerate(([], ["--upsample-conv", "folded", "--skip-path", "triton"])):
        out = tmp_path / f"eval{i}"
        assert cli_main(common + ["--out", str(out)] + extra) == 0, capsys.readouterr().out
        results.append(json.loads((out / "eval.json").read_text()))
    official, fast = results
    assert official["settings"]["plan"]["upsample_conv"] == "reference"
    assert official["settings"]["plan"]["skip_path"] == "reference"
    assert fast["settings"]["plan"]["upsample_conv"] == "folded" and fast["settings"]["plan"]["skip_path"] == "triton"
    for key in ("id", "preservation"):
        assert abs(fast["metrics"][key] - official["metrics"][key]) < 1e-4, key


def test_cli_loads_inception_weights_from_a_file(run_dir, tmp_path, inception, capsys):
    weights = tmp_path / "pt_inception-random.pth"
    torch.save(inception.state_dict(), weights)
    out = tmp_path / "o"
    rc = cli_main(["evaluate", "--run", str(run_dir), "--inception-weights", str(weights), "--samples", "3",
                   "--device", "cpu", "--quiet", "--out", str(out)])
    assert rc == 0, capsys.readouterr()
    result = json.loads((out / "eval.json").read_text())
    assert result["fid"]["inception_weights"]["path"] == str(weights)
    # the defaults: GUIDE's detector for the (here skipped) ID metric, GUIDE's independent noise draws
    assert result["settings"]["detector"] == "guide" and result["settings"]["noise"] == "official"
    assert result["metrics"]["fid_pre"] > 0 and result["metrics"]["id"] is None
    assert any("identity metrics skipped" in n for n in result["notes"])


def test_run_source_is_rebuilt_from_the_delta_when_missing(run_dir, tmp_path):
    import shutil

    from guide_fast.checkpoints import load_generator
    from guide_fast.commands.evaluate import _load_run

    moved = tmp_path / "run"
    shutil.copytree(run_dir, moved)
    report = json.loads((moved / "report.json").read_text())
    report["generator"] = str(moved / "source.safetensors")
    (moved / "report.json").write_text(json.dumps(report))
    (moved / "source.safetensors").unlink()  # report.json now names a file that is gone
    notes = []
    rebuilt, unlearned, w, report = _load_run(moved, "reference", torch.device("cpu"), notes)
    assert any("rebuilt as unlearned - delta" in n for n in notes)
    original = load_generator(run_dir / "source.safetensors")
    for (name, a), b in zip(original.state_dict().items(), rebuilt.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    assert w.shape == (1, source_num_ws(original), original.config.w_dim)

    # A preset source (the demo's case) resolves when it is the delta's source...
    report["generator"] = "tiny"
    (moved / "report.json").write_text(json.dumps(report))
    notes = []
    resolved = _load_run(moved, "reference", torch.device("cpu"), notes)[0]
    assert notes == [] and torch.equal(resolved.backbone.synthesis.b4.conv1.weight, original.backbone.synthesis.b4.conv1.weight)
    # ... and one that is not the delta's source is refused in favour of the rebuilt one.
    report["generator_seed"] = 5
    (moved / "report.json").write_text(json.dumps(report))
    notes = []
    _load_run(moved, "reference", torch.device("cpu"), notes)
    assert any("not the source this run's delta was made from" in n for n in notes)


def source_num_ws(gen):
    return gen.num_ws


def test_cli_broken_weight_paths_give_clear_errors(run_dir, tmp_path, capsys):
    missing = tmp_path / "missing_pt_inception.pth"
    rc = cli_main(["evaluate", "--run", str(run_dir), "--inception-weights", str(missing), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "not found" in err and "missing_pt_inception.pth" in err

    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"\x80\x02garbage")
    rc = cli_main(["evaluate", "--run", str(run_dir), "--inception-weights", str(broken), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "broken.pth" in err

    rc = cli_main(["evaluate", "--run", str(run_dir), "--id-weights", str(tmp_path / "no_ir101.pth"),
                   "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "no_ir101.pth" in err

    rc = cli_main(["evaluate", "--run", str(tmp_path / "no_such_run"), "--random-nets"])
    err = capsys.readouterr().err
    assert rc == 2 and "no_such_run" in err

    rc = cli_main(["evaluate", "--source", "tiny", "--random-nets"])
    assert rc == 2 and "--unlearned" in capsys.readouterr().err


def test_identity_network_runs_in_fp32_unless_the_evaluation_asks_for_bf16(monkeypatch):
    """GUIDE scores ID with IR-101 in fp32: the evaluation's default; bf16 (or TensorRT's fp16
    engine) on CUDA only when the evaluation runs with precision bf16."""
    from guide_fast.evaluation import fastest_identity_backend, make_scorer
    from guide_fast.identity import build_backbone, scorer as scorer_mod

    monkeypatch.setattr(scorer_mod, "available_backends", lambda: ["torch", "onnxruntime", "tensorrt"])
    assert fastest_identity_backend("cuda", "fp32") == "torch"
    assert fastest_identity_backend("cuda", "bf16") == "tensorrt"
    assert fastest_identity_backend("cpu", "fp32") == fastest_identity_backend("cpu", "bf16") == "onnxruntime"
    with pytest.raises(InputError, match="identity precision"):
        fastest_identity_backend("cuda", "fp16")
    net = build_backbone("ir_se50", seed=0)
    for precision in ("fp32", "bf16"):  # a CPU runs fp32 either way
        assert make_scorer(net, "cpu", backend="torch", precision=precision).precision == "fp32"


def test_fid_from_features_used_by_evaluate_is_the_standard_formula():
    pytest.importorskip("scipy")
    # evaluate's FID path ("gram" for few samples) equals the sqrtm formula on the same features.
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((20, 40)), rng.standard_normal((25, 40)) * 1.3
    assert fid_from_features(a, b, method="gram") == pytest.approx(fid_from_features(a, b, method="sqrtm"), rel=1e-6)


# ------------------------------------------------------------------------ noise schemes
def test_noise_schemes_draw_independently_or_identically():
    from guide_fast.evaluation.noise import side_generators, side_seeds

    b, a = side_seeds("paired", 17)
    assert b == a
    b2, a2 = side_seeds("official", 17)
    assert b2 == b and a2 != a  # the before side draws the same in both schemes
    g_b, g_a = side_generators("official", 17, "cpu")
    assert not torch.equal(torch.randn(8, generator=g_b), torch.randn(8, generator=g_a))
    g_b, g_a = side_generators("paired", 17, "cpu")
    assert torch.equal(torch.randn(8, generator=g_b), torch.randn(8, generator=g_a))
    with pytest.raises(InputError, match="noise"):
        side_seeds("shared", 1)


def test_official_noise_renders_the_two_sides_with_different_draws(source):
    from guide_fast.evaluation.metrics import render_pairs
    from guide_fast.plan import ExecutionPlan

    plan = ExecutionPlan.reference("cpu")
    w = _latents(source, 2, seed=4)
    labels = EvalCamera().labels(torch.zeros(2), "cpu")
    kw = dict(plan=plan, noise_seed=9, noise_mode="random")
    paired = render_pairs(source, source, w, w, labels, noise="paired", **kw)
    official = render_pairs(source, source, w, w, labels, noise="official", **kw)
    assert torch.equal(paired[0], paired[1])          # same generator, same draws: same image
    assert not torch.equal(official[0], official[1])  # same generator, other draws: another image
    assert torch.equal(official[0], paired[0])        # the before side is the same in both schemes


def test_evaluate_defaults_to_official_noise_and_guides_detector(source):
    w = _latents(source, 1, seed=5)
    kw = dict(w_source=w, scorer=ProjectionScorer(), num_fid_samples=0, preserve_samples=2, align="crop",
              batch_size=11, seed=3)
    official = evaluate(source, source.copy(), **kw)
    assert official.settings["noise"] == "official"
    assert official.metrics["id"] < 1 - 1e-6 and official.metrics["preservation"] < 1 - 1e-6
    paired = evaluate(source, source.copy(), noise="paired", **kw)
    assert paired.settings["noise"] == "paired" and paired.metrics["id"] == pytest.approx(1.0, abs=1e-7)
    assert EvalConfig().detector == "guide" and EvalConfig().noise == "official"


# ------------------------------------------------------------------------ config and result
def test_eval_config_and_result(tmp_path, source):
    with pytest.raises(InputError, match="unknown evaluation setting"):
        EvalConfig.build(num_samples=3)
    with pytest.raises(InputError, match="detector"):
        EvalConfig(detector="dlib")
    with pytest.raises(InputError, match="noise"):
        EvalConfig(noise="shared")
    cfg = EvalConfig.build(EvalConfig(seed=4), batch_size=3)
    assert (cfg.seed, cfg.batch_size, cfg.num_fid_samples) == (4, 3, 5000)

    w = _latents(source, 1, seed=5)
    result = evaluate(source, source.copy(), w_source=w, scorer=ProjectionScorer(), config=EvalConfig(
        num_fid_samples=0, preserve_samples=0, align="crop", batch_size=11, noise="paired"), out_dir=tmp_path)
    assert isinstance(result, EvalResult)
    d = result.to_dict()
    assert list(d)[:4] == ["format", "format_version", "metrics", "settings"]
    assert set(d["metrics"]) == {"id", "id_others", "id_avg", "preservation", "fid_pre", "delta_fid_real",
                                 "diversity_cosine_after", "diversity_cosine_before"}
    written = json.loads((tmp_path / "eval.json").read_text())
    assert written == json.loads(result.to_json())
    assert written["settings"]["noise"] == "paired" and written["settings"]["detector"] is None  # crop: no detector
    assert written["settings"]["plan"]["renderer"] == "reference" and written["settings"]["precision"] == "fp32"
    back = EvalResult.from_dict(written)
    assert back.metrics == result.metrics and back.files == result.files
    with pytest.raises(InputError, match="not a guide-fast evaluation"):
        EvalResult.from_dict({"format": "other"})

    import guide_fast

    assert guide_fast.evaluate is evaluate and guide_fast.EvalResult is EvalResult and guide_fast.EvalConfig is EvalConfig


def test_guide_detector_path_embeds_the_aligned_crop():
    """align 'mtcnn' + detector 'guide': GUIDE's MTCNN and cv2 warp on the PNG levels, then the
    scorer on the 112x112 crop; NaN where no face is found."""
    skimage_data = pytest.importorskip("skimage.data")
    pytest.importorskip("facenet_pytorch")
    from guide_fast.evaluation.metrics import FaceEmbedder
    from guide_fast.identity import guide_mtcnn
    from guide_fast.identity.preprocess import normalize_uint8

    face = skimage_data.astronaut()
    levels = torch.from_numpy(np.stack([face, np.zeros_like(face)])).permute(0, 3, 1, 2).float()
    scorer = ProjectionScorer()
    emb = FaceEmbedder(scorer, "mtcnn", "guide", "cpu")(levels)
    assert emb.shape == (2, 64) and torch.isfinite(emb[0]).all() and torch.isnan(emb[1]).all()
    crop = guide_mtcnn.align([face])[0].image
    torch.testing.assert_close(emb[0], scorer.embed(normalize_uint8(crop))[0])


def test_unlearning_report_scores_views_with_evaluations_scoring():
    """unlearn/report.py's before/after similarity is evaluation's ID-over-views scoring."""
    from types import SimpleNamespace

    from guide_fast.unlearn.report import identity_similarity

    g = torch.Generator().manual_seed(0)
    renders = {k: torch.rand(2, 3, 3, 16, 16, generator=g) * 2 - 1 for k in ("before", "after", "target")}
    scorer = ProjectionScorer()
    out = identity_similarity(SimpleNamespace(renders=renders), scorer)
    flat = lambda x: x.reshape(6, 3, 16, 16)  # noqa: E731
    expected = (scorer.embed(flat(renders["before"])) * scorer.embed(flat(renders["after"]))).sum(1).reshape(2, 3)
    np.testing.assert_allclose(out["before_vs_after_per_view"], expected.numpy(), rtol=1e-12)
    assert out["before_vs_after_mean"] == pytest.approx(float(expected.mean()))
    assert out["views_without_face"] == 0
