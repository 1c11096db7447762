"""Build EG3D network pickles in the official format (docs/eg3d.md §7.1-7.2) from a generator.

The official file is `pickle.dump({"G": ..., "D": ..., "G_ema": ..., ...})` where networks are
`torch_utils.persistence` objects: each reduces to `_reconstruct_persistent_obj(meta)` with
meta = {type: 'class', version: 6, module_src: <source text>, class_name, state: __dict__}.
To pickle such objects by reference, fake `torch_utils` / `dnnlib` / `training` modules are put
in sys.modules while dumping and removed afterwards, so the loader under test cannot use them.
"""
from __future__ import annotations

import pickle
import sys
import types
from collections import OrderedDict
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from guide_fast.eg3d import networks
from guide_fast.eg3d.generator import TriPlaneGenerator

FAKE_SOURCE = {
    "training.triplane": "# triplane.py (stand-in text; a real pickle carries the full module source)\nimport os\nos.system('echo pwned')\n",
    "training.networks_stylegan2": "# networks_stylegan2.py stand-in\nraise SystemExit('executed embedded source')\n",
    "training.superresolution": "# superresolution.py stand-in\nraise SystemExit('executed embedded source')\n",
}


def _never_call(meta):  # the loader must not import or call this
    raise AssertionError("the embedded persistence hook was executed")


@contextmanager
def fake_modules():
    names = [
        "torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util", "training", "training.triplane",
        "training.volumetric_rendering", "training.volumetric_rendering.renderer",
        "training.volumetric_rendering.ray_sampler", "training.volumetric_rendering.ray_marcher",
    ]
    saved = {n: sys.modules.get(n) for n in names}
    mods = {n: types.ModuleType(n) for n in names}
    _never_call.__module__ = "torch_utils.persistence"
    _never_call.__qualname__ = "_reconstruct_persistent_obj"
    _never_call.__name__ = "_reconstruct_persistent_obj"
    mods["torch_utils.persistence"]._reconstruct_persistent_obj = _never_call

    class EasyDict(dict):
        pass

    EasyDict.__module__ = "dnnlib.util"
    EasyDict.__qualname__ = "EasyDict"
    mods["dnnlib.util"].EasyDict = EasyDict
    for mod, cls_name in [
        ("training.triplane", "OSGDecoder"),
        ("training.volumetric_rendering.renderer", "ImportanceRenderer"),
        ("training.volumetric_rendering.ray_sampler", "RaySampler"),
        ("training.volumetric_rendering.ray_marcher", "MipRayMarcher2"),
    ]:
        cls = type(cls_name, (object,), {})
        cls.__module__ = mod
        cls.__qualname__ = cls_name
        setattr(mods[mod], cls_name, cls)
    sys.modules.update(mods)
    try:
        yield mods
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


class Persistent:
    def __init__(self, module_name, class_name, state):
        self.module_name, self.class_name, self.state = module_name, class_name, state

    def __reduce__(self):
        meta = dict(type="class", version=6, module_src=FAKE_SOURCE[self.module_name], class_name=self.class_name,
                    state=self.state)
        return (sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (meta,))


_PERSISTENT = {
    networks.FullyConnectedLayer: ("training.networks_stylegan2", "FullyConnectedLayer"),
    networks.MappingNetwork: ("training.networks_stylegan2", "MappingNetwork"),
    networks.SynthesisLayer: ("training.networks_stylegan2", "SynthesisLayer"),
    networks.ToRGBLayer: ("training.networks_stylegan2", "ToRGBLayer"),
    networks.SynthesisBlock: ("training.networks_stylegan2", "SynthesisBlock"),
    networks.SynthesisNetwork: ("training.networks_stylegan2", "SynthesisNetwork"),
    networks.Backbone: ("training.networks_stylegan2", "Generator"),
    networks.SuperResolution: ("training.superresolution", "SuperresolutionHybrid8XDC"),
    TriPlaneGenerator: ("training.triplane", "TriPlaneGenerator"),
}


def _module_state(m: nn.Module, children: OrderedDict, easy, extra=None) -> dict:
    state = {
        "training": False,
        "_parameters": OrderedDict((k, nn.Parameter(v.detach().clone(), requires_grad=False)) for k, v in m._parameters.items()),
        "_buffers": OrderedDict((k, v.detach().clone()) for k, v in m._buffers.items()),
        "_non_persistent_buffers_set": set(),
        "_backward_hooks": OrderedDict(),
        "_forward_hooks": OrderedDict(),
        "_forward_pre_hooks": OrderedDict(),
        "_state_dict_hooks": OrderedDict(),
        "_load_state_dict_pre_hooks": OrderedDict(),
        "_modules": children,
        "_init_args": (),
        "_init_kwargs": easy(),
    }
    # numpy scalars, as the official code stores gains (weight_gain = lr / np.sqrt(n)).
    for attr in ("weight_gain", "bias_gain"):
        if hasattr(m, attr):
            state[attr] = np.float32(getattr(m, attr))
    state.update(extra or {})
    return state


