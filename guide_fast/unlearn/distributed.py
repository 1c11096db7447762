"""Identities sharded across processes with torch.distributed (NCCL between GPUs, gloo on CPUs).

N-identity GUIDE minimises the sum of N independent per-identity losses with one Adam step
(docs/guide.md §3.5), so it splits exactly: each rank takes a contiguous block of the
identities (sizes differ by at most one; N < K ranks is refused, see `shard`), computes its
identities' losses and gradients with the same step as one process (passes, bf16, CUDA-graph
capture), the trainable gradients are summed over the ranks by ONE all-reduce of one flat fp32
buffer, and every rank takes the same Adam step on the same sum, so the weights stay identical on
every rank without being sent again.

What makes the result independent of K: every random number of identity i comes from a stream
seeded by (run seed, i) (guide_fast.unlearn.streams), never by the rank, so a K-rank run equals
the one-process run of the same N identities up to the summation order of the fp32 gradients.

Where the all-reduce sits: outside the captured CUDA graph. A distributed graph step is two graphs
(draws, forward, backward and packing into the flat buffer | Adam and the loss log) with the
NCCL all-reduce between them, eager: nothing of NCCL is captured, and a replay costs one more
graph launch (microseconds). Bucketing or overlapping the all-reduce with the backward is not
possible with a captured backward, and with gradients of one step (~100 MB for FFHQ) one flat
all-reduce is the fewest messages (benchmarks/bench_distributed.py measures both).

The flat buffer also carries the step's 4 loss values, the N per-identity losses (each rank writes
its identities' slots) and one status slot per rank: one collective per step gives every rank the
whole run's losses, and a rank whose step raised (it contributes zeros and its status slot) makes
every rank stop at that step with the failing rank's message. Every other phase (inputs, set-up,
the end of the run, the saving on rank 0) ends with `agree`, an all-reduce of one status flag per
rank, so no rank goes on alone and nothing is committed unless every rank succeeded. Collectives
wait at most the process group's timeout (`init_from_env(timeout_s=...)`).

Rank 0 loads and broadcasts: the starting weights of both generator copies and of the loss
networks, and the W+ latents (seeds, latents files and photos are resolved on rank 0 only), so
the other ranks need only the architecture. Rank 0 alone renders and writes the outputs.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import GuideFastError, InputError

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT_S = 600.0


class DistributedError(GuideFastError):
    """A rank of a distributed run failed, or contact between the ranks was lost. Every rank
    raises it with the same message; `lost_contact` is True where this rank may be the only one
    left to tell (the CLI then prints it on every rank, else on rank 0 only)."""

    def __init__(self, message: str, lost_contact: bool = False):
        super().__init__(message)
        self.lost_contact = lost_contact


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, GuideFastError):
        text = f"{type(exc).__name__}: {text}"
    return text[:400]


@dataclass
class DistContext:
    """The process group a run is sharded over, and this process's place in it."""

    group: object
    rank: int
    world_size: int
    backend: str
    device: torch.device  # where the collectives' tensors live (cuda for NCCL, cpu for gloo)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def src(self) -> int:
        """The global rank of this group's rank 0 (the source of every broadcast)."""
        return dist.get_global_rank(self.group, 0) if self.group is not None else 0

    def describe(self) -> dict:
        return {"world_size": self.world_size, "rank": self.rank, "backend": self.backend}

    # ------------------------------------------------------------------ agreement
    def _lost(self, what: str, exc: BaseException) -> DistributedError:
        return DistributedError(f"lost contact with the other ranks while {what} ({_one_line(exc)}); "
                                f"no output was written", lost_contact=True)

    def _collective(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except GuideFastError:
            raise
        except Exception as exc:  # a dead peer, a timeout: the backend's error, as one line
            raise self._lost(what, exc) from exc

    def agree(self, error: BaseException | None, what: str) -> None:
        """Every rank calls this at the same point; it returns on every rank if no rank failed,
        and raises the same DistributedError on every rank (naming the first failed rank and
        its message) if any did."""
        flags = torch.zeros(self.world_size, device=self.device)
        if error is not None:
            flags[self.rank] = 1
        self._collective(what, dist.all_reduce, flags, group=self.group)
        failed = [r for r, f in enumerate(flags.tolist()) if f]
        if failed:
            self._raise_failure(failed, error, what)

    def _raise_failure(self, failed: list, error: BaseException | None, what: str):
        messages = [None] * self.world_size
        self._collective(what, dist.all_gather_object, messages, _one_line(error) if error is not None else None,
                         group=self.group)
        first = failed[0]
        more = f" (ranks {', '.join(map(str, failed))} failed)" if len(failed) > 1 else ""
        exc = DistributedError(f"rank {first} of {self.world_size} failed while {what}: {messages[first]}{more}; "
                               f"no output was written")
        raise exc from error

    @contextlib.contextmanager
    def phase(self, what: str):
        """Run a block on every rank; if it raised on any rank, every rank raises (see agree)."""
        error = None
        try:
            yield
        except DistributedError:
            raise  # already agreed on (or contact lost)
        except Exception as exc:
            error = exc
        self.agree(error, what)

    # ------------------------------------------------------------------ broadcasts
    def broadcast_object(self, obj, what: str):
        box = [obj if self.is_main else None]
        kwargs = {"device": self.device} if self.backend == "nccl" else {}
        self._collective(what, dist.broadcast_object_list, box, src=self.src, group=self.group, **kwargs)
        return box[0]

    def broadcast_tensors(self, tensors: list, what: str) -> None:
        """Rank 0's values into `tensors` on every rank, in place: one broadcast per dtype of a
        flat copy (not one per tensor: a generator has hundreds)."""
        by_dtype: dict = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for dtype, group in by_dtype.items():
            flat = torch.cat([t.detach().reshape(-1).to(self.device) for t in group]) if group else None
            self._collective(what, dist.broadcast, flat, src=self.src, group=self.group)
            offset = 0
            with torch.no_grad():
                for t in group:
                    n = t.numel()
                    t.copy_(flat[offset:offset + n].view(t.shape).to(t.device))
                    offset += n

    def broadcast_module(self, module: torch.nn.Module, what: str) -> None:
        """Every parameter and buffer of rank 0's module into this rank's (same architecture)."""
        tensors = [t for t in module.state_dict(keep_vars=True).values() if torch.is_tensor(t) and t.numel()]
        self.broadcast_tensors([t.data if isinstance(t, torch.nn.Parameter) else t for t in tensors], what)

    def broadcast_latents(self, w: torch.Tensor | None, device) -> torch.Tensor:
        """Rank 0's W+ latents [N, num_ws, w_dim] on every rank (the others pass None)."""
        shape = self.broadcast_object(tuple(w.shape) if self.is_main else None, "sharing the latents")
        out = w.to(self.device, torch.float32).contiguous() if self.is_main else torch.empty(shape, device=self.device)
        self._collective("sharing the latents", dist.broadcast, out, src=self.src, group=self.group)
        return out.to(device)


def resolve_group(process_group=None, device=None) -> DistContext | None:
    """The process group an `Unlearner` shards over: None = the default group when
    torch.distributed is initialised (any world size), else no sharding; False = never shard;
    a ProcessGroup = that group."""
    if process_group is False:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise InputError("process_group was given but torch.distributed is not initialised "
                             "(call torch.distributed.init_process_group first, or use torchrun)")
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        comm = torch.device("cuda", torch.cuda.current_device())
        backend = "nccl"
    else:
        comm = torch.device("cpu")
    return DistContext(group, dist.get_rank(group), dist.get_world_size(group), backend, comm)


def shard(n: int, world_size: int, rank: int) -> range:
    """Rank `rank`'s identities: contiguous blocks whose sizes differ by at most one (the first
    N mod K ranks take one more). Every rank needs at least one identity: N < K is refused
    (an idle rank would only add a member to every all-reduce)."""
    if n < world_size:
        raise InputError(f"{n} identit{'y' if n == 1 else 'ies'} for {world_size} ranks: each rank needs at least one "
                         f"identity; launch at most {n} process{'' if n == 1 else 'es'} (torchrun --nproc_per_node) "
                         f"or unlearn more identities at once")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def torchrun_environment() -> bool:
    """True inside a process started by torchrun (or any launcher setting its variables)."""
    return all(v in os.environ for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def init_from_env(device: torch.device | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[DistContext, torch.device]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT): NCCL with cuda:LOCAL_RANK when the run is on CUDA, gloo on the CPU.
    -> (context, this rank's device)."""
    missing = [v for v in TORCHRUN_VARIABLES if not os.environ.get(v)]
    if missing:
        raise InputError(f"--distributed needs torchrun's environment but {', '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} not set; launch with "
                         f"`torchrun --nproc_per_node K -m guide_fast unlearn ...`")
    try:
        local_rank = int(os.environ["LOCAL_RANK"])
        rank, world_size, port = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["MASTER_PORT"])
    except ValueError:
        raise InputError("RANK, WORLD_SIZE, LOCAL_RANK and MASTER_PORT must be integers "
                         f"(got {[os.environ.get(v) for v in TORCHRUN_VARIABLES]})") from None
    # checked here: torch.distributed would report these after a ~40-line C++ stack dump, or wait
    # for ranks that can never join
    if world_size < 1 or not 0 <= rank < world_size:
        raise InputError(f"torchrun's environment needs WORLD_SIZE >= 1 and 0 <= RANK < WORLD_SIZE, "
                         f"got RANK={rank} WORLD_SIZE={world_size}")
    if local_rank < 0:
        raise InputError(f"torchrun's environment needs LOCAL_RANK >= 0, got LOCAL_RANK={local_rank}")
    if not 1 <= port <= 65535:
        raise InputError(f"MASTER_PORT must be a TCP port in 1..65535, got {port}")
    if not (0 < timeout_s < float("inf")):
        raise InputError(f"the distributed timeout must be > 0 seconds, got {timeout_s}")
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if device.index is not None and device.index != local_rank:
            raise InputError(f"--device {device}: under torchrun each process uses cuda:LOCAL_RANK "
                             f"(this one cuda:{local_rank}); give --device cuda")
        if local_rank >= count:
            raise InputError(f"LOCAL_RANK {local_rank} but only {count} CUDA device(s) are visible; "
                             f"launch at most {count} processes per machine")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        try:
            kwargs = {"device_id": device} if backend == "nccl" else {}
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
        except Exception as exc:
            raise DistributedError(f"could not join the process group ({backend}, "
                                   f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}): "
                                   f"{_one_line(exc)}", lost_contact=True) from exc
    return resolve_group(None), device


