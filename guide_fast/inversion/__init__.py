"""From a photo to an identity: photo I/O, EG3D framing, GOAE encoding and W+ optimisation
(docs/guide.md §3.3).

    photo = align_photo("me.jpg")                      # 512x512 crop in EG3D framing
    [res] = invert_images(gen, ["me.jpg"], id_loss=id_loss, lpips=lpips)               # optimisation
    [res] = invert_images(gen, "me.jpg", encoder="encoder_FFHQ.pt", w_avg="w_avg.pt",  # GOAE, as GUIDE
                          id_loss=id_loss, lpips=lpips)
    res.w_plus                                         # [1, num_ws, w_dim]: w_u for unlearning
    res.camera.label, res.quality                      # camera [1, 25]; lpips / identity / mse
    res.save_images("out/", prefix="identity0_")       # aligned crop + reconstruction PNGs

Modules: `photo` (reading photos, folders), `framing` (MTCNN alignment into EG3D's crop),
`encode` (the GOAE step), `optimize` (the W+ optimisation and `invert_images`), `average`
(w_avg: GUIDE's file or the mapping buffer), `goae` (the encoder network; imported on first use).
"""
from __future__ import annotations

from .average import AverageLatent, load_w_avg, resolve_w_avg, w_avg_distance
from .encode import ENCODER_MODES, encode_photos
from .framing import (
    ALIGN_METHODS,
    EG3D_OUTPUT_SIZE,
    FFHQ_POINTS_512,
    LM3D_STD,
    PIXELS_PER_UNIT,
    AlignedPhoto,
    align_photo,
    ffhq_points,
    framing_matrix,
    pos_fit,
    pre_aligned_photo,
    prepare_photos,
)
from .optimize import (
    DEFAULT_STEPS,
    CameraEstimate,
    InversionConfig,
    InversionError,
    InversionResult,
    invert_image,
    invert_images,
)
from .photo import PHOTO_SUFFIXES, expand_photo_sources, list_photos, load_photo

_GOAE = ("load_encoder", "preprocess_for_goae")


def __getattr__(name):
    # the encoder network (Swin-V2, ~110M parameters when loaded) is imported only when asked for
    if name in _GOAE:
        from . import goae

        return getattr(goae, name)
    raise AttributeError(f"module 'guide_fast.inversion' has no attribute {name!r}")


__all__ = [
    "ALIGN_METHODS", "AlignedPhoto", "AverageLatent", "CameraEstimate", "DEFAULT_STEPS", "EG3D_OUTPUT_SIZE",
    "ENCODER_MODES", "FFHQ_POINTS_512", "InversionConfig", "InversionError", "InversionResult", "LM3D_STD",
    "PHOTO_SUFFIXES", "PIXELS_PER_UNIT", "align_photo", "encode_photos", "expand_photo_sources", "ffhq_points",
    "framing_matrix", "invert_image", "invert_images", "list_photos", "load_encoder", "load_photo", "load_w_avg",
    "pos_fit", "pre_aligned_photo", "prepare_photos", "preprocess_for_goae", "resolve_w_avg", "w_avg_distance",
]