def _convert(m: nn.Module, mods, gen_kwargs=None):
    easy = mods["dnnlib.util"].EasyDict
    children = OrderedDict((k, _convert(c, mods)) for k, c in m._modules.items())
    if isinstance(m, networks.OSGDecoder):
        obj = mods["training.triplane"].OSGDecoder()
        obj.__dict__.update(_module_state(m, children, easy))
        return obj
    if isinstance(m, (nn.Sequential, nn.Softplus)):
        # Plain torch modules are pickled by import path; their children are persistent objects.
        clone = nn.Sequential() if isinstance(m, nn.Sequential) else nn.Softplus()
        clone.__dict__["_modules"] = children
        return clone
    module_name, class_name = _PERSISTENT[type(m)]
    extra = {}
    if isinstance(m, TriPlaneGenerator):
        rk = easy(m.rendering_kwargs)
        ren = mods["training.volumetric_rendering.renderer"].ImportanceRenderer()
        marcher = mods["training.volumetric_rendering.ray_marcher"].MipRayMarcher2()
        marcher.__dict__.update(_module_state(nn.Module(), OrderedDict(), easy))
        ren.__dict__.update(_module_state(nn.Module(), OrderedDict(ray_marcher=marcher), easy))
        ren.__dict__["plane_axes"] = torch.eye(3).repeat(3, 1, 1)
        sampler = mods["training.volumetric_rendering.ray_sampler"].RaySampler()
        sampler.__dict__.update(_module_state(nn.Module(), OrderedDict(), easy))
        children = OrderedDict([("backbone", children["backbone"]), ("renderer", ren), ("ray_sampler", sampler),
                                ("superresolution", children["superresolution"]), ("decoder", children["decoder"])])
        extra = {"rendering_kwargs": rk, "neural_rendering_resolution": m.neural_rendering_resolution,
                 "_init_kwargs": easy(gen_kwargs)}
    return Persistent(module_name, class_name, _module_state(m, children, easy, extra))


def official_init_kwargs(gen: TriPlaneGenerator, easy) -> dict:
    cfg = gen.config
    return dict(
        z_dim=cfg.z_dim, w_dim=cfg.w_dim, mapping_kwargs=easy(num_layers=cfg.mapping_layers),
        channel_base=cfg.channel_base, channel_max=cfg.channel_max, fused_modconv_default="inference_only",
        num_fp16_res=0, conv_clamp=None, rendering_kwargs=easy(gen.rendering_kwargs), sr_num_fp16_res=4,
        sr_kwargs=easy(channel_base=cfg.channel_base, channel_max=cfg.channel_max, fused_modconv_default="inference_only"),
        c_dim=cfg.c_dim, img_resolution=cfg.img_resolution, img_channels=3,
    )


def official_pickle_bytes(gen: TriPlaneGenerator, extra_entries: dict | None = None, init_kwargs: dict | None = None,
                          g_attrs: dict | None = None, rendering_kwargs: dict | None = None,
                          protocol: int = 4) -> bytes:
    """The official network pickle of `gen`. init_kwargs / g_attrs / rendering_kwargs update
    G_ema's constructor kwargs, its attributes (e.g. neural_rendering_resolution) and its
    rendering_kwargs as written, to make the checkpoints of other releases or defective ones."""
    with fake_modules() as mods:
        easy = mods["dnnlib.util"].EasyDict
        kwargs = official_init_kwargs(gen, easy)
        kwargs.update(init_kwargs or {})
        g_ema = _convert(gen, mods, kwargs)
        g_ema.state.update(g_attrs or {})
        if rendering_kwargs:
            g_ema.state["rendering_kwargs"] = easy({**g_ema.state["rendering_kwargs"], **rendering_kwargs})
        d_stub = Persistent("training.networks_stylegan2", "DualDiscriminator",
                            {"_parameters": OrderedDict(w=nn.Parameter(torch.randn(4, 4), requires_grad=False)),
                             "_buffers": OrderedDict(), "_modules": OrderedDict(), "_init_kwargs": easy(c_dim=25)})
        data = {"training_set_kwargs": easy(resolution=512), "G": g_ema, "D": d_stub, "G_ema": g_ema, "augment_pipe": None}
        data.update(extra_entries or {})
        return pickle.dumps(data, protocol=protocol)


# The released EG3D generators (docs/eg3d.md §1): neural rendering resolution and the
# rendering_kwargs that differ from FFHQ's. All but shapenetcars use SuperresolutionHybrid8XDC.
OFFICIAL_RELEASES = {
    "ffhq512-64": (64, {}),
    "ffhq512-128": (128, {}),
    "ffhqrebalanced512-64": (64, {}),
    "ffhqrebalanced512-128": (128, {}),
    "afhqcats512-128": (128, {"avg_camera_pivot": [0, 0, -0.06]}),
}
SHAPENET_KWARGS = {"superresolution_module": "training.superresolution.SuperresolutionHybrid2X",
                   "image_resolution": 128, "ray_start": 0.1, "ray_end": 2.6, "box_warp": 1.6, "white_back": True,
                   "avg_camera_radius": 1.7, "avg_camera_pivot": [0, 0, 0]}


def official_config(name: str):
    """The GeneratorConfig of a released checkpoint (its architecture at full size)."""
    from guide_fast.eg3d.generator import FFHQ_RENDERING_KWARGS, GeneratorConfig

    nrr, rk = OFFICIAL_RELEASES[name]
    return GeneratorConfig(neural_rendering_resolution=nrr, rendering_kwargs={**FFHQ_RENDERING_KWARGS, **rk})


def official_release_pickle(name: str, seed: int = 0) -> tuple:
    """(generator with small random weights, its pickle) of a released configuration: the
    architecture, shapes and kwargs of the real file, weights drawn at init scale."""
    with torch.random.fork_rng(devices=[]):  # the caller's random stream is left alone
        torch.manual_seed(seed)
        gen = TriPlaneGenerator(official_config(name)).eval().requires_grad_(False)
    return gen, official_pickle_bytes(gen)
