"""Bad CLI input: exit code 2, one clear line naming the flag / file and what was expected, no
traceback, and nothing written. Most checks fail before any heavy work, so these take seconds."""
import errno
import json
import os

import pytest
import torch

from guide_fast.cli import main
from guide_fast.errors import InputError


def run(capsys, *argv):
    """(exit code, stderr) of `guide-fast argv`."""
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def listing(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def gen_file(tmp_path_factory):
    from guide_fast.checkpoints import save_generator
    from guide_fast.eg3d.generator import build_generator

    return save_generator(build_generator("tiny", seed=0), tmp_path_factory.mktemp("gen") / "tiny.safetensors")


@pytest.fixture
def ws(tmp_path):
    """A work folder holding a text file and an empty folder, for outputs that collide with them."""
    (tmp_path / "text.txt").write_text("not a folder\n")
    (tmp_path / "existing_dir").mkdir()
    return tmp_path


def assert_one_line(rc, err, *parts):
    assert rc == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) >= 1
    for part in parts:
        assert part in err, (part, err)


# ---------------------------------------------------------------- 1. output paths, every command
def test_convert_output_collisions(capsys, ws, gen_file):
    before = listing(ws)
    rc, err = run(capsys, "convert", gen_file, ws / "existing_dir")
    assert_one_line(rc, err, "existing_dir", "is an existing folder", "file path")
    rc, err = run(capsys, "convert", gen_file, ws / "text.txt" / "out.safetensors")
    assert_one_line(rc, err, "text.txt", "is a file, not a folder")
    rc, err = run(capsys, "convert", gen_file, ws / "out.pkl")
    assert_one_line(rc, err, "DST", ".safetensors", ".pkl")
    assert listing(ws) == before


def test_unwritable_folder_is_refused_up_front(capsys, ws, gen_file, monkeypatch):
    import guide_fast.io as gio

    real_probe = gio._probe  # the up-front check really tries to write (os.access says yes to root)
    ro = ws / "ro"
    ro.mkdir()
    monkeypatch.setattr(gio, "_probe", lambda p: PermissionError(errno.EACCES, "Permission denied")
                        if str(p) == str(ro) else real_probe(p))
    for argv in (["convert", gen_file, ro / "g.safetensors"],
                 ["render", "--out", ro / "r.png"],
                 ["weights", "--dir", ws, "--json", ro / "w.json"],
                 ["export-identity", "--weights", ws / "missing.pth", "--onnx", ro / "m.onnx"],
                 ["unlearn", "--generator", gen_file, "--random-nets", "--seed", "1", "--out", ro / "run"],
                 ["demo", "--out", ro / "demo"],
                 ["evaluate", "--source", "tiny", "--unlearned", gen_file, "--latent", ws / "w.pt", "--random-nets",
                  "--out", ro / "ev"]):
        rc, err = run(capsys, *argv)
        assert_one_line(rc, err, str(ro), "permission denied")
    assert listing(ro) == []


def test_write_time_os_error_is_one_line_and_leaves_nothing(capsys, ws, monkeypatch):
    """Root passes os.access everywhere: a read-only file system shows only at the write."""
    import guide_fast.io as gio

    def read_only(src, dst):
        raise OSError(errno.EROFS, "Read-only file system", str(dst))

    monkeypatch.setattr(gio.os, "replace", read_only)
    before = listing(ws)
    rc, err = run(capsys, "weights", "--dir", ws, "--no-fallbacks", "--json", ws / "w.json")
    assert_one_line(rc, err, "w.json", "Read-only file system")
    assert listing(ws) == before  # no temporary file left