class GradientReducer:
    """The trainable gradients as views of one flat fp32 buffer, followed by the step's
    losses [4], the per-identity losses [N] and one status slot per rank; `all_reduce` sums
    the whole buffer over the ranks in one collective (or in `bucket_mb` pieces)."""

    def __init__(self, ctx: DistContext, params: list, n_total: int, identities: range, bucket_mb: float = 0.0):
        self.ctx = ctx
        device = params[0].device
        self.numel = sum(p.numel() for p in params)
        self.n_total = n_total
        size = self.numel + 4 + n_total + ctx.world_size
        self.flat = torch.zeros(size, device=device, dtype=torch.float32)
        offset = 0
        for p in params:
            if p.dtype != torch.float32:
                raise InputError(f"trainable parameters must be fp32 master weights, got {p.dtype}")
            # the gradient keeps the parameter's strides (channels_last weights), packed densely
            p.grad = self.flat.as_strided(p.shape, p.stride(), offset)
            offset += p.numel()
        self.params = params
        a = self.numel
        self.losses = self.flat[a:a + 4]
        self.identity_losses = self.flat[a + 4:a + 4 + n_total]
        self.status = self.flat[a + 4 + n_total:]
        self.local_index = torch.tensor(list(identities), dtype=torch.long, device=device)
        self.bucket_elems = int(bucket_mb * 2 ** 20 / 4) if bucket_mb > 0 else 0
        self.bytes_per_step = size * 4
        self._checked = False

    def check_attached(self) -> None:
        """The gradients must still be the flat buffer's views (nothing set them to None)."""
        for p in self.params:
            if p.grad is None or p.grad.untyped_storage().data_ptr() != self.flat.untyped_storage().data_ptr():
                raise RuntimeError("a trainable gradient was detached from the flat all-reduce buffer")

    def pack(self, values: torch.Tensor, per_id: torch.Tensor) -> None:
        """This rank's losses into the buffer (device ops only: capture-safe)."""
        self.losses.copy_(values.float())
        self.identity_losses.zero_()
        self.identity_losses.index_copy_(0, self.local_index, per_id.float())
        self.status.zero_()

    def all_reduce(self, what: str = "summing the gradients") -> None:
        flat, ctx = self.flat, self.ctx
        if self.bucket_elems and self.bucket_elems < flat.numel():
            works = [dist.all_reduce(flat[i:i + self.bucket_elems], group=ctx.group, async_op=True)
                     for i in range(0, flat.numel(), self.bucket_elems)]
            for w in works:
                ctx._collective(what, w.wait)
        else:
            ctx._collective(what, dist.all_reduce, flat, group=ctx.group)

    def hook(self, values: torch.Tensor, per_id: torch.Tensor):
        """steps' gradient_hook (the eager step): pack, sum over the ranks, hand back the totals."""
        if not self._checked:  # the first backward must have accumulated into the flat buffer
            self.check_attached()
            self._checked = True
        self.pack(values, per_id)
        self.all_reduce()
        return self.losses.clone(), self.identity_losses.clone()

    def fail(self, error: BaseException, step: int) -> None:
        """This rank's step raised: join the step's all-reduce with zeros and its status slot,
        then fail on every rank together (check_status on the others)."""
        with torch.no_grad():
            self.flat.zero_()
            self.status[self.ctx.rank] = 1
        self.all_reduce(f"step {step}")
        self.check_status(step, error)
        raise error  # not reached: check_status raised

    def check_status(self, step: int, error: BaseException | None = None) -> None:
        """After a step's all-reduce (a host read): stop every rank if any rank's step failed."""
        status = self.status.tolist()
        failed = [r for r, f in enumerate(status) if f]
        if failed:
            self.ctx._raise_failure(failed, error, f"running step {step}")


