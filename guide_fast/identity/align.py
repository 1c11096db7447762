"""Face detection (MTCNN from facenet-pytorch, its bundled weights) and 5-point alignment.

GUIDE's evaluation (docs/guide.md §4.2, docs/face_models.md §2.3) detects 5 landmarks with MTCNN, fits a
least-squares similarity transform onto fixed reference points in a 112x112 square (MATLAB
`cp2tform('similarity')` semantics: a reflected variant is fitted too and the better one kept),
and warps the uint8 RGB image with `cv2.warpAffine` (bilinear, black border). This module does
the same without OpenCV:

* `detect_faces(image)` -> list of `Face(box, prob, landmarks)`; exposed separately so photo
  inversion can align to other reference points / sizes (e.g. EG3D framing at 512x512).
* `similarity_transform(src, dst)` -> 2x3 matrix (cp2tform semantics, see its docstring).
* `warp_affine(image, matrix, size)` -> uint8 crop (cv2.warpAffine INTER_LINEAR semantics).
* `align_face(image)` -> `AlignedFace` (the largest face by default; another by index; strict
  mode refuses several faces and lists them; no face -> `NoFaceError`).

Detector differences from GUIDE's own MTCNN port (docs/face_models.md §5.1 table): facenet-pytorch's
P-Net softmax, pyramid resize and landmark offset differ; on a clean frontal face the 5 points
agree with GUIDE's to about 1 px (§5.3). We keep facenet-pytorch's landmarks unchanged. The ID
metric of `evaluate` uses GUIDE's own detector by default (identity/guide_mtcnn.py, exact); this
one serves photo inversion and `evaluate --detector facenet`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import GuideFastError, InputError
from .preprocess import normalize_uint8, to_rgb_uint8

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .preprocess import ImageLike

# get_reference_facial_points(default_square=True): the 96x112 points with 8 px added to x
# (docs/face_models.md §2.3 step 3). Order: left eye, right eye, nose, left / right mouth corner, where
# left/right are image left/right (docs/face_models.md §5.2).
REFERENCE_POINTS_112 = np.array(
    [
        [38.29459953, 51.69630051],
        [73.53179932, 51.50139999],
        [56.02519989, 71.73660278],
        [41.54930115, 92.3655014],
        [70.72990036, 92.20410156],
    ],
    dtype=np.float64,
)
ALIGNED_SIZE = 112

# facenet-pytorch's defaults: reliable on photos (GUIDE's 0.15/0.25/0.35 give false positives on
# scikit-image's coffee, rocket and chelsea images).
DEFAULT_THRESHOLDS = (0.6, 0.7, 0.7)
# GUIDE's evaluation thresholds (docs/guide.md §4.2): used by IdentityScorer so that faces in degraded
# renders of an unlearned generator are still found, as they are in the official evaluation.
GUIDE_THRESHOLDS = (0.15, 0.25, 0.35)
MIN_FACE_SIZE = 20
# MTCNN's image pyramid starts at scale 12/min_face_size and needs the smaller side to be >= 12
# px at that scale, so smaller images cannot contain a detectable face.
_MIN_SIDE = 20
# Images larger than this (longer side) are downscaled for detection only; landmarks are mapped
# back and the warp reads the full-resolution image.
DEFAULT_MAX_DETECT_SIDE = 1280
_DETECT_CHUNK = 16


class NoFaceError(InputError):
    """No face was found in an image. `indices` lists the images (batch calls)."""

    def __init__(self, message: str, indices: "Sequence[int]" = ()):
        super().__init__(message)
        self.indices = list(indices)


class MultipleFacesError(InputError):
    """strict=True and the image holds several faces; `faces` lists them."""

    def __init__(self, message: str, faces: "Sequence[Face]" = ()):
        super().__init__(message)
        self.faces = list(faces)


@dataclasses.dataclass(frozen=True)
class Face:
    """One detected face, in the input image's pixel coordinates.

    box: (x1, y1, x2, y2); prob: MTCNN O-Net probability; landmarks: [5, 2] (x, y) in the order
    left eye, right eye, nose, left mouth corner, right mouth corner (image left/right).
    """

    box: np.ndarray
    prob: float
    landmarks: np.ndarray

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])

    @property
    def height(self) -> float:
        return float(self.box[3] - self.box[1])

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    def describe(self) -> str:
        x1, y1, x2, y2 = (float(v) for v in self.box)
        return f"box ({x1:.0f}, {y1:.0f}, {x2:.0f}, {y2:.0f}) {self.width:.0f}x{self.height:.0f} px, p={self.prob:.3f}"


@dataclasses.dataclass
class AlignedFace:
    """Result of `align_face`.

    image: uint8 [size, size, 3] aligned crop; matrix: 2x3 float64 (source pixel -> crop pixel,
    cv2 convention); face: the chosen Face; faces: every detected face (in `select` order);
    index: position of `face` in `faces`; landmarks_aligned: the 5 points mapped into the crop.
    """

    image: np.ndarray
    matrix: np.ndarray
    face: Face
    faces: list
    index: int
    source_size: tuple  # (width, height)

    @property
    def landmarks_aligned(self) -> np.ndarray:
        return apply_transform(self.matrix, self.face.landmarks)

    @property
    def boxes(self) -> np.ndarray:
        return np.stack([f.box for f in self.faces]) if self.faces else np.zeros((0, 4))

    def tensor(self) -> torch.Tensor:
        """[3, size, size] float in [-1, 1] (ToTensor + Normalize(0.5, 0.5)), ready for the backbone."""
        return normalize_uint8(self.image)[0]


# ---------------------------------------------------------------------------------------------
# Similarity transform (cp2tform 'similarity')
# ---------------------------------------------------------------------------------------------

def _fit_nonreflective(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares map dst -> src of the form [[a, b], [-b, a]] q + t; returns the 3x3 matrix
    of its inverse (src -> dst) in column-vector form.

    The fit direction (reference points -> detected points, then inverted) is the one of
    cp2tform's findNonreflectiveSimilarity; it gives a slightly different matrix than fitting
    src -> dst directly, and the reference matrix of docs/face_models.md §5.3 pins it down.
    """
    x, y = dst[:, 0], dst[:, 1]
    ones, zeros = np.ones_like(x), np.zeros_like(x)
    # u = a x + b y + tx ;  v = -b x + a y + ty   (unknowns a, b, tx, ty)
    design = np.concatenate([np.stack([x, y, ones, zeros], 1), np.stack([y, -x, zeros, ones], 1)], 0)
    target = np.concatenate([src[:, 0], src[:, 1]])
    if np.linalg.matrix_rank(design) < 4:
        raise InputError("similarity_transform: the points are degenerate (need at least 2 distinct points)")
    (a, b, tx, ty), *_ = np.linalg.lstsq(design, target, rcond=None)
    dst_to_src = np.array([[a, b, tx], [-b, a, ty], [0.0, 0.0, 1.0]])
    return np.linalg.inv(dst_to_src)


