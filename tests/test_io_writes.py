"""Writes that fail early and clean up (issue 13 §6): a real write probe, one-line errors with the
earlier result intact (disk full, the safetensors writer's own error), stale staging folders of
a killed run removed (or the earlier result restored), one file mode for every output, bounded
iterations."""
import errno
import os
import stat

import pytest
import torch

from guide_fast import io as gio
from guide_fast.errors import GuideFastError, InputError


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_write_probe_refuses_paths_os_access_accepts(tmp_path):
    # root passes os.access on /proc; only a real write attempt fails there
    with pytest.raises(InputError, match="--out /proc/x/o.safetensors: cannot"):
        gio.check_output_path("/proc/x/o.safetensors", "file", "--out")
    with pytest.raises(InputError, match="cannot"):
        gio.check_output_path("/proc/run", "folder", "--out")
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        if os.geteuid() != 0:
            with pytest.raises(InputError, match="cannot"):
                gio.check_output_path(ro / "a.png", "file", "--out", image=True)
    finally:
        os.chmod(ro, 0o700)
    assert gio.check_output_path(tmp_path / "new" / "a.png", "file", "--out", image=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".guide-fast-probe")]


def test_stale_stages_of_a_killed_run_are_cleaned_and_the_old_result_restored(tmp_path):
    out = tmp_path / "run"
    dead = 2 ** 22 + 12345  # above pid_max: no such process
    (tmp_path / f".run.partial-{dead}-abc").mkdir()
    (tmp_path / f".run.partial-{dead}-abc" / "generator.safetensors").write_bytes(b"half")
    old = tmp_path / f".run.old-{dead}-def"
    old.mkdir()
    (old / "report.json").write_text("{}")
    alive = tmp_path / f".run.partial-{os.getpid()}-live"
    alive.mkdir()
    done = gio.clean_stale_stages(out)
    assert any(d.startswith("restored") for d in done)
    assert (out / "report.json").read_text() == "{}"  # the only copy of the earlier run came back
    assert not (tmp_path / f".run.partial-{dead}-abc").exists() and alive.exists()
    alive.rmdir()
    # and staged_folder does it on its own before writing
    (tmp_path / f".run.partial-{dead}-xyz").mkdir()
    with gio.staged_folder(out, overwrite=True) as stage:
        (stage / "a.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert sorted(os.listdir(out)) == ["a.txt"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_every_output_gets_one_mode_from_the_umask(tmp_path, umask):
    from safetensors.torch import save_file

    from guide_fast.checkpoints import save_generator
    from guide_fast.eg3d.generator import PRESETS, TriPlaneGenerator

    old = os.umask(umask)
    try:
        gen = TriPlaneGenerator(PRESETS["tiny"]())
        save_generator(gen, tmp_path / "g.safetensors")
        gio.write_json(tmp_path / "r.json", {"a": 1})
        gio.save_image(tmp_path / "i.png", torch.zeros(3, 4, 4))
        with gio.staged_folder(tmp_path / "run") as stage:
            save_file({"w": torch.zeros(2)}, str(stage / "latents.safetensors"))  # the writer makes 0600
            gio.write_json(stage / "report.json", {})
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    for p in ("g.safetensors", "r.json", "i.png", "run/latents.safetensors", "run/report.json"):
        assert _mode(tmp_path / p) == want, (p, oct(_mode(tmp_path / p)))
    assert _mode(tmp_path / "run") == 0o777 & ~umask


def test_disk_full_is_one_line_and_keeps_the_earlier_file(tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    from guide_fast.checkpoints import save_generator
    from guide_fast.eg3d.generator import PRESETS, TriPlaneGenerator

    gen = TriPlaneGenerator(PRESETS["tiny"]())
    path = save_generator(gen, tmp_path / "g.safetensors")
    before = path.read_bytes()

    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(InputError, match=r"cannot write .*g.safetensors \(no space left on device\); any earlier") as e:
        save_generator(gen, path)
    assert "\n" not in str(e.value) and path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.safetensors"]
    # the run folder: the safetensors error inside the stage, the earlier run stays whole
    out = tmp_path / "run"
    with gio.staged_folder(out) as stage:
        (stage / "report.json").write_text("old")
    with pytest.raises(GuideFastError, match="no space left on device"):
        with gio.staged_folder(out, overwrite=True) as stage:
            full()
    assert os.listdir(out) == ["report.json"] and (out / "report.json").read_text() == "old"
    # a plain OSError (ENOSPC) from a JSON/PNG write
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    gio_path = tmp_path / "r.json"
    gio_path.write_text("earlier")
    with pytest.raises(InputError, match="no space left on device"):
        gio.write_json(gio_path, {"a": 1})
    assert gio_path.read_text() == "earlier"


def test_iterations_are_bounded():
    from guide_fast.unlearn.config import MAX_ITERATIONS, UnlearnConfig

    UnlearnConfig(iterations=MAX_ITERATIONS)
    for bad in (10 ** 12, -1, 2.5, True):
        with pytest.raises(InputError, match="iterations"):
            UnlearnConfig(iterations=bad)
