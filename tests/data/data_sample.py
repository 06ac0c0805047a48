"""A small generated multi-domain text sample, and sources built from it: no data test needs the network."""

import gzip
import io
import random
import tarfile

from moge.data.corpus import Document
from moge.data.fetch import Archive

VOCAB = 400  # small: trains in well under a second on the sample

_WORDS = {
    "verse": "thou thee thy love night day sweet rose heart fair doth hath art spring summer winter eyes "
             "sorrow grace king crown sword".split(),
    "prose": "the and of to in that said unto people land house city went came river field bread year "
             "café naïve façade Zürich".split(),
    "code_docs": "return value argument object function class module default raise error list string "
                 "integer None True iterator buffer encoding".split(),
}
_EXTRAS = ["—", "“quoted”", "日本語", "🙂", "\t", "  ", "é", "ß"]


def make_text(domain: str, index: int, lines: int = 60) -> str:
    rng = random.Random(f"{domain}-{index}")
    words = _WORDS[domain]
    out = [f"{domain.upper()} {index}", ""]
    for i in range(lines):
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        if i % 7 == 3:
            line += " " + rng.choice(_EXTRAS)
        if i % 11 == 5:
            line = "    " + line + "  "
        out.append(line)
        if i % 9 == 8:
            out.append("")
    return "\n".join(out) + ("\r\n" if index % 2 else "")


def make_documents(domain: str, count: int = 8) -> list[Document]:
    return [Document(domain, f"{domain}_{i:02d}", make_text(domain, i, 40 + 10 * i), f"{domain} {i}")
            for i in range(count)]


def make_archive(domain: str, count: int = 8) -> bytes:
    """A tar.gz holding one text file per document, like the registry archives we read."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for doc in make_documents(domain, count):
            data = doc.text.encode("utf-8")
            info = tarfile.TarInfo(f"sample-1.0/texts/{doc.name}.txt")
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(buf.getvalue(), mtime=0)  # byte-identical on every call


def read_archive_docs(domain: str):
    def extract(path):
        with tarfile.open(path, "r:*") as tar:
            names = sorted(m.name for m in tar.getmembers() if m.isfile())
            return [Document(domain, n.rsplit("/", 1)[1][:-4], tar.extractfile(n).read().decode("utf-8"))
                    for n in names]
    return extract


class FakeRegistry:
    """Stands in for the package index: serves archives from memory and counts downloads."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.calls: list[str] = []

    def __call__(self, archive: Archive, index_url: str) -> bytes:
        self.calls.append(archive.filename)
        return self.files[archive.filename]
