"""GUIDE's identity loss (docs/guide.md §3.5, docs/face_models.md §1.4): 1 - cos between IR-SE50
embeddings of the pSp-cropped renders, the target branch detached."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError
from .backbones import IRBackbone, l2_normalize
from .preprocess import idloss_crop


class IdentityLoss(nn.Module):
    """ID(a, b) = 1 - <phi(a), phi(b)>, phi = backbone(idloss_crop(x)) as unit vectors.

    The backbone is frozen and always in eval mode (GUIDE calls .eval() once and never switches
    back, §1.1); gradients flow to the first argument only.
    """

    def __init__(self, backbone: IRBackbone):
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise InputError(f"backbone must be an nn.Module (see load_backbone), got {type(backbone).__name__}")
        self.backbone = backbone
        self.backbone.requires_grad_(False)
        self.backbone.eval()

    def train(self, mode: bool = True) -> "IdentityLoss":
        super().train(mode)
        self.backbone.eval()  # dropout / batch statistics must never switch on
        return self

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """[N,3,H,W] in [-1,1] -> [N,512] unit vectors (differentiable w.r.t. images)."""
        x = idloss_crop(images)
        dtype = next(self.backbone.parameters()).dtype
        feats = self.backbone.features(x.to(dtype)) if hasattr(self.backbone, "features") else self.backbone(x.to(dtype))
        return l2_normalize(feats.float())

    def forward(self, images: torch.Tensor, target_images: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        if reduction not in ("mean", "none"):
            raise InputError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        if images.shape[0] != target_images.shape[0]:
            raise InputError(
                f"images and target_images have batch sizes {images.shape[0]} and {target_images.shape[0]}"
            )
        feats = self.embed(images)
        with torch.no_grad():
            target = self.embed(target_images.detach())
        loss = 1.0 - (feats * target).sum(dim=1)
        return loss.mean() if reduction == "mean" else loss
