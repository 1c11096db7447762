"""The manifest of every external weight file guide-fast can use, and their checks.

None of these files can be downloaded by the package (GUIDE's own files come from the authors'
Google Drive folder; the others from their upstream projects, docs/guide.md §2): the user puts them
in one folder and `guide-fast weights --dir D` reports, for each, whether it is found, valid
(loads with the expected keys / shapes) or missing, and where it comes from.

Every state_dict is read by guide_fast.checkpoints.files (an inert parser: nothing in a file is
run); the EG3D pickle goes through `guide_fast.checkpoints.load_generator`.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from pathlib import Path
from typing import Callable

from .errors import CheckpointError, InputError

STATUS_VALID = "valid"
STATUS_INVALID = "invalid"
STATUS_MISSING = "missing"
STATUS_FOUND = "found"  # present, but this installation cannot validate it (reason given)


class CannotValidate(Exception):
    """A validator's own dependency is absent: the file is reported as found, not judged."""


@dataclasses.dataclass(frozen=True)
class WeightFile:
    name: str
    filenames: tuple
    description: str
    format: str
    source: str
    used_by: str
    validator: Callable
    optional: bool = False
    fallbacks: Callable | None = None  # () -> list of other places to look (package data, caches)


@dataclasses.dataclass
class WeightStatus:
    name: str
    status: str
    path: Path | None
    detail: str
    entry: WeightFile

    def as_dict(self) -> dict:
        return {
            "name": self.name, "status": self.status, "path": str(self.path) if self.path else None,
            "detail": self.detail, "filenames": list(self.entry.filenames), "format": self.entry.format,
            "source": self.entry.source, "used_by": self.entry.used_by, "optional": self.entry.optional,
        }


# ---------------------------------------------------------------------------------------------
# Validators: path -> short description of what was found; raise CheckpointError when invalid,
# CannotValidate when a dependency needed to check is missing.
# ---------------------------------------------------------------------------------------------

def _state_dict(path, what):
    from .checkpoints.files import read_state_dict

    return read_state_dict(path, what)


def _check_finite(path, state) -> None:
    from .checkpoints.keys import check_weight_values

    check_weight_values(state, path)


def _num_params(state, skip=("num_batches_tracked", "running_mean", "running_var")) -> int:
    return sum(v.numel() for k, v in state.items() if not k.endswith(skip))


def _diff_error(path, what, diffs) -> CheckpointError:
    shown = "; ".join(diffs[:6])
    more = f"; ... and {len(diffs) - 6} more" if len(diffs) > 6 else ""
    return CheckpointError(f"{path}: not {what}; first differences: {shown}{more}")


def validate_eg3d(path) -> str:
    try:
        from .checkpoints import load_generator
    except ImportError as exc:
        raise CannotValidate(f"guide_fast.checkpoints.load_generator is not available here ({exc})") from None
    try:
        generator = load_generator(path)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - report any loader failure as an invalid file
        raise CheckpointError(f"{path}: load_generator failed: {type(exc).__name__}: {exc}") from None
    n = sum(p.numel() for p in generator.parameters()) if hasattr(generator, "parameters") else None
    detail = f"EG3D generator loaded ({type(generator).__name__}" + (f", {n:,} parameters" if n else "")
    cfg = getattr(generator, "config", None)
    img, nrr = getattr(cfg, "img_resolution", None), getattr(generator, "neural_rendering_resolution", None)
    if img is not None and nrr is not None:
        detail += f", output {img}, neural rendering {nrr}"
        if (img, nrr) != (512, 128):
            detail += "; note: ffhqrebalanced512-128 is 512 / 128 (docs/guide.md §2), this is another configuration"
    return detail + ")"


def _validate_backbone(path, kind) -> str:
    from .checkpoints.keys import compare_keys
    from .identity.backbones import DESCRIPTIONS, expected_keys

    state = _state_dict(path, "face-recognition weight file")
    diffs = compare_keys(state, expected_keys(kind))
    if diffs:
        other = [k for k in DESCRIPTIONS if k != kind][0]
        if not compare_keys(state, expected_keys(other)):
            raise CheckpointError(f"{path}: holds {DESCRIPTIONS[other]}, expected {DESCRIPTIONS[kind]}")
        raise _diff_error(path, DESCRIPTIONS[kind], diffs)
    _check_finite(path, state)
    nbt = sum(k.endswith("num_batches_tracked") for k in state)
    return f"{len(state)} tensors, {_num_params(state):,} parameters" + ("" if nbt else " (no num_batches_tracked keys: old format, fine)")


