"""IR-SE50 (ArcFace, GUIDE's ID loss) and IR-101 (CurricularFace, GUIDE's ID metric).

Both are the InsightFace "IR" ResNet of docs/face_models.md §1-2, built so that `state_dict()` has
exactly the key names, shapes and order of the official files (`model_ir_se50.pth` of the pSp
release, `CurricularFace_Backbone.pth`): module attributes are registered in the order
input_layer, output_layer, body (§1.3: output_layer is listed before body), and inside a unit
shortcut_layer before res_layer.

`load_backbone(path)` reads a file through checkpoints.files (nothing in it runs), works out which of the
two networks it holds from its keys and shapes, and refuses anything else with the first
differences listed.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from ..checkpoints.files import read_state_dict  # noqa: F401 - re-exported for callers
from ..checkpoints.keys import compare_keys  # noqa: F401 - the one key comparison
from ..errors import CheckpointError, InputError

KINDS = ("ir_se50", "ir101")

# (depth, number of units) per stage; the first unit of each stage has stride 2 (§1.2, §2.1).
_STAGES = {
    "ir_se50": ((64, 3), (128, 4), (256, 14), (512, 3)),
    "ir101": ((64, 3), (128, 13), (256, 30), (512, 3)),
}
# kind -> (squeeze-excitation units, dropout p, affine final BatchNorm1d), as GUIDE builds them:
# IDLoss: Backbone(112, 50, 'ir_se', drop_ratio=0.6); IDSimNet: IR_101 = Backbone(112, 100, 'ir',
# drop_ratio=0.4, affine=False) (§1.1, §2.1). Dropout is inactive: the nets are always in eval.
_CONFIG = {
    "ir_se50": (True, 0.6, True),
    "ir101": (False, 0.4, False),
}
DESCRIPTIONS = {
    "ir_se50": "IR-SE50 (ArcFace, pSp model_ir_se50.pth)",
    "ir101": "IR-101 (CurricularFace_Backbone.pth)",
}
EMBEDDING_DIM = 512
INPUT_SIZE = 112


class SEModule(nn.Module):
    """Squeeze-excitation: avg-pool -> 1x1 conv d->d/16 -> ReLU -> 1x1 conv d/16->d -> sigmoid,
    scaling the input per channel (§1.2). Only fc1 / fc2 own weights (no biases)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, kernel_size=1, padding=0, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(channels // reduction, channels, kernel_size=1, padding=0, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        w = self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))
        return x * w


class BottleneckIR(nn.Module):
    """One pre-activation IR unit: BN -> conv3x3 -> PReLU -> conv3x3(stride) -> BN (-> SE), plus
    a shortcut (max-pool(1, stride) subsample when the width is unchanged, else 1x1 conv + BN).
    No activation after the sum (§1.2)."""

    def __init__(self, in_channels: int, depth: int, stride: int, se: bool):
        super().__init__()
        if in_channels == depth:
            self.shortcut_layer = nn.MaxPool2d(kernel_size=1, stride=stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channels, depth, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(depth),
            )
        layers = [
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, depth, kernel_size=3, stride=1, padding=1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, kernel_size=3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(depth),
        ]
        if se:
            layers.append(SEModule(depth, 16))
        self.res_layer = nn.Sequential(*layers)

    def forward(self, x):
        return self.res_layer(x) + self.shortcut_layer(x)


class IRBackbone(nn.Module):
    """The 112x112 IR / IR-SE backbone. forward(x [N,3,112,112] in [-1,1]) -> [N,512] unit vectors.

    `features(x)` is the same network without the final L2 normalisation (used by the bf16 path,
    which normalises in fp32).
    """

    def __init__(self, kind: str):
        super().__init__()
        if kind not in _STAGES:
            raise InputError(f"unknown backbone kind {kind!r}; expected one of {list(KINDS)}")
        se, drop_ratio, affine = _CONFIG[kind]
        self.kind = kind
        self.input_layer = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.PReLU(64),
        )
        # Registered before `body` on purpose: it fixes the official key order (§1.3, §6.1).
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(512),
            nn.Dropout(drop_ratio),
            nn.Flatten(),  # channel-major (C, H, W) over the contiguous 512x7x7 map (§6.4)
            nn.Linear(512 * 7 * 7, EMBEDDING_DIM),
            nn.BatchNorm1d(EMBEDDING_DIM, affine=affine),
        )
        units = []
        in_channels = 64
        for depth, count in _STAGES[kind]:
            for i in range(count):
                units.append(BottleneckIR(in_channels, depth, 2 if i == 0 else 1, se))
                in_channels = depth
        self.body = nn.Sequential(*units)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_layer(x)
        x = self.body(x)
        # nn.Flatten works on the logical NCHW shape, so the (C, H, W) order of §6.4 holds even
        # for a channels_last tensor (it then copies).
        return self.output_layer(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.features(x))


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / ||x||_2 along dim 1, without an epsilon, as GUIDE's `l2_norm` (§1.2 step 4)."""
    return x / torch.norm(x, 2, 1, True)


