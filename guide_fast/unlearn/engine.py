"""`Unlearner`: the GUIDE engine's public face (docs/guide.md §3).

    unl = Unlearner(generator, id_loss, lpips, UnlearnConfig())
    result = unl.unlearn(seeds=[7])            # or latents=w [N, num_ws, w_dim], or images=[...]
    result.generator                           # G_u: the source no longer produces identity 7
    result.save("out/")                        # checkpoint, delta, latents, report.json, grid.png

For profiling: `session = unl.prepare(seeds=[7]); session.step(); session.synchronize()`.
"""
from __future__ import annotations

import contextlib
import copy
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..errors import GuideFastError, InputError
from ..plan import ExecutionPlan

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path

    import torch.distributed as dist

    from ..eg3d.generator import TriPlaneGenerator
    from ..identity.loss import IdentityLoss
    from ..inversion.average import AverageLatent
    from ..inversion.photo import PhotoSource
    from ..perceptual import LPIPS
from ..losslog import LossLog
from .config import UnlearnConfig
from .steps import LOSS_NAMES, FastStep, ReferenceStep, sample_draws
from .streams import IdentityStreams
from .targets import target_latent
from .views import latents_from_seeds, render_views, view_yaws  # noqa: F401 (public here too)


class UnlearnError(GuideFastError):
    """The optimisation itself failed (e.g. the loss became non-finite)."""


def generator_pair(source: "TriPlaneGenerator", plan: ExecutionPlan | None = None
                   ) -> tuple["TriPlaneGenerator", "TriPlaneGenerator"]:
    """(G_u, G_s) as an unlearning run sets them up (docs/guide.md §3.1).

    G_s frozen; G_u a copy whose backbone.synthesis alone trains. Both in train mode as the
    official code (EG3D has no dropout/batch-norm: it only selects the shared-weight modulated
    conv, which batches well), both with the plan's operators (renderer, up-convs, layout;
    `plan=None` keeps the source's)."""
    pair = []
    for _ in range(2):
        g = copy.deepcopy(source)
        if plan is not None:
            plan.apply(g)
        pair.append(g.train().requires_grad_(False))
    g_u, g_s = pair
    for _, p in g_u.trainable_synthesis_parameters():
        p.requires_grad_(True)
    return g_u, g_s


@dataclass
class UnlearnResult:
    """What one unlearning run produced. `generator` is G_u (eval mode, frozen)."""

    generator: object
    source: object
    w_source: torch.Tensor
    w_target: torch.Tensor
    config: UnlearnConfig
    losses: list = field(default_factory=list)            # per step: {"step", "total", "local", "adjacency", "global"}
    identity_losses: list = field(default_factory=list)   # per step: [n] per-identity totals
    timings: dict = field(default_factory=dict)
    renders: dict | None = None                           # {"before", "after", "target"}: [N, V, 3, H, W]
    identity_similarity: dict | None = None
    inversion: list | None = None                         # per identity, when started from photos
    w_others: torch.Tensor | None = None                  # other photos of the person, inverted (ID_others)
    w_avg: dict | None = None                             # where w_avg came from: {"source": "file <sha256>" | ...}

    def delta(self) -> dict:
        from ..checkpoints import compute_delta

        return compute_delta(self.source, self.generator)

    def save(self, out_dir: "str | os.PathLike", **kwargs) -> Path:
        from .report import save_result

        return save_result(self, out_dir, **kwargs)


def raised_in_kernels(exc: BaseException) -> bool:
    """Whether the exception was raised inside guide_fast.kernels or Triton (its traceback's frames)."""
    import triton

    from .. import kernels

    roots = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (kernels, triton))
    tb = exc.__traceback__
    while tb is not None:
        if os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(roots):
            return True
        tb = tb.tb_next
    return False


