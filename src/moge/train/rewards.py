"""Reward functions for GRPO: plain functions `reward(completion, ids, item) -> float`, chosen by name
or by `module:function` and weighted (`--reward correct=1 --reward format=0.2`).

`completion` is the decoded answer (without the stop token), `ids` its token ids (with the stop
token when generation stopped), `item` the prompt's JSONL object (its `answer` for the checker).
Shipped: the task's exact correctness checker, a format validator and a hash-based repetition
penalty.
"""

from __future__ import annotations

import importlib
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from moge.errors import ConfigError
from moge.train.tasks import check_answer, well_formed

RewardFn = Callable[[str, Sequence[int], dict], float]


def correct(completion: str, ids: Sequence[int], item: dict) -> float:
    """1 when the final "answer" equals the item's `answer`, else 0."""
    return 1.0 if check_answer(completion, item["answer"]) else 0.0


def format_ok(completion: str, ids: Sequence[int], item: dict) -> float:
    """1 when the completion has the worked format (column steps, then the answer), else 0."""
    return 1.0 if well_formed(completion) else 0.0


def repetition(completion: str, ids: Sequence[int], item: dict, n: int = 4, threshold: float = 0.5) -> float:
    """Minus the share of token n-grams whose hash was already seen earlier in the completion, when
    that share exceeds `threshold` (a loop), else 0. Hashing keeps it O(length) with no n-gram
    table. The threshold leaves the worked format alone: its column steps repeat a few n-grams
    (at most about 0.3 of them), and a penalty there would only add noise that breaks the ties
    the zero-advantage mask looks for."""
    ids = list(ids)
    if len(ids) <= n:
        return 0.0
    seen: set[int] = set()
    repeats = 0
    for i in range(len(ids) - n + 1):
        h = zlib.crc32(bytes(str(ids[i:i + n]), "ascii"))
        repeats += h in seen
        seen.add(h)
    share = repeats / (len(ids) - n + 1)
    return -share if share > threshold else 0.0


REWARDS: dict[str, RewardFn] = {"correct": correct, "format": format_ok, "repetition": repetition}


@dataclass(frozen=True)
class Reward:
    name: str
    fn: RewardFn
    weight: float


def resolve(spec: str) -> Reward:
    """`NAME[=WEIGHT]` where NAME is a shipped reward or `package.module:function`."""
    name, _, weight = spec.partition("=")
    try:
        w = float(weight) if weight else 1.0
    except ValueError:
        raise ConfigError(f"reward {spec!r}: weight {weight!r} is not a number") from None
    if name in REWARDS:
        return Reward(name, REWARDS[name], w)
    module, sep, attr = name.partition(":")
    if not sep:
        raise ConfigError(f"reward {name!r} is unknown: shipped rewards are {', '.join(REWARDS)}, or give "
                          f"package.module:function")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"reward {name!r} cannot be loaded: {e}") from None
    if not callable(fn):
        raise ConfigError(f"reward {name!r} is not callable")
    return Reward(name, fn, w)
