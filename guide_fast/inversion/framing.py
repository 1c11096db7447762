"""Alignment into EG3D's crop: MTCNN's five points, the FFHQ framing and the warp.

Framing (docs/eg3d.md §6; EG3D `dataset_preprocessing/ffhq/crop_images_in_the_wild.py`)
=======================================================================================
EG3D's FFHQ crops come from Deep3DFaceRecon's `align_img`: an affine-camera fit (`POS`) of the
5 detected landmarks to a standard 3D face `lm3d_std` (the 5 points of BFM's
`similarity_Lm3D_all.mat`, decimetres, +y up) gives a scale s (px per template unit) and the
image position t of the template origin; the image is resized by 300/s (`rescale_factor=300`),
a 1024 square centred on t is cut (`target_size=1024`), its central 700 square is kept and
resized to 512 (LANCZOS). So in the 512 crop the template origin sits at the centre and one
template unit is 300 * 512 / 700 = 219.43 px. For a frontal face the five points therefore land
on `FFHQ_POINTS_512` = centre + 219.43 * (X, -Y) of `LM3D_STD`:

    left eye (187.15, 191.79)   right eye (323.48, 191.93)   nose (256.21, 265.63)
    left mouth (200.17, 339.18) right mouth (310.02, 339.16)       (pixel centres, x right, y down)

i.e. eyes 37.5 % down the crop and 136.3 px apart (26.6 % of the width). The centre is taken
as (255.5, 255.5), the crop's centre in pixel-centre coordinates. EG3D's integer crop offsets
and PIL's half-pixel resize conventions move its crop by about 0.37 s' px plus up to 0.73 px of
truncation, s' = 300 / s its resize factor: within about 1 px for photos larger than the crop
(s' <= 1, FFHQ's in-the-wild sources), 2.5 px for the 512-px astronaut (s' = 4.5); tests
re-run EG3D's recipe as an oracle. MTCNN's landmark noise is about 1 px (docs/face_models.md §5.3).

Approximation. `method="similarity"` (default) fits a 2D similarity (scale, in-plane rotation,
shift; never a reflection) of the detected points onto `FFHQ_POINTS_512`. Against EG3D's own
pipeline it differs in two ways: (1) Deep3DFaceRecon fits a 3D affine camera, so for a turned
head (yaw/pitch) the scale and centre come from the 3D template, whereas a 2D fit to a frontal
projection shrinks / shifts a turned face slightly (a few px at 20-30 degrees of yaw); (2) EG3D
does not rotate the image: in-plane roll stays in the crop and in the camera label, while our
camera has yaw and pitch only, so we remove roll. `method="eg3d"` reproduces the EG3D recipe
itself (POS fit, scale and shift only, roll kept) for callers who want EG3D's exact framing.
Both methods agree exactly on a frontal, upright face (tests/test_invert.py). They part where a
face is not the template seen from the front: on scikit-image's astronaut (a broad smile, face
slightly tilted back, 3 degrees of roll) the similarity puts the eyes within 5 px of their
targets (nose and mouth within 20 px), while EG3D's recipe reads her proportions as pitch and
frames her about 13-21 px lower (eyes at y = 209 and 215 instead of 192). With the default
frontal camera the similarity framing is the better match for the render; with
`refine_camera=True`, "eg3d" framing is the consistent one. Landmarks come from facenet-pytorch's
MTCNN; EG3D used another MTCNN port, about 1 px apart (docs/face_models.md §5.1).
"""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..identity.align import (
    DEFAULT_MAX_DETECT_SIDE,
    DEFAULT_THRESHOLDS,
    MIN_FACE_SIZE,
    Face,
    MultipleFacesError,
    NoFaceError,
    apply_transform,
    choose_face,
    detect_faces,
    similarity_transform,
    warp_affine,
)
from .photo import expand_photo_sources, load_photo

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .photo import PhotoSource

# ---------------------------------------------------------------------------------------------
# Framing constants (module docstring)
# ---------------------------------------------------------------------------------------------

