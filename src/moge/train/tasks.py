"""A verifiable task family generated locally: multi-digit addition with a worked chain of thought,
plus digit reversal as the non-reasoning chat data (answer only).

Digits are written with spaces between them ("4 7 + 3 8 5") so that a byte-level BPE tokenizer
trained on ordinary text gives one token per digit. The worked answer adds column by column from
the right with the carry, then states the sum:

    user:      4 7 + 3 8 5
    assistant: 7 + 5 + 0 = 1 2, 4 + 8 + 1 = 1 3, 0 + 3 + 1 = 4, answer 4 3 2

`check_answer` is exact: the text after the last "answer" must be the sum's digits. `make_task`
writes the SFT files (reasoning and non-reasoning), the RL prompts, the held-out problems (no
(a, b) pair of them appears anywhere else) and a copy of a prepared corpus with an extra `arith`
domain holding the task's text, for pretraining on "the corpus plus the task's text".
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from moge.errors import ConfigError
from moge.inference.tokenizer import Tokenizer, chat_prompt, load_tokenizer
from moge.io import atomic_write_text

DOMAIN = "arith"
_ANSWER = re.compile(r"answer((?: \d)+)\s*$")
_STEP = r"\d \+ \d \+ [01] = (?:1 )?\d"
_FORMAT = re.compile(rf"^{_STEP}(?:, {_STEP})*, answer(?: \d)+$")


def spaced(n: int) -> str:
    return " ".join(str(n))


def question(a: int, b: int) -> str:
    return f"{spaced(a)} + {spaced(b)}"


def worked_answer(a: int, b: int) -> str:
    """The column-by-column chain of thought and the sum."""
    da, db = str(a)[::-1], str(b)[::-1]
    carry, steps = 0, []
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        steps.append(f"{x} + {y} + {carry} = {spaced(s)}")
        carry = s // 10
    return ", ".join(steps) + f", answer {spaced(a + b)}"


def parse_answer(text: str) -> int | None:
    """The number after the final "answer", or None when the text does not end with one."""
    m = _ANSWER.search(text.strip())
    return int(m.group(1).replace(" ", "")) if m else None


def check_answer(text: str, answer: str | int) -> bool:
    got = parse_answer(text)
    return got is not None and got == int(answer)


def well_formed(text: str) -> bool:
    """Whether a completion has the worked format: column steps, then the answer."""
    return _FORMAT.match(text.strip()) is not None


def reversal(digits: str) -> tuple[str, str]:
    return f"reverse {' '.join(digits)}", " ".join(digits[::-1])


def problems(rng: np.random.Generator, max_digits: int) -> Iterator[tuple[int, int]]:
    """Endless (a, b) pairs; each operand's digit count is uniform in 1..max_digits."""
    while True:
        da, db = rng.integers(1, max_digits + 1, size=2)
        lo = [0 if d == 1 else 10 ** (d - 1) for d in (da, db)]
        yield int(rng.integers(lo[0], 10 ** int(da))), int(rng.integers(lo[1], 10 ** int(db)))


def conversation(a: int, b: int) -> dict:
    return {"messages": [{"role": "user", "content": question(a, b)},
                         {"role": "assistant", "content": worked_answer(a, b)}]}


