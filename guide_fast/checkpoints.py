"""Generator checkpoints: safe loading of official EG3D pickles, the project's own format,
and weight deltas.

Official network pickles (eg3d.md §7.1-7.2) embed the source code of their classes and, with
the stock loader, `exec` it. Here a restricted unpickler (eg3d.md §7.4) resolves only an
allow-list of globals; persistence-wrapped objects become inert stubs whose embedded source is
kept as text and never executed; tensors are rebuilt through `torch.load(weights_only=True)`.
Any other global (os.system, builtins.eval, ...) stops the load before anything runs.

Own format: one safetensors file; its metadata holds the JSON config, the sha256 of the
checkpoint it was converted from, and the neural rendering resolution.
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError, GuideFastError, InputError, describe_state_mismatch
from .io import atomic_path, short_list

GENERATOR_FORMAT = "guide-fast/generator"
DELTA_FORMAT = "guide-fast/delta"
FORMAT_VERSION = "1"
SYNTHESIS_PREFIX = "backbone.synthesis."


# --------------------------------------------------------------------------- hashing
def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def state_fingerprint(module_or_state) -> str:
    """sha256 over (name, dtype, shape, bytes) of every state_dict entry: identifies a set of
    weights independently of the file format it came from."""
    state = module_or_state.state_dict() if hasattr(module_or_state, "state_dict") else module_or_state
    h = hashlib.sha256()
    for name, t in state.items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- restricted unpickler
class EasyDict(dict):
    """Stand-in for dnnlib.util.EasyDict: a dict with attribute access."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value


class ObjectStub:
    """An inert object standing for a class of the pickled EG3D code base.

    Only its state (__dict__) is kept; it has no behaviour, so nothing of the original class
    runs. `class_path` says what it stood for.
    """

    class_path = "?"

    def __init__(self, *args, **kwargs):
        self.__dict__["_stub_args"] = args

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)

    def __repr__(self):
        return f"<stub of {self.class_path}>"


class PersistentStub(ObjectStub):
    """A `torch_utils.persistence` object: state plus the embedded module source, as text."""

    def __repr__(self):
        return f"<persistent stub of {self.class_name}>"


def _reconstruct_persistent_stub(meta):
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise CheckpointError("malformed persistent object in the pickle (expected a class record)")
    if meta.get("version") != 6:
        raise CheckpointError(f"unsupported torch_utils.persistence version {meta.get('version')!r} (expected 6)")
    obj = PersistentStub()
    obj.__dict__["class_name"] = meta.get("class_name")
    obj.__dict__["module_src"] = meta.get("module_src")  # kept as text, never executed
    obj.__dict__["persistence_version"] = meta.get("version")
    state = meta.get("state")
    if isinstance(state, dict):
        obj.__dict__.update(state)
    return obj


def _load_storage_from_bytes(data: bytes):
    # Stock torch uses torch.load(weights_only=False) here (eg3d.md §7.4).
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


_STUB_CLASSES: dict[str, type] = {}
_STUB_MODULE_PREFIXES = ("training.", "torch_utils.", "dnnlib.", "_imported_module_", "torch.nn.modules.")


