"""The issue 13-16 flags tried as a demanding user would (review of the new CLI surface): each
bad value or conflicting combination gives exit code 2, one line naming the flag and the
problem, no traceback and no --out folder. All checks fail before any network is built."""
import pytest
import torch

from guide_fast.cli import main

TINY = ["unlearn", "--generator", "tiny", "--random-nets", "--iters", "1", "--no-progress"]


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def assert_refused(rc, err, *parts):
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in lines[0], (part, lines[0])


@pytest.fixture
def photo(tmp_path):
    from PIL import Image

    path = tmp_path / "person.png"
    Image.new("RGB", (64, 64), (120, 90, 60)).save(path)
    return path


@pytest.mark.parametrize("value", ["nan", "-1", "0", "inf"])
def test_dist_timeout_checked_in_one_process_too(capsys, tmp_path, value):
    # --dist-timeout nan was accepted (and ignored) outside torchrun: the run went ahead
    out = tmp_path / "run"
    rc, err = run(capsys, *TINY, "--seed", "1", "--dist-timeout", value, "--out", out)
    assert_refused(rc, err, "--dist-timeout", "positive")
    assert not out.exists()


def test_one_inversion_step_is_refused(capsys, tmp_path, photo):
    # the projector schedule's learning rate is 0 at step 0: one step returned w_avg, and the run
    # then failed deep in the engine with "w_source equals w_avg" after the whole inversion
    out = tmp_path / "run"
    rc, err = run(capsys, *TINY, "--image", photo, "--pre-aligned", "--invert-steps", "1", "--out", out)
    assert_refused(rc, err, "--invert-steps 1", "2 or more")
    assert not out.exists()


def test_one_refine_step_is_refused(capsys, tmp_path, photo):
    # with --encoder, --refine-steps 1 silently left the GOAE latent as it was (reported as refined)
    enc = tmp_path / "encoder_FFHQ.pt"
    enc.write_bytes(b"not read: the flag check comes first")
    out = tmp_path / "run"
    rc, err = run(capsys, *TINY, "--image", photo, "--pre-aligned", "--encoder", enc, "--refine-steps", "1",
                  "--out", out)
    assert_refused(rc, err, "--refine-steps 1", "2 or more")
    assert not out.exists()


@pytest.mark.parametrize("extra", [["--random-nets"], ["--random-nets", "--align", "crop"]])
def test_evaluate_detector_with_crop_alignment_is_a_conflict(capsys, tmp_path, extra):
    # --detector facenet with the crop alignment was silently ignored (eval.json: detector null)
    out = tmp_path / "eval"
    rc, err = run(capsys, "evaluate", "--run", tmp_path / "no_run", "--detector", "facenet", *extra, "--out", out)
    assert_refused(rc, err, "--detector facenet", "--align mtcnn")
    assert not out.exists()


def test_evaluate_run_that_is_a_file(capsys, tmp_path):
    f = tmp_path / "report.json"
    f.write_text("{}")
    rc, err = run(capsys, "evaluate", "--run", f, "--random-nets", "--out", tmp_path / "eval")
    assert_refused(rc, err, str(f), "is a file", "--run")
    assert not (tmp_path / "eval").exists()


def test_repeated_seed_is_refused(capsys, tmp_path):
    # --seed 1 1 unlearned identity 1 twice (its loss counted twice in the joint step), exit 0
    out = tmp_path / "run"
    rc, err = run(capsys, *TINY, "--seed", "1", "2", "1", "--out", out)
    assert_refused(rc, err, "--seed 1", "more than once")
    assert not out.exists()


def test_repeated_photo_is_refused(capsys, tmp_path, photo):
    # the same photo twice (here: a file and its folder) was both the person to forget and a w_others photo
    out = tmp_path / "run"
    rc, err = run(capsys, *TINY, "--image", photo.parent, photo, "--pre-aligned", "--invert-steps", "2",
                  "--out", out)
    assert_refused(rc, err, "--image", str(photo), "more than once")
    assert not out.exists()


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64, torch.bool])
def test_library_refuses_non_float_latents(tiny_generator_for_latents, dtype):
    # complex latents were cast to float (imaginary part dropped, a ComplexWarning only); ints/bools silently
    from guide_fast.errors import InputError

    gen = tiny_generator_for_latents
    with pytest.raises(InputError, match="expected floating point"):
        gen.as_latents(torch.zeros(1, gen.num_ws, gen.config.w_dim, dtype=dtype))


@pytest.fixture(scope="module")
def tiny_generator_for_latents():
    from guide_fast.eg3d.generator import build_generator

    return build_generator("tiny", seed=0)


@pytest.mark.parametrize("seeds, message", [([-1], "out of range"), ([2 ** 63], "out of range"),
                                            ([3, 3], "more than once")])
def test_library_seed_checks(tiny_generator_for_latents, seeds, message):
    # the library took seeds=[-1] (an alias of another seed in torch's generator) and repeated seeds
    from guide_fast.errors import InputError
    from guide_fast.unlearn.views import latents_from_seeds

    with pytest.raises(InputError, match=message):
        latents_from_seeds(tiny_generator_for_latents, seeds)


def test_goae_on_a_generator_of_another_layout_is_refused_before_any_photo(capsys, tmp_path, photo, monkeypatch):
    # a real GOAE (head fixed at [14, 512]) with the tiny generator ([8, 64]) failed after the
    # forward with "the encoder returned [1, 14, 512]", not saying why
    import guide_fast.inversion.goae as goae
    from guide_fast.inversion.goae import GOAEncoder

    class Loaded(torch.nn.Module):
        output_layout = GOAEncoder.output_layout

        def forward(self, x):  # pragma: no cover - must not be reached
            raise AssertionError("the photo went through the encoder")

    monkeypatch.setattr(goae, "load_encoder", lambda *a, **k: Loaded())
    enc = tmp_path / "encoder_FFHQ.pt"
    enc.write_bytes(b"stand-in")
    out = tmp_path / "run"
    rc, err = run(capsys, *TINY, "--image", photo, "--pre-aligned", "--encoder", enc, "--out", out)
    assert_refused(rc, err, "--encoder", "[14, 512]", "[8, 64]", "leave out --encoder")
    assert not out.exists()


def test_w_avg_of_ffhq_on_tiny_names_both_layouts(capsys, tmp_path):
    f = tmp_path / "w_avg.pt"
    torch.save(torch.randn(14, 512), f)
    rc, err = run(capsys, *TINY, "--seed", "1", "--w-avg", f, "--out", tmp_path / "run")
    assert_refused(rc, err, "[14, 512]", "expected [8, 64]", "GUIDE's file for EG3D FFHQ 512, not for this generator")
