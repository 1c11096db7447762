"""Output safety and flag checks found by a review of the CLI: a failed, interrupted or terminated
run leaves the file system as it was; --overwrite never deletes the command's own inputs; flags
that cannot apply and sizes that cannot be meant are refused in one line before any work."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from guide_fast.cli import main
from guide_fast.errors import InputError
from guide_fast.io import staged_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNLEARN = ["unlearn", "--generator", "tiny", "--random-nets", "--device", "cpu", "--no-progress", "--iters", "1"]


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def one_line(rc, err, *parts):
    assert rc == 2, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    for part in parts:
        assert part in err, (part, err)


# ---------------------------------------------------------------- staged output folders
def test_a_failed_write_removes_the_folders_it_created_and_names_the_output(tmp_path):
    out = tmp_path / "a" / "b" / "c"
    with pytest.raises(RuntimeError):
        with staged_folder(out) as stage:
            (stage / "generator.safetensors").write_bytes(b"partial")
            raise RuntimeError("the run failed")
    assert sorted(os.listdir(tmp_path)) == []  # a/, a/b/ and a/b/c/ are gone again, no stage left
    with pytest.raises(InputError) as err:
        with staged_folder(out) as stage:
            raise InputError(f"cannot write {stage / 'generator.safetensors'} (no space left on device)")
    assert str(err.value) == f"cannot write {out / 'generator.safetensors'} (no space left on device)"
    assert sorted(os.listdir(tmp_path)) == []
    (tmp_path / "keep").mkdir()  # a folder that existed before stays
    with pytest.raises(KeyboardInterrupt):
        with staged_folder(tmp_path / "keep" / "run"):
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["keep"] and os.listdir(tmp_path / "keep") == []
    with staged_folder(out) as stage:  # success keeps the folders, of course
        (stage / "report.json").write_text("{}")
    assert (out / "report.json").read_text() == "{}"


def test_sigterm_unwinds_like_ctrl_c_and_keeps_no_partial_output(tmp_path):
    """`kill`, `timeout`, docker and batch schedulers send SIGTERM: the stage is removed, the
    exit code is 143, and stderr has one line."""
    out = tmp_path / "run"
    code = textwrap.dedent(f"""
        import argparse, os, signal, sys, time
        import guide_fast.cli as cli
        from guide_fast.io import staged_folder

        def work(args):
            with staged_folder({str(out)!r}) as stage:
                (stage / "generator.safetensors").write_bytes(b"half")
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(30)

        def parser():
            p = argparse.ArgumentParser(prog="guide-fast")
            sub = p.add_subparsers(dest="command")
            sub.add_parser("work").set_defaults(func=work)
            return p

        cli.build_parser = parser
        sys.exit(cli.main(["work"]))
    """)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 143, proc.stderr
    assert proc.stderr == "guide-fast work: terminated (SIGTERM); no partial output was kept\n"
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- inputs are never outputs
def _photos(folder, n=2):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


def test_overwrite_never_deletes_the_commands_own_inputs(capsys, tmp_path):
    photos = _photos(tmp_path / "photos")
    rc, err = run(capsys, *UNLEARN, "--pre-aligned", "--invert-steps", "2", "--image", photos, "--out", photos,
                  "--overwrite")
    one_line(rc, err, f"--out {photos} holds the input --image {photos}", "choose another --out")
    assert sorted(os.listdir(photos)) == ["p0.png", "p1.png"]
    rc, err = run(capsys, *UNLEARN, "--seed", "1", "--w-avg", photos / "p0.png", "--out", photos, "--overwrite")
    one_line(rc, err, "holds the input --w-avg")
    rc, err = run(capsys, "evaluate", "--source", "tiny", "--unlearned", photos / "p0.png", "--latent",
                  photos / "p1.png", "--random-nets", "--out", photos, "--overwrite")
    one_line(rc, err, "holds the input --unlearned")
    assert sorted(os.listdir(photos)) == ["p0.png", "p1.png"]


def test_a_photo_cannot_be_both_forgotten_and_held_out(capsys, tmp_path):
    photos = _photos(tmp_path / "photos")
    rc, err = run(capsys, *UNLEARN, "--pre-aligned", "--invert-steps", "2", "--image", photos / "p0.png",
                  "--others", photos, "--out", tmp_path / "o")
    one_line(rc, err, f"--others: {photos / 'p0.png'} is also an --image photo")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- flags that cannot apply
@pytest.mark.parametrize("extra,part", [
    (["--seed", "1", "--face-index", "2"], "--face-index applies to photos"),
    (["--seed", "1", "--strict", "--pre-aligned"], "--strict, --pre-aligned apply to photos"),
    (["--seed", "1", "--invert-steps", "5"], "--invert-steps applies to photos"),
    (["--seed", "1", "--id-weights", "x.pth"], "--random-nets replaces --id-weights"),
])
def test_flags_that_cannot_apply_are_refused(capsys, tmp_path, extra, part):
    rc, err = run(capsys, *UNLEARN, *extra, "--out", tmp_path / "o")
    one_line(rc, err, part)


def test_face_selection_flags_need_detection(capsys, tmp_path):
    photos = _photos(tmp_path / "photos", 1)
    rc, err = run(capsys, *UNLEARN, "--pre-aligned", "--image", photos, "--face-index", "1", "--out", tmp_path / "o")
    one_line(rc, err, "--face-index chooses among the faces MTCNN finds")


# ---------------------------------------------------------------- sizes nobody means
@pytest.mark.parametrize("argv,part", [
    (["render", "--device", "cpu", "--views", "100000000", "--out", "{t}/g.png"], "--seeds x --views = 3 x 100,000,000"),
    (UNLEARN[:-2] + ["--iters", "2000000", "--seed", "1", "--out", "{t}/o"], "--iters must be <= 1,000,000"),
    (UNLEARN + ["--pre-aligned", "--image", "{t}/p.png", "--invert-steps", "1000000000000", "--out", "{t}/o"],
     "--invert-steps must be <= 1,000,000"),
    (["evaluate", "--source", "tiny", "--unlearned", "tiny", "--random-nets", "--samples", "1000000000000",
      "--out", "{t}/e"], "--samples must be <= 100,000"),
    (["evaluate", "--source", "tiny", "--unlearned", "tiny", "--random-nets", "--preserve", "1000000000",
      "--out", "{t}/e"], "--preserve must be <= 100,000"),
])
def test_absurd_sizes_are_refused_before_any_work(capsys, tmp_path, argv, part):
    Image.new("RGB", (64, 64)).save(tmp_path / "p.png")
    rc, err = run(capsys, *[a.format(t=tmp_path) for a in argv])
    one_line(rc, err, part)
    assert sorted(os.listdir(tmp_path)) == ["p.png"]


def test_library_bounds_match_the_flags():
    from guide_fast.evaluation import EvalConfig
    from guide_fast.inversion.optimize import _check_steps

    with pytest.raises(InputError, match="num_fid_samples must be <= 100,000"):
        EvalConfig(num_fid_samples=10 ** 12)
    with pytest.raises(InputError, match="inversion steps must be <= 1,000,000"):
        _check_steps(10 ** 12, None)


# ---------------------------------------------------------------- small ones
def test_weights_report_never_replaces_a_weight_file(capsys, tmp_path):
    np.save(tmp_path / "ffhq_real_feat.npy", np.zeros((2, 2048), dtype=np.float32))
    rc, err = run(capsys, "weights", "--dir", tmp_path, "--json", tmp_path / "ffhq_real_feat.npy")
    one_line(rc, err, "--json", "weight file this check found")
    assert np.load(tmp_path / "ffhq_real_feat.npy").shape == (2, 2048)


def test_a_folder_named_like_a_preset_does_not_hide_the_preset(tmp_path, monkeypatch):
    from guide_fast.commands.generator import resolve_generator

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    gen, random_weights = resolve_generator("tiny")
    assert random_weights and gen.config.img_resolution > 0
