"""GUIDE's own MTCNN detector and 5-point alignment, as its ID metric runs them (docs/face_models.md §2.3, §5).

GUIDE's `evaluate_id.py` scores a before/after pair with `IDSimNet`: each PNG is opened with PIL,
detected with its MTCNN port (TropComplique's `mtcnn-pytorch` as modified in pSp), aligned onto
the 112x112 reference points with `cv2.warpAffine`, and embedded with CurricularFace IR-101.
facenet-pytorch's MTCNN (guide_fast.identity.align) is a different algorithm on the same weights;
its landmarks differ from GUIDE's by 1-3 px, which moves the pair similarity by about the size of
the published ID figure. This module reproduces GUIDE's detector step by step:

* **Weights**: facenet-pytorch's bundled `pnet/rnet/onet.pt` (no download). They are GUIDE's
  `pnet/rnet/onet.npy` up to names and one fixed column permutation of the two dense layers fed by
  a flatten (R-Net 576 inputs, O-Net 1152): GUIDE flattens the [C, H, W] map in (C, W, H) order,
  facenet in (W, H, C) order (`facenet_to_guide_dense`, docs/face_models.md §5.1).
* **Pyramid**: min face size 20, scales 0.6 * 0.707^k while min(H, W) * 0.6 * 0.707^k > 12; each
  scale resized with PIL BILINEAR to (ceil(W s), ceil(H s)), normalised (x - 127.5) * 0.0078125.
* **P-Net**: softmax over the map's *width* axis (GUIDE's `dim=-1` quirk), threshold 0.15, boxes
  from stride 2 / cell 12 rounded (numpy's round-half-even) at each scale, NMS 0.5 (union) per
  scale, NMS 0.7 (union) over all scales, P-Net offsets applied, squared, rounded.
* **R-Net**: crops cut with zero padding where a box leaves the image, PIL BILINEAR to 24x24,
  threshold 0.25, NMS 0.7 (union), calibrated, squared, rounded. Cutting the crops clips the
  boxes to the image *in place* (GUIDE's `correct_bboxes` writes through numpy views), and the
  clipped boxes are what the next stage calibrates: reproduced here.
* **O-Net**: 48x48 crops, threshold 0.35; landmarks x = x1 + (x2 - x1 + 1) * l (stored as
  float32, as GUIDE's array is), boxes calibrated, final NMS 0.7 in 'min' mode. Faces come out
  highest O-Net score first; GUIDE aligns `landmarks[0]`.
* **Alignment**: points and reference points cast to float32; cp2tform 'similarity' with
  GUIDE's matlab_cp2tform quirk: the reflective candidate is fitted, and both candidates' residuals
  are measured against the *x-mirrored* reference points (the port mirrors its input array in
  place before comparing); ties keep the non-reflective fit. The 2x3 matrix warps the uint8 RGB
  image with `cv2.warpAffine` (INTER_LINEAR, black border), OpenCV's fixed-point bilinear: the
  crop's pixel values depend on it, so OpenCV (opencv-python-headless) is used, not emulated.

The numbers are GUIDE's up to the floating-point rounding of the three small networks (GUIDE runs
them one image at a time on CUDA; here equal-size images share a batch, on CPU or CUDA).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import GuideFastError, InputError

MIN_FACE_SIZE = 20.0
MIN_DETECTION_SIZE = 12
PYRAMID_FACTOR = 0.707
THRESHOLDS = (0.15, 0.25, 0.35)
NMS_THRESHOLDS = (0.7, 0.7, 0.7)
SCALE_NMS_THRESHOLD = 0.5  # P-Net's NMS within one scale
ALIGNED_SIZE = 112
# get_reference_facial_points(default_square=True): the 96x112 points + (8, 0) (docs/face_models.md §2.3)
REFERENCE_POINTS_96x112 = np.array([[30.29459953, 51.69630051], [65.53179932, 51.50139999],
                                    [48.02519989, 71.73660278], [33.54930115, 92.3655014],
                                    [62.72990036, 92.20410156]], dtype=np.float64)
REFERENCE_POINTS_112 = REFERENCE_POINTS_96x112 + np.array([8.0, 0.0])


# ---------------------------------------------------------------------------------- networks
class _FlattenCWH(nn.Module):
    """GUIDE's Flatten: transpose H and W, then flatten, so [N, C, H, W] -> (C, W, H) order."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(3, 2).contiguous().flatten(1)


class PNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(3, 10, 3)), ("prelu1", nn.PReLU(10)), ("pool1", nn.MaxPool2d(2, 2, ceil_mode=True)),
            ("conv2", nn.Conv2d(10, 16, 3)), ("prelu2", nn.PReLU(16)),
            ("conv3", nn.Conv2d(16, 32, 3)), ("prelu3", nn.PReLU(32)),
        ]))
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor):
        """-> (offsets [N, 4, h, w], probabilities [N, 2, h, w]); the softmax runs over the last
        axis (the map's width), as GUIDE's port does, not over the two classes."""
        x = self.features(x)
        return self.conv4_2(x), F.softmax(self.conv4_1(x), dim=-1)


class RNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(3, 28, 3)), ("prelu1", nn.PReLU(28)), ("pool1", nn.MaxPool2d(3, 2, ceil_mode=True)),
            ("conv2", nn.Conv2d(28, 48, 3)), ("prelu2", nn.PReLU(48)), ("pool2", nn.MaxPool2d(3, 2, ceil_mode=True)),
            ("conv3", nn.Conv2d(48, 64, 2)), ("prelu3", nn.PReLU(64)),
            ("flatten", _FlattenCWH()), ("conv4", nn.Linear(576, 128)), ("prelu4", nn.PReLU(128)),
        ]))
        self.conv5_1 = nn.Linear(128, 2)
        self.conv5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor):
        """-> (offsets [N, 4], probabilities [N, 2])."""
        x = self.features(x)
        return self.conv5_2(x), F.softmax(self.conv5_1(x), dim=-1)


class ONet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(3, 32, 3)), ("prelu1", nn.PReLU(32)), ("pool1", nn.MaxPool2d(3, 2, ceil_mode=True)),
            ("conv2", nn.Conv2d(32, 64, 3)), ("prelu2", nn.PReLU(64)), ("pool2", nn.MaxPool2d(3, 2, ceil_mode=True)),
            ("conv3", nn.Conv2d(64, 64, 3)), ("prelu3", nn.PReLU(64)), ("pool3", nn.MaxPool2d(2, 2, ceil_mode=True)),
            ("conv4", nn.Conv2d(64, 128, 2)), ("prelu4", nn.PReLU(128)),
            ("flatten", _FlattenCWH()), ("conv5", nn.Linear(1152, 256)), ("drop5", nn.Dropout(0.25)),
            ("prelu5", nn.PReLU(256)),
        ]))
        self.conv6_1 = nn.Linear(256, 2)
        self.conv6_2 = nn.Linear(256, 4)
        self.conv6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor):
        """-> (landmarks [N, 10] as x1..x5, y1..y5 in box units, offsets [N, 4], probabilities [N, 2])."""
        x = self.features(x)
        return self.conv6_3(x), self.conv6_2(x), F.softmax(self.conv6_1(x), dim=-1)


def facenet_to_guide_dense(weight: torch.Tensor, channels: int, height: int, width: int) -> torch.Tensor:
    """A dense weight [out, C*H*W] that reads a flatten in facenet-pytorch's order -> the same
    layer reading GUIDE's order.

    facenet flattens x.permute(0, 3, 2, 1) of the [N, C, H, W] map: column ((w*H + h)*C + c).
    GUIDE flattens x.transpose(3, 2): column ((c*W + w)*H + h). So the weight, viewed as
    [out, W, H, C], is permuted to [out, C, W, H].
    """
    out = weight.shape[0]
    if weight.shape[1] != channels * height * width:
        raise InputError(f"dense weight has {weight.shape[1]} inputs, expected {channels}x{height}x{width}")
    return weight.reshape(out, width, height, channels).permute(0, 3, 1, 2).reshape(out, -1).contiguous()


# facenet-pytorch name -> GUIDE (pSp) name; the two dense layers fed by a flatten get permuted.
_RENAMES = {
    "pnet": {"conv4_1": "conv4_1", "conv4_2": "conv4_2"},
    "rnet": {"dense4": "features.conv4", "prelu4": "features.prelu4", "dense5_1": "conv5_1", "dense5_2": "conv5_2"},
    "onet": {"dense5": "features.conv5", "prelu5": "features.prelu5", "dense6_1": "conv6_1", "dense6_2": "conv6_2",
             "dense6_3": "conv6_3"},
}
_FLATTEN_FED = {"rnet": ("dense4.weight", (64, 3, 3)), "onet": ("dense5.weight", (128, 3, 3))}