@pytest.mark.parametrize("command", ["unlearn", "demo", "evaluate"])
def test_folder_outputs_refuse_a_file(capsys, ws, gen_file, command):
    argv = {"unlearn": ["unlearn", "--generator", gen_file, "--random-nets", "--seed", "1"],
            "demo": ["demo"],
            "evaluate": ["evaluate", "--source", "tiny", "--unlearned", gen_file, "--latent", ws / "w.pt",
                         "--random-nets"]}[command]
    before = listing(ws)
    rc, err = run(capsys, *argv, "--out", ws / "text.txt")
    assert_one_line(rc, err, "--out", "text.txt", "is an existing file", "expected a folder")
    assert listing(ws) == before and (ws / "text.txt").read_text() == "not a folder\n"


def test_file_outputs_refuse_a_folder(capsys, ws):
    rc, err = run(capsys, "render", "--out", ws / "existing_dir")
    assert_one_line(rc, err, "--out", "existing_dir", "existing folder")
    rc, err = run(capsys, "weights", "--dir", ws, "--json", ws / "existing_dir")
    assert_one_line(rc, err, "--json", "existing folder")
    rc, err = run(capsys, "export-identity", "--weights", ws / "w.pth", "--onnx", ws / "existing_dir")
    assert_one_line(rc, err, "--onnx", "existing folder")
    rc, err = run(capsys, "export-identity", "--weights", ws / "w.pth", "--onnx", ws / "m.onnx", "--tensorrt",
                  ws / "existing_dir")
    assert_one_line(rc, err, "--tensorrt", "existing folder")
    assert listing(ws / "existing_dir") == []


# ------------------------------------------------- 2. existing output folders and --overwrite
def test_non_empty_output_folder_needs_overwrite(capsys, ws, gen_file):
    run_dir = ws / "run1"
    run_dir.mkdir()
    (run_dir / "report.json").write_text("{}")
    for argv in (["unlearn", "--generator", gen_file, "--random-nets", "--seed", "1"], ["demo"],
                 ["evaluate", "--source", "tiny", "--unlearned", gen_file, "--latent", ws / "w.pt", "--random-nets"]):
        rc, err = run(capsys, *argv, "--out", run_dir)
        assert_one_line(rc, err, f"--out {run_dir} already holds files (report.json)", "--overwrite")
    assert listing(run_dir) == ["report.json"]


def _result():
    from guide_fast.eg3d.generator import build_generator
    from guide_fast.unlearn.config import UnlearnConfig
    from guide_fast.unlearn.engine import UnlearnResult

    src = build_generator("tiny", seed=0)
    w = torch.randn(1, src.num_ws, src.config.w_dim)
    return UnlearnResult(generator=src.copy(), source=src, w_source=w, w_target=w + 1,
                         config=UnlearnConfig(iterations=1))


# a result with no renders: no grid.png; losses.png and identity.png are written for every run (docs/formats.md §7)
EXPECTED = ["delta.safetensors", "generator.safetensors", "identity.png", "latents.safetensors", "losses.png",
            "report.json"]


def test_save_overwrite_replaces_the_folder_as_a_whole(tmp_path):
    result = _result()
    out = tmp_path / "run"
    result.save(out)
    assert listing(out) == EXPECTED
    (out / "eval.json").write_text("{}")  # a stale file of an earlier evaluation
    with pytest.raises(InputError, match=r"already holds files .*overwrite=True"):
        result.save(out)
    assert (out / "eval.json").exists()
    result.save(out, overwrite=True)
    assert listing(out) == EXPECTED  # eval.json is gone: nothing of the earlier run stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no stage / old folder left
    with pytest.raises(InputError, match="is an existing file"):
        result.save(tmp_path / "run" / "report.json")


def test_save_across_file_systems_falls_back_to_staging_inside(tmp_path, monkeypatch):
    """out_dir on another file system than its parent: renaming the stage into place fails with
    EXDEV; the complete stage is then moved in from inside the folder."""
    import guide_fast.io as gio

    result = _result()
    out = tmp_path / "mnt"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    real_replace = os.replace

    def cross_device(src, dst):
        if ".partial-" in str(src) and str(dst) == str(out):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_replace(src, dst)

    monkeypatch.setattr(gio.os, "replace", cross_device)
    result.save(out, overwrite=True)
    assert listing(out) == EXPECTED
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnt"]

    # a detected mount point stages inside from the start
    monkeypatch.setattr(gio, "_other_filesystem", lambda folder: True)
    (out / "stale.txt").write_text("old")
    result.save(out, overwrite=True)
    assert listing(out) == EXPECTED


