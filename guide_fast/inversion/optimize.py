"""From a photo to an identity: face alignment to EG3D's FFHQ framing, a camera, and an
optimisation-based inversion into W+ (issue 6; guide.md §3.3).

    photo = align_photo("me.jpg")                      # 512x512 crop in EG3D framing
    [res] = invert_images(gen, ["me.jpg"], id_loss=id_loss, lpips=lpips)
    res.w_plus                                         # [1, num_ws, w_dim]: w_u for unlearning
    res.camera.label, res.quality                      # camera [1, 25]; lpips / identity / mse
    res.save_images("out/", prefix="identity0_")       # aligned crop + reconstruction PNGs

GUIDE inverts with a GOAE encoder (guide.md §3.3: 256x256 input in [-1, 1], W+ offsets added to
w_avg, no camera). Its weights may not be at hand, so the default here is an optimisation that
needs only the generator and the loss networks; an encoder with GOAE's convention can be passed
instead (`encoder=`) and is then the starting point (refined by `steps` > 0).

Framing (eg3d.md §6; EG3D `dataset_preprocessing/ffhq/crop_images_in_the_wild.py`)
----------------------------------------------------------------------------------
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
re-run EG3D's recipe as an oracle. MTCNN's landmark noise is about 1 px (face_models.md §5.3).

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
MTCNN; EG3D used another MTCNN port, about 1 px apart (face_models.md §5.1).

Optimisation (defaults, `InversionConfig`)
------------------------------------------
Start w = w_avg broadcast to [1, num_ws, w_dim] (or encoder offsets + w_avg); Adam (lr 0.01,
StyleGAN2-projector schedule: 5 % warm-up, cosine ramp-down over the last 25 %); per step the
loss is 1.0 * MSE + 0.8 * LPIPS + 0.1 * (1 - cos) identity, pSp's encoder weights (l2 1, lpips
0.8, id 0.1). Renders at the generator's img_resolution with noise_mode "const" and renderer
draws from a seeded generator (a new draw each step, the same sequence every run); LPIPS is
computed at <= 256 px as in StyleGAN/EG3D projectors. The camera is frontal (GUIDE's FOV and
look-at, guide.md §3.2) unless `refine_camera=True`: then yaw and pitch are learnt as
0.6 * tanh(u) (bounded to +-0.6 rad). Fast path on CUDA: bf16 autocast and the Triton renderer
(the reference renderer when the camera is learnt: the fused kernel gives no gradient for the
rays); fp32 with the reference renderer on the CPU.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import cameras
from .errors import GuideFastError, InputError
from .identity.align import (
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
from .identity.preprocess import to_rgb_uint8

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
#: GOAE's input (guide.md §3.3): 256x256, PIL bicubic, x / 127.5 - 1.
ENCODER_RESOLUTION = 256
# A face that MTCNN misses in a photo downscaled to DEFAULT_MAX_DETECT_SIDE is looked for once
# more at up to this many times the resolution (small faces in big photos).
_RETRY_DETECT_FACTOR = 2
_PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def ffhq_points(size: int = EG3D_OUTPUT_SIZE) -> np.ndarray:
    """FFHQ_POINTS_512 scaled to a size x size crop (pixel centres scale about -0.5)."""
    return (FFHQ_POINTS_512 + 0.5) * (float(size) / EG3D_OUTPUT_SIZE) - 0.5


class InversionError(GuideFastError):
    """The inversion itself failed (e.g. the loss became non-finite)."""


# ---------------------------------------------------------------------------------------------
# Loading photos
# ---------------------------------------------------------------------------------------------

def load_photo(source, name: str | None = None) -> tuple[np.ndarray, str]:
    """A photo -> (uint8 HxWx3 RGB array, display name).

    source: a path (JPEG, PNG, ...; EXIF orientation applied), a PIL image, a numpy array (gray,
    RGB, RGBA; uint8 or float in [0, 1]) or a [3, H, W] tensor in [-1, 1]. Unreadable files raise
    InputError naming the file.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        label = name or str(path)
        if not path.exists():
            raise InputError(f"{label}: photo not found")
        if path.is_dir():
            raise InputError(f"{label}: is a folder, expected an image file")
        from PIL import Image, ImageOps

        try:
            with Image.open(path) as im:
                im.load()  # decode now, so truncated / corrupt files fail here
                im = ImageOps.exif_transpose(im)
                arr = to_rgb_uint8(im, name=label)
        except InputError:
            raise
        except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
            raise InputError(f"{label}: cannot be read as an image ({type(exc).__name__}: {exc})") from None
        return arr, label
    label = name or f"{type(source).__name__} image"
    return to_rgb_uint8(source, name=label), label


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

    def tensor(self, resolution: int | None = None, device=None) -> torch.Tensor:
        """[1, 3, r, r] float in [-1, 1] (u / 127.5 - 1, the inverse of the generator's uint8
        conversion, guide.md §3.3), resized with an antialiased bilinear filter."""
        x = torch.from_numpy(np.array(self.image, dtype=np.uint8)).to(device).permute(2, 0, 1)[None].float()
        x = x / 127.5 - 1.0
        r = int(resolution or self.size)
        if r != x.shape[-1]:
            x = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False, antialias=True)
        return x

    def encoder_input(self, device=None) -> torch.Tensor:
        """GOAE's preprocessing (guide.md §3.3): PIL bicubic resize to 256, x / 127.5 - 1."""
        from PIL import Image

        img = Image.fromarray(self.image)
        if img.size != (ENCODER_RESOLUTION, ENCODER_RESOLUTION):
            img = img.resize((ENCODER_RESOLUTION, ENCODER_RESOLUTION), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float()
        return (x / 127.5 - 1.0).to(device)

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


def framing_matrix(landmarks, size: int = EG3D_OUTPUT_SIZE, method: str = "similarity") -> np.ndarray:
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


def align_photo(image, index: int | None = None, strict: bool = False, size: int = EG3D_OUTPUT_SIZE, *,
                method: str = "similarity", device=None, thresholds=DEFAULT_THRESHOLDS,
                min_face_size: int = MIN_FACE_SIZE, max_side: int = DEFAULT_MAX_DETECT_SIDE,
                name: str | None = None) -> AlignedPhoto:
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


def pre_aligned_photo(image, name: str | None = None) -> AlignedPhoto:
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


def prepare_photos(images, *, align: bool = True, index=None, strict: bool = False, method: str = "similarity",
                   size: int = EG3D_OUTPUT_SIZE, device=None, **detect_kwargs) -> list:
    """Every photo aligned (or taken as pre-aligned) before any inversion starts, so that a bad
    photo fails fast. images: one photo or a list; index: one int for all, or one per photo."""
    photos = list(images) if isinstance(images, (list, tuple)) else [images]
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


# ---------------------------------------------------------------------------------------------
# Inversion
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class InversionConfig:
    """Knobs of the optimisation (module docstring gives the reasons for the defaults)."""

    lr: float = 0.01
    lr_rampup: float = 0.05          # fraction of the steps (StyleGAN2 projector schedule)
    lr_rampdown: float = 0.25
    mse_weight: float = 1.0          # pSp: l2 1.0, lpips 0.8, id 0.1
    lpips_weight: float = 0.8
    id_weight: float = 0.1
    lpips_resolution: int = 256      # LPIPS on renders downsampled to at most this size
    camera_lr: float = 0.01          # Adam lr of the camera's unbounded parameters u, v
    camera_limit: float = 0.6        # |yaw|, |pitch| <= camera_limit (radians), via tanh
    yaw: float = 0.0                 # starting camera (frontal, guide.md §3.2)
    pitch: float = 0.0
    fov_degrees: float = cameras.GUIDE_FOV_DEGREES
    lookat: tuple = cameras.GUIDE_LOOKAT
    radius: float = cameras.DEFAULT_RADIUS
    seed: int = 0                    # renderer draws
    renderer: str = "auto"           # "auto": triton on CUDA, reference on the CPU
    precision: str = "auto"          # "auto": bf16 autocast on CUDA, fp32 on the CPU
    batch_size: int = 4              # photos optimised together (independent losses, summed)
    align: bool = True               # False: photos are already in EG3D framing
    method: str = "similarity"       # alignment: "similarity" or "eg3d" (module docstring)
    crop_size: int = EG3D_OUTPUT_SIZE
    log_every: int = 10              # progress-bar refresh / loss read-back interval (steps)

    def __post_init__(self):
        self.lookat = tuple(float(v) for v in self.lookat)
        self.validate()

    def validate(self) -> None:
        for key in ("lr", "camera_lr", "camera_limit", "radius"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) > 0):
                raise InputError(f"inversion {key} must be a positive number, got {getattr(self, key)!r}")
        for key in ("mse_weight", "lpips_weight", "id_weight"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) >= 0):
                raise InputError(f"inversion {key} must be >= 0, got {getattr(self, key)!r}")
        if self.mse_weight + self.lpips_weight + self.id_weight <= 0:
            raise InputError("inversion loss weights are all zero: nothing to optimise")
        if not (0 <= self.lr_rampup <= 1 and 0 <= self.lr_rampdown <= 1):
            raise InputError("lr_rampup and lr_rampdown are fractions of the steps, in [0, 1]")
        if self.camera_limit >= math.pi / 2:
            raise InputError(f"camera_limit must be below pi/2 rad, got {self.camera_limit}")
        for key in ("yaw", "pitch"):
            if abs(getattr(self, key)) >= self.camera_limit:
                raise InputError(f"starting {key} {getattr(self, key)} is outside +-camera_limit ({self.camera_limit})")
        if self.renderer not in ("auto", "reference", "triton"):
            raise InputError(f"unknown renderer {self.renderer!r}; expected 'auto', 'reference' or 'triton'")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise InputError(f"unknown precision {self.precision!r}; expected 'auto', 'fp32' or 'bf16'")
        if self.method not in ALIGN_METHODS:
            raise InputError(f"alignment method must be one of {ALIGN_METHODS}, got {self.method!r}")
        for key in ("batch_size", "lpips_resolution", "log_every", "crop_size"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise InputError(f"inversion {key} must be a positive integer, got {getattr(self, key)!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lookat"] = list(self.lookat)
        return d


@dataclasses.dataclass
class CameraEstimate:
    """The camera the photo was inverted with: yaw / pitch offsets from frontal (radians,
    cameras.pose_label convention) and the 25-value label [1, 25]."""

    yaw: float
    pitch: float
    label: torch.Tensor
    refined: bool
    fov_degrees: float
    lookat: tuple
    radius: float

    def to_dict(self) -> dict:
        return {"yaw": self.yaw, "pitch": self.pitch, "refined": self.refined, "fov_degrees": self.fov_degrees,
                "lookat": list(self.lookat), "radius": self.radius,
                "label": [float(v) for v in self.label.detach().cpu().reshape(-1)]}


@dataclasses.dataclass
class InversionResult:
    """One photo inverted: w_plus [1, num_ws, w_dim] (w_u), the camera, the aligned crop, the
    reconstruction (uint8 render at img_resolution), its quality against the crop and the same
    measures at the starting point (w_avg or the encoder's code)."""

    w_plus: torch.Tensor
    camera: CameraEstimate
    aligned: AlignedPhoto
    reconstruction: np.ndarray
    quality: dict
    start_quality: dict
    losses: list
    steps: int
    encoder: bool
    config: InversionConfig
    timings: dict

    def summary(self) -> dict:
        d = {
            "photo": self.aligned.summary(),
            "camera": self.camera.to_dict(),
            "quality": dict(self.quality),
            "start_quality": dict(self.start_quality),
            "steps": self.steps,
            "start": "encoder" if self.encoder else "w_avg",
            "settings": self.config.to_dict(),
            "timings": dict(self.timings),
        }
        if self.losses:
            d["loss_first_last"] = [self.losses[0], self.losses[-1]]
        return d

    def save_images(self, folder, prefix: str = "") -> list:
        """Write `{prefix}aligned.png` (the crop) and `{prefix}reconstruction.png`, atomically."""
        from .io import save_image

        folder = Path(folder)
        paths = [folder / f"{prefix}aligned.png", folder / f"{prefix}reconstruction.png"]
        save_image(paths[0], self.aligned.image)
        save_image(paths[1], self.reconstruction)
        return paths


def _lr_factor(t: float, rampup: float, rampdown: float) -> float:
    """StyleGAN2 projector schedule: linear warm-up over `rampup`, cosine decay over the last
    `rampdown` of the run (t in [0, 1])."""
    f = 1.0
    if rampdown > 0:
        f = min(1.0, (1.0 - t) / rampdown)
        f = 0.5 - 0.5 * math.cos(f * math.pi)
    if rampup > 0:
        f *= min(1.0, t / rampup)
    return f


def _uint8_render(images: torch.Tensor) -> np.ndarray:
    from .io import to_uint8

    return to_uint8(images.float())


class _Inverter:
    """The optimisation for one batch of aligned photos."""

    def __init__(self, gen, id_loss, lpips, cfg: InversionConfig, device, autocast_dtype):
        self.gen, self.id_loss, self.lpips, self.cfg = gen, id_loss, lpips, cfg
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.res = int(gen.config.img_resolution)
        self.rays = gen.neural_rendering_resolution ** 2

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _lpips_input(self, x: torch.Tensor) -> torch.Tensor:
        r = self.cfg.lpips_resolution
        if x.shape[-1] > r:
            x = F.interpolate(x, size=(r, r), mode="area")
        return x

    def camera(self, u: torch.Tensor, v: torch.Tensor):
        lim = self.cfg.camera_limit
        yaw, pitch = lim * torch.tanh(u), lim * torch.tanh(v)
        label = cameras.pose_label(yaw, pitch, fov_degrees=self.cfg.fov_degrees, lookat=self.cfg.lookat,
                                   radius=self.cfg.radius, device=self.device)
        return yaw, pitch, label

    def render(self, w, label, generator):
        from .render import make_render_draws

        draws = make_render_draws(w.shape[0], self.rays, self.gen.render_options, self.device, generator)
        return self.gen.synthesis(w, label, noise_mode="const", render_draws=draws, validate=False)["image"]

    def per_photo_losses(self, img, target, target_emb):
        """[n] terms: MSE (in [-1, 1] units), LPIPS and 1 - cos of the identity embeddings."""
        img = img.float()
        mse = (img - target).square().flatten(1).mean(1)
        lp = self.lpips(self._lpips_input(img), self._lpips_input(target)).float().reshape(-1)
        idl = 1.0 - (self.id_loss.embed(img) * target_emb).sum(1)
        return mse, lp, idl

    @torch.no_grad()
    def measure(self, w, label, target, target_emb):
        """Quality of w at the camera: fp32, fixed draws (seed), so start and end compare."""
        g = torch.Generator(device=self.device).manual_seed(self.cfg.seed + 7919)
        # clamped as the saved reconstruction is (the loss itself sees the unclamped render)
        img = self.render(w, label, g).float().clamp(-1, 1)
        mse, lp, idl = self.per_photo_losses(img, target, target_emb)
        q = [{"lpips": float(lp[i]), "identity_similarity": float(1.0 - idl[i]), "mse": float(mse[i])}
             for i in range(w.shape[0])]
        return q, img

    def run(self, w0: torch.Tensor, targets: torch.Tensor, steps: int, refine_camera: bool, bar, names):
        cfg, n = self.cfg, w0.shape[0]
        with torch.no_grad():
            target_emb = self.id_loss.embed(targets).float()
        lim = cfg.camera_limit
        u = torch.full((n,), math.atanh(cfg.yaw / lim), device=self.device)
        v = torch.full((n,), math.atanh(cfg.pitch / lim), device=self.device)
        with torch.no_grad():
            label0 = self.camera(u, v)[2]
        start_q, _ = self.measure(w0, label0, targets, target_emb)

        w = w0.detach().clone().requires_grad_(True)
        params = [w]
        groups = [{"params": [w], "lr": cfg.lr}]
        if refine_camera:
            u.requires_grad_(True), v.requires_grad_(True)
            params += [u, v]
            groups.append({"params": [u, v], "lr": cfg.camera_lr})
        opt = torch.optim.Adam(groups, betas=(0.9, 0.999))
        base_lrs = [g_["lr"] for g_ in opt.param_groups]
        draw_gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        # per step and photo [weighted total, mse, lpips, identity], kept on the
        # device and read back every log_every steps (a read-back per step would stall the GPU)
        log = torch.zeros(max(steps, 1), n, 4, device=self.device)
        losses, read = [[] for _ in range(n)], 0
        wm, wl, wi = cfg.mse_weight, cfg.lpips_weight, cfg.id_weight
        for step in range(steps):
            f = _lr_factor(step / max(steps, 1), cfg.lr_rampup, cfg.lr_rampdown)
            for group, base in zip(opt.param_groups, base_lrs):
                group["lr"] = base * f
            label = self.camera(u, v)[2] if refine_camera else label0
            with self._autocast():
                img = self.render(w, label, draw_gen)
                mse, lp, idl = self.per_photo_losses(img, targets, target_emb)
            per_photo = wm * mse + wl * lp + wi * idl
            # Summed over photos, so each photo's latent gets exactly its own gradient (Adam is
            # per-element): a batch equals separate runs, up to the renderer draws.
            # autograd.grad: no gradient reaches (or accumulates in) the generator's parameters.
            grads = torch.autograd.grad(per_photo.sum(), params)
            for p, g_ in zip(params, grads):
                p.grad = g_
            opt.step()
            log[step] = torch.stack([per_photo, mse, lp, idl], dim=1).detach()
            if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
                rows = log[read:step + 1].cpu()
                if not bool(torch.isfinite(rows).all()):
                    bad = read + 1 + int((~torch.isfinite(rows)).flatten(1).any(1).nonzero()[0])
                    raise InversionError(f"{', '.join(names)}: the inversion loss became non-finite at step {bad}")
                for j, row in enumerate(rows.tolist()):
                    for i in range(n):
                        losses[i].append({"step": read + j + 1, "total": row[i][0], "mse": row[i][1],
                                          "lpips": row[i][2], "identity": row[i][3]})
                read = step + 1
                bar.set_postfix(loss=f"{float(rows[-1, :, 0].mean()):.4f}", refresh=False)
            bar.update(n)
        w = w.detach()
        with torch.no_grad():
            yaw, pitch, label = self.camera(u.detach(), v.detach())
        end_q, img = self.measure(w, label, targets, target_emb)
        return w, yaw, pitch, label, start_q, end_q, img, losses


def _resolve_device(gen, device):
    gen_device = next(gen.parameters()).device
    if device is None:
        return gen_device
    dev = torch.device(device)
    same_index = dev.index is None or gen_device.index is None or dev.index == gen_device.index
    if dev.type != gen_device.type or not same_index:
        raise InputError(f"device {dev} differs from the generator's device {gen_device}; move the generator first")
    return gen_device


def _path_choice(cfg: InversionConfig, device: torch.device, refine_camera: bool):
    on_cuda = device.type == "cuda"
    # The fused Triton renderer differentiates planes and decoder only, not the rays
    # (kernels/triplane_render.py backward), so a learnt camera needs the reference renderer.
    if refine_camera and cfg.renderer == "triton":
        raise InputError("refine_camera needs gradients with respect to the camera, which the Triton renderer does "
                         "not give; use renderer='reference' (or 'auto')")
    fused = on_cuda and not refine_camera
    renderer = cfg.renderer if cfg.renderer != "auto" else ("triton" if fused else "reference")
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if on_cuda else "fp32")
    if precision == "bf16" and not on_cuda:
        raise InputError("inversion precision 'bf16' needs a CUDA device; use 'fp32' (or 'auto') on the CPU")
    return renderer, precision