class UnlearnSession:
    """A prepared run: copies of the generator, targets, the step and its optimizer."""

    def __init__(self, unlearner: "Unlearner", w_source: torch.Tensor, dist=None):
        cfg = unlearner.config
        self.dist = dist  # a distributed.DistContext when the identities are sharded over ranks
        self.config = cfg
        self.unlearner = unlearner
        source = unlearner.generator
        self.device = next(source.parameters()).device
        t0 = time.perf_counter()
        # every "how does this run" choice, resolved once (guide_fast/plan.py)
        self.plan = unlearner.execution_plan()
        fast = self.plan.path == "fast"
        self.finished = False
        self.use_graph = self.plan.cuda_graph  # turned off if the capture fails (then eager, said so)
        # Inductor's own CUDA graphs (compile_mode "reduce-overhead") do not nest inside the engine's
        # capture of the whole step: one or the other (guide_fast/compiled.py)
        self.inductor_graphs = self.plan.compile and cfg.compile_mode == "reduce-overhead"
        if self.inductor_graphs:
            self.use_graph = False
        self.g_u, self.g_s = generator_pair(source, self.plan)
        id_loss = unlearner.id_loss.to(self.device).eval().requires_grad_(False)
        lpips = unlearner.lpips.to(self.device).eval().requires_grad_(False)

        n_total = w_source.shape[0]
        self.identities = range(n_total)
        run_seed = cfg.seed if cfg.seed is not None else int(torch.randint(0, 2 ** 62, ()).item())
        if dist is not None:
            from .distributed import shard

            self.identities = shard(n_total, dist.world_size, dist.rank)
            # rank 0's weights on every rank (distributed.py): generators and loss networks
            for what, module in (("generator", self.g_s), ("generator", self.g_u), ("identity network", id_loss),
                                 ("LPIPS", lpips)):
                dist.broadcast_module(module, f"sharing the {what} weights")
            run_seed = dist.broadcast_object(run_seed, "sharing the run seed")
        # every draw of identity i comes from its own stream, keyed by (run seed, i) (streams.py)
        self.streams = IdentityStreams(run_seed, self.identities, self.device)
        self.w_source = w_source.to(self.device, torch.float32)
        # w_avg: GUIDE's file when the Unlearner was given one, else the mapping buffer (docs/guide.md §3.4)
        self.w_target = target_latent(self.w_source, unlearner.w_avg.to(self.device), cfg.target, cfg.target_distance)
        if dist is not None:  # rank 0's targets (its w_avg), so every rank optimises the same loss
            dist.broadcast_tensors([self.w_target], "sharing the UFO targets")
        step_cls = FastStep if fast else ReferenceStep
        extra = dict(plan=self.plan, capturable=self.use_graph, identities_per_pass=cfg.identities_per_pass,
                     target_noise=IdentityStreams(run_seed, self.identities, self.device,
                                                  stream="target-planes").generators) if fast else {}
        a, b = self.identities.start, self.identities.stop
        self.stepper = step_cls(self.g_u, self.g_s, id_loss, lpips, cfg, self.w_source[a:b], self.w_target[a:b],
                                **extra)
        self.layout = self.stepper.layout
        self.n = n_total
        # torch.compile of the step's networks (a no-op report when the plan's compile is off);
        # installed after the stepper so its one-off cached target planes run eagerly
        from ..compiled import compile_step

        self._loss_nets = (id_loss, lpips)
        self.compile_report = compile_step(
            self.g_u, self.g_s, id_loss, lpips, self.plan, mode=cfg.compile_mode,
            layout_key=(self.layout.n, self.layout.use_local, self.layout.k_adj, self.layout.k_glob,
                        cfg.identities_per_pass, cfg.noise_passes))
        self.reducer = None
        if dist is not None:
            from .distributed import GradientReducer

            self.reducer = GradientReducer(dist, self.stepper.params, n_total, self.identities)
            self.stepper.static_grads = True
            self.stepper.gradient_hook = self.reducer.hook
        self.steps_done = 0
        self.graph = None
        # device-side loss log: one row per step, read back every cfg.log_every steps
        self.log = LossLog(cfg.iterations, len(LOSS_NAMES) + self.n, self.device)
        self.losses: list = []
        self.identity_losses: list = []
        self.timings = {"setup_s": time.perf_counter() - t0}
        self._stream = torch.cuda.Stream(self.device) if self.use_graph else None

    # --------------------------------------------------------------------- stepping
    def _draws(self):
        return sample_draws(self.config, self.layout, self.g_u.config.z_dim, self.device, streams=self.streams,
                            render=(self.stepper.rays, self.g_u.render_options))

    def _step_and_log(self):
        values, per_id = self.stepper.step(self._draws())
        self._log_row(values, per_id)

    def _log_row(self, values, per_id):
        self.log.record(torch.cat([values.float(), per_id.float()]))

    def _capture(self):
        """Capture one whole step (draws, forward, backward, Adam) in a CUDA graph."""
        t0 = time.perf_counter()
        torch.cuda.synchronize(self.device)
        self.graph = torch.cuda.CUDAGraph()
        for g in self.streams.generators:  # the identity streams advance on every replay
            self.graph.register_generator_state(g)
        self.stepper.optimizer.zero_grad(set_to_none=self.reducer is None)
        if self.reducer is None:
            with torch.cuda.graph(self.graph):
                self._step_and_log()
        else:
            # distributed: the NCCL all-reduce runs between two graphs, never inside one (distributed.py)
            update = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.reducer.pack(*self.stepper.forward_backward(self._draws()))
            with torch.cuda.graph(update):
                self.stepper.update()
                self._log_row(self.reducer.losses, self.reducer.identity_losses)
            self._graph_update = update
        torch.cuda.synchronize(self.device)
        self.timings["capture_s"] = time.perf_counter() - t0

    def step(self) -> None:
        """Run one optimisation step (eager, or a graph replay once captured)."""
        if self.finished:
            raise InputError("this session is finished (finish() handed its generator back); prepare a new one")
        if self.steps_done >= self.config.iterations:
            raise InputError(f"all {self.config.iterations} iterations are done")
        with self.plan.backend_flags():
            self._step_once()
        self.steps_done += 1
        if self.reducer is not None and self.dist.world_size > 1:
            self.reducer.check_status(self.steps_done)

    def _step_once(self) -> None:
        if self.use_graph and self.graph is None and self.steps_done >= self.config.warmup_steps:
            try:
                self._capture()
            except Exception as exc:  # e.g. an op that cannot be captured: go on eagerly, say so
                self.graph = None
                self.use_graph = False
                self.timings["graph_error"] = f"{type(exc).__name__}: {exc}"[:500]
                warnings.warn(f"CUDA graph capture failed ({self.timings['graph_error']}); continuing with eager steps")
                torch.cuda.synchronize(self.device)
        try:
            try:
                self._run_step()
            except Exception as exc:
                if not (self._compile_fallback(exc) or self._kernel_fallback(exc)):
                    raise
                self._run_step()  # the same step again, eagerly or without the kernels (fresh draws)
        except Exception as exc:
            from .distributed import DistributedError

            if self.reducer is None or isinstance(exc, DistributedError):
                raise
            self.reducer.fail(exc, self.steps_done + 1)  # every rank stops at this step, with this message

    def _run_step(self) -> None:
        if self.inductor_graphs:
            # one step = one generation of Inductor's CUDA-graph outputs (the previous step's are dead)
            torch.compiler.cudagraph_mark_step_begin()
        if self.graph is not None:
            self.graph.replay()
            if self.reducer is not None:
                self.reducer.all_reduce(f"step {self.steps_done + 1}")
                self._graph_update.replay()
        elif self.use_graph:
            # warm-up steps run on a side stream before capture, as CUDA graphs require
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                self._step_and_log()
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
        else:
            self._step_and_log()

    def compiled_modules(self) -> list:
        from ..compiled import step_modules

        return [m for _, m in step_modules(self.g_u, self.g_s, *self._loss_nets)]

    def _compile_fallback(self, exc: Exception) -> bool:
        """A step failed with compiled networks before capture (e.g. the lazily compiled backward):
        every compiled module goes back to eager, the reason is recorded, and the step is retried."""
        from ..compiled import fail_all, is_compiled

        if (not self.plan.compile or self.graph is not None or isinstance(exc, GuideFastError)
                or getattr(self, "_compile_failed", False) or not any(is_compiled(m) for m in self.compiled_modules())):
            return False
        self._compile_failed = True
        fail_all(self.compiled_modules(), exc)
        self.timings["compile_error"] = self.compile_report.error_text()
        self.optimizer_zero()
        self.synchronize()
        return True

    def _kernel_fallback(self, exc: Exception) -> bool:
        """A step failed inside the hand-written Triton kernels (the fused renderer, the skip
        path) before capture, e.g. a Triton compile error or a launch out of resources on a GPU
        they were never built on: the session goes on with the reference renderer and skip path
        (the same maths), the reason recorded in timings["kernel_error"] and warned about, and
        the step is retried. The Unlearner remembers it, so later runs in the process start
        without the kernels instead of failing once each. Out-of-memory errors are not caught here
        (the reference renderer needs more memory, not less)."""
        if (self.graph is not None or isinstance(exc, (GuideFastError, torch.OutOfMemoryError))
                or "kernel_error" in self.timings or not self.plan.uses_kernels or not raised_in_kernels(exc)):
            return False
        reason = f"{type(exc).__name__}: {exc}"[:500]
        self.timings["kernel_error"] = reason
        self.unlearner.kernel_error = reason
        self.plan = self.plan.without_kernels()
        self.stepper.plan = self.plan
        for g in (self.g_u, self.g_s):
            g.set_renderer(self.plan.renderer).set_skip_path(self.plan.skip_path)
        warnings.warn(f"the Triton kernels failed ({reason}); continuing with the reference renderer and skip path")
        self.optimizer_zero()
        self.synchronize()
        return True

    def optimizer_zero(self) -> None:
        self.stepper.optimizer.zero_grad(set_to_none=not self.stepper.static_grads)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def read_losses(self) -> list:
        """Copy the log rows written since the last read to the host; fail on a non-finite loss."""
        def non_finite(step, row):
            terms = ", ".join(f"{k}={v:.4g}" for k, v in zip(LOSS_NAMES, row))
            return UnlearnError(f"the loss became non-finite at step {step} ({terms}); no output was written")

        new = []
        for step, row in self.log.read(self.steps_done, error=non_finite):
            entry = {"step": step, **{k: v for k, v in zip(LOSS_NAMES, row)}}
            self.losses.append(entry)
            self.identity_losses.append(row[len(LOSS_NAMES):])
            new.append(entry)
        return new

    def run(self, progress: bool = False, callback=None) -> "UnlearnSession":
        """Run the remaining iterations. callback(step, session) is called after each step."""
        from tqdm.auto import tqdm

        cfg = self.config
        bar = tqdm(total=cfg.iterations, initial=self.steps_done, disable=not progress, desc="unlearning",
                   unit="step", dynamic_ncols=True)
        self.synchronize()
        t0 = time.perf_counter()
        first = None
        warm = []  # wall time of the warm-up steps (compilation happens in them)
        try:
            while self.steps_done < cfg.iterations:
                ts = time.perf_counter()
                self.step()
                if first is None or len(warm) < cfg.warmup_steps:
                    self.synchronize()
                    warm.append(time.perf_counter() - ts)
                    if first is None:
                        first = time.perf_counter() - t0
                if self.steps_done % cfg.log_every == 0 or self.steps_done == cfg.iterations or not self.use_graph:
                    new = self.read_losses()
                    if new and progress:
                        last = new[-1]
                        bar.set_postfix({k: f"{last[k]:.3f}" for k in ("total", "local", "adjacency", "global")}, refresh=False)
                bar.update(1)
                if callback is not None:
                    callback(self.steps_done, self)
            self.synchronize()
            self.read_losses()
        finally:
            bar.close()
        loop = time.perf_counter() - t0
        self.timings.update(
            loop_s=loop, iterations=cfg.iterations, first_step_s=first or 0.0,
            steady_step_ms=1e3 * (loop - (first or 0.0) - self.timings.get("capture_s", 0.0)) / max(cfg.iterations - 1, 1),
        )
        if self.plan.compile:
            # compile time, never hidden: the warm-up steps' wall time beyond as many steady steps
            # (first calls of the compiled forwards are in compile["first_call_s"])
            steady = self.timings["steady_step_ms"] / 1e3
            self.timings["compile_s"] = max(0.0, sum(warm) - len(warm) * steady)
        else:
            self.timings["compile_s"] = 0.0
        if self.device.type == "cuda":
            self.timings["peak_memory_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return self

    def finish(self, render: bool = True) -> UnlearnResult:
        self.finished = True  # the parameters change layout below: a captured graph must not replay again
        source = self.unlearner.generator
        from ..compiled import uninstall_all

        uninstall_all(self.compiled_modules())  # plain modules again (the process keeps the graphs)
        # G_u goes back to the source generator's operators and plain layouts (the delta and the
        # checkpoint store those); G_s likewise, so that before/after renders differ only by the weights.
        for g in (self.g_u, self.g_s):
            g.eval().requires_grad_(False)
            g.set_operators(**source.operators())
            if self.plan.memory_format != "contiguous":
                g.to(memory_format=torch.contiguous_format)
        g_u = self.g_u
        result = UnlearnResult(
            generator=g_u, source=self.unlearner.generator, w_source=self.w_source.detach(),
            w_target=self.w_target.detach(), config=self.config, losses=list(self.losses),
            identity_losses=list(self.identity_losses), w_avg=self.unlearner.w_avg.to_dict(),
            # the plan's fields flat (as before) and whole; cuda_graph says whether capture really ran
            timings={**self.timings, **self.plan.to_dict(), "plan": self.plan.to_dict(), "cuda_graph": self.use_graph,
                     "cached_target_planes": getattr(self.stepper, "cache_target", False),
                     "noise_passes": self.config.noise_passes if self.plan.path == "fast" else "separate",
                     "compile_mode": self.config.compile_mode if self.plan.compile else None,
                     "inductor_graphs": self.inductor_graphs, "compile": self.compile_report.to_dict(),
                     "compile_error": self.compile_report.error_text(),
                     "world_size": self.dist.world_size if self.dist is not None else 1},
        )
        if self.dist is not None:
            result.timings["distributed"] = dict(
                self.dist.describe(), identities=[self.identities.start, self.identities.stop],
                allreduce_bytes_per_step=self.reducer.bytes_per_step)
        if render:
            t0 = time.perf_counter()
            src = self.g_s
            result.renders = {
                "before": render_views(src, self.w_source, self.config),
                "after": render_views(g_u, self.w_source, self.config),
                "target": render_views(src, self.w_target, self.config),
            }
            result.timings["render_s"] = time.perf_counter() - t0
        return result


class Unlearner:
    """GUIDE unlearning for an EG3D generator (docs/guide.md §3).

    generator: the source G_s (a TriPlaneGenerator; never modified); id_loss: an
    `guide_fast.identity.IdentityLoss` (ArcFace IR-SE50 for GUIDE); lpips: a
    `guide_fast.perceptual.LPIPS` (VGG v0.1); config: an UnlearnConfig (paper defaults);
    plan: an ExecutionPlan on the generator's device (default: resolved from the config's engine
    fields, `UnlearnConfig.execution_plan`). A given plan replaces those fields of the config, so
    the report's config and plan agree.
    """

    session_class = UnlearnSession  # what prepare() builds (distributed.prepare_sharded too)

    def __init__(self, generator: "TriPlaneGenerator", id_loss: "IdentityLoss", lpips: "LPIPS",
                 config: UnlearnConfig | None = None, process_group: "dist.ProcessGroup | None" = None, *,
                 plan: ExecutionPlan | None = None,
                 w_avg: "str | os.PathLike | torch.Tensor | AverageLatent | None" = None):
        """w_avg: the average latent of the UFO target and of the photo inversion: a file
        (GUIDE's w_avg_ffhqrebalanced512-128.pt, [14, 512]), a tensor, or None for the mapping
        network's buffer (guide_fast.inversion.resolve_w_avg); result.w_avg says which.
        process_group: None = shard the identities over torch.distributed's default group
        when it is initialised (a service with its own launcher, or torchrun), else run in this
        process; False = never shard; a ProcessGroup = shard over that group. Sharded, every
        rank calls unlearn() with the same config; rank 0's generator, loss networks and
        identities (seeds, latents or photos: rank 0's are used) are broadcast, every rank
        returns the same result, and only rank 0 should save it (result.timings["distributed"]
        ["rank"]). See guide_fast.unlearn.distributed."""
        from ..eg3d.generator import TriPlaneGenerator

        if not isinstance(generator, TriPlaneGenerator):
            raise InputError(f"generator must be a TriPlaneGenerator (see load_generator), got {type(generator).__name__}")
        # the loss networks run as modules (.to/.eval/.requires_grad_) only once a run starts: a
        # wrong argument is named here rather than failing there as an AttributeError
        for name, net, kind in (("id_loss", id_loss, "guide_fast.identity.IdentityLoss"),
                                ("lpips", lpips, "guide_fast.perceptual.LPIPS")):
            if not isinstance(net, torch.nn.Module):
                raise InputError(f"{name} must be a torch.nn.Module (e.g. a {kind}), got {type(net).__name__}")
        if config is not None and not isinstance(config, UnlearnConfig):
            raise InputError(f"config must be an UnlearnConfig (a dict: UnlearnConfig.from_dict(d)), "
                             f"got {type(config).__name__}")
        self.generator = generator
        self.id_loss = id_loss
        self.lpips = lpips
        self.config = config if config is not None else UnlearnConfig()
        self.config.validate()
        self.process_group = process_group
        from ..inversion.average import resolve_w_avg

        self.w_avg = resolve_w_avg(w_avg, generator)
        self.kernel_error: str | None = None  # set when a run's Triton kernels failed (UnlearnSession)
        self.plan = None
        if plan is not None:
            if not isinstance(plan, ExecutionPlan):
                raise InputError(f"plan must be an ExecutionPlan, got {type(plan).__name__}")
            device = next(generator.parameters()).device
            if plan.device != device:
                raise InputError(f"the plan is for {plan.device} but the generator is on {device}; "
                                 f"resolve the plan for the generator's device")
            self.config = self.config.with_plan(plan)
            self.plan = plan

    def execution_plan(self) -> ExecutionPlan:
        """The plan runs use: the given one, else resolved from the config for the generator's device;
        without the Triton kernels once they have failed in this process (kernel_error)."""
        plan = self.plan if self.plan is not None else self.config.execution_plan(next(self.generator.parameters()).device)
        return plan.without_kernels() if self.kernel_error is not None else plan

    def _dist(self):
        from .distributed import resolve_group

        return resolve_group(self.process_group)

    def _resolve_latents(self, latents=None, seeds=None, images=None, **invert_kwargs):
        given = [x is not None for x in (latents, seeds, images)]
        if sum(given) != 1:
            raise InputError("give exactly one of latents=, seeds= or images=")
        gen = self.generator
        inversion = None
        if seeds is not None:
            w = latents_from_seeds(gen, seeds, self.config.truncation_psi, self.config.fov_degrees, self.config.lookat,
                                   self.config.radius)
        elif images is not None:
            from ..inversion import invert_images

            invert_kwargs.setdefault("w_avg", self.w_avg)
            inversion = invert_images(gen, images, id_loss=self.id_loss, lpips=self.lpips, **invert_kwargs)
            w = torch.cat([r.w_plus for r in inversion])
        else:
            w = gen.as_latents(latents, "latents")
        return w.detach().to(next(gen.parameters()).device, torch.float32), inversion

    def _split_photos(self, latents, seeds, images, target_index, invert_kwargs):
        """GUIDE's out-of-domain protocol: every photo inverted together (one GOAE batch), the
        target_index-th is the identity to forget, the others become w_others (ID_others)."""
        from ..inversion import invert_images

        if images is None or latents is not None or seeds is not None:
            raise InputError("target_index picks one of the images= photos; give images= (a folder or a list of "
                             "photos of one person) and neither latents= nor seeds=")
        if isinstance(target_index, bool) or not isinstance(target_index, int) or target_index < 0:
            raise InputError(f"target_index must be an integer >= 0, got {target_index!r}")
        invert_kwargs.setdefault("w_avg", self.w_avg)
        results = invert_images(self.generator, images, id_loss=self.id_loss, lpips=self.lpips, **invert_kwargs)
        if target_index >= len(results):
            raise InputError(f"target_index {target_index} is out of range: {len(results)} photo(s) given")
        rest = results[:target_index] + results[target_index + 1:]
        w_others = torch.cat([r.w_plus for r in rest]) if rest else None
        return results[target_index].w_plus, [results[target_index]], w_others

    def prepare(self, latents: torch.Tensor | None = None, seeds: "int | list[int] | None" = None,
                images: "PhotoSource | Sequence[PhotoSource] | None" = None, target_index: int | None = None,
                **invert_kwargs) -> UnlearnSession:
        """A session ready to step. target_index (with images=): see _split_photos."""
        split = None
        if target_index is not None:
            latents, *split = self._split_photos(latents, seeds, images, target_index, invert_kwargs)
            images = None
        ctx = self._dist()
        if ctx is not None:
            from .distributed import prepare_sharded

            session = prepare_sharded(self, ctx, latents, seeds, images, invert_kwargs)
        else:
            w, inversion = self._resolve_latents(latents, seeds, images, **invert_kwargs)
            session = UnlearnSession(self, w)
            session.inversion = inversion
        if split is not None and session is not None:
            session.inversion, session.w_others = split
        return session

    def unlearn(self, latents: torch.Tensor | None = None, seeds: "int | list[int] | None" = None,
                images: "PhotoSource | Sequence[PhotoSource] | None" = None, progress: bool = False,
                render: bool = True, callback: "Callable[[int, UnlearnSession], object] | None" = None,
                target_index: int | None = None, **invert_kwargs) -> UnlearnResult:
        """Unlearn N identities at once (W+ latents [N, num_ws, w_dim], seeds, or photos).

        images= takes photos or a folder; the remaining keywords go to
        `guide_fast.inversion.invert_images` (e.g. encoder="encoder_FFHQ.pt" for GUIDE's GOAE
        inversion, steps=N to refine it). target_index=K: the photos are of one person, the K-th
        is forgotten and the others are kept as result.w_others (GUIDE's out-of-domain protocol)."""
        cfg = self.config
        devices = [next(self.generator.parameters()).device]
        cuda_devices = [d for d in devices if d.type == "cuda"]
        rng = torch.random.fork_rng(devices=cuda_devices) if cfg.seed is not None else contextlib.nullcontext()
        t0 = time.perf_counter()
        with rng:
            if cfg.seed is not None:
                torch.manual_seed(cfg.seed)
            if images is not None:
                invert_kwargs.setdefault("progress", progress)
            session = self.prepare(latents, seeds, images, target_index=target_index, **invert_kwargs)
            if session.dist is None:
                session.run(progress=progress, callback=callback)
                result = session.finish(render=render)
            else:
                from .distributed import run_sharded

                result = run_sharded(session, progress, callback, render)
        result.inversion = getattr(session, "inversion", None)
        if result.w_others is None:
            result.w_others = getattr(session, "w_others", None)
        result.timings["total_s"] = time.perf_counter() - t0
        return result
