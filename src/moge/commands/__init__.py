"""CLI subcommands that are not owned by a deeper package, and argument types they share."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def list_argument(convert: Callable[[str], float], valid: Callable[[float], bool], requirement: str):
    """An argparse `type` for comma-separated values: each converted, each checked by `valid`;
    errors quote the text and say what is required."""
    def parse(text: str) -> tuple:
        try:
            values = tuple(convert(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of "
                                             f"{'integers' if convert is int else 'numbers'}") from None
        if not values or not all(valid(v) for v in values):
            raise argparse.ArgumentTypeError(f"{text!r}: {requirement}")
        return values
    return parse
