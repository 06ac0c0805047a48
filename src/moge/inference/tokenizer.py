"""Tokenizers for Pangu Pro MoE checkpoints, and the release's chat format.

The release ships a SentencePiece `tokenizer.model` (BPE with byte fallback, BOS id 1); converted
checkpoints may carry a Hugging Face `tokenizer.json` instead. `Tokenizer` gives both the same small
interface, so generation code never asks which one it has. BOS is added only when asked
(`add_bos=True`): the caller knows whether a text starts a sequence.

Chat format of the release (full-width colons; `[unused10]` ends a turn and stops generation):

    [unused9]系统：{system}[unused10][unused9]用户：{user}[unused10][unused9]助手：
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple, Union

from moge.errors import ConfigError, MissingFileError

TURN_START = "[unused9]"
TURN_END = "[unused10]"
THINK_START = "[unused16]"  # wraps reasoning text in assistant turns
THINK_END = "[unused17]"
RELEASE_TURN_END_ID = 45892  # id of [unused10] in the release's tokenizer
ROLE_LABELS = {"system": "系统", "user": "用户", "assistant": "助手"}
SENTENCEPIECE_NAME = "tokenizer.model"
HF_JSON_NAME = "tokenizer.json"
HF_CONFIG_NAME = "tokenizer_config.json"
_MARKER = re.compile(r"\[unused\d+\]")


class Tokenizer:
    """Text <-> token ids. Subclasses wrap one library; use `load_tokenizer` to get one."""

    path: Path
    bos_id: int | None
    eos_id: int | None
    vocab_size: int

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings such as `[unused9]` become their single id."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self._encode(text)
        if add_bos:
            ids.insert(0, self._required("bos_id", self.bos_id))
        if add_eos:
            ids.append(self._required("eos_id", self.eos_id))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`. BOS/EOS/padding produce no text; `[unused10]` and friends do."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ConfigError(f"token id {bad[0]} is out of range: valid ids are 0..{self.vocab_size - 1} "
                             f"(vocab_size={self.vocab_size}) for tokenizer {self.path}")
        return self._decode(ids)

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary entry, or None if it has none."""
        raise NotImplementedError

    def id_to_token(self, token_id: int) -> str:
        raise NotImplementedError

    @property
    def turn_end_id(self) -> int:
        """The id that ends a chat turn: `[unused10]` when the vocabulary has it, else EOS."""
        found = self.token_to_id(TURN_END)
        if found is not None:
            return found
        return self._required("eos_id", self.eos_id, f"and no {TURN_END} token to end chat turns")

    def _required(self, name: str, value: int | None, extra: str = "") -> int:
        if value is None:
            raise ConfigError(f"tokenizer {self.path} has no {name.removesuffix('_id').upper()} token"
                             f"{' ' + extra if extra else ''}")
        return value

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.path)!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id})")


