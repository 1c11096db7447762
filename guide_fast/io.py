"""File output that is never half-written: write to a temporary name beside the target, then
rename over it (atomic on POSIX). Every file guide-fast writes goes through here.

Output paths are checked before any work (check_output_path): a path that cannot be written
is an InputError naming the path, the flag and the reason, never an OSError traceback after
minutes of work. Folders of several files (an unlearning run, an evaluation) are written into a
staging folder and put in place as a whole (staged_folder).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import InputError

# suffix -> PIL format of the images guide-fast writes (a path without a suffix is a PNG)
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP",
                 ".tif": "TIFF", ".tiff": "TIFF"}


def _label(path, flag) -> str:
    return f"{flag} {path}" if flag else str(path)


def _os_reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _cannot_write(flag, path, exc: OSError) -> InputError:
    where = f"{flag} {path}: cannot write there" if flag else f"cannot write {path}"
    return InputError(f"{where} ({_os_reason(exc)})")


def write_error(path, exc: BaseException) -> InputError:
    """One line for a failed write (disk full, quota, I/O error, or the safetensors writer's own
    error type, which is no OSError); the file at `path`, if any, is left as it was."""
    text = str(exc)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = "no space left on device" if exc.errno == errno.ENOSPC else "disk quota exceeded"
    elif "os error 28" in text or "No space left" in text:
        reason = "no space left on device"
    elif isinstance(exc, OSError):
        reason = _os_reason(exc)
    else:
        reason = (text.strip().splitlines() or [type(exc).__name__])[0][:200]
    return InputError(f"cannot write {path} ({reason}); any earlier file there is unchanged")


def _probe(folder: Path) -> OSError | None:
    """Really create (and remove) a file in `folder`: os.access says yes to root on /proc and on
    read-only mounts; only a write attempt tells."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".guide-fast-probe-", dir=folder)
    except OSError as exc:
        return exc
    try:
        os.write(fd, b"\0")
    except OSError as exc:
        return exc
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return None


def _probe_reason(path: Path, err: OSError) -> str:
    if _read_only(path) or err.errno == errno.EROFS:
        return "read-only file system"
    if err.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return _os_reason(err)


def _writable_parent(path: Path, label: str) -> None:
    """The folder that will hold `path` exists (or can be created) and can be written."""
    parent = path.parent
    missing = []
    probe = parent
    while not os.path.lexists(probe):
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    if os.path.lexists(probe) and not probe.is_dir():
        what = "the folder" if not missing else "a folder on its path"
        raise InputError(f"{label}: cannot write there: {what} {probe} is a file, not a folder")
    err = _probe(probe) if os.path.isdir(probe) else None
    if err is not None:
        action = "create folders in" if missing else "write in"
        reason = _probe_reason(probe, err)
        raise InputError(f"{label}: cannot {action} {probe} ({reason})")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def image_format(path, flag: str | None = None) -> str:
    """The PIL format for an image path from its suffix; InputError for one guide-fast cannot write."""
    suffix = Path(path).suffix.lower()
    if not suffix:
        return "PNG"
    if suffix not in IMAGE_FORMATS:
        raise InputError(f"{_label(path, flag)}: cannot write a {suffix!r} image; expected a path ending in "
                         f"{', '.join(IMAGE_FORMATS)}")
    fmt = IMAGE_FORMATS[suffix]
    if fmt == "WEBP":
        from PIL import features

        if not features.check("webp"):
            raise InputError(f"{_label(path, flag)}: this Pillow has no WebP support; use .png or .jpg")
    return fmt


MAX_JSON_BYTES = 64 << 20  # a run's report.json is a few hundred kB


