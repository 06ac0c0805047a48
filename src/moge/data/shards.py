"""Token shards on disk, and how training and evaluation read them.

One `.npy` file of uint16 ids per split and domain (`train/<domain>.npy`, `val/<domain>.npy`),
documents concatenated with `<|endoftext|>` after each. They are opened as read-only memory maps,
so a data-loader costs no RAM and many processes can share the page cache.

Training batches are random windows of `seq_len + 1` tokens (inputs and shifted targets). A batch
is a pure function of (seed, step, micro-batch index): a resumed run asks for step k and gets the very batch the
interrupted run would have seen, with no sampler state to checkpoint beyond the step counter.
Validation reads each domain's held-out shard front to back in non-overlapping windows, so every
held-out token after the first is predicted exactly once.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from moge.data.corpus import SPLITS
from moge.data.fetch import ChecksumError, sha256_file
from moge.errors import ConfigError, MissingFileError
from moge.io import atomic_write_bytes

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1  # of the output layout and manifest; readers refuse other versions
SHARD_DTYPE = np.uint16


def shard_relpath(split: str, domain: str) -> str:
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is invalid: valid splits are {', '.join(SPLITS)}")
    return f"{split}/{domain}.npy"


def concat_documents(token_lists: Sequence[np.ndarray], eos_id: int) -> tuple[np.ndarray, list[int]]:
    """The documents' ids joined with `eos_id` after each, and each document's start offset."""
    total = sum(len(t) + 1 for t in token_lists)
    out = np.empty(total, dtype=SHARD_DTYPE)
    offsets = []
    pos = 0
    for ids in token_lists:
        offsets.append(pos)
        out[pos:pos + len(ids)] = ids
        pos += len(ids)
        out[pos] = eos_id
        pos += 1
    return out, offsets


def write_shard(path: Path, ids: np.ndarray) -> None:
    """Atomically write a 1-D uint16 `.npy` file."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.dtype != SHARD_DTYPE:
        raise ConfigError(f"a shard must be a 1-D {np.dtype(SHARD_DTYPE).name} array, got {ids.ndim}-D {ids.dtype}")
    buf = io.BytesIO()
    np.save(buf, ids, allow_pickle=False)
    atomic_write_bytes(Path(path), buf.getvalue())


