"""The `moge` command. Each subcommand lives with the code it drives and registers itself here."""

from __future__ import annotations

import argparse
import importlib
import sys

from moge.errors import MogeError

# module path -> it defines `register(subparsers)` adding one or more subcommands
COMMAND_MODULES = [
    "moge.commands.imbalance",
    "moge.commands.model",
    "moge.commands.train",
    "moge.commands.posttrain",
    "moge.commands.quickstart",
    "moge.commands.bench_ep",
    "moge.commands.quant",
    "moge.commands.serve",
    "moge.data.cli",
    "moge.sim.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moge",
        description="Mixture of Grouped Experts (MoGE) and Pangu Pro MoE: routing studies, "
                    "models, training and deployment simulation.")
    from moge import __version__

    parser.add_argument("--version", action="version", version=f"moge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MogeError as e:  # caused by the input: one line, like argparse's own errors
        print(f"moge {args.command}: error: {e}", file=sys.stderr)
        return 2
    # anything else is a bug: its traceback propagates (exit code 1)


if __name__ == "__main__":
    sys.exit(main())
