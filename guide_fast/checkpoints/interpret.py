"""The typed interpreter: inert pickle records (pickle_reader.py) -> checked Python values.

It recognises only the shapes a PyTorch weight file or an EG3D network pickle has
(docs/formats.md §1-2) and refuses everything else:

* containers: dict, list, tuple, set, frozenset; `collections.OrderedDict`; `dnnlib.util.EasyDict`
  (a plain dict here); `builtins.set`/`frozenset`, `_codecs.encode(text, 'latin1')` (protocol 2 bytes);
* tensors: `torch._utils._rebuild_tensor_v2` over a storage read from bytes in the file, with the
  dtype from a fixed allow-list and size/stride/offset checked against the storage's byte count;
  `_rebuild_parameter(_with_state)` (a plain tensor here); `torch.storage._load_from_bytes`
  (legacy and zip `torch.save` archives, torch_archive.py); persistent storage ids of an archive;
* numpy scalars of numeric dtypes, decoded from their raw bytes here (numpy never sees the
  pickled dtype state);
* `torch_utils.persistence._reconstruct_persistent_obj(meta)` -> PersistentObject, keeping the
  embedded module source as text, never executed; objects of classes under training.*,
  torch_utils.*, dnnlib.*, torch.nn.modules.* -> ObjectRecord (class path and state only).

Every value is interpreted at most once (shared references stay shared), cycles and nesting
beyond MAX_DEPTH are refused, and the bytes of all tensors made are bounded by a budget.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import CheckpointError
from .pickle_reader import Call, Global, PersistentId

MAX_DEPTH = 100
MAX_NDIM = 16

# legacy storage class name -> dtype (the only storages accepted)
STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
REFUSED_STORAGES = {"ComplexFloatStorage", "ComplexDoubleStorage", "QInt8Storage", "QUInt8Storage",
                    "QInt32Storage", "QUInt4x2Storage", "QUInt2x4Storage", "UntypedStorage"}
# numpy scalar type codes accepted (numeric only), by kind+size
NUMPY_CODES = {"f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "b1"}
STUB_MODULE_PREFIXES = ("training.", "torch_utils.", "dnnlib.", "torch.nn.modules.")
EASYDICT = {("dnnlib.util", "EasyDict"), ("dnnlib", "EasyDict")}
PERSISTENCE = ("torch_utils.persistence", "_reconstruct_persistent_obj")


class EasyDict(dict):
    """Stand-in for dnnlib.util.EasyDict: a dict with attribute access."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass
class Storage:
    dtype: torch.dtype
    data: memoryview   # exactly numel * itemsize bytes, from the file
    numel: int


@dataclass
class ObjectRecord:
    """An object of a class of the pickled code base: its class path and state, no behaviour."""

    class_path: str
    state: dict = field(default_factory=dict)

    @property
    def class_name(self) -> str:
        return self.class_path.rsplit(".", 1)[-1]