def validate_ir_se50(path) -> str:
    return _validate_backbone(path, "ir_se50")


def validate_ir101(path) -> str:
    return _validate_backbone(path, "ir101")


def validate_vgg16(path) -> str:
    from .perceptual import vgg16_features_from_state

    state = _state_dict(path, "VGG16 weight file")
    feats = vgg16_features_from_state(state, path)  # names, shapes, dtypes and finiteness
    has_cls = any(k.startswith("classifier.") for k in state)
    return f"{len(feats)} features.* tensors ({_num_params(feats):,} parameters)" + (
        "; classifier present (unused)" if has_cls else "; no classifier (LPIPS does not need it)")


def validate_lpips_heads(path) -> str:
    from .perceptual import read_lpips_heads

    heads = read_lpips_heads(path)  # names, shapes, dtypes and finiteness
    negative = [k for k, v in heads.items() if bool((v < 0).any())]
    note = f"; note: negative weights in {negative} (trained v0.1 heads are non-negative)" if negative else ""
    return f"5 heads, {_num_params(heads):,} weights{note}"


def inception_file_keys() -> "OrderedDict[str, tuple]":
    """Key -> shape of pt_inception-2015-12-05-6726825d.pth: torchvision's Inception3 with 1008
    classes and no aux logits (docs/face_models.md §4.1, §4.3; the FID patches add no parameters)."""
    try:
        import torch
        from torchvision.models.inception import Inception3
    except ImportError as exc:
        raise CannotValidate(f"torchvision is needed to check the Inception keys ({exc})") from None
    with torch.device("meta"):
        net = Inception3(num_classes=1008, aux_logits=False, transform_input=False, init_weights=False)
    return OrderedDict((k, tuple(v.shape)) for k, v in net.state_dict().items())


def validate_fid_inception(path) -> str:
    """The project's own loader (guide_fast.fid.load_inception) when present: a file valid here is
    one the evaluation accepts. Otherwise the key names / shapes of the file naming (§4.3)."""
    try:
        from .fid import load_inception
    except ImportError:
        load_inception = None
    if load_inception is not None:
        net = load_inception(path)  # raises CheckpointError naming the problem
        return f"loaded by guide_fast.fid ({sum(p.numel() for p in net.parameters()):,} parameters)"
    from .checkpoints.keys import compare_keys

    expected = inception_file_keys()
    state = _state_dict(path, "FID Inception weight file")
    diffs = compare_keys(state, expected)
    if diffs:
        raise _diff_error(path, "the pytorch-fid Inception (torchvision Inception3 naming, 1008 classes)", diffs)
    _check_finite(path, state)
    return f"{len(state)} tensors, {_num_params(state):,} parameters"


def validate_goae(path) -> str:
    """Every key and shape of GUIDE's GOAEncoder (545 entries, 111.2M parameters), the position
    index buffers and finiteness: a file valid here is one `load_encoder` loads."""
    from .inversion.goae import describe_file

    return describe_file(path)


def validate_w_avg(path) -> str:
    """The reader `unlearn --w-avg` uses (guide_fast.inversion.load_w_avg): a float tensor
    [14, 512] ([1, 14, 512] and [512] are accepted too), finite."""
    from .inversion.average import load_w_avg

    found = load_w_avg(path)
    return f"tensor [14, 512], finite ({found.source})"


def validate_real_features(path) -> str:
    from .checkpoints import read_npy_file

    arr = read_npy_file(path, "real-image features", mmap=True)
    if arr.ndim != 2 or arr.shape[1] != 2048:
        raise CheckpointError(f"{path}: array of shape {list(arr.shape)}, expected [N, 2048] Inception pool3 features")
    return f"{arr.shape[0]} feature rows of 2048 ({arr.dtype})"