def test_save_into_a_mount_point_that_cannot_be_renamed(tmp_path, monkeypatch):
    import guide_fast.io as gio

    result = _result()
    out = tmp_path / "mnt"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    real_replace = os.replace

    def busy(src, dst):
        if str(src) == str(out):
            raise OSError(errno.EBUSY, "Device or resource busy")
        return real_replace(src, dst)

    monkeypatch.setattr(gio.os, "replace", busy)
    result.save(out, overwrite=True)
    assert listing(out) == EXPECTED
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnt"]


def test_save_on_a_read_only_file_system_is_an_input_error(tmp_path, monkeypatch):
    import guide_fast.io as gio

    result = _result()
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("old")

    real_replace = os.replace

    def read_only(src, dst):  # the folder's own rename fails (a read-only parent, as root)
        if str(out) in (str(src), str(dst)):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_replace(src, dst)

    monkeypatch.setattr(gio.os, "replace", read_only)
    with pytest.raises(InputError, match=r"cannot write .*run \(Read-only file system\)"):
        result.save(out, overwrite=True)
    assert listing(out) == ["old.txt"]  # the earlier contents are untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_evaluation_files_of_a_run_folder_are_replaced_as_a_set(tmp_path):
    """`evaluate --run R --overwrite`: only R's evaluation files are replaced, the run's stay."""
    from guide_fast.commands.evaluate import EVAL_FILES
    from guide_fast.io import staged_folder

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("report.json", "eval.json", "diversity.png"):
        (run_dir / name).write_text("old")
    with pytest.raises(RuntimeError):
        with staged_folder(run_dir, replace=EVAL_FILES) as stage:
            (stage / "eval.json").write_text("half")
            raise RuntimeError("interrupted")
    assert listing(run_dir) == ["diversity.png", "eval.json", "report.json"]
    assert (run_dir / "eval.json").read_text() == "old"
    with staged_folder(run_dir, replace=EVAL_FILES) as stage:
        (stage / "eval.json").write_text("new")
    assert listing(run_dir) == ["eval.json", "report.json"]
    assert (run_dir / "eval.json").read_text() == "new" and (run_dir / "report.json").read_text() == "old"


def test_overwrite_never_replaces_the_working_folder(capsys, tmp_path, gen_file, monkeypatch):
    (tmp_path / "keep.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    rc, err = run(capsys, "unlearn", "--generator", gen_file, "--random-nets", "--seed", "1", "--out", ".",
                  "--overwrite")
    assert_one_line(rc, err, "refusing to replace")
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_demo_default_folder_replaces_only_an_earlier_demo(capsys, tmp_path, monkeypatch):
    from guide_fast.commands.unlearn import _demo_out

    monkeypatch.chdir(tmp_path)
    args = type("A", (), {"out": None, "overwrite": False})
    assert _demo_out(args)[1] is False  # no folder yet: nothing to replace
    (tmp_path / "demo_out").mkdir()
    (tmp_path / "demo_out" / "report.json").write_text(json.dumps({"demo": {"iterations": 1}}))
    assert _demo_out(args)[1] is True  # `make demo` twice works
    (tmp_path / "demo_out" / "report.json").write_text(json.dumps({"what": "someone else's run"}))
    rc, err = run(capsys, "demo")
    assert_one_line(rc, err, "--out demo_out already holds files", "--overwrite")
    (tmp_path / "demo_out" / "report.json").write_text(json.dumps({"demo": {}}))
    args.out = "demo_out"  # as `make demo` passes it
    assert _demo_out(args)[1] is True
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "report.json").write_text(json.dumps({"demo": {}}))
    args.out = "other"
    assert _demo_out(args)[1] is False  # any other --out follows unlearn's rule


