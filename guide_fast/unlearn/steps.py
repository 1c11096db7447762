"""One GUIDE optimisation step, two ways (docs/guide.md §3.5).

`ReferenceStep`: the official order of operations: eager fp32, batch 1, one term at a time,
separate backbone passes for the tri-plane MSE and the image. The oracle and the speed baseline.

`FastStep`: the same maths restructured: every trainable render of the step in one batched
call and every frozen one in another; tri-planes computed once per latent and reused for the
MSE (noise_passes="shared", the default: one noise draw serves the MSE and the image of a latent;
each term still sees a correctly distributed draw, so the expected gradient is GUIDE's, with
another variance; "separate" runs the MSE's own backbone passes with independent noise, as the
official code); the local target's frozen tri-planes
computed once per run where that is exact (constant noise; UnlearnConfig.cache_target_planes);
bf16 autocast on CUDA (losses,
master weights and Adam state stay fp32); the fused renderer; all random draws made on the
device, so the whole step (forward, backward, Adam) can be captured once in a CUDA graph and
replayed.

Both consume a `StepDraws`, so they can be run on identical draws and compared.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .. import cameras
from ..plan import ExecutionPlan
from ..profiling import nvtx_range
from .config import UnlearnConfig
from .targets import adjacency_offsets

LOSS_NAMES = ("total", "local", "adjacency", "global")


@dataclass
class Layout:
    """Order of the renders of one step: [local (n)] [adjacency (n*K_adj)] [global (n*K_glob)],
    identity-major inside each block. The first n_local + n_adj entries carry MSE and ID terms."""

    n: int
    use_local: bool
    k_adj: int
    k_glob: int

    @property
    def n_local(self) -> int:
        return self.n if self.use_local else 0

    @property
    def n_adj(self) -> int:
        return self.n * self.k_adj

    @property
    def n_glob(self) -> int:
        return self.n * self.k_glob

    @property
    def n_unlearn(self) -> int:
        return self.n_local + self.n_adj

    @property
    def total(self) -> int:
        return self.n_local + self.n_adj + self.n_glob

    def identity_index(self, device=None) -> torch.Tensor:
        """Identity of each entry [T] (built once per run: it is a host-side list)."""
        return torch.tensor([i for _, i, _ in self.entries()], dtype=torch.long, device=device)

    def entry_indices(self, a: int, b: int) -> list:
        """Indices (in this layout) of the entries of identities a..b-1, in the order of the
        layout of those identities alone."""
        pos = {e: j for j, e in enumerate(self.entries())}
        sub = Layout(b - a, self.use_local, self.k_adj, self.k_glob)
        return [pos[(kind, a + i, k)] for kind, i, k in sub.entries()]

    def entries(self) -> list[tuple[str, int, int]]:
        """(kind, identity, k) for each entry, in order."""
        out = [("local", i, 0) for i in range(self.n_local)]
        out += [("adjacency", i, k) for i in range(self.n) for k in range(self.k_adj)]
        out += [("global", i, k) for i in range(self.n) for k in range(self.k_glob)]
        return out


@dataclass
class StepDraws:
    """The random numbers of one step. yaw [n]; adj_z [n, K_adj, z]; adj_alpha [n, K_adj];
    glob_z [n, K_glob, z]; render_u / render_s: renderer uniforms for the trainable / frozen
    renders in Layout order ({"stratified": [T, rays, S, 1], "importance": [T*rays, S_imp]}),
    or None to let the renderer draw them.

    With identity streams the renderer's uniforms are drawn late, by `with_render`, for the
    identities of one pass at a time (the fast step) or all at once (the reference step): they
    are ~63 MB per identity at FFHQ settings, and drawing them per pass bounds that by
    identities_per_pass instead of the shard. The values do not change: each identity draws
    from its own stream, in its own order (streams.py), whichever pass it is in.
    """

    yaw: torch.Tensor
    adj_z: torch.Tensor
    adj_alpha: torch.Tensor
    glob_z: torch.Tensor
    render_u: dict | None = None
    render_s: dict | None = None
    # one stream per identity (streams.IdentityStreams.generators): the backbone noise of each
    # identity's renders is drawn from its own stream; None: from torch's global generator
    generators: list | None = None
    render_spec: tuple | None = None   # (rays, RenderOptions) of render draws still to be made

    def with_render(self, layout: "Layout") -> "StepDraws":
        """These draws with render_u / render_s filled in for `layout` (the identities of
        self.generators, in that order); themselves when there is nothing left to draw."""
        if self.render_spec is None or self.render_u is not None:
            return self
        from .streams import identity_render_draws

        if self.generators is None or len(self.generators) != layout.n:
            raise ValueError(f"render draws for {layout.n} identities asked of draws holding "
                             f"{len(self.generators or [])} identity streams")
        rays, opts = self.render_spec
        device = self.yaw.device
        render_u = identity_render_draws(self.generators, layout, rays, opts, device)
        render_s = identity_render_draws(self.generators, layout, rays, opts, device)
        return replace(self, render_u=render_u, render_s=render_s, render_spec=None)


def sample_draws(cfg: UnlearnConfig, layout: Layout, z_dim: int, device: torch.device | str,
                 generator: torch.Generator | None = None, render: tuple | None = None,
                 streams=None) -> StepDraws:
    """Draw one step's randomness on `device` (graph-safe with the default CUDA generator).

    render: optional (rays, RenderOptions) to also draw the renderer's uniforms explicitly (with
    streams they are drawn later, per pass: StepDraws.with_render).
    streams: a `streams.IdentityStreams` (one generator per identity): every draw of identity i
    comes from its own stream, in the order that module states, so the draws of an identity do
    not depend on which other identities share the batch, the pass or the rank (the engine's way).
    """
    if streams is not None:
        return _sample_identity_draws(cfg, layout, z_dim, device, streams, render)
    n = layout.n
    kw = dict(device=device, generator=generator)
    yaw = (torch.rand(n, **kw) * 2 - 1) * cfg.yaw_range
    adj_z = torch.randn(n, layout.k_adj, z_dim, **kw)
    adj_alpha = torch.rand(n, layout.k_adj, **kw) * (cfg.adjacency_alpha_max - cfg.adjacency_alpha_min) + cfg.adjacency_alpha_min
    glob_z = torch.randn(n, layout.k_glob, z_dim, **kw)
    render_u = render_s = None
    if render is not None:
        from ..render import make_render_draws

        rays, opts = render
        render_u = make_render_draws(layout.total, rays, opts, device, generator)
        render_s = make_render_draws(layout.total, rays, opts, device, generator)
    return StepDraws(yaw, adj_z, adj_alpha, glob_z, render_u, render_s)


def _sample_identity_draws(cfg: UnlearnConfig, layout: Layout, z_dim: int, device, streams, render) -> StepDraws:
    if len(streams) != layout.n:
        raise ValueError(f"{len(streams)} identity streams for a layout of {layout.n} identities")
    span = cfg.adjacency_alpha_max - cfg.adjacency_alpha_min
    yaw, adj_z, adj_alpha, glob_z = [], [], [], []
    for g in streams.generators:
        kw = dict(device=device, generator=g)
        yaw.append((torch.rand(1, **kw) * 2 - 1) * cfg.yaw_range)
        adj_z.append(torch.randn(1, layout.k_adj, z_dim, **kw))
        adj_alpha.append(torch.rand(1, layout.k_adj, **kw) * span + cfg.adjacency_alpha_min)
        glob_z.append(torch.randn(1, layout.k_glob, z_dim, **kw))
    # the renderer's uniforms come later, per pass (StepDraws.with_render)
    return StepDraws(torch.cat(yaw), torch.cat(adj_z), torch.cat(adj_alpha), torch.cat(glob_z), None, None,
                     list(streams.generators), render_spec=render)


def _slice_draws(draws: dict | None, entry: int, rays: int):
    if draws is None:
        return None
    return {"stratified": draws["stratified"][entry:entry + 1],
            "importance": draws["importance"][entry * rays:(entry + 1) * rays]}


def step_cameras(cfg: UnlearnConfig, yaw: torch.Tensor) -> torch.Tensor:
    """One rendering camera per identity (docs/guide.md §3.2): yaw pi/2 + U(±yaw_range), polar pi/2 + pitch."""
    return cameras.pose_label(yaw, cfg.pitch, fov_degrees=cfg.fov_degrees, lookat=cfg.lookat, radius=cfg.radius,
                              device=yaw.device)


class _StepBase:
    def __init__(self, g_u, g_s, id_loss, lpips, cfg: UnlearnConfig, w_u: torch.Tensor, w_t: torch.Tensor):
        self.g_u, self.g_s = g_u, g_s
        self.id_loss, self.lpips = id_loss, lpips
        self.cfg = cfg
        self.w_u, self.w_t = w_u, w_t
        self.device = w_u.device
        self.layout = Layout(w_u.shape[0], cfg.use_local, cfg.k_adj, cfg.k_glob)
        self.c_cond = cameras.frontal_label(1, fov_degrees=cfg.fov_degrees, lookat=cfg.lookat, radius=cfg.radius,
                                            device=self.device)
        self.rays = g_u.neural_rendering_resolution ** 2
        self.params = [p for _, p in g_u.trainable_synthesis_parameters()]
        self.entry_identity = self.layout.identity_index(self.device)
        # True once the gradients are views of one flat buffer (distributed.GradientReducer):
        # they are then zeroed in place, never replaced
        self.static_grads = False
        # called between the backward and the optimizer step with (losses [4], per-identity [n]);
        # returns them (the distributed engine all-reduces gradients and losses there)
        self.gradient_hook = None

    def update(self) -> None:
        """The optimizer step on the gradients of forward_backward."""
        with nvtx_range("optimizer"):
            self.optimizer.step()

    def step(self, draws: StepDraws):
        """One optimisation step: forward, backward, (gradient_hook), Adam. -> (losses [4], per-identity [n])."""
        values, per_id = self.forward_backward(draws)
        if self.gradient_hook is not None:
            values, per_id = self.gradient_hook(values, per_id)
        self.update()
        return values, per_id

    def map_z(self, z: torch.Tensor) -> torch.Tensor:
        """Random latents with frontal conditioning, psi from the config (docs/guide.md §3.5(b) step 1).
        The mapping network is frozen and identical in both generators."""
        flat = z.reshape(-1, z.shape[-1])
        ws = self.g_s.mapping(flat, self.c_cond.expand(flat.shape[0], -1), truncation_psi=self.cfg.truncation_psi)
        return ws.reshape(*z.shape[:-1], *ws.shape[1:])

    def latents(self, draws: StepDraws, part=None):
        """-> (trainable latents, frozen latents) [T, L, D] in Layout order."""
        part = part or self
        lay, w_u, w_t = part.layout, part.w_u, part.w_t
        parts_u, parts_s = [], []
        if lay.use_local:
            parts_u.append(w_u)
            parts_s.append(w_t)
        if lay.k_adj:
            delta = adjacency_offsets(self.map_z(draws.adj_z), w_u, draws.adj_alpha)
            parts_u.append((w_u.unsqueeze(1) + delta).flatten(0, 1))
            parts_s.append((w_t.unsqueeze(1) + delta).flatten(0, 1))
        if lay.k_glob:
            w_g = self.map_z(draws.glob_z).flatten(0, 1)
            parts_u.append(w_g)
            parts_s.append(w_g)
        return torch.cat(parts_u), torch.cat(parts_s)

    def weights(self, layout=None):
        """Per-entry weights of the (mse, lpips, id) terms, as the summed GUIDE loss needs them."""
        cfg, lay = self.cfg, layout or self.layout
        mse = [cfg.local_mse_weight] * lay.n_local + [cfg.adjacency_weight * cfg.adjacency_mse_weight] * lay.n_adj
        lp = ([cfg.local_lpips_weight] * lay.n_local + [cfg.adjacency_weight * cfg.adjacency_lpips_weight] * lay.n_adj
              + [cfg.global_weight] * lay.n_glob)
        idw = [cfg.local_id_weight] * lay.n_local + [cfg.adjacency_weight * cfg.adjacency_id_weight] * lay.n_adj
        t = lambda v: torch.tensor(v, dtype=torch.float32, device=self.device)  # noqa: E731
        return t(mse), t(lp), t(idw)

    def summarize(self, entry_loss: torch.Tensor, part=None) -> tuple[torch.Tensor, torch.Tensor]:
        """entry losses [T] -> (LOSS_NAMES values [4], per-identity totals [n])."""
        part = part or self
        lay = part.layout
        a, b = lay.n_local, lay.n_local + lay.n_adj
        zero = entry_loss.new_zeros(())
        local = entry_loss[:a].sum() if a else zero
        adj = entry_loss[a:b].sum() if lay.n_adj else zero
        glob = entry_loss[b:].sum() if lay.n_glob else zero
        total = local + adj + glob
        per_id = entry_loss.new_zeros(lay.n).index_add(0, part.entry_identity, entry_loss)
        return torch.stack([total, local, adj, glob]), per_id


class ReferenceStep(_StepBase):
    """docs/guide.md §3.5 as the official code runs it: batch 1, term by term, fp32, eager."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.cfg
        self.optimizer = torch.optim.Adam(self.params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)

    def losses(self, draws: StepDraws):
        """Entry losses [T] in Layout order, computed one term at a time."""
        cfg, lay = self.cfg, self.layout
        draws = draws.with_render(lay)
        w_u_all, w_s_all = self.latents(draws)
        cams = step_cameras(cfg, draws.yaw)
        ids = [i for _, i, _ in lay.entries()]
        mse_w, lp_w, id_w = self.weights()
        out = []
        for e, (kind, _i, _k) in enumerate(lay.entries()):
            wu, ws = w_u_all[e:e + 1], w_s_all[e:e + 1]
            c = cams[ids[e]:ids[e] + 1]
            g = draws.generators[ids[e]] if draws.generators is not None else None  # the identity's noise stream
            term = 0.0
            if kind != "global":
                # the MSE runs its own backbone passes, with their own noise (docs/guide.md §3.5)
                p_u = self.g_u.planes(wu, noise_mode=cfg.noise_mode, generator=g)
                with torch.no_grad():
                    p_s = self.g_s.planes(ws, noise_mode=cfg.noise_mode, generator=g)
                term = term + mse_w[e] * F.mse_loss(p_u, p_s)
            img_u = self.g_u.synthesis(wu, c, noise_mode=cfg.noise_mode, generator=g,
                                       render_draws=_slice_draws(draws.render_u, e, self.rays))["image"]
            with torch.no_grad():
                img_s = self.g_s.synthesis(ws, c, noise_mode=cfg.noise_mode, generator=g,
                                           render_draws=_slice_draws(draws.render_s, e, self.rays))["image"]
            term = term + lp_w[e] * self.lpips(img_u, img_s).mean()
            if kind != "global":
                term = term + id_w[e] * self.id_loss(img_u, img_s, reduction="mean")
            out.append(term.reshape(()))
        return torch.stack(out)

    def forward_backward(self, draws: StepDraws):
        entry = self.losses(draws)
        values, per_id = self.summarize(entry)
        self.optimizer.zero_grad(set_to_none=not self.static_grads)
        values[0].backward()
        return values.detach(), per_id.detach()


@dataclass
class _Pass:
    """One forward/backward pass of the fast step: a contiguous group of identities."""

    start: int
    entry_index: torch.Tensor  # positions of this pass's entries in the whole step's layout
    layout: Layout
    w_u: torch.Tensor
    w_t: torch.Tensor
    planes_target: torch.Tensor | None  # None: recomputed every step (random noise)
    entry_identity: torch.Tensor
    mse_w: torch.Tensor
    lp_w: torch.Tensor
    id_w: torch.Tensor


class FastStep(_StepBase):
    """The batched, cached, mixed-precision, graph-capturable step.

    identities_per_pass bounds memory for many identities: groups of identities run one
    forward/backward each, gradients accumulate, and one Adam step follows (the same update
    as a single pass, up to summation order). plan: the run's ExecutionPlan (its precision is
    the step's autocast); default: fp32 with the generators' own operators. target_noise: one
    generator per identity for the noise of cached target planes under random noise
    (cache_target_planes="on"), so that each identity's frozen draw does not depend on the others
    in its pass; None: torch's global generator.
    """

    def __init__(self, *args, plan: ExecutionPlan | None = None, capturable: bool = False,
                 identities_per_pass: int = 0, target_noise: "list | None" = None, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.cfg
        if plan is None:
            plan = ExecutionPlan(self.device, path="fast", precision="fp32", **self.g_u.operators())
        self.plan = plan
        opt_kwargs = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
        if capturable:
            opt_kwargs.update(capturable=True, foreach=True)
        self.optimizer = torch.optim.Adam(self.params, **opt_kwargs)
        n = self.layout.n
        per = n if identities_per_pass <= 0 else min(identities_per_pass, n)
        self.separate = cfg.noise_passes == "separate"
        self.cache_target = cfg.use_local and (cfg.cache_target_planes == "on" or (
            cfg.cache_target_planes == "auto" and cfg.noise_mode != "random"))
        self.passes = []
        for a in range(0, n, per):
            b = min(a + per, n)
            lay = Layout(b - a, cfg.use_local, cfg.k_adj, cfg.k_glob)
            w_u, w_t = self.w_u[a:b], self.w_t[a:b]
            # docs/guide.md §3.5(a): with constant noise the local target's tri-planes P_s(w_t) are the
            # same every step: computed once here instead of every step.
            planes_t = None
            if self.cache_target:
                noise = None
                if target_noise is not None and cfg.noise_mode == "random":
                    from .streams import IdentityNoise

                    noise = IdentityNoise(target_noise[a:b], Layout(b - a, True, 0, 0), self.device)
                with torch.no_grad(), self._autocast():
                    planes_t = self.g_s.planes(w_t, noise_mode=cfg.noise_mode, generator=noise, validate=False).float()
            index = torch.tensor(self.layout.entry_indices(a, b), dtype=torch.long, device=self.device)
            self.passes.append(_Pass(a, index, lay, w_u, w_t, planes_t, lay.identity_index(self.device), *self.weights(lay)))

    def _backbone(self, gen, ws, draws: StepDraws, layout: Layout) -> torch.Tensor:
        """One backbone pass over the entries of `layout` (ws in its order): each identity's noise
        from its own stream (streams.py); under compile, drawn onto a tape first (compiled.NoiseTape)."""
        source = None
        if self.cfg.noise_mode == "random":
            if draws.generators is not None:
                from .streams import IdentityNoise

                source = IdentityNoise(draws.generators, layout, self.device)
            if self.plan.compile:
                from ..compiled import NoiseTape

                source = NoiseTape.draw(source, gen.backbone.synthesis, ws.shape[0], self.device)
        return gen.planes(ws, noise_mode=self.cfg.noise_mode, generator=source, validate=False)

    def _frozen_planes(self, ws, draws: StepDraws, layout: Layout, planes_target, cached: int) -> torch.Tensor:
        """G_s's tri-planes (fp32) of the entries of `layout`; the first `cached` (the local
        entries) from the per-run cache."""
        if cached >= layout.total:
            return planes_target
        rest = Layout(layout.n, False, layout.k_adj, layout.k_glob) if cached else layout
        new = self._backbone(self.g_s, ws[cached:], draws, rest).float()
        return torch.cat([planes_target, new]) if cached else new

    def _autocast(self):
        # cache_enabled=False: cached weight casts must not leak out of a captured graph
        return self.plan.autocast(cache_enabled=False)

    def _render(self, gen, ws, cams, planes, draws):
        if self.plan.autocast_dtype is not None and gen.renderer_backend == "triton":
            planes = planes.to(self.plan.autocast_dtype)  # halve the renderer's texel traffic
        return gen.synthesis(ws, cams, planes=planes, render_draws=draws, validate=False)["image"]

    def _slice(self, draws: StepDraws, part: "_Pass", whole: bool) -> StepDraws:
        """The draws of one pass's identities (render draws made now, for them only)."""
        if whole:
            return draws.with_render(part.layout)
        a, b = part.start, part.start + part.layout.n

        def pick(d):
            if d is None:
                return None
            imp = d["importance"].reshape(self.layout.total, self.rays, -1).index_select(0, part.entry_index)
            return {"stratified": d["stratified"].index_select(0, part.entry_index), "importance": imp.flatten(0, 1)}

        gens = draws.generators[a:b] if draws.generators is not None else None
        sub = StepDraws(draws.yaw[a:b], draws.adj_z[a:b], draws.adj_alpha[a:b], draws.glob_z[a:b],
                        pick(draws.render_u), pick(draws.render_s), gens, render_spec=draws.render_spec)
        return sub.with_render(part.layout)

    def losses(self, draws: StepDraws, part: _Pass | None = None):
        """Entry losses [T] of one pass (default: the first, i.e. all identities when unsplit)."""
        part = part or self.passes[0]
        cfg, lay = self.cfg, part.layout
        with nvtx_range("mapping"):
            w_u_all, w_s_all = self.latents(draws, part)
            cams = step_cameras(cfg, draws.yaw).index_select(0, part.entry_identity)
        cached = lay.n_local if part.planes_target is not None else 0
        m = lay.n_unlearn
        with self._autocast():
            with nvtx_range("backbone"):
                if self.separate and m:
                    # noise_passes="separate": the MSE's tri-planes from their own backbone passes,
                    # with noise drawn independently of the image's (docs/guide.md §3.5, as the official code)
                    mse_lay = Layout(lay.n, lay.use_local, lay.k_adj, 0)
                    mse_u = self._backbone(self.g_u, w_u_all[:m], draws, mse_lay)
                    with torch.no_grad():
                        mse_s = self._frozen_planes(w_s_all[:m], draws, mse_lay, part.planes_target, cached)
                planes_u = self._backbone(self.g_u, w_u_all, draws, lay)
                with torch.no_grad():
                    planes_s = self._frozen_planes(w_s_all, draws, lay, part.planes_target, cached)
                if not (self.separate and m):
                    mse_u, mse_s = planes_u[:m], planes_s[:m]
            with nvtx_range("synthesis"):
                img_u = self._render(self.g_u, w_u_all, cams, planes_u, draws.render_u)
                with torch.no_grad():
                    img_s = self._render(self.g_s, w_s_all, cams, planes_s, draws.render_s)
            entry = img_u.new_zeros(lay.total, dtype=torch.float32)
            if m:
                # tri-plane MSE per entry: F.mse_loss's mean over all elements (docs/guide.md §3.5(a))
                mse = (mse_u.float() - mse_s).square().flatten(1).mean(1)
                entry = entry + F.pad(part.mse_w * mse, (0, lay.total - m))
            with nvtx_range("lpips"):
                entry = entry + part.lp_w * self.lpips(img_u, img_s).float().reshape(-1)
            if m:
                with nvtx_range("identity"):
                    idl = self.id_loss(img_u[:m], img_s[:m], reduction="none").float()
                entry = entry + F.pad(part.id_w * idl, (0, lay.total - m))
        return entry

    def forward_backward(self, draws: StepDraws):
        """Forward and backward of every pass; the gradients of all passes accumulate."""
        with nvtx_range("step"):
            # set_to_none: inside a graph capture the backward then allocates the gradients
            # from the graph's pool and each replay overwrites them (no accumulation).
            self.optimizer.zero_grad(set_to_none=not self.static_grads)
            whole = len(self.passes) == 1
            values, per_ids = None, []
            for part in self.passes:
                sub = self._slice(draws, part, whole)
                entry = self.losses(sub, part)
                v, per_id = self.summarize(entry, part)
                with nvtx_range("backward"):
                    v[0].backward()
                values = v.detach() if values is None else values + v.detach()
                per_ids.append(per_id.detach())
        return values, torch.cat(per_ids)
