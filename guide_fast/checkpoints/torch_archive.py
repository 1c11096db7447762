"""`torch.save` containers read without torch.load: the zip archive and the legacy stream
(docs/formats.md §2). Both hold one pickle whose persistent ids name storages and the raw
storage bytes; the pickle goes through the inert parser and the typed interpreter, and each
storage is a view of bytes that are really in the file (its declared size is checked against them).

Used for whole .pt/.pth files (files.read_torch_file) and for the storages that a plain pickle
of tensors embeds as `torch.storage._load_from_bytes(<legacy torch.save bytes>)`.
"""
from __future__ import annotations

import io
import struct
import zipfile

from ..errors import CheckpointError
from .interpret import Interpreter, Storage, itemsize, storage_dtype
from .pickle_reader import Call, PersistentId, parse_pickle

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
MAX_RECORDS_WALK = 50_000_000


def _walk_persistent_ids(root) -> list:
    """Every PersistentId reachable from `root` (iterative; each record visited once)."""
    out, seen, todo = [], set(), [root]
    while todo:
        rec = todo.pop()
        if id(rec) in seen or rec is None or isinstance(rec, (bool, int, float, str, memoryview)):
            continue
        seen.add(id(rec))
        if len(seen) > MAX_RECORDS_WALK:
            break
        if isinstance(rec, PersistentId):
            out.append(rec)
        elif isinstance(rec, (tuple, list, set, frozenset)):
            todo.extend(rec)
        elif isinstance(rec, dict):
            todo.extend(rec.values())
        elif isinstance(rec, Call):
            todo.append(rec.args)
            todo.extend(rec.states)
            todo.extend(v for kv in rec.items for v in kv)
            todo.extend(rec.appends)
    return out


def _pid_fields(pid, where: str, interp: Interpreter, legacy: bool):
    """('storage', StorageType, key, location, numel[, view_metadata]) -> (dtype, key, numel)."""
    want = 6 if legacy else 5
    if not isinstance(pid, tuple) or len(pid) != want or pid[0] != "storage":
        interp.fail(where, f"malformed storage record (a {type(pid).__name__}, expected a {want}-tuple "
                           "('storage', type, key, location, size...))")
    dtype = storage_dtype(pid[1], where, interp.fail)
    key, location, numel = pid[2], pid[3], pid[4]
    if not isinstance(key, str) or not isinstance(location, str) or not isinstance(numel, int) or numel < 0:
        interp.fail(where, "malformed storage record (key, location or size)")
    if legacy and pid[5] is not None:
        interp.fail(where, "storage views (legacy view_metadata) are not accepted")
    return dtype, key, numel


