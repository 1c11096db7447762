"""The `guide-fast` command. Each area registers its subcommands from guide_fast.commands.*;
heavy imports happen inside the handlers so `guide-fast --help` stays fast."""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import GuideFastError

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


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except GuideFastError as exc:
        print(f"guide-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"guide-fast {args.command}: interrupted; no partial output was kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