def similarity_transform(src_points: np.ndarray, dst_points: np.ndarray, reflective: bool = True) -> np.ndarray:
    """2x3 matrix mapping src_points (e.g. detected landmarks) onto dst_points (the reference),
    as `get_similarity_transform_for_cv2(src, dst)` of GUIDE's matlab_cp2tform.py.

    The non-reflective similarity is fitted; with `reflective`, so is one composed with a mirror
    in x, and the one whose mapped src points are closer to dst (Frobenius norm; ties keep the
    non-reflective one) is returned.
    """
    src = np.asarray(src_points, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(dst_points, dtype=np.float64).reshape(-1, 2)
    if src.shape != dst.shape or src.shape[0] < 2:
        raise InputError(f"similarity_transform: point sets of shapes {list(src.shape)} and {list(dst.shape)}")
    best = _fit_nonreflective(src, dst)
    if reflective:
        mirror = np.diag([-1.0, 1.0, 1.0])
        # Fit against mirrored dst, then mirror the result back: src -> mirrored dst -> dst.
        candidate = mirror @ _fit_nonreflective(src, dst @ mirror[:2, :2].T)
        err_best = np.linalg.norm(apply_transform(best[:2], src) - dst)
        err_cand = np.linalg.norm(apply_transform(candidate[:2], src) - dst)
        if err_cand < err_best:
            best = candidate
    return best[:2].copy()


def apply_transform(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map [K, 2] points with a 2x3 matrix."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    m = np.asarray(matrix, dtype=np.float64)
    return pts @ m[:, :2].T + m[:, 2]


# ---------------------------------------------------------------------------------------------
# Warp (cv2.warpAffine semantics)
# ---------------------------------------------------------------------------------------------

def warp_affine(image: np.ndarray, matrix: np.ndarray, size: "int | tuple[int, int]") -> np.ndarray:
    """uint8 HxWx3 -> uint8 (size_h x size_w x 3): out(x, y) = image(M^-1 (x, y)) with bilinear
    interpolation, integer pixel centres and a black constant border, rounded to uint8, as
    `cv2.warpAffine(img, M, (w, h))` with its defaults.

    When the map shrinks the face by more than 2x (big photos), the image is first box-reduced
    by an integer factor so that the bilinear taps do not alias; GUIDE's 512 renders map at
    about 0.92x (docs/face_models.md §5.3) and are never reduced.
    """
    out_w, out_h = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    img = np.ascontiguousarray(image)
    if img.dtype != np.uint8 or img.ndim != 3:
        raise InputError(f"warp_affine expects a uint8 HxWxC image, got {img.dtype} {list(img.shape)}")
    m = np.asarray(matrix, dtype=np.float64).reshape(2, 3)
    scale = math.sqrt(abs(np.linalg.det(m[:, :2])))
    if scale <= 0 or not np.isfinite(m).all():
        raise InputError(f"warp_affine: degenerate matrix {m.tolist()}")
    k = int(math.floor(1.0 / scale)) if scale < 0.5 else 1
    if k >= 2:
        from PIL import Image

        img = np.asarray(Image.fromarray(img).reduce(k))
        # reduced pixel j covers original pixels k*j .. k*j+k-1, centre k*j + (k-1)/2
        m = np.concatenate([m[:, :2] * k, (m[:, :2] @ np.full(2, (k - 1) / 2.0) + m[:, 2])[:, None]], 1)
    h, w = img.shape[:2]
    inv = np.linalg.inv(np.vstack([m, [0.0, 0.0, 1.0]]))[:2]
    ys, xs = np.meshgrid(np.arange(out_h, dtype=np.float64), np.arange(out_w, dtype=np.float64), indexing="ij")
    sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    # grid_sample with align_corners=True: -1 and +1 are the centres of the first / last pixel.
    gx = 2.0 * sx / max(w - 1, 1) - 1.0
    gy = 2.0 * sy / max(h - 1, 1) - 1.0
    grid = torch.from_numpy(np.stack([gx, gy], -1)[None]).to(torch.float64)
    src = torch.from_numpy(img.astype(np.float64)).permute(2, 0, 1)[None]
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def reference_points(size: int = ALIGNED_SIZE) -> np.ndarray:
    """GUIDE's 112x112 reference points scaled to a size x size crop."""
    return REFERENCE_POINTS_112 * (float(size) / ALIGNED_SIZE)


# ---------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------

def _import_mtcnn():
    try:
        from facenet_pytorch import MTCNN
    except ImportError as exc:
        raise GuideFastError(
            "MTCNN face alignment needs facenet-pytorch (its wheel bundles the detector weights): "
            f"pip install --no-deps facenet-pytorch==2.6.0 ({exc})"
        ) from None
    return MTCNN


@functools.lru_cache(maxsize=8)
def _detector(device: str, thresholds: tuple, min_face_size: int):
    MTCNN = _import_mtcnn()
    # keep_all + select_largest=False: we get every face in detector order and sort ourselves.
    det = MTCNN(keep_all=True, select_largest=False, thresholds=list(thresholds),
                min_face_size=int(min_face_size), device=torch.device(device))
    det.eval()
    return det


def _resolve_device(device) -> str:
    if device is None:
        return "cpu"
    return str(torch.device(device))


def _order(faces: list, select: str) -> list:
    if select == "largest":
        return sorted(faces, key=lambda f: -f.area)
    if select == "probability":
        return sorted(faces, key=lambda f: -f.prob)
    raise InputError(f"select must be 'largest' or 'probability', got {select!r}")


def detect_faces(image: "ImageLike", *, thresholds: "tuple[float, float, float]" = DEFAULT_THRESHOLDS,
                 min_face_size: int = MIN_FACE_SIZE, max_side: int = DEFAULT_MAX_DETECT_SIDE, select: str = "largest",
                 device: "torch.device | str | None" = None) -> list:
    """Every face in one image as `Face`s, largest first (select="largest") or most probable first
    (select="probability", GUIDE's order). An image without faces gives an empty list."""
    return detect_faces_batch([image], thresholds=thresholds, min_face_size=min_face_size,
                              max_side=max_side, select=select, device=device)[0]


def detect_faces_batch(images: "Sequence[ImageLike]", *, thresholds: "tuple[float, float, float]" = DEFAULT_THRESHOLDS,
                       min_face_size: int = MIN_FACE_SIZE, max_side: int = DEFAULT_MAX_DETECT_SIDE,
                       select: str = "largest", device: "torch.device | str | None" = None) -> list:
    """`detect_faces` for a list of images; images of equal size go through MTCNN together."""
    if select not in ("largest", "probability"):
        raise InputError(f"select must be 'largest' or 'probability', got {select!r}")
    arrays = [to_rgb_uint8(im, name=f"image {i}") for i, im in enumerate(images)]
    return _detect_arrays(arrays, tuple(float(t) for t in thresholds), int(min_face_size), int(max_side),
                          select, _resolve_device(device))


def _detect_arrays(arrays, thresholds, min_face_size, max_side, select, device) -> list:
    results: list = [[] for _ in arrays]
    groups: dict = {}
    scales: dict = {}
    for i, arr in enumerate(arrays):
        h, w = arr.shape[:2]
        if min(h, w) < max(_MIN_SIDE, min_face_size):
            continue  # too small for MTCNN's pyramid: no face (the caller says why)
        small, sx, sy = _downscale_for_detection(arr, max_side)
        if min(small.shape[:2]) < _MIN_SIDE:
            continue
        scales[i] = (sx, sy)
        groups.setdefault(small.shape, []).append((i, small))
    if not groups:
        return results
    det = _detector(device, thresholds, min_face_size)
    for _, members in groups.items():
        for start in range(0, len(members), _DETECT_CHUNK):
            chunk = members[start:start + _DETECT_CHUNK]
            batch = np.stack([a for _, a in chunk])
            try:
                boxes, probs, points = det.detect(batch, landmarks=True)
            except RuntimeError as exc:
                # facenet-pytorch concatenates per-stage candidate lists and fails on some empty
                # edge cases; retry image by image so one odd image cannot sink the batch.
                if len(chunk) == 1:
                    raise GuideFastError(f"MTCNN failed on image {chunk[0][0]}: {exc}") from None
                boxes, probs, points = [], [], []
                for _, single in chunk:
                    b1, p1, l1 = det.detect(single[None], landmarks=True)
                    boxes.append(b1[0])
                    probs.append(p1[0])
                    points.append(l1[0])
            for (i, _), b, p, l in zip(chunk, boxes, probs, points):
                if b is None or len(b) == 0:
                    continue
                sx, sy = scales[i]
                faces = []
                for box, prob, pts in zip(np.asarray(b, dtype=np.float64), np.asarray(p, dtype=np.float64),
                                          np.asarray(l, dtype=np.float64)):
                    box = box * np.array([sx, sy, sx, sy])
                    # pixel-centre convention: centre c of the small image = (c + 0.5) * s - 0.5
                    pts = (pts + 0.5) * np.array([sx, sy]) - 0.5
                    faces.append(Face(box=box, prob=float(prob), landmarks=pts))
                results[i] = _order(faces, select)
    return results


def _downscale_for_detection(arr: np.ndarray, max_side: int):
    h, w = arr.shape[:2]
    if max(h, w) <= max_side:
        return arr, 1.0, 1.0
    from PIL import Image

    f = max_side / float(max(h, w))
    nw, nh = max(1, int(round(w * f))), max(1, int(round(h * f)))
    small = np.asarray(Image.fromarray(arr).resize((nw, nh), Image.BILINEAR))  # antialiased downscale
    return np.ascontiguousarray(small), w / nw, h / nh


# ---------------------------------------------------------------------------------------------
# Alignment
# ---------------------------------------------------------------------------------------------

def _describe_faces(faces) -> str:
    return "; ".join(f"[{i}] {f.describe()}" for i, f in enumerate(faces))


def choose_face(faces: list, image_size: "tuple[int, int]", index: int | None = None, strict: bool = False) -> int:
    """Index of the face to align: 0 (the first in `select` order) by default; `index` picks
    another; `strict` refuses several faces. Raises NoFaceError / MultipleFacesError / InputError."""
    w, h = image_size
    if not faces:
        reason = ""
        if min(w, h) < _MIN_SIDE:
            reason = f" (the image is smaller than MTCNN's {_MIN_SIDE}-pixel minimum)"
        raise NoFaceError(f"no face found in the {w}x{h} image{reason}")
    if index is not None:
        if not (-len(faces) <= int(index) < len(faces)):
            raise InputError(f"face index {index} out of range: {len(faces)} face(s) found: {_describe_faces(faces)}")
        return int(index) % len(faces)
    if strict and len(faces) > 1:
        raise MultipleFacesError(
            f"{len(faces)} faces found (strict mode; pass index= to choose one): {_describe_faces(faces)}", faces
        )
    return 0


def align_face(image: "ImageLike", index: int | None = None, strict: bool = False, *, size: int = ALIGNED_SIZE,
               select: str = "largest", thresholds: "tuple[float, float, float]" = DEFAULT_THRESHOLDS,
               min_face_size: int = MIN_FACE_SIZE, max_side: int = DEFAULT_MAX_DETECT_SIDE,
               device: "torch.device | str | None" = None, faces: list | None = None) -> AlignedFace:
    """Detect faces, pick one and warp it onto GUIDE's 112x112 reference points (scaled to `size`).

    image: PIL image, numpy array (gray, RGB, RGBA; uint8 or float in [0,1]) or a [3,H,W] tensor
    in [-1,1]. `faces` (from detect_faces on the same image) skips detection.
    """
    arr = to_rgb_uint8(image)
    h, w = arr.shape[:2]
    if faces is None:
        faces = _detect_arrays([arr], tuple(float(t) for t in thresholds), int(min_face_size), int(max_side),
                               select, _resolve_device(device))[0]
    i = choose_face(faces, (w, h), index=index, strict=strict)
    return _align_with(arr, faces, i, size)


def _align_with(arr: np.ndarray, faces: list, i: int, size: int) -> AlignedFace:
    face = faces[i]
    matrix = similarity_transform(face.landmarks, reference_points(size))
    crop = warp_affine(arr, matrix, (size, size))
    return AlignedFace(image=crop, matrix=matrix, face=face, faces=list(faces), index=i,
                       source_size=(arr.shape[1], arr.shape[0]))


def align_faces(images: "Sequence[ImageLike]", *, size: int = ALIGNED_SIZE, select: str = "largest",
                thresholds: "tuple[float, float, float]" = DEFAULT_THRESHOLDS, min_face_size: int = MIN_FACE_SIZE,
                max_side: int = DEFAULT_MAX_DETECT_SIDE, device: "torch.device | str | None" = None) -> list:
    """Batch alignment for scoring: one AlignedFace per image (its first face in `select` order),
    or None where no face is found. Detection of equal-size images is batched."""
    arrays = [to_rgb_uint8(im, name=f"image {i}") for i, im in enumerate(images)]
    all_faces = _detect_arrays(arrays, tuple(float(t) for t in thresholds), int(min_face_size), int(max_side),
                               select, _resolve_device(device))
    return [(_align_with(arr, faces, 0, size) if faces else None) for arr, faces in zip(arrays, all_faces)]