def read_json_object(path, what: str = "JSON file") -> dict:
    """A JSON file that must hold an object (a run's report.json): InputError naming the file for
    anything else (missing, not a regular file, too large, not UTF-8, not JSON, nested beyond
    what the parser takes, not an object)."""
    path = Path(path)
    if not path.is_file():  # also refuses a FIFO or a device, which read_bytes would block on
        raise InputError(f"{what} {path}: not found or not a regular file")
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise InputError(f"{what} {path}: {size:,} bytes, more than the {MAX_JSON_BYTES >> 20} MB a report can be")
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise InputError(f"{what} {path}: not UTF-8 text") from None
    except RecursionError:
        raise InputError(f"{what} {path}: JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, or an integer of 4300+ digits
        raise InputError(f"{what} {path}: not valid JSON ({str(exc)[:200]})") from None
    if not isinstance(value, dict):
        raise InputError(f"{what} {path}: holds a JSON {type(value).__name__}, expected an object")
    return value


def folder_entries(path) -> list[str]:
    """Names in an existing folder (sorted), [] for a missing or empty one."""
    path = Path(path)
    if not path.is_dir():
        return []
    return sorted(p.name for p in path.iterdir())


def short_list(names, limit: int = 4) -> str:
    """'a, b, c, ... (N in all)': names for a message, sorted, at most `limit` of them."""
    names = sorted(map(str, names))
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_output_path(path, kind: str = "file", flag: str | None = "--out", *, overwrite: bool = False,
                      suffixes=None, image: bool = False, keep_contents: bool = False) -> Path:
    """Check an output path before any work is done; returns it as a Path.

    kind "file": must not be an existing folder; its folder must exist or be creatable, and be
    writable. With `suffixes` the name must end in one of them; with image=True it must be an
    image type save_image writes. kind "folder": must not be an existing file; its parent must be
    creatable and writable; an existing folder that holds files is refused unless `overwrite`
    (the whole folder is then replaced, see staged_folder); keep_contents=True: files are added
    to an existing folder (an evaluation into its run folder), only writability is checked.
    `flag` names the option in messages (None: the library's `out_dir`).
    """
    if kind not in ("file", "folder"):
        raise ValueError(f"kind must be 'file' or 'folder', got {kind!r}")
    if path is None or str(path) == "":
        raise InputError(f"{flag or 'output path'}: empty path")
    p = Path(path)
    label = _label(path, flag)
    if kind == "file":
        if p.is_dir():
            suffix = suffixes[0] if suffixes else ".png" if image else None
            example = f" (for example {p / ('name' + suffix)})" if suffix else ""
            raise InputError(f"{label} is an existing folder; expected a file path{example}")
        if suffixes and p.suffix.lower() not in suffixes:
            raise InputError(f"{label}: expected a file name ending in {' or '.join(suffixes)}, got "
                             f"{p.suffix or 'no suffix'!r}")
        if image:
            image_format(p, flag)
        _writable_parent(p, label)
        return p
    if os.path.lexists(p) and not p.is_dir():
        raise InputError(f"{label} is an existing file; expected a folder (a new one, or one of an earlier run "
                         f"with --overwrite)")
    if p.is_dir():
        entries = [] if keep_contents else folder_entries(p)
        if entries and not overwrite:
            how = "pass --overwrite" if flag else "pass overwrite=True"
            raise InputError(f"{label} already holds files ({short_list(entries)}); choose another folder or {how} "
                             f"to replace its contents")
        if entries:
            _check_replaceable(p, label)
        err = _probe(p)
        if err is not None:
            raise InputError(f"{label}: cannot write in {p} "
                             f"({_probe_reason(p, err)})")
        return p  # an existing folder is written from inside when its parent is not writable
    _writable_parent(p, label)
    return p


def _check_replaceable(p: Path, label: str) -> None:
    """--overwrite deletes the folder's old contents: never the working folder, one above it, a
    file-system root or the home folder."""
    real = p.resolve()
    cwd = Path.cwd().resolve()
    home = Path.home().resolve()
    if real == cwd or real in cwd.parents or real.parent == real or real == home:
        raise InputError(f"{label}: refusing to replace {real} (it is the current folder, a folder above it, "
                         f"the home folder or a file-system root); choose a dedicated output folder")


def _other_filesystem(folder: Path) -> bool:
    """True when `folder` cannot be renamed within its parent (a mount point)."""
    try:
        return os.path.ismount(folder) or os.stat(folder).st_dev != os.stat(folder.parent).st_dev
    except OSError:
        return False


def check_inputs_outside(out_dir, inputs, flag: str = "--out") -> None:
    """InputError when an input file or folder is `out_dir` itself or lies inside it: the output
    folder is replaced as a whole (staged_folder), so --overwrite would delete the command's own
    inputs (a folder of photos, the generator checkpoint) along with the earlier run.
    inputs: (flag, path) pairs; None paths are skipped."""
    out = Path(out_dir).resolve()
    for in_flag, path in inputs:
        if path is None or not Path(path).exists():
            continue
        p = Path(path).resolve()
        if p == out or out in p.parents:
            raise InputError(f"{flag} {out_dir} holds the input {in_flag} {path}: the output folder is replaced "
                             f"as a whole, which would delete it; choose another {flag}")


def _missing_parents(folder: Path) -> list[Path]:
    """The folders `mkdir(parents=True)` would create for `folder`, outermost first."""
    missing = []
    for p in (folder, *folder.parents):
        if p.exists():
            break
        missing.append(p)
    return missing[::-1]


@contextlib.contextmanager
def staged_folder(out_dir, *, overwrite: bool = False, flag: str | None = None, replace=None):
    """Yield an empty staging folder; when the block succeeds its files become `out_dir`.

    replace=None (a whole folder): the stage is a sibling of out_dir; once complete, an existing
    out_dir is moved aside, the stage renamed into place and the old folder deleted, so an
    interruption leaves the old folder or the new one, never a mix. When out_dir is a mount point
    (rename across file systems fails with EXDEV) the stage is made inside out_dir instead and
    its files moved in one by one (report.json last). replace=[names]: only those names of an
    existing out_dir are replaced (the evaluation files of a run folder); the stage is inside out_dir.
    On any exception the stage is removed and out_dir keeps what it had; folders this call
    created for out_dir (it and missing parents) are removed again, so a failed or interrupted
    run leaves the file system as it found it.
    """
    out_dir = Path(out_dir)
    clean_stale_stages(out_dir)
    if replace is None:
        check_output_path(out_dir, "folder", flag, overwrite=overwrite)
    created = _missing_parents(out_dir.absolute())
    done = False
    try:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            inside = (replace is not None or _other_filesystem(out_dir) or _probe(out_dir.parent) is not None)
            stage = Path(tempfile.mkdtemp(prefix=_stage_prefix(out_dir, "partial"),
                                          dir=out_dir if inside else out_dir.parent))
        except OSError as exc:
            raise _cannot_write(flag, out_dir, exc) from None
        try:
            try:
                yield stage
            except OSError as exc:
                raise write_error(out_dir, exc) from None
            except InputError as exc:  # a writer's message names its file in the stage: name the output
                text = str(exc)
                if str(stage) in text:
                    raise InputError(text.replace(str(stage), str(out_dir))) from None
                raise
            except Exception as exc:
                if type(exc).__name__ == "SafetensorError":  # the safetensors writer's own (disk full, ...)
                    raise write_error(out_dir, exc) from None
                raise
            _normalise_modes(stage)
            if inside:
                _commit_inside(stage, out_dir, flag, replace)
            else:
                _commit_beside(stage, out_dir, flag)
            done = True
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    finally:
        if not done:
            for folder in reversed(created):  # innermost first; a folder someone filled meanwhile stays
                try:
                    folder.rmdir()
                except OSError:
                    break


def _stage_prefix(out_dir: Path, kind: str) -> str:
    # the pid tells a later run whether the folder's writer is still alive (clean_stale_stages)
    return f".{out_dir.name}.{kind}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def clean_stale_stages(out_dir) -> list[str]:
    """Remove `.NAME.partial-*` / `.NAME.old-*` folders that a killed run (kill -9, power loss)
    left beside or inside `out_dir`. A folder is stale when the process named in it is gone
    (or, for names without a pid, when it is over an hour old). A stale `.old-` folder beside a
    missing `out_dir` is the only copy of the earlier result: it is put back instead. Returns
    the names removed or restored."""
    import time

    out_dir = Path(out_dir)
    done = []
    for where in (out_dir.parent, out_dir):
        try:
            names = [p for p in where.iterdir() if p.is_dir() and not p.is_symlink()
                     and p.name.startswith((f".{out_dir.name}.partial-", f".{out_dir.name}.old-"))]
        except OSError:
            continue
        for p in names:
            rest = p.name[len(out_dir.name) + 2:].split("-")
            kind, pid = rest[0], rest[1] if len(rest) > 2 else ""
            try:
                stale = not _pid_alive(int(pid)) if pid.isdigit() else time.time() - p.stat().st_mtime > 3600
            except OSError:
                continue
            if not stale:
                continue
            if kind == "old" and where == out_dir.parent and not folder_entries(out_dir):
                with contextlib.suppress(OSError):
                    if out_dir.is_dir():
                        out_dir.rmdir()
                    os.replace(p, out_dir)
                    done.append(f"restored {p.name}")
                    continue
            shutil.rmtree(p, ignore_errors=True)
            done.append(p.name)
    return done


def _normalise_modes(stage: Path) -> None:
    """One file mode for every output: what the user's umask gives a new file (folders likewise);
    mkdtemp makes 0700 folders and the safetensors writer 0600 files."""
    mask = _umask()
    with contextlib.suppress(OSError):
        os.chmod(stage, 0o777 & ~mask)
        for root, dirs, files in os.walk(stage):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o777 & ~mask)
            for f in files:
                os.chmod(os.path.join(root, f), 0o666 & ~mask)