#: Deep3DFaceRecon's `load_lm3d`: the 5 points (left eye, right eye, nose tip, left / right mouth
#: corner; image left first) of BFM's similarity_Lm3D_all.mat, decimetres, +y up.
LM3D_STD = np.array(
    [
        [-0.31148657, 0.29036078, 0.13377953],
        [0.30979887, 0.28972036, 0.13179526],
        [0.0032535, -0.04617932, 0.55244243],
        [-0.25216928, -0.38133916, 0.22405732],
        [0.2484662, -0.38128236, 0.22235769],
    ],
    dtype=np.float64,
)
#: crop_images_in_the_wild.py: align_img(rescale_factor=300, target_size=1024), centre crop 700, resize 512.
EG3D_RESCALE_FACTOR = 300.0
EG3D_CENTER_CROP = 700
EG3D_OUTPUT_SIZE = 512
#: pixels of the 512 crop per template unit: 300 * 512 / 700
PIXELS_PER_UNIT = EG3D_RESCALE_FACTOR * EG3D_OUTPUT_SIZE / EG3D_CENTER_CROP
_CENTER_512 = (EG3D_OUTPUT_SIZE - 1) / 2.0
#: Frontal projection of LM3D_STD into the 512 crop (x right, y down, pixel centres).
FFHQ_POINTS_512 = np.stack(
    [_CENTER_512 + PIXELS_PER_UNIT * LM3D_STD[:, 0], _CENTER_512 - PIXELS_PER_UNIT * LM3D_STD[:, 1]], axis=1
)
ALIGN_METHODS = ("similarity", "eg3d")
# A face that MTCNN misses in a photo downscaled to DEFAULT_MAX_DETECT_SIDE is looked for once
# more at up to this many times the resolution (small faces in big photos).
_RETRY_DETECT_FACTOR = 2


def ffhq_points(size: int = EG3D_OUTPUT_SIZE) -> np.ndarray:
    """FFHQ_POINTS_512 scaled to a size x size crop (pixel centres scale about -0.5)."""
    return (FFHQ_POINTS_512 + 0.5) * (float(size) / EG3D_OUTPUT_SIZE) - 0.5


# ---------------------------------------------------------------------------------------------
# Alignment
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class AlignedPhoto:
    """A photo cut to EG3D's FFHQ framing.

    image: uint8 [size, size, 3]; matrix: 2x3 (source pixel -> crop pixel); landmarks_source /
    landmarks_aligned: the chosen face's 5 points [5, 2] before / after the transform (None for
    a pre-aligned photo); target_points: where the framing puts them; faces: every face found
    (largest first); index: the chosen one; name: the file name or a description.
    """

    image: np.ndarray
    matrix: np.ndarray
    landmarks_source: np.ndarray | None
    landmarks_aligned: np.ndarray | None
    target_points: np.ndarray | None
    faces: list
    index: int | None
    source_size: tuple
    name: str
    method: str

    @property
    def face(self) -> Face | None:
        return None if self.index is None else self.faces[self.index]

    @property
    def size(self) -> int:
        return int(self.image.shape[0])

    def tensor(self, resolution: int | None = None, device: "torch.device | str | None" = None) -> torch.Tensor:
        """[1, 3, r, r] float in [-1, 1] (u / 127.5 - 1, the inverse of the generator's uint8
        conversion, docs/guide.md §3.3), resized with an antialiased bilinear filter."""
        x = torch.from_numpy(np.array(self.image, dtype=np.uint8)).to(device).permute(2, 0, 1)[None].float()
        x = x / 127.5 - 1.0
        r = int(resolution or self.size)
        if r != x.shape[-1]:
            x = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False, antialias=True)
        return x

    def encoder_input(self, device: "torch.device | str | None" = None) -> torch.Tensor:
        """[1, 3, 256, 256]: GOAE's own input path (docs/guide.md §3.3: PIL bicubic resize to
        256, x / 127.5 - 1), from `goae.preprocess_for_goae`."""
        from PIL import Image

        from .goae import preprocess_for_goae

        return preprocess_for_goae([Image.fromarray(self.image)]).to(device)

    def summary(self) -> dict:
        d = {"source": self.name, "source_size": list(self.source_size), "crop_size": self.size, "method": self.method}
        if self.index is not None:
            face = self.face
            d.update(
                face_index=self.index, faces_found=len(self.faces),
                face_box=[round(float(v), 2) for v in face.box], face_probability=float(face.prob),
                landmarks_source=np.round(self.landmarks_source, 2).tolist(),
                landmarks_aligned=np.round(self.landmarks_aligned, 2).tolist(),
                target_points=np.round(self.target_points, 2).tolist(),
                alignment_residual_px=float(np.linalg.norm(self.landmarks_aligned - self.target_points, axis=1).mean()),
                matrix=np.asarray(self.matrix).tolist(),
            )
        return d