def build_backbone(kind: str, seed: int | None = None, device: "torch.device | str | None" = None) -> IRBackbone:
    """A randomly initialised backbone in eval mode (tests, demo, benchmarks).

    With a seed, BatchNorm running statistics and affine parameters are also randomised (mildly)
    so that a test comparing two implementations exercises every tensor of the state_dict.
    """
    if kind not in _STAGES:
        raise InputError(f"unknown backbone kind {kind!r}; expected one of {list(KINDS)}")
    gen = None
    if seed is not None:
        gen = torch.Generator().manual_seed(int(seed))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = IRBackbone(kind)
        _randomise_norms(model, gen)
    else:
        model = IRBackbone(kind)
    model.eval()
    if device is not None:
        model.to(device)
    return model


def _randomise_norms(model: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.75 + 0.5 * torch.rand(n, generator=gen))
                if m.affine:
                    m.weight.copy_(0.8 + 0.4 * torch.rand(n, generator=gen))
                    m.bias.copy_(0.05 * torch.randn(n, generator=gen))
            elif isinstance(m, nn.PReLU):
                m.weight.copy_(0.25 * torch.rand(m.weight.shape, generator=gen))


def expected_keys(kind: str, with_num_batches_tracked: bool = True) -> "OrderedDict[str, tuple]":
    """The official state_dict of `kind`: key -> shape, in file order. Built on the meta device."""
    if kind not in _STAGES:
        raise InputError(f"unknown backbone kind {kind!r}; expected one of {list(KINDS)}")
    if kind not in _EXPECTED_CACHE:
        with torch.device("meta"):
            model = IRBackbone(kind)
        _EXPECTED_CACHE[kind] = OrderedDict((k, tuple(v.shape)) for k, v in model.state_dict().items())
    table = _EXPECTED_CACHE[kind]
    if with_num_batches_tracked:
        return OrderedDict(table)
    return OrderedDict((k, s) for k, s in table.items() if not k.endswith("num_batches_tracked"))


_EXPECTED_CACHE: dict = {}


# ---------------------------------------------------------------------------------------------
# Loading official files
# ---------------------------------------------------------------------------------------------

def detect_kind(state: dict) -> tuple[str | None, dict]:
    """Which backbone a state_dict holds: (kind or None, {kind: differences})."""
    diffs = {kind: compare_keys(state, expected_keys(kind)) for kind in KINDS}
    for kind in KINDS:
        if not diffs[kind]:
            return kind, diffs
    return None, diffs


def load_backbone(path: "str | os.PathLike", device: "torch.device | str | None" = None,
                  kind: str | None = None) -> IRBackbone:
    """Load an official IR-SE50 or IR-101 file; returns the network in eval mode with frozen
    parameters and `.kind` set. `kind` (optional) insists on one of the two.

    Raises CheckpointError when the file is neither, listing the first differences from the
    closer of the two key lists.
    """
    path = Path(path)
    state = read_state_dict(path, "face-recognition weight file")
    found, diffs = detect_kind(state)
    if found is None:
        closest = min(KINDS, key=lambda k: len(diffs[k]))
        shown = diffs[closest][:8]
        more = len(diffs[closest]) - len(shown)
        raise CheckpointError(
            f"{path}: not an IR-SE50 (model_ir_se50.pth) nor an IR-101 (CurricularFace_Backbone.pth) "
            f"state_dict ({len(state)} entries). Closest is {DESCRIPTIONS[closest]}; first differences: "
            + "; ".join(shown) + (f"; ... and {more} more" if more > 0 else "")
        )
    if kind is not None and kind != found:
        raise CheckpointError(f"{path}: holds {DESCRIPTIONS[found]}, expected {DESCRIPTIONS.get(kind, kind)}")
    from ..checkpoints.keys import check_weight_values

    check_weight_values(state, path)  # right names and shapes, but NaN or integer values: refused here
    # Every key was checked above; old files may lack num_batches_tracked (§0), which has no
    # effect in eval mode: fill it with 0 so that the load below is complete and strict.
    full = OrderedDict()
    for key in expected_keys(found):
        full[key] = state[key] if key in state else torch.zeros((), dtype=torch.long)
    # Build on the meta device and adopt the file's tensors (assign=True): no random
    # initialisation of 44-65 M parameters only to overwrite them.
    with torch.device("meta"):
        model = IRBackbone(found)
    model.load_state_dict(
        OrderedDict((k, v.float() if v.is_floating_point() else v) for k, v in full.items()), strict=True, assign=True
    )
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    return model