def read_shard(path: Path) -> np.ndarray:
    """A read-only memory map of a shard (a plain empty array for an empty shard)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"token shard {path} does not exist (run `moge data prepare` again)")
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    if arr.dtype != SHARD_DTYPE or arr.ndim != 1:
        raise ConfigError(f"token shard {path} holds a {arr.ndim}-D {arr.dtype} array, expected 1-D uint16")
    return arr


class Batch(NamedTuple):
    """`tokens[:, :-1]` are the inputs, `tokens[:, 1:]` the targets; `domains` index `TokenShards.domains`."""

    tokens: np.ndarray  # int64 [batch, seq_len + 1]
    domains: np.ndarray  # int64 [batch]
    starts: np.ndarray  # int64 [batch], offsets of the windows in their shards


class TokenShards:
    """A prepared corpus directory: its manifest, tokenizer facts and memory-mapped shards."""

    def __init__(self, root: str | Path, *, verify: bool = False):
        self.root = Path(root)
        path = self.root / MANIFEST_FILE
        if not path.is_file():
            raise MissingFileError(f"{path} does not exist: {self.root} is not a prepared corpus "
                                    f"(run `moge data prepare --out {self.root}`)")
        try:
            self.manifest: dict = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT_VERSION:
            found = self.manifest.get("format") if isinstance(self.manifest, dict) else None
            raise ConfigError(f"{path} has format {found!r}, this version of moge reads format {FORMAT_VERSION}: "
                             f"run `moge data prepare --out {self.root}` again")
        if verify:
            self.verify()
        tok = self.manifest["tokenizer"]
        self.vocab_size: int = tok["vocab_size"]
        self.eos_id: int = tok["eos_id"]
        self.pad_id: int = tok["pad_id"]
        self.domains: list[str] = list(self.manifest["domains"])
        self._shards: dict[tuple[str, str], np.ndarray] = {}

    @property
    def tokenizer_path(self) -> Path:
        return self.root / self.manifest["tokenizer"]["file"]

    def tokens(self, split: str, domain: str) -> np.ndarray:
        """The memory-mapped uint16 ids of one split of one domain."""
        if domain not in self.domains:
            raise ConfigError(f"domain={domain!r} is not in this corpus: valid domains are {', '.join(self.domains)}")
        key = (split, domain)
        if key not in self._shards:
            self._shards[key] = read_shard(self.root / shard_relpath(split, domain))
        return self._shards[key]

    def num_tokens(self, split: str, domain: str) -> int:
        return int(self.manifest["domains"][domain]["tokens"][split])

    def documents(self, domain: str | None = None, split: str | None = None) -> list[dict]:
        """Document records {domain, name, title, split, offset, tokens, chars}: where each document's
        ids sit in its shard (its `<|endoftext|>` follows at offset + tokens)."""
        return [d for d in self.manifest["documents"]
                if (domain is None or d["domain"] == domain) and (split is None or d["split"] == split)]

    def verify(self) -> None:
        """Raise ChecksumError unless every output file exists with the size and sha256 in the manifest."""
        problems = verify_outputs(self.root, self.manifest.get("outputs", {}))
        if problems:
            raise ChecksumError(f"prepared corpus {self.root} failed verification: " + "; ".join(problems))

    def num_val_windows(self, domain: str, seq_len: int) -> int:
        """How many validation windows `val_batches` yields for `domain` at this `seq_len`."""
        _check_positive("seq_len", seq_len)
        n = len(self.tokens("val", domain))
        return max(0, (n - 1) // seq_len)

    def val_batches(self, domain: str, *, seq_len: int, batch_size: int,
                    max_windows: int | None = None) -> Iterator[np.ndarray]:
        """int64 arrays [b, seq_len + 1] over `domain`'s validation shard in order: window i covers
        tokens [i*seq_len, (i+1)*seq_len] (one token of overlap, the next window's first input).
        The last batch may be smaller; `max_windows` caps the total for a quick evaluation."""
        _check_positive("batch_size", batch_size)
        count = self.num_val_windows(domain, seq_len)
        if count == 0:
            raise ConfigError(f"domain {domain!r} has {len(self.tokens('val', domain))} validation tokens, too few "
                             f"for one window of seq_len + 1 = {seq_len + 1}: lower seq_len")
        if max_windows is not None:
            count = min(count, _check_positive("max_windows", max_windows))
        ids = self.tokens("val", domain)
        for first in range(0, count, batch_size):
            rows = range(first, min(first + batch_size, count))
            yield np.stack([np.asarray(ids[i * seq_len:i * seq_len + seq_len + 1], dtype=np.int64) for i in rows])

    def summary(self) -> dict:
        return manifest_summary(self.manifest)


class TrainSampler:
    """Random training windows, drawn domain first (by weight) then a uniform start in its shard.

    `batch(step, micro)` depends only on (seed, step, micro, batch_size, seq_len, weights): resuming is
    `TrainSampler(shards, **state)` with the `state_dict()` saved in a checkpoint, then iterating
    (or calling `batch(step)`) from the saved step."""

    def __init__(self, shards: TokenShards, *, batch_size: int, seq_len: int, seed: int = 0,
                 weights: Mapping[str, float] | None = None, step: int = 0):
        self.shards = shards
        self.batch_size = _check_positive("batch_size", batch_size)
        self.seq_len = _check_positive("seq_len", seq_len)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seed={seed!r} is invalid: must be a non-negative integer")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ConfigError(f"step={step!r} is invalid: must be a non-negative integer")
        self.seed = seed
        self.step = step
        self.weights = self._weights(weights)
        self._p = np.array([self.weights[d] for d in shards.domains], dtype=np.float64)
        self._p /= self._p.sum()
        self._train = [shards.tokens("train", d) for d in shards.domains]
        for d, ids, p in zip(shards.domains, self._train, self._p):
            if p > 0 and len(ids) < seq_len + 1:
                raise ConfigError(f"domain {d!r} has {len(ids)} training tokens, too few for one window of "
                                 f"seq_len + 1 = {seq_len + 1}: lower seq_len or give the domain weight 0")

    def _weights(self, weights: Mapping[str, float] | None) -> dict[str, float]:
        domains = self.shards.domains
        if weights is None:
            return {d: float(self.shards.num_tokens("train", d)) for d in domains}
        unknown = [d for d in weights if d not in domains]
        if unknown:
            raise ConfigError(f"weights name domain {unknown[0]!r}, which is not in this corpus: valid domains "
                             f"are {', '.join(domains)}")
        out = {d: float(weights.get(d, 0.0)) for d in domains}
        bad = [d for d, w in out.items() if not np.isfinite(w) or w < 0]
        if bad:
            raise ConfigError(f"weights[{bad[0]!r}]={out[bad[0]]} is invalid: weights must be finite and >= 0")
        if sum(out.values()) <= 0:
            raise ConfigError(f"weights {dict(weights)} are all zero: at least one domain needs a positive weight")
        return out

    def batch(self, step: int, micro: int = 0) -> Batch:
        """The batch for training step `step`, micro-batch `micro` under gradient accumulation
        (independent of any earlier call)."""
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0 \
                or isinstance(micro, bool) or not isinstance(micro, (int, np.integer)) or micro < 0:
            raise ConfigError(f"step={step!r}, micro={micro!r} are invalid: both must be non-negative integers")
        rng = np.random.default_rng([self.seed, int(step), int(micro)])
        domains = rng.choice(len(self._p), size=self.batch_size, p=self._p)
        highs = np.array([len(self._train[d]) - self.seq_len for d in domains], dtype=np.int64)
        starts = rng.integers(0, highs)
        span = self.seq_len + 1
        tokens = np.stack([np.asarray(self._train[d][s:s + span], dtype=np.int64) for d, s in zip(domains, starts)])
        return Batch(tokens, domains.astype(np.int64), starts.astype(np.int64))

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        out = self.batch(self.step)
        self.step += 1
        return out

    def state_dict(self) -> dict:
        """Small and JSON-serialisable; `TrainSampler(shards, **state)` continues exactly here."""
        return {"seed": self.seed, "step": self.step, "batch_size": self.batch_size, "seq_len": self.seq_len,
                "weights": dict(self.weights)}


def manifest_summary(manifest: Mapping) -> dict:
    """A manifest without its per-document records and per-file hashes: what `--json` prints."""
    return {k: v for k, v in manifest.items() if k not in ("documents", "outputs")}


def verify_outputs(root: Path, outputs: Mapping[str, Mapping]) -> list[str]:
    """Problems with the files listed in a manifest's `outputs` ({relpath: {bytes, sha256}}); [] if none."""
    problems = []
    for rel, want in outputs.items():
        path = Path(root) / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
        elif path.stat().st_size != want["bytes"]:
            problems.append(f"{rel} has {path.stat().st_size} bytes, expected {want['bytes']}")
        else:
            found = sha256_file(path)
            if found != want["sha256"]:
                problems.append(f"{rel} has sha256 {found}, expected {want['sha256']}")
    return problems


def _check_positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ConfigError(f"{name}={value!r} is invalid: must be a positive integer")
    return int(value)
