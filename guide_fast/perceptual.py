"""LPIPS-VGG v0.1 (docs/face_models.md §3), as GUIDE calls it: `lpips.LPIPS(net="vgg")`, inputs in
[-1, 1] (normalize=False), eval mode.

LPIPS(x, y) = sum over the 5 VGG16 taps k of mean_hw( w_k . (f̂_k(x) - f̂_k(y))^2 ),
f̂ = f / (||f||_channels + 1e-10), taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of
torchvision's vgg16().features after the ScalingLayer (x - shift) / scale.

Weights: the trunk comes from torchvision's ImageNet file `vgg16-397923af.pth` (a plain
state_dict; only `features.*` is used), the 1x1 heads from lpips' `weights/v0.1/vgg.pth`
(legacy serialisation with CUDA-tagged tensors, read onto the CPU). Both are read through
guide_fast.checkpoints.files, which runs nothing from a file. The state_dict of this module
uses the lpips package's names (`scaling_layer.*`, `net.slice{s}.{i}.*`, `lin{k}.model.1.weight`)
without the duplicate `lins.*` aliases (§6.5), so weights copy between the two by name.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError, InputError

# ScalingLayer constants (§3.1): ImageNet mean / std expressed in [-1, 1] units.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10  # added to the channel norm, not inside the square root (§3.1)

# torchvision vgg16 `features` layout: conv indices -> (in, out); ReLU after every conv;
# MaxPool2d(2, 2) at 4, 9, 16, 23 (30 is not used by LPIPS). Slice s ends at the ReLU of tap s.
VGG16_CONVS = OrderedDict([
    (0, (3, 64)), (2, (64, 64)),
    (5, (64, 128)), (7, (128, 128)),
    (10, (128, 256)), (12, (256, 256)), (14, (256, 256)),
    (17, (256, 512)), (19, (512, 512)), (21, (512, 512)),
    (24, (512, 512)), (26, (512, 512)), (28, (512, 512)),
])
_POOLS = (4, 9, 16, 23)
_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))  # [start, end) feature indices
TAP_CHANNELS = (64, 128, 256, 512, 512)


def _slice_of(index: int) -> int:
    for s, (a, b) in enumerate(_SLICES, start=1):
        if a <= index < b:
            return s
    raise ValueError(index)


class ScalingLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))

    def forward(self, x):
        return (x - self.shift) / self.scale


class VGG16Taps(nn.Module):
    """torchvision vgg16().features[0:30] cut into 5 slices, keeping torchvision's indices."""

    def __init__(self):
        super().__init__()
        for s, (a, b) in enumerate(_SLICES, start=1):
            seq = nn.Sequential()
            for i in range(a, b):
                if i in VGG16_CONVS:
                    cin, cout = VGG16_CONVS[i]
                    layer = nn.Conv2d(cin, cout, kernel_size=3, padding=1)
                elif i in _POOLS:
                    layer = nn.MaxPool2d(kernel_size=2, stride=2)
                else:
                    # in-place is safe: the conv before it does not need its output for backward,
                    # and each tap is consumed by a max-pool, which does not modify its input.
                    layer = nn.ReLU(inplace=True)
                seq.add_module(str(i), layer)
            setattr(self, f"slice{s}", seq)

    def forward(self, x):
        taps = []
        for s in range(1, 6):
            x = getattr(self, f"slice{s}")(x)
            taps.append(x)
        return taps


