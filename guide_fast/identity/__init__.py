"""Face networks of GUIDE: IR-SE50 (ID loss), IR-101 (ID metric), MTCNN alignment, the
identity scorer and its ONNX / TensorRT export (docs/face_models.md §1-2, §5; docs/guide.md §3.5, §4.2).

facenet-pytorch, onnx, onnxruntime and tensorrt are imported only when used.
"""
from .align import (
    DEFAULT_THRESHOLDS,
    GUIDE_THRESHOLDS,
    REFERENCE_POINTS_112,
    AlignedFace,
    Face,
    MultipleFacesError,
    NoFaceError,
    align_face,
    align_faces,
    apply_transform,
    choose_face,
    detect_faces,
    detect_faces_batch,
    reference_points,
    similarity_transform,
    warp_affine,
)
from .backbones import KINDS, IRBackbone, build_backbone, expected_keys, load_backbone
from .loss import IdentityLoss
from .preprocess import idloss_crop, normalize_uint8, renders_to_uint8, to_rgb_uint8
from .scorer import EmbedResult, IdentityScorer, available_backends

__all__ = [
    "AlignedFace", "DEFAULT_THRESHOLDS", "EmbedResult", "Face", "GUIDE_THRESHOLDS", "IRBackbone", "IdentityLoss", "IdentityScorer",
    "KINDS", "MultipleFacesError", "NoFaceError", "REFERENCE_POINTS_112", "align_face", "align_faces",
    "apply_transform", "available_backends", "choose_face", "build_backbone", "detect_faces", "detect_faces_batch",
    "expected_keys", "idloss_crop", "load_backbone", "normalize_uint8", "reference_points",
    "renders_to_uint8", "similarity_transform", "to_rgb_uint8", "warp_affine",
]
