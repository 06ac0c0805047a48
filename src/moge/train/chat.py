"""Chat data for supervised fine-tuning: JSONL files of conversations in the release's chat format,
encoded with a loss mask that keeps only the assistant's tokens, mixed by ratio and packed.

One line is `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`. The text
before each assistant answer is exactly what `moge.inference.tokenizer.chat_prompt` renders for
generation (system turn, user turn, the open assistant turn), so the model learns to continue the
prompts it will be given; the answer is followed by the tokenizer's turn-end id (`[unused10]` in
the release's tokenizer, EOS in a corpus tokenizer without it), the id generation stops at.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moge.errors import ConfigError, MissingFileError
from moge.inference.tokenizer import Tokenizer, chat_prompt
from moge.train.packing import Packed, first_fit, pack


@dataclass
class Conversation:
    """One conversation, encoded: ids and a 0/1 mask (1 = an assistant token the loss is on)."""

    ids: list[int]
    mask: list[int]
    where: str  # file:line, for errors

    def segment(self) -> tuple[list[int], list[int], list[int]]:
        """(inputs, targets, loss mask of the targets): next-token prediction inside the conversation."""
        return self.ids[:-1], self.ids[1:], self.mask[1:]


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"chat data file {path} does not exist")
    out = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise ConfigError(f"{path}:{n}: expected a JSON object with a 'messages' list, got "
                                  f"{type(obj).__name__}")
            out.append((n, obj))
    if not out:
        raise ConfigError(f"{path} holds no conversations")
    return out


def messages_of(obj: dict, where: str) -> list[dict]:
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ConfigError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
    return messages


def encode_conversation(messages: Sequence[dict], tokenizer: Tokenizer, where: str = "conversation") -> Conversation:
    """ids and assistant-only loss mask of one conversation. Turns after the last assistant turn are
    dropped (nothing to learn from them)."""
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not answers:
        raise ConfigError(f"{where}: the conversation has no assistant turn, so there is nothing to train on")
    stop = tokenizer.turn_end_id
    ids: list[int] = []
    mask: list[int] = []
    done_text = ""
    for j in answers:
        try:
            prompt = chat_prompt(list(messages[:j]), tokenizer).text
            through = chat_prompt(list(messages[:j + 1]), tokenizer, add_generation_prompt=False).text
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        if not prompt.startswith(done_text):
            raise ConfigError(f"{where}: turn {j} does not extend the earlier turns")  # never for valid turns
        chunk = tokenizer.encode(prompt[len(done_text):])
        answer = tokenizer.encode(messages[j]["content"]) + [stop]
        ids += chunk + answer
        mask += [0] * len(chunk) + [1] * len(answer)
        done_text = through
    return Conversation(ids, mask, where)


def load_conversations(path: str | Path, tokenizer: Tokenizer, max_tokens: int) -> list[Conversation]:
    """Every conversation of a JSONL file, encoded; one longer than `max_tokens` + 1 (it must fit in
    one packed row of max_tokens inputs) is an error naming its line."""
    out = []
    for n, obj in read_jsonl(path):
        where = f"{path}:{n}"
        conv = encode_conversation(messages_of(obj, where), tokenizer, where)
        if len(conv.ids) - 1 > max_tokens:
            raise ConfigError(f"{where}: the conversation has {len(conv.ids)} tokens, longer than the context of "
                              f"seq_len + 1 = {max_tokens + 1}; raise seq_len or shorten it")
        out.append(conv)
    return out


@dataclass
class Source:
    path: str
    weight: float
    conversations: list[Conversation]


def parse_source(spec: str) -> tuple[str, float]:
    """`PATH` or `PATH:WEIGHT`."""
    path, sep, weight = spec.rpartition(":")
    if not sep or not path:
        return spec, 1.0
    try:
        w = float(weight)
    except ValueError:
        return spec, 1.0  # a ':' inside the path
    if not w > 0 or not np.isfinite(w):
        raise ConfigError(f"data source {spec!r}: weight={weight} is invalid: must be a finite number > 0")
    return path, w


class ChatData:
    """SFT batches: per micro-batch, conversations drawn source by source in proportion to the weights
    (the paper's 3:1 reasoning to non-reasoning), packed first-fit into `batch_size` rows of `seq_len`.
    A batch is a pure function of (seed, step, micro), like the pretraining sampler, so resume is exact."""

    domains: list[str] = []  # no validation corpus: Trainer.evaluate has nothing to do

    def __init__(self, sources: Sequence[tuple[str, float]], tokenizer: Tokenizer, *, seq_len: int, seed: int = 0):
        if not sources:
            raise ConfigError("sft needs at least one chat data file (--data PATH[:WEIGHT])")
        self.tokenizer = tokenizer
        self.tokenizer_path = tokenizer.path
        self.vocab_size = tokenizer.vocab_size
        self.eos_id = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.turn_end_id
        self.pad_id = getattr(tokenizer, "pad_id", None) or self.eos_id
        self.seq_len, self.seed = seq_len, seed
        self.sources = [Source(str(p), w, load_conversations(p, tokenizer, seq_len)) for p, w in sources]
        total = sum(s.weight for s in self.sources)
        self.p = np.array([s.weight / total for s in self.sources])

    def micro_batch(self, step: int, micro: int, batch_size: int) -> tuple[Packed, list[int]]:
        """The packed rows and how many conversations of each source they hold."""
        rng = np.random.default_rng([self.seed, int(step), int(micro)])
        chosen: list[tuple[int, int]] = []
        segments, lengths = [], []
        capacity = batch_size * self.seq_len
        while sum(lengths) < capacity:
            s = int(rng.choice(len(self.sources), p=self.p))
            c = int(rng.integers(len(self.sources[s].conversations)))
            seg = self.sources[s].conversations[c].segment()
            rows, left = first_fit(lengths + [len(seg[0])], batch_size, self.seq_len)
            if left:  # the next conversation fits nowhere: the rows are full
                break
            chosen.append((s, c))
            segments.append(seg)
            lengths.append(len(seg[0]))
        rows, _ = first_fit(lengths, batch_size, self.seq_len)
        counts = [sum(1 for s, _ in chosen if s == k) for k in range(len(self.sources))]
        return pack(segments, rows, self.seq_len, self.pad_id), counts
