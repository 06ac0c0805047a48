"""Is a prepared corpus tokenized for this checkpoint? A corpus stores token ids, and ids only mean
text under the tokenizer that produced them: calibrating or analysing a checkpoint on ids from
another tokenizer runs it on the wrong tokens (only ids beyond its vocabulary would show).

A checkpoint carries its tokenizer next to its weights: `tokenizer.model` (SentencePiece, the
release's own file, which wins when both are present, as in `moge.inference.tokenizer`) or
`tokenizer.json` (Hugging Face; `moge train` copies the corpus's there). Two tokenizer.json files
match when they hold the same JSON (formatting and key order aside). A checkpoint without any
tokenizer file states nothing to compare against; `moge quantize` then gives it the corpus's.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from moge.data.shards import TokenShards
from moge.errors import ConfigError

SENTENCEPIECE_FILE = "tokenizer.model"
HF_JSON_FILE = "tokenizer.json"


def checkpoint_tokenizer(checkpoint: str | Path) -> Path | None:
    """The tokenizer file a checkpoint directory carries (the one it is read with), or None."""
    for name in (SENTENCEPIECE_FILE, HF_JSON_FILE):
        if (Path(checkpoint) / name).is_file():
            return Path(checkpoint) / name
    return None


def check_corpus_tokenizer(corpus: str | Path | TokenShards, checkpoint: str | Path) -> None:
    """Raise ConfigError naming both tokenizers when the corpus was tokenized with another tokenizer
    than the checkpoint's."""
    shards = corpus if isinstance(corpus, TokenShards) else TokenShards(corpus)
    ours, theirs = shards.tokenizer_path, checkpoint_tokenizer(checkpoint)
    if theirs is None or (theirs.suffix == ".json" and _same_json(ours, theirs)):
        return
    raise ConfigError(
        f"the corpus at {shards.root} is tokenized with {ours} (sha256 {_sha(ours)}), but the checkpoint "
        f"{checkpoint} carries another tokenizer, {theirs} (sha256 {_sha(theirs)}): its token ids would mean "
        "other text. Use a checkpoint trained on this corpus, or prepare a corpus with the checkpoint's tokenizer")


def _same_json(a: Path, b: Path) -> bool:
    try:
        return json.loads(a.read_text(encoding="utf-8")) == json.loads(b.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return a.read_bytes() == b.read_bytes()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]