def rl_item(a: int, b: int) -> dict:
    return {"messages": [{"role": "user", "content": question(a, b)}], "answer": str(a + b)}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _document_ids(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    """A pretraining document of one conversation: exactly the tokens SFT trains on (prompt, answer),
    without the turn-end id; the shard's document separator follows it."""
    prompt = chat_prompt(messages[:-1], tokenizer).text
    return tokenizer.encode(prompt) + tokenizer.encode(messages[-1]["content"])


def make_task(out: str | Path, *, corpus: str | Path | None = None, max_digits: int = 3, seed: int = 0,
              pretrain: int = 20000, sft: int = 6000, plain: int = 2000, rl: int = 2000, heldout: int = 200,
              pretrain_val: int = 200) -> dict:
    """Write the task's files into `out` (see the module docstring); returns a summary."""
    if max_digits < 1 or max_digits > 6:
        raise ConfigError(f"max_digits={max_digits} is invalid: choose 1..6")
    for name, v in (("pretrain", pretrain), ("sft", sft), ("plain", plain), ("rl", rl), ("heldout", heldout)):
        if v < 1:
            raise ConfigError(f"{name}={v} is invalid: must be a positive count")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    draw = problems(rng, max_digits)
    space = sum(10 ** d - (10 ** (d - 1) if d > 1 else 0) for d in range(1, max_digits + 1)) ** 2
    held: set[tuple[int, int]] = set()
    while len(held) < min(heldout, space // 4):
        held.add(next(draw))
    held_list = [sorted(held)[i] for i in rng.permutation(len(held))]  # random order: --limit takes a sample

    def fresh(n: int) -> list[tuple[int, int]]:
        got = []
        while len(got) < n:
            p = next(draw)
            if p not in held:
                got.append(p)
        return got

    summary: dict = {"max_digits": max_digits, "seed": seed, "heldout": len(held_list)}
    _write_jsonl(out / "heldout.jsonl", [rl_item(a, b) for a, b in held_list])
    _write_jsonl(out / "sft_reasoning.jsonl", [conversation(a, b) for a, b in fresh(sft)])
    plain_rows = []
    for _ in range(plain):
        digits = "".join(str(d) for d in rng.integers(0, 10, size=int(rng.integers(2, 2 * max_digits + 1))))
        q, a = reversal(digits)
        plain_rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    _write_jsonl(out / "sft_plain.jsonl", plain_rows)
    _write_jsonl(out / "rl_prompts.jsonl", [rl_item(a, b) for a, b in fresh(rl)])
    summary.update(sft_reasoning=sft, sft_plain=plain, rl_prompts=rl)
    if corpus is not None:
        summary["corpus"] = str(_task_corpus(Path(corpus), out / "corpus", fresh(pretrain), fresh(pretrain_val),
                                             plain_rows[: max(1, pretrain // 4)]))
    atomic_write_text(out / "task.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _task_corpus(corpus: Path, dest: Path, train: list[tuple[int, int]], val: list[tuple[int, int]],
                 plain_rows: list[dict]) -> Path:
    """A copy of prepared corpus `corpus` with the `arith` domain added (its shards, manifest entries
    and output hashes), readable by `moge train --data`."""
    from moge.data.fetch import sha256_file
    from moge.data.shards import TokenShards, concat_documents, shard_relpath, write_shard

    base = TokenShards(corpus)
    if DOMAIN in base.domains:
        raise ConfigError(f"corpus {corpus} already has a domain named {DOMAIN!r}")
    tokenizer = load_tokenizer(base.tokenizer_path)
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "train").mkdir(parents=True)
    (dest / "val").mkdir()
    manifest = json.loads((corpus / "manifest.json").read_text())
    for rel in manifest["outputs"]:
        shutil.copy2(corpus / rel, dest / rel)
    split_docs = {"train": [conversation(a, b)["messages"] for a, b in train] + [r["messages"] for r in plain_rows],
                  "val": [conversation(a, b)["messages"] for a, b in val]}
    tokens, records = {}, []
    for split, docs in split_docs.items():
        ids = [np.asarray(_document_ids(tokenizer, m), dtype=np.uint16) for m in docs]
        arr, offsets = concat_documents(ids, base.eos_id)
        rel = shard_relpath(split, DOMAIN)
        write_shard(dest / rel, arr)
        manifest["outputs"][rel] = {"bytes": (dest / rel).stat().st_size, "sha256": sha256_file(dest / rel)}
        tokens[split] = int(len(arr))
        records += [{"domain": DOMAIN, "name": f"{DOMAIN}_{split}_{i}", "title": f"addition {i}", "split": split,
                     "offset": int(o), "tokens": int(len(d)), "chars": 0} for i, (o, d) in enumerate(zip(offsets, ids))]
    manifest["domains"][DOMAIN] = {"description": "generated addition problems with worked answers, and digit "
                                                  "reversal, in the chat format", "licence": "generated",
                                   "source": {"domain": DOMAIN, "generated": True},
                                   "documents": {s: len(d) for s, d in split_docs.items()}, "tokens": tokens}
    manifest["documents"] = manifest["documents"] + records
    for key in ("documents", "tokens"):
        for split in ("train", "val"):
            manifest["totals"][key][split] += manifest["domains"][DOMAIN][key][split]
    atomic_write_text(dest / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    return dest