class LinearHead(nn.Module):
    """lpips NetLinLayer: Dropout (inactive in eval) then a 1x1 conv C -> 1 without bias."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(OrderedDict([
            ("0", nn.Dropout(0.5)),
            ("1", nn.Conv2d(channels, 1, kernel_size=1, stride=1, padding=0, bias=False)),
        ]))

    def forward(self, x):
        return self.model(x)


def _unit_normalize(f: torch.Tensor) -> torch.Tensor:
    return f / (torch.sqrt(torch.sum(f * f, dim=1, keepdim=True)) + EPS)


class LPIPS(nn.Module):
    """LPIPS-VGG v0.1. forward(x, y) -> [N] distances; x, y [N,3,H,W] in [-1,1].

    Differentiable w.r.t. both inputs; every parameter is frozen and the module stays in eval
    mode (GUIDE's lpips is built with eval_mode=True and never trained, §3.1).
    """

    def __init__(self):
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Taps()
        for k, c in enumerate(TAP_CHANNELS):
            setattr(self, f"lin{k}", LinearHead(c))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def random(cls, seed: int = 0) -> "LPIPS":
        """Random trunk (PyTorch default conv init) and random non-negative heads, for tests and
        the demo (real LPIPS needs the VGG16 ImageNet weights)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = cls()
            with torch.no_grad():
                for k in range(len(TAP_CHANNELS)):
                    w = getattr(model, f"lin{k}").model[1].weight
                    w.copy_(torch.rand(w.shape) * 0.5)
        return model

    @classmethod
    def from_files(cls, vgg16_path: "str | os.PathLike", lin_path: "str | os.PathLike | None" = None,
                   device: "torch.device | str | None" = None) -> "LPIPS":
        """vgg16_path: torchvision's `vgg16` state_dict (`vgg16-397923af.pth`);
        lin_path: lpips' `weights/v0.1/vgg.pth` (None: the copy inside the installed lpips package)."""
        model = cls()
        model.load_vgg16(vgg16_path)
        model.load_heads(lin_path if lin_path is not None else bundled_lin_path())
        if device is not None:
            model.to(device)
        return model

    def load_vgg16(self, path: "str | os.PathLike") -> None:
        state = read_vgg16_features(path)
        mine = self.net.state_dict()
        remapped = {}
        for key, value in state.items():
            _, idx, name = key.split(".")
            remapped[f"slice{_slice_of(int(idx))}.{idx}.{name}"] = value
        assert set(remapped) == set(mine), "internal: VGG16 key mapping"  # checked by read_vgg16_features
        self.net.load_state_dict(remapped, strict=True)

    def load_heads(self, path: "str | os.PathLike") -> None:
        state = read_lpips_heads(path)
        for k in range(len(TAP_CHANNELS)):
            with torch.no_grad():
                getattr(self, f"lin{k}").model[1].weight.copy_(state[f"lin{k}.model.1.weight"])

    # -- forward -------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3 or y.dim() != 4 or y.shape[1] != 3:
            raise InputError(f"LPIPS inputs must be [N, 3, H, W]; got {list(x.shape)} and {list(y.shape)}")
        if x.shape[-2:] != y.shape[-2:]:
            raise InputError(f"LPIPS inputs differ in size: {list(x.shape)} and {list(y.shape)}")
        if x.shape[0] == y.shape[0] and x.requires_grad != y.requires_grad and torch.is_grad_enabled():
            # GUIDE's case: only the generator being unlearned needs gradients. Running the
            # frozen side without autograd halves the trunk's backward work (a joint pass would
            # compute input gradients for both halves and discard one).
            tx = self.net(self.scaling_layer(x))
            with torch.no_grad():
                ty = self.net(self.scaling_layer(y))
            pairs = list(zip(tx, ty))
        elif x.shape[0] == y.shape[0]:
            # One trunk pass over both halves: half the kernel launches of two calls.
            taps = self.net(self.scaling_layer(torch.cat([x, y], dim=0)))
            pairs = [t.split(x.shape[0], dim=0) for t in taps]
        elif y.shape[0] == 1 or x.shape[0] == 1:
            tx, ty = self.net(self.scaling_layer(x)), self.net(self.scaling_layer(y))
            pairs = list(zip(tx, ty))
        else:
            raise InputError(f"LPIPS batch sizes {x.shape[0]} and {y.shape[0]} do not match")
        total = None
        for k, (fx, fy) in enumerate(pairs):
            d = (_unit_normalize(fx) - _unit_normalize(fy)) ** 2
            v = getattr(self, f"lin{k}")(d).mean(dim=(2, 3))  # spatial average -> [N, 1]
            total = v if total is None else total + v
        return total[:, 0]


# ---------------------------------------------------------------------------------------------
# Weight files
# ---------------------------------------------------------------------------------------------

def vgg16_feature_keys() -> "OrderedDict[str, tuple]":
    """`features.*` keys and shapes of torchvision's vgg16 state_dict (docs/face_models.md §3.3)."""
    table = OrderedDict()
    for i, (cin, cout) in VGG16_CONVS.items():
        table[f"features.{i}.weight"] = (cout, cin, 3, 3)
        table[f"features.{i}.bias"] = (cout,)
    return table


VGG16_CLASSIFIER_KEYS = OrderedDict([
    ("classifier.0.weight", (4096, 25088)), ("classifier.0.bias", (4096,)),
    ("classifier.3.weight", (4096, 4096)), ("classifier.3.bias", (4096,)),
    ("classifier.6.weight", (1000, 4096)), ("classifier.6.bias", (1000,)),
])


def lpips_head_keys() -> "OrderedDict[str, tuple]":
    return OrderedDict((f"lin{k}.model.1.weight", (1, c, 1, 1)) for k, c in enumerate(TAP_CHANNELS))


def _load(path, what: str) -> dict:
    from .checkpoints.files import read_state_dict

    return read_state_dict(path, what)


def read_vgg16_features(path) -> "OrderedDict[str, torch.Tensor]":
    """The `features.*` tensors of a torchvision vgg16 state_dict file, checked by name and shape.
    A classifier, when present, must have torchvision's shapes; it is not returned."""
    return vgg16_features_from_state(_load(path, "VGG16 weight file"), path)


def vgg16_features_from_state(state: dict, path="state_dict") -> "OrderedDict[str, torch.Tensor]":
    from .checkpoints.keys import check_weight_values, compare_keys

    expected = vgg16_feature_keys()
    feats = OrderedDict((k, v) for k, v in state.items() if k.startswith("features."))
    rest = {k: v for k, v in state.items() if not k.startswith("features.")}
    diffs = compare_keys(feats, expected)
    diffs += [d for d in compare_keys(rest, VGG16_CLASSIFIER_KEYS) if not d.startswith("missing")]
    if diffs:
        raise CheckpointError(
            f"{path}: not a torchvision vgg16 state_dict; first differences: " + "; ".join(diffs[:8])
            + (f"; ... and {len(diffs) - 8} more" if len(diffs) > 8 else "")
        )
    check_weight_values(feats, path)
    return feats


def read_lpips_heads(path) -> "OrderedDict[str, torch.Tensor]":
    """The 5 linear heads of lpips v0.1 vgg.pth, checked by name and shape."""
    state = _load(path, "LPIPS head file")
    from .checkpoints.keys import check_weight_values, compare_keys

    expected = lpips_head_keys()
    # The package's own LPIPS.state_dict() also carries lins.* aliases and the trunk; accept a
    # full dump too, as long as the five heads are there with the right shapes.
    heads = OrderedDict((k, v) for k, v in state.items() if k in expected)
    diffs = compare_keys(heads, expected)
    if not diffs and not heads:
        diffs = ["no lin{0..4}.model.1.weight keys"]
    if diffs:
        raise CheckpointError(f"{path}: not an lpips v0.1 vgg.pth head file; first differences: " + "; ".join(diffs[:8]))
    check_weight_values(heads, path)
    return heads


def bundled_lin_path() -> Path:
    """lpips' own copy of weights/v0.1/vgg.pth (the package ships it in its wheel)."""
    import importlib.util

    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.origin:
        raise CheckpointError(
            "no LPIPS head file given and the lpips package is not installed; pass the path of "
            "lpips' weights/v0.1/vgg.pth (https://github.com/richzhang/PerceptualSimilarity)"
        )
    path = Path(spec.origin).parent / "weights" / "v0.1" / "vgg.pth"
    if not path.is_file():
        raise CheckpointError(f"the installed lpips package has no {path}")
    return path
