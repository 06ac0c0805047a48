"""Documents with domain labels, and the held-out validation split per domain.

The split is by whole documents (a play, a book of the Bible, a module's docstrings), so no
passage of a validation document is ever seen in training, and it is chosen per domain so every
domain can be evaluated on its own (the expert-specialisation analysis compares domains). Which
documents go to validation depends only on the seed and the document names, not on their order or
on the other domains.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from moge.errors import ConfigError

SPLITS = ("train", "val")
_OVERSHOOT = 1.5  # validation may hold up to this multiple of its target share, to keep documents whole
_NAME = re.compile(r"[a-z0-9][a-z0-9_]*")


@dataclass(frozen=True)
class Document:
    """A unit of text that is kept whole: it is never split across train and validation."""

    domain: str
    name: str
    text: str
    title: str = ""


def check_domain_name(domain: str) -> str:
    """Domain names become file names: lower-case letters, digits and underscores only."""
    if not isinstance(domain, str) or not _NAME.fullmatch(domain):
        raise ConfigError(f"domain name {domain!r} is invalid: use lower-case letters, digits and underscores, "
                         f"starting with a letter or digit")
    return domain


def split_documents(documents: Iterable[Document], val_fraction: float = 0.05, seed: int = 0
                    ) -> dict[str, dict[str, list[Document]]]:
    """{domain: {"train": [...], "val": [...]}}, documents kept in their given order within each split.

    Per domain, documents are ranked by a hash of (seed, domain, name) and taken into validation in
    that order until they hold at least `val_fraction` of the domain's characters, passing over any
    that would take validation past 1.5 times that share; at least one document goes to each split,
    so every domain needs two or more documents."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction={val_fraction} is invalid: must be strictly between 0 and 1")
    by_domain: dict[str, list[Document]] = {}
    for doc in documents:
        check_domain_name(doc.domain)
        if not doc.text:
            raise ConfigError(f"document {doc.domain}/{doc.name} is empty")
        by_domain.setdefault(doc.domain, []).append(doc)
    if not by_domain:
        raise ConfigError("no documents to split: every source produced an empty list")
    out = {}
    for domain, docs in by_domain.items():
        dupes = sorted(n for n, k in Counter(d.name for d in docs).items() if k > 1)
        if dupes:
            raise ConfigError(f"domain {domain!r} has duplicate document names {dupes[:5]}: names must be unique")
        if len(docs) < 2:
            raise ConfigError(f"domain {domain!r} has {len(docs)} document: a train/validation split needs at "
                             f"least 2")
        out[domain] = _split_domain(docs, val_fraction, seed)
    return out


def _split_domain(docs: Sequence[Document], val_fraction: float, seed: int) -> dict[str, list[Document]]:
    target = val_fraction * sum(len(d.text) for d in docs)
    ranked = sorted(docs, key=lambda d: _rank(seed, d.domain, d.name))
    val_names: set[str] = set()
    held = 0
    for doc in ranked[:-1]:  # the last-ranked document always stays in train
        if held >= target:
            break
        if held and held + len(doc.text) > _OVERSHOOT * target:
            continue  # a long document would overshoot the target: try the next ones
        val_names.add(doc.name)
        held += len(doc.text)
    return {"train": [d for d in docs if d.name not in val_names],
            "val": [d for d in docs if d.name in val_names]}


def _rank(seed: int, domain: str, name: str) -> bytes:
    return hashlib.sha256(f"{seed}\x00{domain}\x00{name}".encode()).digest()


def text_sha256(docs: Iterable[Document]) -> str:
    """A hash of names and texts in order: shows whether extraction is deterministic across runs."""
    h = hashlib.sha256()
    for d in docs:
        for part in (d.domain, d.name, d.text):
            data = part.encode("utf-8")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()