def weights_agree(ctx: DistContext, params: list) -> bool:
    """Whether every rank holds the same trainable weights (they should: same sums, same Adam)."""
    with torch.no_grad():
        s = torch.stack([sum(p.double().sum() for p in params), sum(p.double().square().sum() for p in params)])
        s = s.to(ctx.device)
        hi, lo = s.clone(), s.clone()
        ctx._collective("comparing the weights", dist.all_reduce, hi, op=dist.ReduceOp.MAX, group=ctx.group)
        ctx._collective("comparing the weights", dist.all_reduce, lo, op=dist.ReduceOp.MIN, group=ctx.group)
        return bool(torch.equal(hi, lo))


def gradient_bytes(trainable_numel: int, n_identities: int, world_size: int) -> int:
    """Bytes all-reduced per step: fp32 gradients + 4 losses + N per-identity losses + K status slots."""
    return 4 * (trainable_numel + 4 + n_identities + world_size)


def prepare_sharded(unlearner, ctx: DistContext, latents=None, seeds=None, images=None, invert_kwargs=None):
    """Unlearner.prepare inside a process group: rank 0 resolves the identities (seeds, a
    latents tensor or photos; the other ranks' arguments are ignored) and broadcasts the W+
    latents; every rank then builds its session over its shard (engine.UnlearnSession, reached
    through the Unlearner so that this module does not import the engine that imports it)."""
    UnlearnSession = unlearner.session_class

    device = next(unlearner.generator.parameters()).device
    w = inversion = None
    with ctx.phase("resolving the identities"):
        if ctx.backend == "nccl" and device != ctx.device:
            raise InputError(f"the generator is on {device} but this rank's NCCL device is {ctx.device}: "
                             f"put each rank's generator on its own GPU (cuda:LOCAL_RANK)")
        if ctx.is_main:
            w, inversion = unlearner._resolve_latents(latents, seeds, images, **(invert_kwargs or {}))
            shard(w.shape[0], ctx.world_size, 0)  # N < K: refused here, before any work
    w = ctx.broadcast_latents(w, device)
    session = None
    with ctx.phase("setting up the run"):
        session = UnlearnSession(unlearner, w, dist=ctx)
        session.inversion = inversion
    return session


def run_sharded(session, progress: bool = False, callback=None, render: bool = True):
    """UnlearnSession.run + finish for a sharded session: progress and renders on rank 0; every
    rank ends together (or fails together) before any rank returns a result."""
    ctx = session.dist
    session.run(progress=progress and ctx.is_main, callback=callback)
    agree = weights_agree(ctx, session.stepper.params)
    result = None
    with ctx.phase("finishing the run"):
        result = session.finish(render=render and ctx.is_main)
    result.timings["distributed"]["ranks_agree"] = agree
    if not agree:
        import warnings

        warnings.warn("the ranks' trainable weights differ after the run (a non-deterministic kernel?); "
                      "rank 0's generator is the result")
    return result
