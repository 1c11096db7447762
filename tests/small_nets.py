"""Small stand-ins for the loss networks, for tests that exercise the engine rather than the
networks: the engine only needs the IdentityLoss / LPIPS interfaces, and the real IR-SE50 costs
seconds per step on two CPU cores."""
import torch
from torch import nn


class SmallFaceNet(nn.Module):
    """112x112 -> 512, in place of IR-SE50 inside guide_fast.identity.IdentityLoss."""

    def __init__(self, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.body = nn.Sequential(nn.Conv2d(3, 8, 5, stride=4), nn.PReLU(8), nn.Conv2d(8, 16, 3, stride=2),
                                      nn.PReLU(16), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(256, 512))

    def forward(self, x):
        return self.body(x)
