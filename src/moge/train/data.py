"""The prepared corpus as the trainer sees it: torch batches addressed by (step, micro-batch) and
fixed validation windows per domain. Batches are a pure function of (seed, step, micro), which is
what makes a resumed run see the same data as one that never stopped."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from moge.errors import MissingFileError
from moge.train.config import TrainConfig


class TrainData:
    """Token shards of `moge data prepare`, served as [batch, seq_len + 1] id tensors."""

    def __init__(self, root: str | Path, *, seq_len: int, seed: int = 0):
        from moge.data.shards import TokenShards

        self.shards = TokenShards(root)
        self.seq_len, self.seed = seq_len, seed
        self.vocab_size, self.eos_id, self.pad_id = self.shards.vocab_size, self.shards.eos_id, self.shards.pad_id
        self.domains = self.shards.domains
        self.tokenizer_path = self.shards.tokenizer_path
        self._samplers: dict[int, Any] = {}

    def train_batch(self, step: int, micro: int, batch_size: int, *, seq_len: int | None = None,
                    weights: dict[str, float] | None = None) -> torch.Tensor:
        """[batch_size, seq_len + 1] token ids: inputs [:, :-1], targets [:, 1:]. `seq_len` (default:
        the data's) and the domain `weights` (default: by tokens) are a phase's."""
        from moge.data.shards import TrainSampler

        seq_len = seq_len or self.seq_len
        key = (batch_size, seq_len, tuple(sorted(weights.items())) if weights else None)
        if key not in self._samplers:
            self._samplers[key] = TrainSampler(self.shards, batch_size=batch_size, seq_len=seq_len,
                                               seed=self.seed, weights=weights or None)
        return torch.from_numpy(self._samplers[key].batch(step, micro).tokens)

    def val_batches(self, domain: str, windows: int, batch_size: int) -> Iterator[torch.Tensor]:
        for arr in self.shards.val_batches(domain, seq_len=self.seq_len, batch_size=batch_size, max_windows=windows):
            yield torch.from_numpy(arr)


def load_data(cfg: TrainConfig) -> TrainData:
    """The corpus at cfg.data; a clear error when it has not been prepared yet."""
    try:
        return TrainData(cfg.data, seq_len=cfg.seq_len, seed=cfg.seed)
    except FileNotFoundError as e:
        raise MissingFileError(f"{e}. Prepare it first: moge data prepare --out {cfg.data}") from None