# ---------------------------------------------------------------------------------------------
# Fallback locations
# ---------------------------------------------------------------------------------------------

def _torch_hub_checkpoints(filename):
    def find():
        try:
            import torch

            return [Path(torch.hub.get_dir()) / "checkpoints" / filename]
        except Exception:  # noqa: BLE001
            return []
    return find


def _lpips_package_heads():
    try:
        from .perceptual import bundled_lin_path

        return [bundled_lin_path()]
    except CheckpointError:
        return []


MANIFEST: "OrderedDict[str, WeightFile]" = OrderedDict((w.name, w) for w in [
    WeightFile(
        name="eg3d",
        filenames=("ffhqrebalanced512-128.pkl",),
        description="EG3D generator, FFHQ rebalanced, 512 output / 128 neural rendering",
        format="official EG3D network pickle (dict with 'G_ema'), read by a restricted unpickler",
        source="NVIDIA EG3D release (NGC catalog: nvidia/research/eg3d); also GUIDE's Google Drive folder",
        used_by="the generator (unlearning, evaluation)",
        validator=validate_eg3d,
    ),
    WeightFile(
        name="ir_se50",
        filenames=("model_ir_se50.pth",),
        description="ArcFace IR-SE50 (GUIDE's identity loss)",
        format="torch state_dict, 397 entries (343 without num_batches_tracked), docs/face_models.md §1.3",
        source="pSp release (eladrich/pixel2style2pixel), from TreB1eN/InsightFace_Pytorch; GUIDE's Google Drive folder",
        used_by="IdentityLoss (unlearning)",
        validator=validate_ir_se50,
    ),
    WeightFile(
        name="ir101",
        filenames=("CurricularFace_Backbone.pth",),
        description="CurricularFace IR-101 (GUIDE's ID metric)",
        format="torch state_dict, 672 entries (568 without num_batches_tracked), docs/face_models.md §2.2",
        source="HuangYG123/CurricularFace (README model link); GUIDE's Google Drive folder",
        used_by="IdentityScorer (evaluation)",
        validator=validate_ir101,
    ),
    WeightFile(
        name="vgg16",
        filenames=("vgg16-397923af.pth",),
        description="torchvision VGG16 ImageNet weights (LPIPS trunk)",
        format="torch state_dict of torchvision.models.vgg16 (features.* used; classifier optional)",
        source="https://download.pytorch.org/models/vgg16-397923af.pth (torchvision IMAGENET1K_V1)",
        used_by="LPIPS (unlearning losses, inversion)",
        validator=validate_vgg16,
        fallbacks=_torch_hub_checkpoints("vgg16-397923af.pth"),
    ),
    WeightFile(
        name="lpips_heads",
        filenames=("vgg.pth",),
        description="LPIPS v0.1 linear heads for VGG",
        format="torch state_dict lin{0..4}.model.1.weight [1,C,1,1] (legacy format, CUDA-tagged tensors)",
        source="richzhang/PerceptualSimilarity lpips/weights/v0.1/vgg.pth (also inside the lpips 0.1.4 wheel)",
        used_by="LPIPS",
        validator=validate_lpips_heads,
        fallbacks=_lpips_package_heads,
    ),
    WeightFile(
        name="fid_inception",
        filenames=("pt_inception-2015-12-05-6726825d.pth",),
        description="pytorch-fid InceptionV3 (FID features)",
        format="torch state_dict in torchvision Inception3 naming, 566 entries incl. fc (docs/face_models.md §4.3)",
        source="https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
        used_by="FID_pre / ΔFID_real (evaluation)",
        validator=validate_fid_inception,
        fallbacks=_torch_hub_checkpoints("pt_inception-2015-12-05-6726825d.pth"),
    ),
    WeightFile(
        name="goae",
        filenames=("encoder_FFHQ.pt",),
        description="GOAE encoder (Swin-V2 + W+ heads): one forward pass from an aligned 256² photo to W+ offsets "
                    "from w_avg, GUIDE's inversion; optional: seeds and optimisation inversion work without it",
        format="torch state_dict of GOAEncoder(swin_config, mlp_layer=2): 545 entries (50 buffers), 111.2M parameters, "
               "keys and shapes checked (docs/formats.md §5)",
        source="jiangyzy/GOAE; GUIDE's Google Drive folder",
        used_by="photo inversion: guide_fast.inversion.goae.load_encoder (unlearn --encoder)",
        validator=validate_goae,
        optional=True,
    ),
    WeightFile(
        name="w_avg",
        filenames=("w_avg_ffhqrebalanced512-128.pt",),
        description="average W+ latent of the EG3D mapping network (the generator's own mapping buffer is used "
                    "when absent; report.json says which)",
        format="torch tensor [14, 512] (also [1, 14, 512] or [512]), floating point, finite (docs/formats.md)",
        source="GUIDE's Google Drive folder",
        used_by="unlearn --w-avg: the UFO target's centre, the GOAE offset (w_u = GOAE(x) + w_avg) and the "
                "optimisation inversion's start; guide_fast.inversion.w_avg_distance compares it with the buffer",
        validator=validate_w_avg,
        optional=True,
    ),
    WeightFile(
        name="ffhq_real_features",
        filenames=("ffhq_real_feat.npy",),
        description="Inception pool3 features of real FFHQ images",
        format="numpy array [N, 2048]",
        source="GUIDE's Google Drive folder",
        used_by="ΔFID_real (optional)",
        validator=validate_real_features,
        optional=True,
    ),
])