def pos_fit(points: np.ndarray, template: np.ndarray = LM3D_STD) -> tuple[np.ndarray, float]:
    """Deep3DFaceRecon's `POS`: least-squares affine camera [R1; R2] X + t mapping the 3D
    template onto the 2D points; returns t (the template origin in the image) and
    s = (|R1| + |R2|) / 2 (image pixels per template unit). Any y direction works: the norms do
    not change when y flips, and t comes back in the points' own convention."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    n = pts.shape[0]
    design = np.zeros((2 * n, 8))
    design[0::2, 0:3] = template
    design[0::2, 3] = 1.0
    design[1::2, 4:7] = template
    design[1::2, 7] = 1.0
    k, *_ = np.linalg.lstsq(design, pts.reshape(-1), rcond=None)
    s = (np.linalg.norm(k[0:3]) + np.linalg.norm(k[4:7])) / 2.0
    if not np.isfinite(s) or s <= 0:
        raise InputError("the face landmarks are degenerate (cannot fit the 3D face template)")
    return np.array([k[3], k[7]]), float(s)


def framing_matrix(landmarks: np.ndarray, size: int = EG3D_OUTPUT_SIZE, method: str = "similarity") -> np.ndarray:
    """2x3 matrix from source pixels to the size x size EG3D/FFHQ crop (module docstring)."""
    if method not in ALIGN_METHODS:
        raise InputError(f"alignment method must be one of {ALIGN_METHODS}, got {method!r}")
    pts = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    if method == "similarity":
        # reflective=False: a mirrored face would invert into a mirrored identity
        return similarity_transform(pts, ffhq_points(size), reflective=False)
    t, s = pos_fit(pts)
    k = PIXELS_PER_UNIT * (size / EG3D_OUTPUT_SIZE) / s
    c = (size - 1) / 2.0
    return np.array([[k, 0.0, c - k * t[0]], [0.0, k, c - k * t[1]]])


def _warp_window(arr: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """warp_affine reading only the part of the source the crop covers (a 6000x4000 photo would
    otherwise be copied to float64 in full: 576 MB)."""
    inv = np.linalg.inv(np.vstack([matrix, [0.0, 0.0, 1.0]]))[:2]
    corners = apply_transform(inv, [[-1, -1], [size, -1], [-1, size], [size, size]])
    h, w = arr.shape[:2]
    x0 = int(max(0, math.floor(corners[:, 0].min()) - 2))
    y0 = int(max(0, math.floor(corners[:, 1].min()) - 2))
    x1 = int(min(w, math.ceil(corners[:, 0].max()) + 3))
    y1 = int(min(h, math.ceil(corners[:, 1].max()) + 3))
    if x1 <= x0 or y1 <= y0:  # the crop lies outside the photo: all border
        return np.zeros((size, size, 3), np.uint8)
    m = np.asarray(matrix, dtype=np.float64).copy()
    m[:, 2] += m[:, :2] @ np.array([x0, y0], dtype=np.float64)
    return warp_affine(np.ascontiguousarray(arr[y0:y1, x0:x1]), m, (size, size))


def _rename_error(exc: InputError, name: str) -> InputError:
    msg = f"{name}: {exc}"
    if isinstance(exc, MultipleFacesError):
        return MultipleFacesError(msg, exc.faces)
    if isinstance(exc, NoFaceError):
        return NoFaceError(msg, exc.indices)
    return InputError(msg)


def align_photo(image: "PhotoSource", index: int | None = None, strict: bool = False, size: int = EG3D_OUTPUT_SIZE, *,
                method: str = "similarity", device: "torch.device | str | None" = None,
                thresholds: "tuple[float, float, float]" = DEFAULT_THRESHOLDS, min_face_size: int = MIN_FACE_SIZE,
                max_side: int = DEFAULT_MAX_DETECT_SIDE, name: str | None = None) -> AlignedPhoto:
    """Detect faces (MTCNN), pick one and cut it to EG3D's FFHQ framing at size x size.

    image: a path or an image (see load_photo). The largest face is used by default; `index`
    picks another (largest first); `strict` refuses a photo with several faces and lists them.
    Photos larger than `max_side` are downscaled for detection only (landmarks are mapped back;
    the crop reads the full-resolution photo). Errors are InputError subclasses (NoFaceError,
    MultipleFacesError) whose message starts with the photo's name.
    """
    if method not in ALIGN_METHODS:
        raise InputError(f"alignment method must be one of {ALIGN_METHODS}, got {method!r}")
    if not isinstance(size, int) or size < 16:
        raise InputError(f"crop size must be an integer >= 16, got {size!r}")
    arr, label = load_photo(image, name)
    h, w = arr.shape[:2]
    det = dict(thresholds=thresholds, min_face_size=min_face_size, select="largest", device=device)
    try:
        faces = detect_faces(arr, max_side=max_side, **det)
        if not faces and max(h, w) > max_side:
            faces = detect_faces(arr, max_side=min(max(h, w), _RETRY_DETECT_FACTOR * max_side), **det)
        i = choose_face(faces, (w, h), index=index, strict=strict)
    except InputError as exc:
        raise _rename_error(exc, label) from None
    face = faces[i]
    matrix = framing_matrix(face.landmarks, size, method)
    crop = _warp_window(arr, matrix, size)
    return AlignedPhoto(
        image=crop, matrix=matrix, landmarks_source=np.asarray(face.landmarks, dtype=np.float64),
        landmarks_aligned=apply_transform(matrix, face.landmarks), target_points=ffhq_points(size),
        faces=list(faces), index=i, source_size=(w, h), name=label, method=method,
    )


def pre_aligned_photo(image: "PhotoSource", name: str | None = None) -> AlignedPhoto:
    """A photo already in EG3D framing (an EG3D/FFHQ-preprocessed crop or a generator render):
    used as it is, without detection. It must be square."""
    arr, label = load_photo(image, name)
    h, w = arr.shape[:2]
    if h != w:
        raise InputError(f"{label}: a pre-aligned photo must be square (EG3D framing), got {w}x{h}")
    if h < 16:
        raise InputError(f"{label}: a pre-aligned photo of {w}x{h} px is too small")
    return AlignedPhoto(image=arr, matrix=np.eye(2, 3), landmarks_source=None, landmarks_aligned=None,
                        target_points=None, faces=[], index=None, source_size=(w, h), name=label,
                        method="pre-aligned")


def prepare_photos(images: "PhotoSource | Sequence[PhotoSource]", *, align: bool = True, index: int | None = None,
                   strict: bool = False, method: str = "similarity", size: int = EG3D_OUTPUT_SIZE,
                   device: "torch.device | str | None" = None, **detect_kwargs) -> list:
    """Every photo aligned (or taken as pre-aligned) before any inversion starts, so that a bad
    photo fails fast. images: one photo or a list; a folder stands for its photos (sorted by
    name, see list_photos); index: one int for all, or one per photo."""
    photos = expand_photo_sources(images)
    if not photos:
        raise InputError("no photos given: need at least one image of the identity to invert")
    if index is None or isinstance(index, int):
        indices = [index] * len(photos)
    else:
        indices = list(index)
        if len(indices) != len(photos):
            raise InputError(f"{len(indices)} face indices for {len(photos)} photos")
    out = []
    for photo, i in zip(photos, indices):
        if isinstance(photo, AlignedPhoto):
            out.append(photo)
        elif align:
            out.append(align_photo(photo, index=i, strict=strict, size=size, method=method, device=device,
                                   **detect_kwargs))
        else:
            out.append(pre_aligned_photo(photo))
    return out


