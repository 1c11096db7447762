"""Official EG3D network pickles (docs/eg3d.md §7.1-7.2) read without running anything.

The stock loader `exec`s the module source each `torch_utils.persistence` object embeds. Here
the pickle is parsed into inert records (pickle_reader.py), only the requested network (G_ema)
is interpreted (interpret.py), its module tree is walked as nn.Module.state_dict() does, and
the constructor kwargs, rendering_kwargs and neural rendering resolution become a typed
GeneratorConfig (every field checked: eg3d/config_check.py). The embedded source is kept as
text for inspection only.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import CheckpointError, InputError
from .files import read_bytes, tensor_budget
from .interpret import Interpreter, ObjectRecord, PersistentObject
from .pickle_reader import Call, Global, parse_pickle
from .torch_archive import read_storage_bytes

if TYPE_CHECKING:
    from collections.abc import Mapping

MAX_MODULE_DEPTH = 32
GENERATOR_CLASS = "TriPlaneGenerator"
PERSISTENCE_PATH = "torch_utils.persistence._reconstruct_persistent_obj"


def read_official_pickle(path: "str | os.PathLike",
                         key: str = "G_ema") -> "tuple[PersistentObject, OrderedDict[str, torch.Tensor]]":
    """-> (G_ema PersistentObject, state dict name -> tensor) without executing anything."""
    path = Path(path)
    data = read_bytes(path, "generator checkpoint")
    source = str(path)
    root, _ = parse_pickle(data, source=source)
    if isinstance(root, dict):
        if key not in root:
            names = sorted(str(k) for k in root)[:8]
            raise CheckpointError(f"{path}: the pickle has no {key!r} entry (found keys: {names})")
        rec = root[key]
    else:
        rec = root
    if not (isinstance(rec, Call) and isinstance(rec.func, Global) and rec.func.path == PERSISTENCE_PATH):
        if isinstance(rec, Call) and isinstance(rec.func, Global):
            raise CheckpointError(f"{path}: {key} references the global {rec.func.path}, which is not on the "
                                  "allow-list of an EG3D network pickle (nothing from the file was executed)")
        raise CheckpointError(f"{path}: {key} is a {type(rec).__name__}, not an EG3D network object (a "
                              "torch_utils.persistence record)")
    interp = Interpreter(source, tensor_budget(len(data)), embedded_storage=read_storage_bytes)
    obj = interp.value(rec, key)
    if not isinstance(obj, ObjectRecord):
        raise CheckpointError(f"{path}: {key} is a {type(obj).__name__}, not an EG3D network object")
    if obj.class_name != GENERATOR_CLASS or not isinstance(obj, PersistentObject):
        raise CheckpointError(f"{path}: {key} is a {obj.class_path}, not an EG3D TriPlaneGenerator")
    return obj, collect_state_dict(obj, source, key)


def collect_state_dict(obj: ObjectRecord, source: str = "<pickle>", where: str = "G_ema", prefix: str = "",
                       depth: int = 0,
                       out: "OrderedDict[str, torch.Tensor] | None" = None) -> "OrderedDict[str, torch.Tensor]":
    """Walk module records as nn.Module.state_dict() does: parameters, persistent buffers, children."""
    out = OrderedDict() if out is None else out
    if depth > MAX_MODULE_DEPTH:
        raise CheckpointError(f"{source}: {where}: modules nested more than {MAX_MODULE_DEPTH} deep")
    st = obj.state

    def table(name):
        t = st.get(name)
        if t is None:
            return {}
        if not isinstance(t, dict):
            raise CheckpointError(f"{source}: field {where}.{name} is a {type(t).__name__}, expected a dict")
        return t

    skip = st.get("_non_persistent_buffers_set") or set()
    if not isinstance(skip, (set, frozenset, list, tuple)):
        raise CheckpointError(f"{source}: field {where}._non_persistent_buffers_set is not a set of names")
    for kind in ("_parameters", "_buffers"):
        for name, t in table(kind).items():
            if t is None or (kind == "_buffers" and name in skip):
                continue
            field = f"{where}.{kind}[{name!r}]"
            if not isinstance(name, str) or not name or "." in name:
                raise CheckpointError(f"{source}: field {field}: not a valid tensor name")
            if not torch.is_tensor(t):
                raise CheckpointError(f"{source}: field {field} is a {type(t).__name__}, not a tensor")
            full = prefix + name
            if full in out:
                raise CheckpointError(f"{source}: field {field}: the name {full} occurs twice")
            out[full] = t
    for name, child in table("_modules").items():
        if child is None:
            continue
        field = f"{where}._modules[{name!r}]"
        if not isinstance(name, str) or not name or "." in name:
            raise CheckpointError(f"{source}: field {field}: not a valid module name")
        if not isinstance(child, ObjectRecord):
            raise CheckpointError(f"{source}: field {field} is a {type(child).__name__}, not a module")
        collect_state_dict(child, source, f"{where}.{name}", prefix + name + ".", depth + 1, out)
    return out


def _num(value, field: str, source: str):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointError(f"{source}: field {field} is {value!r}; expected a number")
    return value


def config_from_official(obj: PersistentObject, state: "Mapping[str, torch.Tensor]",
                         source: str = "<pickle>") -> "GeneratorConfig":  # noqa: F821
    """GeneratorConfig from the G_ema record: its `_init_kwargs`, `rendering_kwargs` and
    `neural_rendering_resolution`, with the architecture's free sizes read off tensor shapes.
    Every value is type- and range-checked; a defect is a CheckpointError naming the field."""
    from ..eg3d.generator import GeneratorConfig

    st = obj.state
    kw = st.get("_init_kwargs", st.get("init_kwargs"))
    if not isinstance(kw, dict):
        raise CheckpointError(f"{source}: field G_ema._init_kwargs is missing or not a dict (constructor kwargs)")
    rk = st.get("rendering_kwargs", kw.get("rendering_kwargs"))
    if not isinstance(rk, dict):
        raise CheckpointError(f"{source}: field G_ema.rendering_kwargs is missing or not a dict")
    try:
        from ..eg3d.config_check import check_rendering_kwargs

        rk = check_rendering_kwargs(dict(rk))
        if "superresolution_module" not in rk:
            raise InputError("generator config field 'rendering_kwargs.superresolution_module' is missing")
    except InputError as exc:
        raise CheckpointError(f"{source}: {exc}") from None

    def shape(key, ndim):
        t = state.get(key)
        if t is None:
            raise CheckpointError(f"{source}: the checkpoint has no tensor {key!r}")
        if t.ndim != ndim:
            raise CheckpointError(f"{source}: tensor {key} has shape {list(t.shape)}; expected {ndim} dimensions")
        return tuple(int(s) for s in t.shape)

    sr_blocks = sorted({k.split(".")[1] for k in state if k.startswith("superresolution.block")})
    if sr_blocks != [f"block{i}" for i in range(len(sr_blocks))] or not 1 <= len(sr_blocks) <= 6:
        raise CheckpointError(f"{source}: super-resolution blocks {sr_blocks[:8]} are not block0..blockN")
    sr_channels = [shape(f"superresolution.{b}.conv1.weight", 4)[0] for b in sr_blocks]
    dec0, dec2 = shape("decoder.net.0.weight", 2), shape("decoder.net.2.weight", 2)
    block_res = set()
    for k in state:
        parts = k.split(".")
        if len(parts) == 4 and parts[:2] == ["backbone", "synthesis"] and parts[3] == "resample_filter":
            digits = parts[2][1:]
            if parts[2][:1] != "b" or not digits.isdigit() or len(digits) > 5:
                raise CheckpointError(f"{source}: unexpected tensor {k}")
            block_res.add(int(digits))
    mapping_kwargs = kw.get("mapping_kwargs") or {}
    if not isinstance(mapping_kwargs, dict):
        raise CheckpointError(f"{source}: field G_ema._init_kwargs.mapping_kwargs is not a dict")
    sr_fp16 = kw.get("sr_num_fp16_res", 0)
    _num(sr_fp16, "G_ema._init_kwargs.sr_num_fp16_res", source)
    fields = dict(
        z_dim=kw.get("z_dim", 512), w_dim=kw.get("w_dim", 512), c_dim=kw.get("c_dim", 25),
        mapping_layers=mapping_kwargs.get("num_layers", 2),
        plane_resolution=max(block_res) if block_res else 256,
        plane_channels=dec0[1], channel_base=kw.get("channel_base", 32768), channel_max=kw.get("channel_max", 512),
        decoder_hidden=dec0[0], decoder_output_dim=dec2[0] - 1,
        neural_rendering_resolution=st.get("neural_rendering_resolution", 64),
        img_resolution=kw.get("img_resolution", 512), sr_channels=sr_channels, sr_fp16=sr_fp16 > 0,
        rendering_kwargs=rk,
    )
    where = {"z_dim": "G_ema._init_kwargs.z_dim", "w_dim": "G_ema._init_kwargs.w_dim",
             "c_dim": "G_ema._init_kwargs.c_dim", "mapping_layers": "G_ema._init_kwargs.mapping_kwargs.num_layers",
             "channel_base": "G_ema._init_kwargs.channel_base", "channel_max": "G_ema._init_kwargs.channel_max",
             "img_resolution": "G_ema._init_kwargs.img_resolution",
             "neural_rendering_resolution": "G_ema.neural_rendering_resolution"}
    try:
        return GeneratorConfig.from_dict(fields)
    except InputError as exc:
        msg = str(exc)
        for name, path in where.items():
            msg = msg.replace(f"field {name!r}", f"field {path}")
        raise CheckpointError(f"{source}: {msg}") from None