def test_evaluate_in_a_run_folder_refuses_an_earlier_evaluation(capsys, baseline_run, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(baseline_run, run_dir)
    (run_dir / "eval.json").write_text("{}")
    before = listing(run_dir)
    rc, err = run(capsys, "evaluate", "--run", run_dir, "--random-nets", "--samples", "0", "--preserve", "0",
                  "--align", "crop", "--quiet")
    assert_one_line(rc, err, "already holds an evaluation (eval.json)", "--overwrite")
    assert listing(run_dir) == before


# ------------------------------------------------------------------ 3. image type of render --out
def test_render_unknown_image_type(capsys, tmp_path):
    rc, err = run(capsys, "render", "--out", tmp_path / "r1.xyz")
    assert_one_line(rc, err, "--out", "r1.xyz", "'.xyz'", ".png")
    assert listing(tmp_path) == []


# ------------------------------------------------------------------------------------- 4. devices
@pytest.mark.parametrize("command", ["render", "unlearn", "demo", "evaluate"])
def test_bad_device_names(capsys, tmp_path, gen_file, command):
    argv = {"render": ["render", "--out", tmp_path / "r.png"],
            "unlearn": ["unlearn", "--generator", gen_file, "--random-nets", "--seed", "1", "--out", tmp_path / "o"],
            "demo": ["demo", "--out", tmp_path / "o"],
            "evaluate": ["evaluate", "--source", "tiny", "--unlearned", gen_file, "--latent", tmp_path / "w.pt",
                         "--random-nets", "--out", tmp_path / "o"]}[command]
    rc, err = run(capsys, *argv, "--device", "gpu")
    assert_one_line(rc, err, "--device 'gpu' is not a device name", "cuda:N")
    rc, err = run(capsys, *argv, "--device", "mps")
    assert_one_line(rc, err, "--device 'mps'", "cpu or cuda")
    if not torch.cuda.is_available():
        rc, err = run(capsys, *argv, "--device", "cuda")
        assert_one_line(rc, err, "--device cuda was asked for but", "--device cpu")
    assert listing(tmp_path) == []


def test_one_device_checker():
    from guide_fast.commands import _common, evaluate, unlearn

    assert not hasattr(evaluate, "_device") and not hasattr(unlearn, "_device")
    assert _common.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(InputError, match="--device 'cuda:x'"):
        _common.resolve_device("cuda:x")


# --------------------------------------------------------------------------------------- 5. seeds
def test_seed_flags_are_range_checked(capsys, tmp_path, gen_file):
    huge = "99999999999999999999999"
    unl = ["unlearn", "--generator", gen_file, "--random-nets", "--out", tmp_path / "o"]
    for argv, flag in ((["render", "--seeds", f"1,{huge}", "--out", tmp_path / "r.png"], "--seeds"),
                       (unl + ["--seed", huge], "--seed"),
                       (unl + ["--seed", "1", "--run-seed", huge], "--run-seed"),
                       (unl + ["--seed", "-1"], "--seed"),
                       (["evaluate", "--source", "tiny", "--random-nets", "--seed", huge], "--seed"),
                       (["evaluate", "--source", "tiny", "--random-nets", "--seed", str(2 ** 32)], "2**32")):
        rc, err = run(capsys, *argv)
        assert_one_line(rc, err, flag, "out of range")
        assert "Overflow" not in err
    rc, err = run(capsys, *unl, "--seed", "x")
    assert_one_line(rc, err, "--seed", "expected an integer seed, got 'x'")
    assert listing(tmp_path) == []


# -------------------------------------------------------------------- 6, 7. demo --iters, --batch-size
def test_demo_iters_and_evaluate_batch_size(capsys, tmp_path, gen_file):
    rc, err = run(capsys, "demo", "--iters", "0", "--out", tmp_path / "d")
    assert_one_line(rc, err, "--iters must be >= 1, got 0")
    for bs in ("0", "-2"):
        rc, err = run(capsys, "evaluate", "--source", "tiny", "--unlearned", gen_file, "--latent", tmp_path / "w.pt",
                      "--random-nets", "--batch-size", bs, "--out", tmp_path / "e")
        assert_one_line(rc, err, f"--batch-size must be >= 1, got {bs}")
    rc, err = run(capsys, "evaluate", "--source", "tiny", "--random-nets", "--samples", "1")
    assert_one_line(rc, err, "--samples must be 0")
    assert listing(tmp_path) == []


# ------------------------------------------------------------------------------------ 8. baseline
@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory, gen_file):
    out = tmp_path_factory.mktemp("baseline") / "run"
    assert main(["unlearn", "--generator", str(gen_file), "--random-nets", "--seed", "3", "--baseline", "--iters", "1",
                 "--no-progress", "--out", str(out)]) == 0
    return out