def _stub_class(module: str, name: str) -> type:
    key = f"{module}.{name}"
    if key not in _STUB_CLASSES:
        _STUB_CLASSES[key] = type(name, (ObjectStub,), {"class_path": key})
    return _STUB_CLASSES[key]


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only allow-listed globals (eg3d.md §7.4); refuses everything else."""

    _ALLOWED = {
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
        ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
        ("collections", "OrderedDict"): OrderedDict,
        ("numpy", "dtype"): np.dtype,
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_stub,
        ("dnnlib.util", "EasyDict"): EasyDict,
        ("dnnlib", "EasyDict"): EasyDict,
    }

    def __init__(self, file, source: str = "<pickle>"):
        super().__init__(file)
        self.source = source

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "scalar":
            return _numpy_scalar
        if module.startswith(_STUB_MODULE_PREFIXES) and name.isidentifier():
            return _stub_class(module, name)
        raise CheckpointError(
            f"refusing to load {self.source}: it references the global {module}.{name}, which is not on the "
            "allow-list of an EG3D network pickle (nothing from the file was executed)"
        )


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise CheckpointError("refusing a numpy scalar of object dtype in the pickle")
    from numpy._core.multiarray import scalar  # numpy >= 2

    return scalar(dtype, data)


def unpickle_restricted(path) -> object:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, source=str(path)).load()
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            RuntimeError, MemoryError, UnicodeDecodeError, OverflowError) as exc:
        raise CheckpointError(f"{path}: not a readable network pickle (truncated or corrupt?): {exc}") from None


def collect_state_dict(stub, prefix: str = "") -> "OrderedDict[str, torch.Tensor]":
    """Walk module stubs as nn.Module.state_dict() does: parameters, persistent buffers, children."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    d = stub.__dict__
    for name, p in (d.get("_parameters") or {}).items():
        if p is not None:
            out[prefix + name] = p.detach() if torch.is_tensor(p) else p
    skip = set(d.get("_non_persistent_buffers_set") or ())
    for name, b in (d.get("_buffers") or {}).items():
        if b is not None and name not in skip:
            out[prefix + name] = b
    for name, child in (d.get("_modules") or {}).items():
        if child is not None:
            out.update(collect_state_dict(child, prefix + name + "."))
    return out


# --------------------------------------------------------------------------- official pickle -> config
def _config_from_official(stub, state) -> "GeneratorConfig":  # noqa: F821
    from .eg3d.generator import GeneratorConfig

    kw = stub.__dict__.get("_init_kwargs") or stub.__dict__.get("init_kwargs")
    if not isinstance(kw, dict):
        raise CheckpointError("the G_ema object carries no constructor kwargs (_init_kwargs)")
    rk = stub.__dict__.get("rendering_kwargs") or kw.get("rendering_kwargs")
    if not isinstance(rk, dict):
        raise CheckpointError("the G_ema object carries no rendering_kwargs")
    sr_module = str(rk.get("superresolution_module", ""))
    if not sr_module.endswith("SuperresolutionHybrid8XDC"):
        raise CheckpointError(
            f"unsupported super-resolution module {sr_module!r}: only SuperresolutionHybrid8XDC "
            "(the FFHQ/AFHQ 512-128 generators) is implemented"
        )

    def shape(key):
        if key not in state:
            raise CheckpointError(f"the checkpoint has no tensor {key!r}")
        return tuple(state[key].shape)

    block_res = sorted(int(k.split(".")[2][1:]) for k in state if k.startswith("backbone.synthesis.b") and k.endswith(".resample_filter") and k.count(".") == 3)
    sr_blocks = sorted({k.split(".")[1] for k in state if k.startswith("superresolution.block")})
    sr_channels = tuple(shape(f"superresolution.{b}.conv1.weight")[0] for b in sr_blocks)
    mapping_kwargs = kw.get("mapping_kwargs") or {}
    nrr = stub.__dict__.get("neural_rendering_resolution", 64)
    return GeneratorConfig(
        z_dim=int(kw.get("z_dim", 512)),
        w_dim=int(kw.get("w_dim", 512)),
        c_dim=int(kw.get("c_dim", 25)),
        mapping_layers=int(mapping_kwargs.get("num_layers", 2)),
        plane_resolution=int(block_res[-1]) if block_res else 256,
        plane_channels=shape("decoder.net.0.weight")[1],
        channel_base=int(kw.get("channel_base", 32768)),
        channel_max=int(kw.get("channel_max", 512)),
        decoder_hidden=shape("decoder.net.0.weight")[0],
        decoder_output_dim=shape("decoder.net.2.weight")[0] - 1,
        neural_rendering_resolution=int(nrr),
        img_resolution=int(kw.get("img_resolution", 512)),
        sr_channels=sr_channels,
        sr_fp16=int(kw.get("sr_num_fp16_res", 0)) > 0,
        rendering_kwargs={k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in rk.items()},
    )


