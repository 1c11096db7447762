"""`torchrun` for guide-fast: torch's own launcher, with a failed job reported in one line.

torch's `torchrun` ends a job whose rank failed by raising `ChildFailedError` out of its
`main`, which prints a Python traceback and a 30-line failure table after the rank's own
one-line error. Here the rank's message (printed by the rank itself) stays the explanation, and
the launcher adds one line naming the ranks that failed and their exit codes, then exits with
the first failure's exit code. Everything else is `torch.distributed.run` unchanged: same
arguments, same rendezvous, same environment for the ranks (README, "Past one GPU").
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


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    # the agent logs "failed (exitcode: N) local_rank: ..." before raising: the line below says it
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        torchrun_main(argv)
    except ChildFailedError as exc:
        first_rank, first = exc.get_first_failure()
        ranks = ", ".join(f"rank {rank} ({_how(failure)})" for rank, failure in sorted(exc.failures.items()))
        print(f"torchrun: {exc.name} failed: {ranks}; rank {first_rank} failed first and its message is above",
              file=sys.stderr)
        return first.exitcode if isinstance(first.exitcode, int) and first.exitcode > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
