"""The corpus tokenizer: byte-level BPE trained with Hugging Face `tokenizers`.

Byte level with no normalizer and no added prefix space means every string maps to ids and back
to exactly itself (any Unicode, any whitespace), so loss numbers are over the real text and
generated text needs no clean-up. `<|endoftext|>` ends every document (EOS and the separator in
the shards); `<|pad|>` pads batches. A `tokenizer_config.json` beside `tokenizer.json` names them,
so `moge.inference.tokenizer.load_tokenizer(out_dir)` finds both.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from moge.errors import ConfigError, MissingFileError
from moge.io import atomic_write_text

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)  # ids 0 and 1
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # the byte alphabet and the special tokens, no merges
MAX_VOCAB_SIZE = 1 << 16  # ids are stored as uint16
DEFAULT_VOCAB_SIZE = 8192
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def check_vocab_size(vocab_size: int) -> int:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) \
            or not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise ConfigError(f"vocab_size={vocab_size!r} is invalid: must be an integer from {MIN_VOCAB_SIZE} "
                         f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens) to {MAX_VOCAB_SIZE} "
                         f"(token ids are stored as uint16)")
    return vocab_size


def new_tokenizer():
    """An untrained byte-level BPE tokenizer with our settings."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, *, min_frequency: int = 2,
              length: int | None = None, show_progress: bool = False):
    """A `tokenizers.Tokenizer` trained on `texts`. It may have fewer than `vocab_size` entries when
    the text is too small to supply that many merges; read its real size with `get_vocab_size()`."""
    from tokenizers import pre_tokenizers, trainers

    check_vocab_size(vocab_size)
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    for i, token in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(token) != i:
            raise RuntimeError(f"trained tokenizer put {token} at id {tok.token_to_id(token)}, expected {i}")
    return tok


def save_tokenizer(tok, out_dir: Path) -> list[Path]:
    """Write tokenizer.json and tokenizer_config.json atomically; returns both paths."""
    out_dir = Path(out_dir)
    paths = [out_dir / TOKENIZER_FILE, out_dir / TOKENIZER_CONFIG_FILE]
    atomic_write_text(paths[0], tok.to_str(pretty=False))
    config = {"eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN, "add_prefix_space": False,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    atomic_write_text(paths[1], json.dumps(config, indent=2) + "\n")
    return paths


def load_bpe(path: Path):
    """A `tokenizers.Tokenizer` from a tokenizer.json file or the directory holding one."""
    from tokenizers import Tokenizer

    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise MissingFileError(f"tokenizer file {path} does not exist (run `moge data prepare` first)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises a bare Exception for malformed files
        raise ConfigError(f"{path} is not a valid Hugging Face tokenizer.json: {e}") from None


def encode_texts(tok, texts: Sequence[str]) -> list[np.ndarray]:
    """uint16 ids of each text. Special-token strings inside the text are encoded as plain text, so
    a document can never inject an EOS of its own."""
    previous = tok.encode_special_tokens
    tok.encode_special_tokens = True
    try:
        encodings = tok.encode_batch_fast(list(texts), add_special_tokens=False) \
            if hasattr(tok, "encode_batch_fast") else tok.encode_batch(list(texts), add_special_tokens=False)
    finally:
        tok.encode_special_tokens = previous
    return [np.asarray(e.ids, dtype=np.uint16) for e in encodings]


def decode_ids(tok, ids: Iterable[int]) -> str:
    """The text of `ids`, special tokens included as their strings (the exact inverse of encoding)."""
    return tok.decode([int(i) for i in ids], skip_special_tokens=False)