def describe_non_finite(state) -> str | None:
    """None if every floating tensor is finite, else 'N non-finite values in K tensors (first: name)'."""
    bad = [(k, int((~torch.isfinite(v)).sum())) for k, v in state.items()
           if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if not bad:
        return None
    return f"{sum(n for _, n in bad):,} non-finite values in {len(bad)} tensors (first: {bad[0][0]})"


def _build_and_fill(config, state, source: str, renderer: str):
    from .eg3d.generator import TriPlaneGenerator

    gen = TriPlaneGenerator(config, renderer=renderer)
    expected = gen.state_dict()
    problems = describe_state_mismatch(state, expected)
    if problems:
        raise CheckpointError(f"{source}: tensors do not match the EG3D generator: {problems}")
    non_finite = describe_non_finite(state)
    if non_finite:
        raise CheckpointError(f"{source}: {non_finite}; refusing a generator that can only render garbage")
    gen.load_state_dict({k: state[k].to(expected[k].dtype) for k in expected}, strict=True)
    return gen.eval().requires_grad_(False)


def read_official_pickle(path, key: str = "G_ema"):
    """-> (G stub, state_dict) from an EG3D network pickle, without executing anything in it."""
    data = unpickle_restricted(path)
    if isinstance(data, dict):
        if key not in data:
            raise CheckpointError(f"{path}: the pickle has no {key!r} entry (found keys: {sorted(map(str, data))})")
        stub = data[key]
    else:
        stub = data
    if not isinstance(stub, ObjectStub):
        raise CheckpointError(f"{path}: {key} is a {type(stub).__name__}, not an EG3D network object")
    name = getattr(stub, "class_name", None) or stub.class_path
    if not str(name).endswith("TriPlaneGenerator"):
        raise CheckpointError(f"{path}: {key} is a {name}, not an EG3D TriPlaneGenerator")
    return stub, collect_state_dict(stub)


# --------------------------------------------------------------------------- public API
def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    return "unknown"


def load_generator(path, renderer: str = "reference", device=None, key: str = "G_ema"):
    """Load a generator from an official EG3D pickle (G_ema) or guide-fast's safetensors format.

    The pickle path never executes code from the file. The generator records
    `source_sha256` (of the original checkpoint) for weight deltas and reports.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"generator checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"generator checkpoint {path} is a directory, expected a file")
    kind = _sniff(path)
    if kind == "pickle":
        stub, state = read_official_pickle(path, key=key)
        config = _config_from_official(stub, state)
        gen = _build_and_fill(config, state, str(path), renderer)
        gen.source_sha256 = sha256_file(path)
    elif kind == "safetensors":
        gen = _load_safetensors_generator(path, renderer)
    else:
        raise CheckpointError(f"{path}: neither an EG3D network pickle nor a guide-fast safetensors file")
    if device is not None:
        gen = gen.to(device)
    return gen


def _read_safetensors(path: Path):
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = OrderedDict((k, f.get_tensor(k)) for k in f.keys())
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file (truncated or corrupt?): {exc}") from None
    return tensors, meta


def _load_safetensors_generator(path: Path, renderer: str):
    from .eg3d.generator import GeneratorConfig

    tensors, meta = _read_safetensors(path)
    if meta.get("format") != GENERATOR_FORMAT:
        raise CheckpointError(f"{path}: metadata 'format' is {meta.get('format')!r}, expected {GENERATOR_FORMAT!r}")
    try:
        config = GeneratorConfig.from_dict(json.loads(meta["config"]))
    except (KeyError, json.JSONDecodeError, TypeError, InputError) as exc:
        raise CheckpointError(f"{path}: bad or missing 'config' metadata: {exc}") from None
    gen = _build_and_fill(config, tensors, str(path), renderer)
    gen.neural_rendering_resolution = int(meta.get("neural_rendering_resolution", config.neural_rendering_resolution))
    gen.source_sha256 = meta.get("source_sha256") or sha256_file(path)
    return gen


def _write_safetensors(path, tensors, meta: dict, what: str) -> None:
    """Atomically write tensors + metadata; never a file holding non-finite weights."""
    from safetensors.torch import save_file

    non_finite = describe_non_finite(tensors)
    if non_finite:
        raise GuideFastError(f"refusing to write {path}: {what} has {non_finite}")
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def save_generator(gen, path, source_sha256: str | None = None) -> Path:
    """Write the generator as one safetensors file (config and provenance in its metadata)."""
    path = Path(path)
    state = OrderedDict((k, v.detach().to("cpu").contiguous().clone()) for k, v in gen.state_dict().items())
    meta = {
        "format": GENERATOR_FORMAT,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(gen.config.to_dict()),
        "neural_rendering_resolution": str(gen.neural_rendering_resolution),
        "source_sha256": source_sha256 or getattr(gen, "source_sha256", None) or "",
    }
    _write_safetensors(path, state, meta, "the generator")
    return path


def convert(src, dst) -> Path:
    """Official pickle (or own format) -> guide-fast safetensors, keeping the source sha256."""
    gen = load_generator(src)
    return save_generator(gen, dst, source_sha256=gen.source_sha256)


# --------------------------------------------------------------------------- plain files
def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _check_file(path: Path, what: str) -> None:
    if path.is_dir():
        raise CheckpointError(f"{what} {path} is a folder; expected a file")
    if not path.is_file():
        raise CheckpointError(f"{what} {path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what} {path} is empty")


def read_torch_file(path, what: str = "file"):
    """torch.load(weights_only=True) on CPU (never executes code from the file), with errors that
    say what is wrong: a folder, an empty file, not a PyTorch file at all, or Python objects
    other than tensors (refused)."""
    path = Path(path)
    _check_file(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types; each gets a plain reason
        with open(path, "rb") as f:
            head = f.read(4)
        if head[:2] != b"PK" and head[:1] != b"\x80":
            reason = (f"not a PyTorch file: one written by torch.save is a zip archive or a pickle, this one "
                      f"starts with {head!r} (read with torch.load(weights_only=True))")
        elif "weights_only" in str(exc) or "Unsupported global" in str(exc):
            reason = ("holds Python objects other than tensors, refused: files are read with "
                      f"torch.load(weights_only=True), which never runs code from the file ({_first_line(exc)})")
        else:
            reason = f"cannot be read with torch.load(weights_only=True) (truncated or corrupt?): {_first_line(exc)}"
        raise CheckpointError(f"{what} {path}: {reason}") from None


def read_npy_file(path, what: str = "file", mmap: bool = False) -> np.ndarray:
    """A plain .npy array (allow_pickle=False), with a clear error for anything else."""
    path = Path(path)
    _check_file(path, what)
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic != b"\x93NUMPY":
        raise CheckpointError(f"{what} {path}: not a .npy array file (it does not start with the .npy magic bytes)")
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except ValueError as exc:
        if "pickle" in str(exc):
            raise CheckpointError(f"{what} {path}: an object array (pickled Python objects), refused; "
                                  "expected a numeric array") from None
        raise CheckpointError(f"{what} {path}: unreadable .npy file: {_first_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{what} {path}: unreadable .npy file (truncated?): {_first_line(exc)}") from None


# --------------------------------------------------------------------------- latent files
LATENT_KEYS = ("w_source", "w_u", "w", "ws", "latents", "latent", "w_plus")


def load_latents(path, what: str = "latent file", key: str | None = None) -> torch.Tensor:
    """A latent tensor from .safetensors / .pt / .pth / .npy (read without executing anything):
    the tensor itself, the entry `key`, else the entry named w_source (or w_u, w, ws, latents,
    ...), else the only tensor in the file. Returned as float32, shape as stored."""
    path = Path(path)
    _check_file(path, what)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        obj = dict(_read_safetensors(path)[0])
    elif suffix == ".npy":
        obj = torch.from_numpy(np.array(read_npy_file(path, what)))
    else:
        obj = read_torch_file(path, what)
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if torch.is_tensor(v)}
        if key is not None:
            if key not in tensors:
                raise CheckpointError(f"{what} {path} has no tensor {key!r} (file has {short_list(obj, 8)})")
            found = key
        else:
            found = next((k for k in LATENT_KEYS if k in tensors), None)
            if found is None and len(tensors) == 1:
                found = next(iter(tensors))
        if found is None:
            raise CheckpointError(f"{what} {path}: no latent tensor found (looked for {', '.join(LATENT_KEYS)}; "
                                  f"file has {short_list(obj, 8)})")
        obj = tensors[found]
    if not torch.is_tensor(obj):
        raise CheckpointError(f"{what} {path} holds a {type(obj).__name__}, not a tensor")
    return obj.float()


# --------------------------------------------------------------------------- deltas
def compute_delta(source, unlearned) -> "OrderedDict[str, torch.Tensor]":
    """unlearned - source for the `backbone.synthesis.*` parameters (the only ones GUIDE trains)."""
    src = dict(source.named_parameters())
    out = OrderedDict()
    for name, p in unlearned.named_parameters():
        if name.startswith(SYNTHESIS_PREFIX):
            out[name] = (p.detach().float().cpu() - src[name].detach().float().cpu()).contiguous()
        elif not torch.equal(p.detach().cpu(), src[name].detach().cpu()):
            raise InputError(f"parameter {name} differs between the generators but is outside backbone.synthesis")
    return out


def save_delta(source, unlearned, path, extra: dict | None = None) -> Path:
    """Safetensors of the synthesis-weight differences, tagged with the source's identity
    (file sha256 and content fingerprint) so a service can check before applying/reverting."""
    delta = compute_delta(source, unlearned)
    meta = {
        "format": DELTA_FORMAT,
        "format_version": FORMAT_VERSION,
        "source_sha256": getattr(source, "source_sha256", None) or "",
        "source_fingerprint": state_fingerprint(source),
        "config": json.dumps(source.config.to_dict()),
    }
    for k, v in (extra or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    _write_safetensors(path, delta, meta, "the weight delta")
    return Path(path)


def load_delta(path):
    """-> (delta dict name -> fp32 tensor, metadata dict)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"delta file not found: {path}")
    delta, meta = _read_safetensors(path)
    if meta.get("format") != DELTA_FORMAT:
        raise CheckpointError(f"{path}: metadata 'format' is {meta.get('format')!r}, expected {DELTA_FORMAT!r}")
    return delta, meta


def apply_delta(gen, delta, meta: dict | None = None, sign: float = 1.0, check_source: bool = True):
    """Add (sign=+1: unlearn) or subtract (sign=-1: revert) a delta in place; returns gen.

    With check_source, applying (+1) requires gen's weights to be the delta's source (content
    fingerprint); reverting is checked by the caller against the unlearned weights.
    """
    if check_source and meta and sign > 0 and meta.get("source_fingerprint"):
        fp = state_fingerprint(gen)
        if fp != meta["source_fingerprint"]:
            raise CheckpointError(
                "this delta was made from a different source generator "
                f"(fingerprint {meta['source_fingerprint'][:12]}…, this generator {fp[:12]}…)"
            )
    params = dict(gen.named_parameters())
    for name, d in delta.items():
        if name not in params:
            raise CheckpointError(f"delta tensor {name!r} has no counterpart in the generator")
        if tuple(params[name].shape) != tuple(d.shape):
            raise CheckpointError(f"delta tensor {name!r} has shape {list(d.shape)}, generator has {list(params[name].shape)}")
    with torch.no_grad():
        for name, d in delta.items():
            p = params[name]
            p.copy_((p.float() + sign * d.to(p.device)).to(p.dtype))
    return gen