def _commit_beside(stage: Path, out_dir: Path, flag) -> None:
    try:
        if folder_entries(out_dir):
            aside = Path(tempfile.mkdtemp(prefix=_stage_prefix(out_dir, "old"), dir=out_dir.parent))
            try:
                os.replace(out_dir, aside)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.rmdir(aside)
                raise
            try:
                os.replace(stage, out_dir)
            except BaseException:
                os.replace(aside, out_dir)
                raise
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(stage, out_dir)  # over the empty folder
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EBUSY):
            raise _cannot_write(flag, out_dir, exc) from None
        # out_dir is on another file system than its parent (or busy): copy the complete stage
        # into a stage inside out_dir, then move the files in there.
        try:
            inner = Path(tempfile.mkdtemp(prefix=_stage_prefix(out_dir, "partial"), dir=out_dir))
        except OSError as exc2:
            raise _cannot_write(flag, out_dir, exc2) from None
        try:
            for child in stage.iterdir():
                (shutil.copytree if child.is_dir() else shutil.copy2)(child, inner / child.name)
            _commit_inside(inner, out_dir, flag, None)
        except OSError as exc2:
            raise _cannot_write(flag, out_dir, exc2) from None
        finally:
            shutil.rmtree(inner, ignore_errors=True)


def _commit_inside(stage: Path, out_dir: Path, flag, replace) -> None:
    """Move the old entries (all, or those named in `replace`) aside inside out_dir, move the
    staged files in (report.json / eval.json last), then delete the old ones. On a failure the
    files moved in are removed and the old ones put back."""
    aside, moved_out, moved_in = None, [], []
    try:
        old = [p for p in out_dir.iterdir() if p.name != stage.name and (replace is None or p.name in replace)]
        if old:
            aside = Path(tempfile.mkdtemp(prefix=_stage_prefix(out_dir, "old"), dir=out_dir))
            for p in old:
                os.replace(p, aside / p.name)
                moved_out.append(p.name)
        last = ("report.json", "eval.json")
        for p in sorted(stage.iterdir(), key=lambda p: (p.name in last, p.name)):
            os.replace(p, out_dir / p.name)
            moved_in.append(p.name)
    except BaseException as exc:
        for name in moved_in:
            target = out_dir / name
            with contextlib.suppress(OSError):
                shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
        for name in moved_out:
            with contextlib.suppress(OSError):
                os.replace(aside / name, out_dir / name)
        if aside is not None:
            with contextlib.suppress(OSError):
                os.rmdir(aside)
        if isinstance(exc, OSError):
            raise _cannot_write(flag, out_dir, exc) from None
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path, suffix: str | None = None):
    """Yield a temporary path in the target's folder; on success rename it to `path`.

    On any exception the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"cannot write {path}: it is an existing folder, not a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
    except OSError as exc:  # read-only file system, a file where a folder should be, permissions
        raise _cannot_write(None, path, exc) from None
    try:
        try:
            yield Path(tmp)
            os.chmod(tmp, 0o666 & ~_umask())  # writers such as safetensors make 0600 files
        except OSError as exc:  # disk full, quota, I/O error while writing
            raise write_error(path, exc) from None
        try:
            os.replace(tmp, path)
        except OSError as exc:
            raise _cannot_write(None, path, exc) from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_json(path, obj) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n").encode())


def _json_default(o):
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_image(path, image) -> None:
    """Save an image atomically. image: PIL.Image, uint8 HxWx3 array, or a [3,H,W] tensor in [-1, 1]."""
    import numpy as np
    from PIL import Image

    if not isinstance(image, Image.Image):
        arr = image
        if hasattr(arr, "detach"):
            arr = to_uint8(arr)
        image = Image.fromarray(np.asarray(arr))
    fmt = image_format(path)
    if fmt == "JPEG" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt)


def to_uint8(image):
    """[3,H,W] or [N,3,H,W] tensor in [-1,1] -> uint8 HxWx3 (or NxHxWx3) array, as the EG3D
    scripts do: (x * 127.5 + 128).clamp(0, 255) (docs/eg3d.md §1.3)."""
    x = image.detach().float().cpu()
    x = (x * 127.5 + 128).clamp(0, 255).to(dtype=__import__("torch").uint8)
    return x.movedim(-3, -1).numpy()