def test_baseline_records_the_average_target(baseline_run):
    report = json.loads((baseline_run / "report.json").read_text())
    cfg = report["config"]
    assert cfg["target"] == "average" and cfg["use_adjacency"] is False and cfg["use_global"] is False


def test_baseline_with_target_extra_is_refused(capsys, tmp_path, gen_file):
    rc, err = run(capsys, "unlearn", "--generator", gen_file, "--random-nets", "--seed", "1", "--baseline",
                  "--target", "extra", "--out", tmp_path / "o")
    assert_one_line(rc, err, "--baseline", "--target extra")
    assert listing(tmp_path) == []


# ------------------------------------------------------------------------------------- 9. opset
@pytest.mark.parametrize("extra", [["--opset", "999"], ["--opset", "1"], ["--opset", "17", "--exporter", "dynamo"]])
def test_export_identity_opset_range(capsys, tmp_path, extra):
    rc, err = run(capsys, "export-identity", "--weights", tmp_path / "w.pth", "--onnx", tmp_path / "m.onnx", *extra)
    assert_one_line(rc, err, f"--opset {extra[1]} is out of range", "exporter")
    assert len(err.strip().splitlines()) == 1
    assert listing(tmp_path) == []


# ------------------------------------------------------------------- 10. messages name CLI flags
def test_flag_conflicts_are_named_as_flags(capsys, tmp_path, gen_file):
    unl = ["unlearn", "--generator", gen_file, "--random-nets", "--seed", "1", "--out", tmp_path / "o", "--device",
           "cpu"]
    rc, err = run(capsys, *unl, "--reference", "--upsample-conv", "folded")
    assert_one_line(rc, err, "--reference", "--upsample-conv folded is a fast-path option")
    assert "upsample_conv=" not in err
    rc, err = run(capsys, *unl, "--reference", "--channels-last")
    assert_one_line(rc, err, "--channels-last is a fast-path option")
    assert "memory_format" not in err
    rc, err = run(capsys, *unl, "--precision", "bf16")
    assert_one_line(rc, err, "--precision bf16 needs a CUDA device")
    if os.environ.get("TRITON_INTERPRET") != "1":
        rc, err = run(capsys, *unl, "--renderer", "triton")
        assert_one_line(rc, err, "--renderer triton needs a CUDA device")
    rc, err = run(capsys, "evaluate", "--source", "tiny", "--random-nets", "--device", "cpu", "--precision", "bf16")
    assert_one_line(rc, err, "--precision bf16 needs a CUDA device")
    assert listing(tmp_path) == []


def test_renderer_triton_without_cuda(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rc, err = run(capsys, "render", "--device", "cpu", "--renderer", "triton", "--out", tmp_path / "r.png")
    assert_one_line(rc, err, "--renderer triton needs a CUDA device", "--renderer reference")
    assert listing(tmp_path) == []


def test_usage_errors_return_2_and_help_0(capsys):
    assert main(["render", "--views", "x"]) == 2
    assert main(["--help"]) == 0
    capsys.readouterr()
