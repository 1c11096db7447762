"""Per-identity random streams: every random number of a step belongs to one identity.

A step of N-identity GUIDE draws, for each identity, its camera yaw, the adjacency latents z and
magnitudes alpha, the global latents z (docs/guide.md §3.2, §3.5), the renderer's uniforms of its
renders (docs/eg3d.md §4.7) and the backbone noise of its renders (docs/guide.md §3.2). Each
identity draws all of these from its own `torch.Generator`, seeded from (run seed, identity index
in the request) and never from the process, the batch or the rank: so an identity's draws are the
same whether it is unlearned alone, in one batch of N, in passes of `identities_per_pass`, or on
rank 3 of 8 (guide_fast.unlearn.distributed). Within a stream the order of the draws of a step is
fixed: yaw, adjacency z, adjacency alpha, global z, renderer uniforms (trainable, then frozen
renders), then the backbone noise layer by layer (trainable renders, then frozen ones). A
run-long cached P_s(w_t) under random noise (cache_target_planes="on") draws its one noise
sample from a second stream per identity ("target-planes"), so it too depends on nothing else.

Capture-safe: the generators live on the run's device; a CUDA graph that draws from them
registers them (`CUDAGraph.register_generator_state`, see UnlearnSession._capture), and the index
tensors that put identity-major draws into the step's layout are built once, outside capture.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch


def identity_seed(run_seed: int, identity: int, stream: str = "identity-stream") -> int:
    """The seed of identity `identity`'s stream in run `run_seed`: 63 bits of a SHA-256 of both,
    so neighbouring run seeds or identities give unrelated streams. `stream` names a stream of
    its own ("target-planes": the one noise draw of a run-long cached P_s(w_t))."""
    digest = hashlib.sha256(f"guide-fast/{stream}/v1/{int(run_seed)}/{int(identity)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


class IdentityStreams:
    """One device generator per identity. `identities` are the indices in the whole request
    (a rank holding identities 4..6 of 10 passes [4, 5, 6])."""

    def __init__(self, run_seed: int, identities: Sequence[int], device, stream: str = "identity-stream"):
        self.run_seed = int(run_seed)
        self.identities = [int(i) for i in identities]
        self.device = torch.device(device)
        self.generators = [torch.Generator(device=self.device).manual_seed(identity_seed(self.run_seed, i, stream))
                           for i in self.identities]

    def __len__(self) -> int:
        return len(self.generators)


_ORDER_CACHE: dict = {}


def identity_major_order(layout, device) -> torch.Tensor:
    """For each entry of `layout` (kind-major: [local][adjacency][global]), its row in the
    identity-major concatenation of the identities' own draws ([local, adjacency k.., global k..]
    per identity). Built once per layout and device (a host-built tensor cannot be captured)."""
    key = (layout.n, layout.use_local, layout.k_adj, layout.k_glob, str(device))
    order = _ORDER_CACHE.get(key)
    if order is None:
        per = (1 if layout.use_local else 0) + layout.k_adj + layout.k_glob
        base = {"local": 0, "adjacency": 1 if layout.use_local else 0,
                "global": (1 if layout.use_local else 0) + layout.k_adj}
        rows = [i * per + base[kind] + k for kind, i, k in layout.entries()]
        order = _ORDER_CACHE[key] = torch.tensor(rows, dtype=torch.long, device=device)
    return order


def entries_per_identity(layout) -> int:
    return (1 if layout.use_local else 0) + layout.k_adj + layout.k_glob


class IdentityNoise:
    """Backbone noise for a batch in `layout` order, drawn identity by identity.

    Passed as the `generator` of `TriPlaneGenerator.planes`: each noise layer asks for
    [B, 1, R, R] through `randn_rows`, and gets, for every identity, its rows drawn from its own
    stream, put in the batch's order."""

    def __init__(self, generators: Sequence[torch.Generator], layout, device):
        if len(generators) != layout.n:
            raise ValueError(f"{len(generators)} streams for {layout.n} identities")
        self.generators = list(generators)
        self.per = entries_per_identity(layout)
        self.total = layout.total
        self.order = identity_major_order(layout, device)

    def randn_rows(self, shape, device) -> torch.Tensor:
        if shape[0] != self.total:
            raise ValueError(f"noise for {shape[0]} rows asked of a source for {self.total}")
        rest = list(shape[1:])
        parts = [torch.randn([self.per] + rest, device=device, generator=g) for g in self.generators]
        return torch.cat(parts).index_select(0, self.order)


def identity_render_draws(generators: Sequence[torch.Generator], layout, rays: int, options, device) -> dict:
    """Renderer uniforms for the batch in `layout` order: each identity's renders from its own stream."""
    from ..render import make_render_draws

    per = entries_per_identity(layout)
    parts = [make_render_draws(per, rays, options, device, g) for g in generators]
    order = identity_major_order(layout, device)
    strat = torch.cat([p["stratified"] for p in parts]).index_select(0, order)
    imp = torch.cat([p["importance"].reshape(per, rays, -1) for p in parts]).index_select(0, order)
    return {"stratified": strat, "importance": imp.flatten(0, 1)}
