"""Random-weight GOAE encoder state_dicts for the tests, in the official format (a bare
state_dict, saved with torch.save): every parameter random, the logit scales on both sides of
the log(100) clamp; buffers as the architecture computes them."""
from __future__ import annotations

from collections import OrderedDict

import torch

from guide_fast.inversion.goae import GOAEConfig, GOAEncoder


# 128² input, window 8: shifted windows in the first two stages, whole-map windows in the last two
# (the official configuration's pattern at 256²), small enough for fast CPU tests.
MICRO = GOAEConfig(img_size=128, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=8,
                   pretrained_window_sizes=(6, 6, 6, 4))


def use_micro_in_manifest(monkeypatch) -> None:
    """Make the weight manifest check GOAE files against MICRO instead of the official 445 MiB layout."""
    import functools

    from guide_fast.inversion import goae

    monkeypatch.setattr(goae, "describe_file", functools.partial(goae.describe_file, config=MICRO))


def randomize_(enc: GOAEncoder, seed: int = 0) -> GOAEncoder:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if name.endswith("logit_scale"):
                p.copy_(torch.rand(p.shape, generator=g) * 6.0)  # exp is capped above log(100) = 4.6
            elif p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return enc


def random_state(config: GOAEConfig, seed: int = 0) -> "OrderedDict[str, torch.Tensor]":
    return OrderedDict(randomize_(GOAEncoder(config), seed).state_dict())