# ---------------------------------------------------------------------------------------------
# Lookup and report
# ---------------------------------------------------------------------------------------------

def entry(name: str) -> WeightFile:
    if name not in MANIFEST:
        raise InputError(f"unknown weight file {name!r}; known: {list(MANIFEST)}")
    return MANIFEST[name]


def locate(name: str, directory=None, use_fallbacks: bool = True) -> Path | None:
    """Path of weight file `name` in `directory` (any of its accepted file names), else in its
    fallback locations (lpips package data, torch hub cache), else None."""
    e = entry(name)
    if directory is not None:
        for fn in e.filenames:
            p = Path(directory) / fn
            if p.is_file():
                return p
    if use_fallbacks and e.fallbacks is not None:
        for p in e.fallbacks():
            if Path(p).is_file():
                return Path(p)
    return None


def check(name: str, path) -> WeightStatus:
    """Validate one file as weight file `name`."""
    e = entry(name)
    path = Path(path)
    if not path.is_file():
        return WeightStatus(name, STATUS_MISSING, path, "no such file", e)
    try:
        detail = e.validator(path)
        return WeightStatus(name, STATUS_VALID, path, detail, e)
    except CannotValidate as exc:
        return WeightStatus(name, STATUS_FOUND, path, f"not validated: {exc}", e)
    except CheckpointError as exc:
        return WeightStatus(name, STATUS_INVALID, path, str(exc), e)
    except Exception as exc:  # noqa: BLE001 - a corrupt file may fail anywhere; it is still just invalid
        return WeightStatus(name, STATUS_INVALID, path, f"{path}: {type(exc).__name__}: {exc}", e)


def check_dir(directory, use_fallbacks: bool = True) -> list:
    """One WeightStatus per manifest entry, in manifest order."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"weights directory {directory}: no such directory")
    out = []
    for name, e in MANIFEST.items():
        path = locate(name, directory, use_fallbacks=use_fallbacks)
        if path is None:
            want = " or ".join(e.filenames)
            opt = " (optional)" if e.optional else ""
            out.append(WeightStatus(name, STATUS_MISSING, None, f"{want} not in {directory}{opt}", e))
            continue
        status = check(name, path)
        if path.parent != directory:
            status.detail += f" [not in {directory}; using {path}]"
        out.append(status)
    return out


def format_report(statuses: list) -> str:
    lines = []
    width = max(len(s.name) for s in statuses)
    for s in statuses:
        where = str(s.path) if s.path else "-"
        lines.append(f"{s.name:<{width}}  {s.status:<7}  {where}")
        lines.append(f"{'':<{width}}  {'':<7}  {s.detail}")
        if s.status != STATUS_VALID:
            lines.append(f"{'':<{width}}  {'':<7}  expected: {' or '.join(s.entry.filenames)} ({s.entry.format}); "
                         f"source: {s.entry.source}")
    return "\n".join(lines)