class SentencePieceTokenizer(Tokenizer):
    """The release's format: a SentencePiece model file, read with the `sentencepiece` package."""

    def __init__(self, path: str | Path):
        import sentencepiece

        self.path = Path(path)
        try:
            data = self.path.read_bytes()
        except OSError as e:
            raise MissingFileError(f"cannot read tokenizer file {self.path}: {e.strerror}") from None
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=data)
        except RuntimeError:
            raise ConfigError(f"{self.path} is not a valid SentencePiece model (the file may be truncated "
                             f"or another format; a Hugging Face tokenizer must be named {HF_JSON_NAME})") from None
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = _none_if_negative(self._sp.bos_id())
        self.eos_id = _none_if_negative(self._sp.eos_id())
        self.pad_id = _none_if_negative(self._sp.pad_id())
        self._markers = self._markers_sentencepiece_mishandles()
        self._marker_text = {i: piece for piece, i in self._markers.items()}

    def _markers_sentencepiece_mishandles(self) -> dict[str, int]:
        """`[unusedN]` pieces that SentencePiece would not keep as one token with its own text.

        User-defined pieces are matched in the text by the library itself; control pieces are not,
        and decode to nothing. Chat markers must be single ids both ways, so encode and decode
        split the text/ids around these. (Each text segment is then encoded on its own, which is
        exact for models without a dummy "▁" prefix.)"""
        pieces = self._sp.id_to_piece(list(range(self.vocab_size)))
        out = {}
        for i, piece in enumerate(pieces):
            if _MARKER.fullmatch(piece) and (self._sp.encode(piece, out_type=int) != [i]
                                             or self._sp.decode([i]) != piece):
                out[piece] = i
        return out

    def _encode(self, text: str) -> list[int]:
        if not self._markers:
            return list(self._sp.encode(text, out_type=int))
        ids: list[int] = []
        start = 0
        for m in _MARKER.finditer(text):
            if m.group() in self._markers:
                if m.start() > start:
                    ids += self._sp.encode(text[start:m.start()], out_type=int)
                ids.append(self._markers[m.group()])
                start = m.end()
        if start < len(text):
            ids += self._sp.encode(text[start:], out_type=int)
        return ids

    def _decode(self, ids: list[int]) -> str:
        if not self._markers:
            return self._sp.decode(ids)
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self._marker_text:
                parts += [self._sp.decode(run), self._marker_text[i]]
                run = []
            else:
                run.append(i)
        return "".join(parts) + self._sp.decode(run)

    def token_to_id(self, token: str) -> int | None:
        i = self._sp.piece_to_id(token)  # unknown pieces map to the unk id
        return i if self._sp.id_to_piece(i) == token else None

    def id_to_token(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json`, read with the `tokenizers` package.

    BOS/EOS come from a `tokenizer_config.json` beside it when present (`bos_token`,
    `eos_token`), else from `<s>` / `</s>` in the vocabulary."""

    def __init__(self, path: str | Path):
        import tokenizers

        self.path = Path(path)
        if not self.path.is_file():
            raise MissingFileError(f"tokenizer file {self.path} does not exist")
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as e:  # the library raises a bare Exception for malformed files
            raise ConfigError(f"{self.path} is not a valid Hugging Face tokenizer.json: {e}") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        names = _special_token_names(self.path.parent / HF_CONFIG_NAME)
        self.bos_id = self._lookup(names.get("bos_token"), "<s>")
        self.eos_id = self._lookup(names.get("eos_token"), "</s>")
        self.pad_id = self._lookup(names.get("pad_token"), "<pad>")

    def _lookup(self, configured: str | None, default: str) -> int | None:
        if configured is not None:
            found = self._tok.token_to_id(configured)
            if found is None:
                raise ConfigError(f"{self.path.parent / HF_CONFIG_NAME} names special token {configured!r}, "
                                 f"which is not in the vocabulary of {self.path}")
            return found
        return self._tok.token_to_id(default)

    def _encode(self, text: str) -> list[int]:
        # add_special_tokens=False: BOS/EOS are ours to add, not the file's post-processor's
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def _decode(self, ids: list[int]) -> str:
        control = {i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None}
        return self._tok.decode([i for i in ids if i not in control], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        return self._tok.id_to_token(int(token_id))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer from a checkpoint directory or a file.

    In a directory `tokenizer.model` (the release's own file) wins over `tokenizer.json`. A file is
    read by its suffix: `.model` as SentencePiece, `.json` as Hugging Face."""
    path = Path(path)
    if path.is_dir():
        if (path / SENTENCEPIECE_NAME).is_file():
            return SentencePieceTokenizer(path / SENTENCEPIECE_NAME)
        if (path / HF_JSON_NAME).is_file():
            return HFTokenizer(path / HF_JSON_NAME)
        raise MissingFileError(f"no tokenizer in {path}: expected {SENTENCEPIECE_NAME} (SentencePiece) or "
                                f"{HF_JSON_NAME} (Hugging Face tokenizers)")
    if not path.exists():
        raise MissingFileError(f"tokenizer path {path} does not exist")
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if path.suffix == ".json":
        return HFTokenizer(path)
    raise ConfigError(f"tokenizer file {path} has suffix {path.suffix!r}: valid are '.model' (SentencePiece) "
                     f"and '.json' (Hugging Face tokenizer.json)")


# ---------------------------------------------------------------------------------------------
# Chat format
# ---------------------------------------------------------------------------------------------

Message = Union[tuple[str, str], Mapping[str, str]]


class ChatPrompt(NamedTuple):
    """The prompt text and the token id that ends the assistant's turn (stop generation there)."""

    text: str
    stop_id: int


def chat_prompt(messages: Sequence[Message] | tuple[str, str], tokenizer: Tokenizer | None = None, *,
                add_generation_prompt: bool = True) -> ChatPrompt:
    """The release's chat format for a conversation.

    `messages` is a list of (role, text) pairs or {"role", "content"} dicts, with roles system
    (first only), user and assistant; or a bare (system, user) pair of strings. Every prompt starts
    with a system turn, empty when none is given, as the release's format does. With
    `add_generation_prompt` the text ends with an open assistant turn for the model to complete.
    The stop id is the tokenizer's `[unused10]` (else its EOS); without a tokenizer the release's
    id 45892. Texts may not contain the turn markers themselves: a user could otherwise forge turns."""
    if isinstance(messages, tuple) and len(messages) == 2 and all(isinstance(m, str) for m in messages):
        messages = [("system", messages[0]), ("user", messages[1])]
    turns = [_as_turn(i, m) for i, m in enumerate(messages)]
    late = [i for i, (role, _) in enumerate(turns) if role == "system" and i > 0]
    if late:
        raise ConfigError(f"messages[{late[0]}] has role 'system': a system message may only come first")
    if not turns or turns[0][0] != "system":
        turns.insert(0, ("system", ""))
    parts = [f"{TURN_START}{ROLE_LABELS[role]}：{text}{TURN_END}" for role, text in turns]
    if add_generation_prompt:
        parts.append(f"{TURN_START}{ROLE_LABELS['assistant']}：")
    stop = tokenizer.turn_end_id if tokenizer is not None else RELEASE_TURN_END_ID
    return ChatPrompt("".join(parts), stop)


def _as_turn(i: int, message: Message) -> tuple[str, str]:
    if isinstance(message, Mapping):
        role, text = message.get("role"), message.get("content")
    elif isinstance(message, (tuple, list)) and len(message) == 2:
        role, text = message
    else:
        raise ConfigError(f"messages[{i}]={message!r} is invalid: expected a (role, text) pair or a "
                         f"{{'role': ..., 'content': ...}} dict")
    if role not in ROLE_LABELS:
        raise ConfigError(f"messages[{i}] has role={role!r}: valid roles are {', '.join(ROLE_LABELS)}")
    if not isinstance(text, str):
        raise ConfigError(f"messages[{i}] content must be a str, got {type(text).__name__}")
    for marker in (TURN_START, TURN_END):
        if marker in text:
            raise ConfigError(f"messages[{i}] ({role}) contains the turn marker {marker}, which would "
                             f"start or end a turn; remove it from the text")
    return role, text


def _special_token_names(config_path: Path) -> dict[str, str]:
    """bos/eos/pad token strings from a tokenizer_config.json (plain or {"content": ...} form)."""
    if not config_path.is_file():
        return {}
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{config_path} is not valid JSON: {e}") from None
    out = {}
    for key in ("bos_token", "eos_token", "pad_token"):
        value = data.get(key) if isinstance(data, dict) else None
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out


def _none_if_negative(i: int) -> int | None:
    return i if i >= 0 else None