def facenet_weights_dir() -> Path:
    """The folder of facenet-pytorch's bundled MTCNN weights (its package `data/` folder)."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("facenet_pytorch")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise GuideFastError("GUIDE's MTCNN is built from facenet-pytorch's bundled weights: "
                             "pip install --no-deps facenet-pytorch==2.6.0")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def guide_state_dict(facenet_state: dict, net: str) -> dict:
    """facenet-pytorch's state dict of `net` ("pnet", "rnet", "onet") -> GUIDE's names and layout."""
    renames = _RENAMES[net]
    out = {}
    for key, value in facenet_state.items():
        module, _, param = key.rpartition(".")
        if key == _FLATTEN_FED.get(net, (None,))[0]:
            value = facenet_to_guide_dense(value, *_FLATTEN_FED[net][1])
        name = renames.get(module, f"features.{module}")
        out[f"{name}.{param}"] = value
    return out


@functools.lru_cache(maxsize=4)
def load_nets(device: str = "cpu") -> tuple:
    """(P-Net, R-Net, O-Net) with GUIDE's layout and weights, from facenet-pytorch's files."""
    from ..checkpoints.files import read_state_dict  # the one file reader (a CheckpointError names the file)

    folder = facenet_weights_dir()
    nets = []
    for name, cls in (("pnet", PNet), ("rnet", RNet), ("onet", ONet)):
        path = folder / f"{name}.pt"
        if not path.is_file():
            raise GuideFastError(f"facenet-pytorch's {path.name} is missing from {folder}: reinstall facenet-pytorch")
        state = read_state_dict(path, "facenet-pytorch's weight file")
        net = cls()
        net.load_state_dict(guide_state_dict(state, name))
        nets.append(net.to(device).eval().requires_grad_(False))
    return tuple(nets)


# ----------------------------------------------------------------------------- box utilities
def nms(boxes: np.ndarray, overlap_threshold: float, mode: str = "union") -> list:
    """Indices kept by GUIDE's NMS: highest score first (numpy argsort order for ties), areas and
    overlaps with the +1 pixel convention; 'min' divides by the smaller area."""
    if len(boxes) == 0:
        return []
    x1, y1, x2, y2, score = (boxes[:, i] for i in range(5))
    area = (x2 - x1 + 1.0) * (y2 - y1 + 1.0)
    order = np.argsort(score)
    keep = []
    while len(order) > 0:
        last = len(order) - 1
        i = order[last]
        keep.append(i)
        rest = order[:last]
        iw = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1.0)
        ih = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1.0)
        inter = iw * ih
        if mode == "min":
            overlap = inter / np.minimum(area[i], area[rest])
        else:
            overlap = inter / (area[i] + area[rest] - inter)
        order = np.delete(order, np.concatenate([[last], np.where(overlap > overlap_threshold)[0]]))
    return keep


def calibrate(boxes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Apply the nets' box offsets (scaled by the +1 width and height), in place as GUIDE does."""
    w = (boxes[:, 2] - boxes[:, 0] + 1.0)[:, None]
    h = (boxes[:, 3] - boxes[:, 1] + 1.0)[:, None]
    boxes[:, 0:4] = boxes[:, 0:4] + np.hstack([w, h, w, h]) * offsets
    return boxes


