"""Random draws made the way GUIDE's `unlearn.py` makes them (docs/guide.md §3.1, §3.3).

Random scenario. `unlearn.py --seed N` calls `torch.manual_seed(N)` (which seeds the CUDA
generator too) and then, on the CUDA device and in this order:

1. `LookAtPoseSampler.sample(pi/2, pi/2, ...)` for the mapping's conditioning camera, and
2. `LookAtPoseSampler.sample(pi/2, pi/2 - 0.2, ...)` for the front preview camera; each call
   draws `torch.randn((1, 1))` for the horizontal and then the vertical angle (their standard
   deviation is 0, so the values are thrown away, but they advance the generator);
3. `z_u = torch.randn(1, 512)`: the identity, mapped with psi = 1.

Nothing else touches the CUDA generator before step 3 (the networks are built on the CPU and
then moved). `identity_z` replays exactly this sequence on a fresh generator of the device
seeded with N, so on CUDA `--seed N` gives the official identity latent, bit for bit.

On the CPU the same sequence runs on the CPU generator. That is deterministic (the same seed
gives the same latent on every CPU run) but it cannot equal the official latent: torch's CPU
generator is a Mersenne Twister and its CUDA generator is Philox, so the same seed gives other
numbers. A seed's identity therefore depends on the device type of the run.

The same four camera draws come first when GUIDE runs its GOAE encoder in train mode (dropout
and drop-path draw from the device's global generator right after them); `official_rng` sets
that state up for an encoder forward in `mode="official"`.
"""
from __future__ import annotations

import contextlib

import torch

#: The draws before the identity: (what, shape), in order.
CAMERA_SAMPLER_DRAWS: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("conditioning camera, horizontal angle", (1, 1)),
    ("conditioning camera, vertical angle", (1, 1)),
    ("front camera, horizontal angle", (1, 1)),
    ("front camera, vertical angle", (1, 1)),
)


def camera_sampler_draws(generator: torch.Generator | None, device: torch.device | str) -> None:
    """Advance `generator` (None: the device's global generator) past the camera sampler's
    four draws, as GUIDE's unlearn.py makes them before anything else (module docstring)."""
    for _, shape in CAMERA_SAMPLER_DRAWS:
        torch.randn(shape, generator=generator, device=device)


def identity_z(seed: int, z_dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The Random scenario's z [z_dim] for `seed` on `device`: the official latent on CUDA, a
    documented deterministic stand-in on the CPU (module docstring)."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(int(seed))
    camera_sampler_draws(g, device)
    return torch.randn((1, int(z_dim)), generator=g, device=device)[0]


@contextlib.contextmanager
def official_rng(seed: int, device: torch.device | str):
    """Inside: the device's global generator is where GUIDE's is when it runs its encoder
    (seeded with `seed`, then the camera sampler's draws). The caller's RNG state is restored
    on exit (torch.random.fork_rng), so nothing outside is disturbed."""
    device = torch.device(device)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(int(seed))
        camera_sampler_draws(None, device)
        yield
