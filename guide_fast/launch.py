"""`torchrun` for guide-fast: torch's own launcher, with a failed job reported in one line.

torch's `torchrun` ends a job whose rank failed by raising `ChildFailedError` out of its
`main`, which prints a Python traceback and a 30-line failure table after the rank's own
one-line error. Here the rank's message (printed by the rank itself) stays the explanation, and
the launcher adds one line naming the ranks that failed and their exit codes, then exits with
the first failure's exit code. A launcher stopped by a signal (Ctrl-C: every rank prints its
own line) exits 128 + the signal's number in one line, and launcher arguments torch would refuse
with a traceback (--nproc-per-node 0, --nnodes 2:1) are refused in one line, exit 2, as argparse
refuses the others. Everything else is `torch.distributed.run` unchanged: same arguments, same
rendezvous, same environment for the ranks (README, "Past one GPU").
"""
from __future__ import annotations

import logging
import sys


def _how(failure) -> str:
    """A rank's end in words: its exit code, or the signal that stopped it (the agent stops the
    others with SIGTERM once one has failed)."""
    if isinstance(failure.exitcode, int) and failure.exitcode < 0:
        return f"stopped by {failure.signal_name()}"
    return f"exit code {failure.exitcode}"


def _positive_int(text: str) -> bool:
    return text.strip().isdigit() and int(text) >= 1


def argument_error(args) -> str | None:
    """What is wrong with torchrun's parsed arguments, naming the argument, or None. torch checks
    these deep in its launcher (an AssertionError or ValueError with a 25-line traceback)."""
    import torch

    nproc = args.nproc_per_node
    if not (_positive_int(nproc) or nproc in ("auto", "cpu", "gpu", "xpu")):
        return f"--nproc-per-node must be an integer >= 1, 'auto', 'cpu' or 'gpu', got {nproc!r}"
    if nproc == "gpu" and not torch.cuda.is_available():
        return "--nproc-per-node gpu needs CUDA, and torch.cuda.is_available() is False on this machine"
    nodes = args.nnodes.split(":")
    if len(nodes) > 2 or not all(_positive_int(n) for n in nodes) or int(nodes[0]) > int(nodes[-1]):
        return f"--nnodes must be N or MIN:MAX with 1 <= MIN <= MAX, got {args.nnodes!r}"
    if args.max_restarts < 0:
        return f"--max-restarts must be >= 0, got {args.max_restarts}"
    if args.node_rank < 0:
        return f"--node-rank must be >= 0, got {args.node_rank}"
    return None


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main
    from torch.distributed.run import parse_args

    # checked before torchrun's own main, which parses them again (its argparse errors are
    # already one line and exit 2)
    problem = argument_error(parse_args(sys.argv[1:] if argv is None else argv))
    if problem is not None:
        print(f"torchrun: {problem}", file=sys.stderr)
        return 2
    # the agent logs "failed (exitcode: N) local_rank: ..." before raising: the line below says it
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    # and "Received 2 death signal, shutting down workers" before a SignalException: likewise
    logging.getLogger("torch.distributed.elastic.agent.server.api").addFilter(
        lambda record: "death signal" not in record.getMessage())
    try:
        torchrun_main(argv)
    except SignalException as exc:
        # Ctrl-C reaches the ranks too, and each printed its own line; the agent has stopped them
        print(f"torchrun: stopped by {exc.sigval.name}; the ranks were shut down", file=sys.stderr)
        return 128 + int(exc.sigval)
    except KeyboardInterrupt:  # a Ctrl-C before the agent installed its signal handlers
        print("torchrun: interrupted", file=sys.stderr)
        return 130
    except ChildFailedError as exc:
        first_rank, first = exc.get_first_failure()
        ranks = ", ".join(f"rank {rank} ({_how(failure)})" for rank, failure in sorted(exc.failures.items()))
        print(f"torchrun: {exc.name} failed: {ranks}; rank {first_rank} failed first and its message is above",
              file=sys.stderr)
        return first.exitcode if isinstance(first.exitcode, int) and first.exitcode > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