def square(boxes: np.ndarray) -> np.ndarray:
    """Squares around each box's centre, side = the longer side (+1 convention)."""
    out = np.zeros_like(boxes)
    h = boxes[:, 3] - boxes[:, 1] + 1.0
    w = boxes[:, 2] - boxes[:, 0] + 1.0
    side = np.maximum(h, w)
    out[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
    out[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
    out[:, 2] = out[:, 0] + side - 1.0
    out[:, 3] = out[:, 1] + side - 1.0
    return out


def _normalise(pixels: np.ndarray) -> np.ndarray:
    """float32 HxWx3 -> [3, H, W] float32 in MTCNN's range: (x - 127.5) * 0.0078125."""
    return ((pixels - 127.5) * 0.0078125).transpose(2, 0, 1)


def cut_boxes(boxes: np.ndarray, image: np.ndarray, size: int) -> np.ndarray:
    """Crops [n, 3, size, size] of `boxes` from the uint8 image, zero-padded where a box leaves it,
    PIL-bilinear resized. As GUIDE's `correct_bboxes`, the boxes are clipped to the image in place."""
    from PIL import Image

    height, width = image.shape[:2]
    n = len(boxes)
    w = (boxes[:, 2] - boxes[:, 0] + 1.0).astype(np.int32)
    h = (boxes[:, 3] - boxes[:, 1] + 1.0).astype(np.int32)
    dx, dy = np.zeros(n), np.zeros(n)
    edx, edy = w - 1.0, h - 1.0
    x, y, ex, ey = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]  # views: writes reach `boxes`
    right = ex > width - 1.0
    edx[right] = w[right] + width - 2.0 - ex[right]
    ex[right] = width - 1.0
    low = ey > height - 1.0
    edy[low] = h[low] + height - 2.0 - ey[low]
    ey[low] = height - 1.0
    left = x < 0.0
    dx[left] = 0.0 - x[left]
    x[left] = 0.0
    high = y < 0.0
    dy[high] = 0.0 - y[high]
    y[high] = 0.0
    dx, dy, edx, edy = (a.astype(np.int32) for a in (dx, dy, edx, edy))
    xi, yi, exi, eyi = (a.astype(np.int32) for a in (x, y, ex, ey))
    crops = np.zeros((n, 3, size, size), np.float32)
    for i in range(n):
        cut = np.zeros((max(h[i], 1), max(w[i], 1), 3), np.uint8)
        try:
            cut[dy[i]:edy[i] + 1, dx[i]:edx[i] + 1] = image[yi[i]:eyi[i] + 1, xi[i]:exi[i] + 1]
        except ValueError:
            pass  # a box wholly outside the image: GUIDE would fail here; a black crop scores no face
        resized = np.asarray(Image.fromarray(cut).resize((size, size), Image.BILINEAR), np.float32)
        crops[i] = _normalise(resized)
    return crops


# ---------------------------------------------------------------------------------- detector
@dataclasses.dataclass(frozen=True)
class GuideFaces:
    """GUIDE's `detect_faces` output for one image: boxes [n, 5] float64 (x1, y1, x2, y2, score)
    and landmarks [n, 10] float32 (x1..x5, y1..y5), highest O-Net score first."""

    boxes: np.ndarray
    landmarks: np.ndarray

    def points(self, i: int = 0) -> np.ndarray:
        """The 5 (x, y) points of face i as float32 [5, 2] (image left eye, right eye, nose, mouth corners)."""
        return np.stack([self.landmarks[i, :5], self.landmarks[i, 5:]], axis=1)

    def __len__(self) -> int:
        return len(self.boxes)


def pyramid_scales(height: int, width: int, min_face_size: float = MIN_FACE_SIZE) -> list:
    m = MIN_DETECTION_SIZE / min_face_size
    min_length = min(height, width) * m
    scales, k = [], 0
    while min_length > MIN_DETECTION_SIZE:
        scales.append(m * PYRAMID_FACTOR ** k)
        min_length *= PYRAMID_FACTOR
        k += 1
    return scales


def _candidate_boxes(probs: np.ndarray, offsets: np.ndarray, scale: float, threshold: float) -> np.ndarray:
    """P-Net map -> [n, 9] boxes (x1, y1, x2, y2, score, 4 offsets) in image pixels."""
    rows, cols = np.where(probs > threshold)
    if rows.size == 0:
        return np.zeros((0, 9))
    stride, cell = 2, 12
    return np.vstack([
        np.round((stride * cols + 1.0) / scale), np.round((stride * rows + 1.0) / scale),
        np.round((stride * cols + 1.0 + cell) / scale), np.round((stride * rows + 1.0 + cell) / scale),
        probs[rows, cols], offsets[:, rows, cols],
    ]).T


def _run(net, batch: np.ndarray, device: str):
    with torch.no_grad():
        out = net(torch.from_numpy(np.ascontiguousarray(batch)).to(device))
    return [o.float().cpu().numpy() for o in out]


def detect(images, *, device=None, min_face_size: float = MIN_FACE_SIZE, thresholds=THRESHOLDS,
           nms_thresholds=NMS_THRESHOLDS) -> list:
    """GUIDE's `MTCNN.detect_faces` for each uint8 HxWx3 RGB image -> a list of `GuideFaces`
    (empty where none is found; GUIDE itself would fail on such an image)."""
    from PIL import Image

    device = str(torch.device(device)) if device is not None else "cpu"
    arrays = [np.ascontiguousarray(a) for a in images]
    for i, a in enumerate(arrays):
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
            raise InputError(f"image {i}: GUIDE's MTCNN takes uint8 HxWx3 RGB, got {a.dtype} {list(a.shape)}")
    pnet, rnet, onet = load_nets(device)
    empty = GuideFaces(np.zeros((0, 5)), np.zeros((0, 10), np.float32))
    results = [empty] * len(arrays)

    # stage 1: P-Net on the pyramid; images of one size share a batch per scale
    stage1: dict = {}
    by_size: dict = {}
    for i, a in enumerate(arrays):
        by_size.setdefault(a.shape[:2], []).append(i)
    for (height, width), members in by_size.items():
        pils = [Image.fromarray(arrays[i]) for i in members]
        for s in pyramid_scales(height, width, min_face_size):
            sw, sh = math.ceil(width * s), math.ceil(height * s)
            batch = np.stack([_normalise(np.asarray(p.resize((sw, sh), Image.BILINEAR), np.float32)) for p in pils])
            offsets, probs = _run(pnet, batch, device)
            for j, i in enumerate(members):
                boxes = _candidate_boxes(probs[j, 1], offsets[j], s, thresholds[0])
                if len(boxes):
                    stage1.setdefault(i, []).append(boxes[nms(boxes[:, 0:5], SCALE_NMS_THRESHOLD)])
    boxes_of = {}
    for i, per_scale in stage1.items():
        boxes = np.vstack(per_scale)
        boxes = boxes[nms(boxes[:, 0:5], nms_thresholds[0])]
        boxes = square(calibrate(boxes[:, 0:5], boxes[:, 5:]))
        boxes[:, 0:4] = np.round(boxes[:, 0:4])
        boxes_of[i] = boxes

    # stage 2: R-Net on 24x24 crops (crops of every image in one batch)
    boxes_of = _refine(rnet, boxes_of, arrays, 24, device, thresholds[1], nms_thresholds[1])

    # stage 3: O-Net on 48x48 crops, landmarks, final 'min' NMS
    order = [i for i in boxes_of if len(boxes_of[i])]
    if order:
        crops = [cut_boxes(boxes_of[i], arrays[i], 48) for i in order]
        landmarks, offsets, probs = _run(onet, np.concatenate(crops), device)
        start = 0
        for i, c in zip(order, crops):
            sl = slice(start, start + len(c))
            start += len(c)
            boxes, lm, off, p = boxes_of[i], landmarks[sl], offsets[sl], probs[sl]
            keep = np.where(p[:, 1] > thresholds[2])[0]
            boxes, lm, off = boxes[keep], lm[keep], off[keep]
            boxes[:, 4] = p[keep, 1]
            w = boxes[:, 2] - boxes[:, 0] + 1.0
            h = boxes[:, 3] - boxes[:, 1] + 1.0
            lm[:, 0:5] = boxes[:, 0:1] + w[:, None] * lm[:, 0:5]  # float64 maths, stored float32
            lm[:, 5:10] = boxes[:, 1:2] + h[:, None] * lm[:, 5:10]
            boxes = calibrate(boxes, off)
            keep = nms(boxes, nms_thresholds[2], mode="min")
            results[i] = GuideFaces(boxes[keep], lm[keep])
    return results


def _refine(net, boxes_of: dict, arrays: list, size: int, device: str, threshold: float, nms_threshold: float) -> dict:
    order = [i for i in boxes_of if len(boxes_of[i])]
    if not order:
        return {}
    crops = [cut_boxes(boxes_of[i], arrays[i], size) for i in order]
    offsets, probs = _run(net, np.concatenate(crops), device)
    out, start = {}, 0
    for i, c in zip(order, crops):
        sl = slice(start, start + len(c))
        start += len(c)
        keep = np.where(probs[sl, 1] > threshold)[0]
        boxes = boxes_of[i][keep]
        boxes[:, 4] = probs[sl][keep, 1]
        off = offsets[sl][keep]
        keep = nms(boxes, nms_threshold)
        boxes = square(calibrate(boxes[keep], off[keep]))
        boxes[:, 0:4] = np.round(boxes[:, 0:4])
        out[i] = boxes
    return out


# --------------------------------------------------------------------------------- alignment
def _fit_nonreflective(uv: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """cp2tform's findNonreflectiveSimilarity: least squares of xy -> uv as [[a, -b], [b, a]],
    inverted; 3x3 in row-vector form ([x y 1] T)."""
    x, y = xy[:, 0:1], xy[:, 1:2]
    ones, zeros = np.ones_like(x, dtype=np.float64), np.zeros_like(x, dtype=np.float64)
    design = np.vstack([np.hstack([x, y, ones, zeros]), np.hstack([y, -x, zeros, ones])])
    target = np.vstack([uv[:, 0:1], uv[:, 1:2]])
    if np.linalg.matrix_rank(design) < 4:
        raise InputError("GUIDE alignment: the landmarks are degenerate (need two distinct points)")
    a, b, tx, ty = np.squeeze(np.linalg.lstsq(design, target, rcond=None)[0])
    t_inv = np.array([[a, -b, 0.0], [b, a, 0.0], [tx, ty, 1.0]])
    t = np.linalg.inv(t_inv)
    t[:, 2] = [0.0, 0.0, 1.0]
    return t


def _forward(t: np.ndarray, uv: np.ndarray) -> np.ndarray:
    return (np.hstack([uv, np.ones((uv.shape[0], 1))]) @ t)[:, :2]


def similarity_matrix(points, reference=REFERENCE_POINTS_112) -> np.ndarray:
    """GUIDE's 2x3 warp matrix (source pixel -> crop pixel) for 5 detected points.

    Inputs are cast to float32 as GUIDE's `warp_and_crop_face` does. The reflective candidate is
    compared with the non-reflective one against the x-mirrored reference points (GUIDE's
    in-place mirroring); ties keep the non-reflective one."""
    uv = np.float32(np.asarray(points).reshape(-1, 2))
    xy = np.float32(np.asarray(reference).reshape(-1, 2))
    trans1 = _fit_nonreflective(uv, xy)
    mirrored = xy.copy()
    mirrored[:, 0] = -mirrored[:, 0]
    trans2 = _fit_nonreflective(uv, mirrored) @ np.diag([-1.0, 1.0, 1.0])
    norm1 = np.linalg.norm(_forward(trans1, uv) - mirrored)
    norm2 = np.linalg.norm(_forward(trans2, uv) - mirrored)
    trans = trans1 if norm1 <= norm2 else trans2
    return trans[:, 0:2].T.copy()


def _cv2():
    try:
        import cv2
    except ImportError as exc:
        raise GuideFastError("GUIDE's alignment warps with OpenCV (cv2.warpAffine): "
                             f"pip install opencv-python-headless ({exc})") from None
    return cv2


def warp(image: np.ndarray, matrix: np.ndarray, size: int = ALIGNED_SIZE) -> np.ndarray:
    """cv2.warpAffine(image, matrix, (size, size)): bilinear, black border, uint8."""
    return _cv2().warpAffine(np.ascontiguousarray(image), np.asarray(matrix, np.float64), (size, size))


@dataclasses.dataclass(frozen=True)
class GuideAlignment:
    """One image aligned as GUIDE's `MTCNN.align`: the 112x112 uint8 crop, the 2x3 matrix, and the
    detections it used (face 0)."""

    image: np.ndarray
    matrix: np.ndarray
    faces: GuideFaces


def align(images, *, device=None, size: int = ALIGNED_SIZE) -> list:
    """GUIDE's `MTCNN.align` for each uint8 RGB image: a `GuideAlignment`, or None without a face."""
    out = []
    for arr, faces in zip(images, detect(images, device=device)):
        if not len(faces):
            out.append(None)
            continue
        matrix = similarity_matrix(faces.points(0), REFERENCE_POINTS_112 * (size / ALIGNED_SIZE))
        out.append(GuideAlignment(image=warp(arr, matrix, size), matrix=matrix, faces=faces))
    return out


__all__ = ["PNet", "RNet", "ONet", "GuideFaces", "GuideAlignment", "detect", "align", "similarity_matrix", "warp",
           "facenet_to_guide_dense", "guide_state_dict", "load_nets", "pyramid_scales", "nms", "THRESHOLDS",
           "REFERENCE_POINTS_112"]