@dataclass
class PersistentObject(ObjectRecord):
    """A torch_utils.persistence object: state plus the embedded module source, as text."""

    module_src: str = ""
    version: int = 6


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class Interpreter:
    """Turns records into values. `storage_loader(pid) -> Storage` resolves persistent ids (an
    archive's storages); `byte_budget` caps the bytes of all tensors made."""

    def __init__(self, source: str, byte_budget: int, storage_loader=None, allow_objects: bool = True,
                 embedded_storage=None):
        self.source = source
        # embedded_storage(data, interpreter, where) -> Storage: reads the torch.save bytes of
        # `torch.storage._load_from_bytes` (torch_archive.read_storage_bytes; passed in, so that
        # this module does not import the one that imports it)
        self.embedded_storage = embedded_storage
        self.budget = int(byte_budget)
        self.used = 0
        self.storage_loader = storage_loader
        self.allow_objects = allow_objects
        self._done: dict[int, object] = {}
        self._active: set[int] = set()
        self._keep: list = []  # records whose id() is a cache key stay alive

    # ------------------------------------------------------------------ helpers
    def fail(self, where: str, msg: str):
        if len(where) > 160:  # a deep path: its start and its end say where
            where = where[:80] + " ... " + where[-60:]
        raise CheckpointError(f"{self.source}: {where}: {msg}")

    def value(self, rec, where: str = "the file", depth: int = 0):
        if depth > MAX_DEPTH:
            self.fail(where, f"nested more than {MAX_DEPTH} levels deep")
        if rec is None or isinstance(rec, (bool, int, float, str)):
            return rec
        if isinstance(rec, memoryview):
            return rec
        key = id(rec)
        if key in self._done:
            return self._done[key]
        if key in self._active:
            self.fail(where, "refers to itself (a cycle), which no weight file needs")
        self._active.add(key)
        try:
            out = self._value(rec, where, depth + 1)
        finally:
            self._active.discard(key)
        self._done[key] = out
        self._keep.append(rec)
        return out

    def _value(self, rec, where, depth):
        if isinstance(rec, tuple):
            return tuple(self.value(v, f"{where}[{i}]", depth) for i, v in enumerate(rec))
        if isinstance(rec, list):
            return [self.value(v, f"{where}[{i}]", depth) for i, v in enumerate(rec)]
        if isinstance(rec, dict):
            return {k: self.value(v, f"{where}[{k!r}]", depth) for k, v in rec.items()}
        if isinstance(rec, (set, frozenset)):
            return rec  # members are hashable primitives (checked by the parser)
        if isinstance(rec, PersistentId):
            if self.storage_loader is None:
                self.fail(where, "a persistent id outside a torch archive")
            return self.storage_loader(rec.pid, where)
        if isinstance(rec, Global):
            self.fail(where, f"a bare reference to {rec.path}")
        if isinstance(rec, Call):
            return self._call(rec, where, depth)
        self.fail(where, f"unexpected {type(rec).__name__}")

    def _pairs(self, rec: Call, where, depth) -> list:
        out = []
        for k, v in rec.items:
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                self.fail(where, f"mapping key of type {type(k).__name__}")
            out.append((k, self.value(v, f"{where}[{k!r}]", depth)))
        return out

    def _call(self, rec: Call, where, depth):
        func = rec.func
        if isinstance(func, Call) and isinstance(func.func, Global) and func.func.path == "copyreg._reconstructor":
            self.fail(where, "copyreg._reconstructor is not used by checkpoints")
        if not isinstance(func, Global):
            self.fail(where, f"a call of a {type(func).__name__}, not of a named global")
        path = (func.module, func.name)
        if rec.kind == "reduce" and path == ("copyreg", "_reconstructor"):
            if len(rec.args) != 3 or not isinstance(rec.args[0], Global):
                self.fail(where, "malformed copyreg._reconstructor")
            inner = Call(rec.args[0], (), kind="newobj", states=rec.states, items=rec.items, appends=rec.appends)
            self._keep.append(inner)
            return self._call(inner, where, depth)
        if rec.kind == "reduce" and path == ("copyreg", "__newobj__"):
            if not rec.args or not isinstance(rec.args[0], Global):
                self.fail(where, "malformed copyreg.__newobj__")
            inner = Call(rec.args[0], rec.args[1:], kind="newobj", states=rec.states, items=rec.items,
                         appends=rec.appends)
            self._keep.append(inner)
            return self._call(inner, where, depth)
        if path == ("collections", "OrderedDict"):
            return self._mapping(rec, dict, where, depth)
        if path in EASYDICT:
            return self._mapping(rec, EasyDict, where, depth)
        if path in (("builtins", "set"), ("__builtin__", "set"), ("builtins", "frozenset"),
                    ("__builtin__", "frozenset")):
            if len(rec.args) > 1 or rec.states or rec.items or rec.appends:
                self.fail(where, "malformed set")
            items = self.value(rec.args[0], where, depth) if rec.args else []
            if not isinstance(items, (list, tuple)) or not all(isinstance(x, (str, int, float)) for x in items):
                self.fail(where, "a set of anything but names or numbers")
            return set(items) if func.name == "set" else frozenset(items)
        if path == ("_codecs", "encode"):
            if len(rec.args) != 2 or not isinstance(rec.args[0], str) or rec.args[1] not in ("latin1", "latin-1"):
                self.fail(where, "_codecs.encode is only accepted as protocol 2's bytes (text, 'latin1')")
            try:
                return memoryview(rec.args[0].encode("latin1"))
            except UnicodeEncodeError:
                self.fail(where, "bytes text outside latin-1")
        if path == ("torch._utils", "_rebuild_tensor_v2"):
            return self._tensor(rec, where, depth)
        if path in (("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state")):
            return self._parameter(rec, where, depth)
        if path == ("torch.storage", "_load_from_bytes"):
            if len(rec.args) != 1 or not isinstance(rec.args[0], (memoryview, Call)) or rec.states:
                self.fail(where, "malformed torch.storage._load_from_bytes")
            data = self.value(rec.args[0], where, depth)
            if not isinstance(data, memoryview):
                self.fail(where, "torch.storage._load_from_bytes of something other than bytes")
            if self.embedded_storage is None:
                self.fail(where, "an embedded storage where none is expected")
            return self.embedded_storage(data, self, where)
        if func.module in ("numpy.core.multiarray", "numpy._core.multiarray") and func.name == "scalar":
            return self._numpy_scalar(rec, where, depth)
        if path == PERSISTENCE:
            return self._persistent(rec, where, depth)
        if func.module.startswith(STUB_MODULE_PREFIXES) and func.name.isidentifier() and rec.kind == "newobj":
            if not self.allow_objects:
                self.fail(where, f"an object of class {func.path} (only tensors and containers are accepted here)")
            if rec.args or rec.kwargs or rec.items or rec.appends:
                self.fail(where, f"an object of {func.path} built with arguments or items")
            state = {}
            for st in rec.states:
                st = self.value(st, f"{where}.__dict__", depth)
                if isinstance(st, tuple) and len(st) == 2:  # (dict state, slot state)
                    st = {**(st[0] or {}), **(st[1] or {})} if all(isinstance(x, (dict, type(None))) for x in st) else None
                if not isinstance(st, dict) or not all(isinstance(k, str) for k in st):
                    self.fail(where, f"the state of {func.path} is not a dict of attributes")
                state.update(st)
            return ObjectRecord(func.path, state)
        self.fail(where, f"it references the global {func.path}, which is not on the allow-list of a weight "
                         "file (nothing from the file was executed)")

    def _mapping(self, rec: Call, cls, where, depth):
        if rec.kwargs or rec.appends:
            self.fail(where, "malformed mapping")
        out = cls()
        if rec.args:
            if len(rec.args) != 1:
                self.fail(where, "mapping built with several arguments")
            init = self.value(rec.args[0], where, depth)
            if isinstance(init, dict):
                init = list(init.items())
            if not isinstance(init, list) or not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in init):
                self.fail(where, "mapping built from something other than (key, value) pairs")
            for k, v in init:
                if not isinstance(k, (str, int)) or isinstance(k, bool):
                    self.fail(where, f"mapping key of type {type(k).__name__}")
                out[k] = v
        for k, v in self._pairs(rec, where, depth):
            out[k] = v
        for st in rec.states:  # OrderedDict._metadata of a state dict, EasyDict.__dict__: attributes, ignored
            st = self.value(st, f"{where}.__dict__", depth)
            if not isinstance(st, (dict, type(None), tuple)):
                self.fail(where, "malformed mapping state")
        return out

    # ------------------------------------------------------------------ tensors
    def charge(self, nbytes: int, where: str) -> None:
        self.used += nbytes
        if self.used > self.budget:
            self.fail(where, f"its tensors would need more than {self.budget:,} bytes, far more than the file holds "
                             "(tensors repeating or extending their storage); refusing")

    def _tensor(self, rec: Call, where, depth):
        args = rec.args
        if len(args) not in (6, 7) or rec.states or rec.items or rec.appends:
            self.fail(where, "malformed tensor record (_rebuild_tensor_v2)")
        storage = self.value(args[0], f"{where}.storage", depth)
        offset, size, stride = (self.value(a, where, depth) for a in args[1:4])
        hooks = self.value(args[5], where, depth)
        if not isinstance(storage, Storage):
            self.fail(where, "tensor record without a storage from the file")
        if (not isinstance(size, tuple) or not isinstance(stride, tuple) or len(size) != len(stride)
                or len(size) > MAX_NDIM):
            self.fail(where, "tensor size/stride are not tuples of one length (<= 16)")
        for v in (offset, *size, *stride):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v > 1 << 48:
                self.fail(where, f"tensor size/stride/offset value {v!r} is not a non-negative integer below 2**48")
        if math.prod(s for s in size if s) > 1 << 48:
            self.fail(where, f"tensor of size {list(size)} is far larger than any file")
        stride = tuple(st if s > 1 else 1 for s, st in zip(size, stride))  # unused strides: no overflow
        if hooks not in ({}, None):
            self.fail(where, "tensor with backward hooks")
        if len(args) == 7 and self.value(args[6], where, depth) not in ({}, None):
            self.fail(where, "tensor with extra metadata")
        numel = math.prod(size)
        if numel:
            extent = offset + sum((s - 1) * st for s, st in zip(size, stride)) + 1
            if extent > storage.numel:
                self.fail(where, f"tensor of size {list(size)} (stride {list(stride)}, offset {offset}) reaches "
                                 f"element {extent:,} of a storage of {storage.numel:,} elements")
        isz = itemsize(storage.dtype)
        if numel == 0:
            return torch.empty(size, dtype=storage.dtype)
        self.charge(max(numel, extent - offset) * isz, where)
        lo, hi = offset * isz, extent * isz
        raw = torch.frombuffer(bytearray(storage.data[lo:hi]), dtype=torch.uint8)
        # a bool byte other than 0/1 is undefined behaviour in torch: normalise it
        base = raw != 0 if storage.dtype == torch.bool else raw.view(storage.dtype)
        out = base.as_strided(size, stride, 0)
        return out if out.is_contiguous() and out.numel() == base.numel() else out.clone()

    def _parameter(self, rec: Call, where, depth):
        if len(rec.args) not in (3, 4) or rec.states or rec.items:
            self.fail(where, "malformed parameter record")
        data = self.value(rec.args[0], where, depth)
        if not torch.is_tensor(data):
            self.fail(where, "a parameter record without a tensor")
        if self.value(rec.args[2], where, depth) not in ({}, None):
            self.fail(where, "parameter with backward hooks")
        if len(rec.args) == 4 and self.value(rec.args[3], where, depth) not in ({}, None):
            self.fail(where, "parameter with extra state")
        return data

    def _numpy_scalar(self, rec: Call, where, depth):
        if len(rec.args) != 2 or rec.states or rec.items:
            self.fail(where, "malformed numpy scalar")
        dt, raw = rec.args
        if not (isinstance(dt, Call) and isinstance(dt.func, Global) and dt.func.path == "numpy.dtype"
                and dt.args and isinstance(dt.args[0], str)):
            self.fail(where, "numpy scalar without a plain numpy dtype")
        code = dt.args[0]
        order = "<"
        if dt.states:
            st = dt.states[-1]
            if not isinstance(st, tuple) or len(st) < 2 or st[1] not in ("<", ">", "|", "="):
                self.fail(where, "numpy dtype with an unexpected state")
            if any(v is not None for v in st[2:5]):
                self.fail(where, "numpy dtype with fields or sub-arrays")
            order = {">": ">"}.get(st[1], "<")
        if code not in NUMPY_CODES:
            self.fail(where, f"numpy scalar of dtype {code!r} (only numeric dtypes are accepted)")
        if not isinstance(raw, memoryview):  # protocol 2: _codecs.encode(text, 'latin1'), interpreted (depth counted)
            raw = self.value(raw, where, depth)
        if not isinstance(raw, (memoryview, str)):
            self.fail(where, "numpy scalar without raw bytes")
        raw = bytes(raw) if isinstance(raw, memoryview) else raw.encode("latin1")
        want = np.dtype(code).newbyteorder(order)
        if len(raw) != want.itemsize:
            self.fail(where, f"numpy {code} scalar of {len(raw)} bytes (expected {want.itemsize})")
        return np.frombuffer(raw, dtype=want)[0].item()

    def _persistent(self, rec: Call, where, depth):
        if len(rec.args) != 1 or rec.items or rec.appends or rec.states:
            self.fail(where, "malformed torch_utils.persistence record")
        if not self.allow_objects:
            self.fail(where, "a torch_utils.persistence object (only tensors and containers are accepted here)")
        meta = self.value(rec.args[0], f"{where}.meta", depth)
        if not isinstance(meta, dict) or meta.get("type") != "class":
            self.fail(where, "malformed persistent object (expected a class record)")
        if meta.get("version") != 6:
            self.fail(where, f"unsupported torch_utils.persistence version {meta.get('version')!r} (expected 6)")
        name, src, state = meta.get("class_name"), meta.get("module_src"), meta.get("state")
        if not isinstance(name, str) or not name.isidentifier():
            self.fail(where, f"persistent object with class name {name!r}")
        if not isinstance(src, str):
            self.fail(where, "persistent object without module source text")
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            self.fail(where, f"persistent {name} whose state is not a dict of attributes")
        return PersistentObject(class_path=name, state=state, module_src=src, version=6)


def storage_dtype(ref, where: str, fail) -> torch.dtype:
    """The dtype of a storage class record (torch.FloatStorage, ...): allow-list only."""
    if isinstance(ref, Global) and ref.module == "torch":
        if ref.name in STORAGE_DTYPES:
            return STORAGE_DTYPES[ref.name]
        if ref.name in REFUSED_STORAGES:
            fail(where, f"storage type torch.{ref.name} is not accepted (weights are real numbers)")
    name = ref.path if isinstance(ref, Global) else type(ref).__name__
    fail(where, f"unknown storage type {name}")
