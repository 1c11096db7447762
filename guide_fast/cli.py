"""The `guide-fast` command. Each area registers its subcommands from guide_fast.commands.*;
heavy imports happen inside the handlers so `guide-fast --help` stays fast."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
import threading

from .errors import GuideFastError, printable

COMMAND_MODULES = [
    "guide_fast.commands.generator",
    "guide_fast.commands.unlearn",
    "guide_fast.commands.identity",
    "guide_fast.commands.evaluate",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="guide-fast",
        description="GUIDE identity unlearning for EG3D: make a 3D face generator forget one person.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `kill`, `timeout`, docker and batch schedulers send), raised where the
    process is, like Ctrl-C: every `finally` runs, so staged output is removed, not left behind."""


@contextlib.contextmanager
def _sigterm_unwinds():
    """SIGTERM raises Terminated for the duration of a command, where its default would kill the
    process on the spot with a half-written stage on disk. Only from the main thread, and only
    over the default handler: a service embedding guide-fast keeps its own."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main(argv=None) -> int:
    """Run the command; returns the exit code: 0 done, 1 `weights` found an invalid file, 2 bad
    input (one line on stderr, and no output written), 130 interrupted (Ctrl-C), 143 terminated
    (SIGTERM). Usage errors from argparse return its code (2) too."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed by argparse
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    try:
        with _sigterm_unwinds():
            return int(args.func(args) or 0)
    except GuideFastError as exc:
        print(f"guide-fast {args.command}: error: {printable(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file-system failure the checks did not foresee: still one line
        where = f" {exc.filename}" if exc.filename else ""
        print(f"guide-fast {args.command}: error:{printable(where)} {printable(exc.strerror or exc)}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"guide-fast {args.command}: terminated (SIGTERM); no partial output was kept", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"guide-fast {args.command}: interrupted; no partial output was kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