# ------------------------------------------------------------------------ zip archives
def _zip_members(data: memoryview, source: str) -> dict[str, memoryview]:
    """name -> zero-copy view of each stored (uncompressed) member; compressed members refused."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, struct.error, OSError, EOFError,
            NotImplementedError, OverflowError, KeyError, IndexError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{source}: not a readable torch zip archive (truncated or corrupt?): {exc}") from None
    out = {}
    spans = []
    n = len(data)
    for info in infos:
        if info.filename in out:  # readers disagree on which copy wins: torch.load and this one did
            raise CheckpointError(f"{source}: zip member {info.filename!r} occurs twice")
        if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
            raise CheckpointError(f"{source}: zip member {info.filename!r} is compressed; torch.save writes "
                                  "stored members only")
        if info.flag_bits & 0x1:
            raise CheckpointError(f"{source}: zip member {info.filename!r} is marked encrypted; torch.save does not "
                                  "encrypt")
        off = info.header_offset
        if off < 0 or off + 30 > n or bytes(data[off:off + 4]) != b"PK\x03\x04":
            raise CheckpointError(f"{source}: zip member {info.filename!r} has no valid local header")
        flags, method, csize, usize, name_len, extra_len = struct.unpack("<2xHH8xIIHH", data[off + 4:off + 30])
        # the local header must describe the same member as the central directory, or the bytes
        # read would be another member's (or the pickle's) under this member's name
        name = info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")
        sizes_ok = (csize, usize) == (info.compress_size, info.file_size) or (flags & 0x8 and csize == usize == 0)
        if bytes(data[off + 30:off + 30 + name_len]) != name or method != zipfile.ZIP_STORED or not sizes_ok:
            raise CheckpointError(f"{source}: zip member {info.filename!r}: its local header does not match the "
                                  "central directory (name, method or sizes)")
        start = off + 30 + name_len + extra_len
        if start + info.file_size > n:
            raise CheckpointError(f"{source}: zip member {info.filename!r} extends past the end of the file "
                                  "(truncated?)")
        out[info.filename] = data[start:start + info.file_size]
        spans.append((off, start + info.file_size, info.filename))
    spans.sort()
    for (_, end, a), (nxt, _, b) in zip(spans, spans[1:]):
        if nxt < end:
            raise CheckpointError(f"{source}: zip members {a!r} and {b!r} overlap in the file")
    return out


def _read_zip(data: memoryview, source: str, interp_factory):
    members = _zip_members(data, source)
    pkl = [name for name in members if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(pkl) != 1:
        raise CheckpointError(f"{source}: a torch zip archive holds exactly one <name>/data.pkl; found {len(pkl)}")
    prefix = pkl[0][: -len("data.pkl")]
    order = members.get(prefix + "byteorder")
    if order is not None and bytes(order) != b"little":
        raise CheckpointError(f"{source}: big-endian torch archives are not supported")
    root, end = parse_pickle(members[pkl[0]], source=f"{source} ({pkl[0]})")
    interp: Interpreter = interp_factory()

    cache = {}

    def load(pid, where):
        dtype, key, numel = _pid_fields(pid, where, interp, legacy=False)
        if key in cache:
            if (cache[key].dtype, cache[key].numel) != (dtype, numel):
                interp.fail(where, f"storage {key!r} declared twice with different types or sizes")
            return cache[key]
        raw = members.get(f"{prefix}data/{key}")
        if raw is None:
            interp.fail(where, f"storage {key!r} is not in the archive")
        nbytes = numel * itemsize(dtype)
        if len(raw) < nbytes:
            interp.fail(where, f"storage {key!r} declares {nbytes:,} bytes but the archive holds {len(raw):,}")
        cache[key] = Storage(dtype, raw[:nbytes], numel)
        return cache[key]

    interp.storage_loader = load
    return root, interp


# ------------------------------------------------------------------------ legacy stream
def _read_legacy(data: memoryview, source: str, interp_factory):
    pos = 0
    magic, pos = parse_pickle(data, pos, source)
    if magic != LEGACY_MAGIC:
        raise CheckpointError(f"{source}: a pickle, but not a torch.save file (no torch magic number)")
    proto, pos = parse_pickle(data, pos, source)
    if proto != LEGACY_PROTOCOL:
        raise CheckpointError(f"{source}: unsupported legacy torch protocol {proto!r}")
    sys_info, pos = parse_pickle(data, pos, source)
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
        raise CheckpointError(f"{source}: legacy torch file that is not little-endian (or has no system info)")
    root, pos = parse_pickle(data, pos, source)
    keys, pos = parse_pickle(data, pos, source)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or len(set(keys)) != len(keys):
        raise CheckpointError(f"{source}: malformed legacy storage key list")
    interp: Interpreter = interp_factory()
    table = {}
    for pid in _walk_persistent_ids(root):
        dtype, key, numel = _pid_fields(pid.pid, "storage record", interp, legacy=True)
        if table.setdefault(key, (dtype, numel)) != (dtype, numel):
            interp.fail("storage record", f"storage {key!r} declared twice with different types or sizes")
    storages = {}
    n = len(data)
    for key in keys:
        if key not in table:
            interp.fail("storage data", f"storage {key!r} is listed but never used")
        dtype, numel = table[key]
        if pos + 8 > n:
            interp.fail("storage data", f"storage {key!r} is missing (truncated file)")
        (count,) = struct.unpack("<q", data[pos:pos + 8])
        pos += 8
        nbytes = count * itemsize(dtype)
        if count != numel or pos + nbytes > n:
            interp.fail("storage data", f"storage {key!r} declares {numel:,} elements, the data holds "
                                        f"{min(max(count, 0), max(n - pos, 0) // itemsize(dtype)):,} (truncated?)")
        storages[key] = Storage(dtype, data[pos:pos + nbytes], numel)
        pos += nbytes
    missing = sorted(set(table) - set(storages))
    if missing:
        interp.fail("storage data", f"storage(s) {missing[:3]} have no data")

    def load(pid, where):
        dtype, key, numel = _pid_fields(pid, where, interp, legacy=True)
        if key not in storages or (storages[key].dtype, storages[key].numel) != (dtype, numel):
            interp.fail(where, f"storage {key!r} has no data of that type and size")
        return storages[key]

    interp.storage_loader = load
    return root, interp


def read_archive(data, source: str, interp_factory):
    """(root record, interpreter ready to resolve its storages) for a zip or legacy torch.save."""
    data = memoryview(data)
    if bytes(data[:2]) == b"PK":
        return _read_zip(data, source, interp_factory)
    if bytes(data[:1]) == b"\x80":
        return _read_legacy(data, source, interp_factory)
    raise CheckpointError(f"{source}: not a torch.save file")


def read_storage_bytes(data: memoryview, outer: Interpreter, where: str) -> Storage:
    """The storage inside `torch.storage._load_from_bytes(data)` (a plain pickle's tensors)."""
    src = f"{outer.source} ({where})"
    root, interp = read_archive(data, src, lambda: Interpreter(src, 0))
    if not isinstance(root, PersistentId):
        outer.fail(where, "embedded torch bytes that are not a single storage")
    storage = interp.storage_loader(root.pid, where)
    return storage