def _encode(encoder, photos, gen, device) -> torch.Tensor:
    x = torch.cat([p.encoder_input(device) for p in photos])
    with torch.no_grad():
        out = encoder(x)
    if isinstance(out, (tuple, list)):  # GOAE's encoder returns (w, features)
        out = out[0]
    want = (len(photos), gen.num_ws, gen.config.w_dim)
    if not torch.is_tensor(out) or tuple(out.shape) != want:
        got = list(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise InputError(f"the encoder returned {got}; expected W+ offsets of shape {list(want)}")
    if not bool(torch.isfinite(out).all()):
        raise InputError("the encoder returned non-finite W+ offsets")
    # GOAE convention (guide.md §3.3): w = offsets + w_avg
    return out.detach().to(device, torch.float32) + gen.w_avg.to(device, torch.float32)


def invert_images(gen, images, *, id_loss, lpips, steps: int = 300, encoder=None, refine_camera: bool = False,
                  index=None, strict: bool = False, progress: bool = False, device=None,
                  config: InversionConfig | None = None, **options) -> list:
    """Invert photos into the generator's W+ space; one InversionResult per photo.

    gen: a TriPlaneGenerator (not modified; its renderer switch is restored afterwards);
    images: a photo or a list (paths, PIL images, arrays, tensors, or AlignedPhoto from
    align_photo); id_loss: an IdentityLoss (its .embed gives the identity term and the reported
    identity_similarity); lpips: an LPIPS module; steps: Adam steps (0 with an encoder: the
    encoder's code as it is); encoder: callable(img [N,3,256,256] in [-1,1]) -> W+ offsets
    [N, num_ws, w_dim] (GOAE convention, w = offsets + w_avg; used in whatever train/eval mode the
    caller left it); refine_camera: learn yaw and pitch too; index / strict: face choice (see
    align_photo); progress: a tqdm bar; device: must be the generator's (default). Remaining
    keyword options are InversionConfig fields (e.g. align=False for pre-aligned photos,
    lr=, id_weight=, seed=).
    """
    from tqdm.auto import tqdm

    from .eg3d.generator import TriPlaneGenerator

    if not isinstance(gen, TriPlaneGenerator):
        raise InputError(f"gen must be a TriPlaneGenerator (see load_generator), got {type(gen).__name__}")
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(InversionConfig)})
    if unknown:
        valid = ", ".join(f.name for f in dataclasses.fields(InversionConfig))
        raise InputError(f"unknown inversion option(s) {unknown}; valid: {valid}")
    cfg = dataclasses.replace(config, **options) if config is not None else InversionConfig(**options)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise InputError(f"inversion steps must be an integer >= 0, got {steps!r}")
    if steps == 0 and encoder is None:
        raise InputError("inversion steps = 0 needs an encoder (otherwise the result would be w_avg)")
    if encoder is not None and not callable(encoder):
        raise InputError(f"encoder must be callable (img256 -> W+ offsets), got {type(encoder).__name__}")
    dev = _resolve_device(gen, device)
    renderer, precision = _path_choice(cfg, dev, refine_camera)

    photos = prepare_photos(images, align=cfg.align, index=index, strict=strict, method=cfg.method,
                            size=cfg.crop_size, device=dev)
    t0 = time.perf_counter()
    previous_renderer = gen.renderer_backend
    results = []
    bar = tqdm(total=steps * len(photos), disable=not progress, desc="inverting", unit="step", dynamic_ncols=True)
    try:
        gen.set_renderer(renderer)
        inverter = _Inverter(gen, id_loss, lpips, cfg, dev, torch.bfloat16 if precision == "bf16" else None)
        for a in range(0, len(photos), cfg.batch_size):
            batch = photos[a:a + cfg.batch_size]
            tb = time.perf_counter()
            targets = torch.cat([p.tensor(inverter.res, dev) for p in batch])
            if encoder is not None:
                w0 = _encode(encoder, batch, gen, dev)
            else:
                w0 = gen.w_avg.to(dev, torch.float32).reshape(1, 1, -1).expand(len(batch), gen.num_ws, -1)
            w, yaw, pitch, label, start_q, end_q, img, losses = inverter.run(
                w0, targets, steps, refine_camera, bar, [p.name for p in batch])
            recon = _uint8_render(img)
            seconds = time.perf_counter() - tb
            for i, photo in enumerate(batch):
                camera = CameraEstimate(yaw=float(yaw[i]), pitch=float(pitch[i]), label=label[i:i + 1].detach(),
                                        refined=bool(refine_camera), fov_degrees=cfg.fov_degrees,
                                        lookat=tuple(cfg.lookat), radius=cfg.radius)
                results.append(InversionResult(
                    w_plus=w[i:i + 1].clone(), camera=camera, aligned=photo, reconstruction=recon[i],
                    quality=end_q[i], start_quality=start_q[i], losses=losses[i], steps=steps,
                    encoder=encoder is not None, config=cfg,
                    timings={"batch_s": seconds, "photos_in_batch": len(batch), "renderer": renderer,
                             "precision": precision, "device": str(dev)},
                ))
    finally:
        bar.close()
        gen.set_renderer(previous_renderer)
    total = time.perf_counter() - t0
    for r in results:
        r.timings["total_s"] = total
    return results


def list_photos(folder) -> list:
    """The image files directly in a folder (sorted by name); for `--others` (ID_others)."""
    path = Path(folder)
    if not path.is_dir():
        raise InputError(f"{folder}: not a folder of photos")
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in _PHOTO_SUFFIXES)
    if not found:
        raise InputError(f"{folder}: no photos found (looked for {', '.join(_PHOTO_SUFFIXES)})")
    return found


__all__ = [
    "ALIGN_METHODS", "AlignedPhoto", "CameraEstimate", "FFHQ_POINTS_512", "InversionConfig", "InversionError",
    "InversionResult", "LM3D_STD", "PIXELS_PER_UNIT", "align_photo", "ffhq_points", "framing_matrix",
    "invert_images", "list_photos", "load_photo", "pos_fit", "pre_aligned_photo", "prepare_photos",
]
