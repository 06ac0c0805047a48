"""The `moge data prepare` pipeline: sources -> documents -> split -> tokenizer -> shards -> manifest.

The manifest is written last and records everything the output depends on (`config`: settings,
pinned source hashes, the Python build for the docstring domain, the tokenizers version) plus the
size and sha256 of every file written. A later run with the same config whose files still match is
a no-op that reads nothing but the manifest and the outputs; anything else rebuilds from scratch.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path, PurePosixPath

from moge.data import bpe
from moge.data.corpus import SPLITS, Document, split_documents, text_sha256
from moge.data.fetch import Downloader, default_cache_dir, ensure_archive, sha256_file
from moge.data.shards import FORMAT_VERSION, MANIFEST_FILE, concat_documents, shard_relpath, verify_outputs, write_shard
from moge.data.sources import Source, select_sources
from moge.errors import ConfigError
from moge.io import atomic_write_text

DEFAULT_OUT = Path("data") / "corpus"
DEFAULT_VAL_FRACTION = 0.05
_ENCODE_CHUNK = 16  # documents per encode call: big enough to parallelise, small enough for a live bar

Log = Callable[[str], None]


def tool_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("moge", "numpy", "tokenizers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    return out


def build_config(sources: Sequence[Source], *, vocab_size: int, val_fraction: float, seed: int,
                 min_frequency: int) -> dict:
    """What the output depends on; equal configs give equal corpora."""
    return {"format": FORMAT_VERSION, "vocab_size": vocab_size, "min_frequency": min_frequency,
            "val_fraction": val_fraction, "seed": seed, "tokenizers": tool_versions()["tokenizers"],
            "sources": [s.fingerprint() for s in sources]}


def read_manifest(out_dir: Path) -> dict | None:
    """The manifest in `out_dir`, or None if there is none or it is unreadable."""
    path = Path(out_dir) / MANIFEST_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def prepare(out_dir: str | Path = DEFAULT_OUT, *, cache_dir: str | Path | None = None,
            sources: Sequence[Source] | None = None, domains: list[str] | None = None,
            vocab_size: int = bpe.DEFAULT_VOCAB_SIZE, val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = 0,
            min_frequency: int = 2, index_url: str | None = None, force: bool = False, progress: bool = False,
            log: Log | None = None, download: Downloader | None = None) -> dict:
    """Build (or find up to date) a prepared corpus in `out_dir`; returns its manifest plus
    `"cached": True/False`. `sources` overrides the built-in ones (tests use generated text);
    `domains` picks some of the built-in ones by name."""
    out_dir = Path(out_dir)
    say = log or (lambda _msg: None)
    bpe.check_vocab_size(vocab_size)
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction={val_fraction} is invalid: must be strictly between 0 and 1")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed={seed!r} is invalid: must be a non-negative integer")
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise ConfigError(f"min_frequency={min_frequency!r} is invalid: must be a positive integer")
    sources = list(sources) if sources is not None else select_sources(domains)
    if not sources:
        raise ConfigError("no sources given: a corpus needs at least one domain")
    seen = [s.domain for s in sources]
    if len(set(seen)) != len(seen):
        raise ConfigError(f"sources name domains {seen}: each domain may appear once")
    config = build_config(sources, vocab_size=vocab_size, val_fraction=val_fraction, seed=seed,
                          min_frequency=min_frequency)

    old = read_manifest(out_dir)
    if old is not None and not force:
        reason = _stale_reason(out_dir, old, config)
        if reason is None:
            say(f"{out_dir} is up to date (manifest and {len(old['outputs'])} file hashes match); nothing to do")
            return {**old, "cached": True}
        say(f"rebuilding {out_dir}: {reason}")
    if old is not None:  # a crash from here on leaves no manifest, so the next run rebuilds
        (out_dir / MANIFEST_FILE).unlink()

    t0 = time.perf_counter()
    timing: dict[str, float] = {}
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    docs: list[Document] = []
    for source in sources:
        path = None
        say(f"{source.domain}: reading {source.archive.filename if source.archive else source.description}")
        if source.archive is not None:
            path = ensure_archive(source.archive, cache, index_url=index_url, download=download, progress=progress)
        found = source.extract(path)
        if not found:
            raise ConfigError(f"source {source.domain!r} produced no documents")
        wrong = [d for d in found if d.domain != source.domain]
        if wrong:
            raise ConfigError(f"source {source.domain!r} produced document {wrong[0].name!r} labelled "
                             f"{wrong[0].domain!r}: every document must carry its source's domain")
        say(f"{source.domain}: {len(found)} documents, {sum(len(d.text) for d in found):,} characters")
        docs += found
    timing["sources_s"] = time.perf_counter() - t0

    split = split_documents(docs, val_fraction, seed)
    t1 = time.perf_counter()
    train_texts = [d.text for s in sources for d in split[s.domain]["train"]]
    say(f"training byte-level BPE (vocab {vocab_size}) on {len(train_texts)} training documents")
    tok = bpe.train_bpe(train_texts, vocab_size, min_frequency=min_frequency, length=len(train_texts),
                        show_progress=progress)
    timing["tokenizer_s"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    written = [out_dir / p.name for p in bpe.save_tokenizer(tok, out_dir)]
    eos_id, pad_id = (tok.token_to_id(t) for t in (bpe.EOS_TOKEN, bpe.PAD_TOKEN))
    domain_info: dict[str, dict] = {}
    records: list[dict] = []
    with _bar(progress, len(docs), "encode") as bar:
        for source in sources:
            info = {"description": source.description, "licence": source.licence, "source": source.fingerprint(),
                    "text_sha256": text_sha256(d for d in docs if d.domain == source.domain),
                    "documents": {}, "chars": {}, "bytes": {}, "tokens": {}}
            for name in SPLITS:
                part = split[source.domain][name]
                ids = []
                for i in range(0, len(part), _ENCODE_CHUNK):
                    chunk = part[i:i + _ENCODE_CHUNK]
                    ids += bpe.encode_texts(tok, [d.text for d in chunk])
                    bar.update(len(chunk))
                shard, offsets = concat_documents(ids, eos_id)
                rel = shard_relpath(name, source.domain)
                write_shard(out_dir / rel, shard)
                written.append(out_dir / rel)
                info["documents"][name] = len(part)
                info["chars"][name] = sum(len(d.text) for d in part)
                info["bytes"][name] = sum(len(d.text.encode("utf-8")) for d in part)
                info["tokens"][name] = int(len(shard))
                records += [{"domain": d.domain, "name": d.name, "title": d.title, "split": name,
                             "offset": off, "tokens": int(len(t)), "chars": len(d.text)}
                            for d, off, t in zip(part, offsets, ids)]
            domain_info[source.domain] = info
    timing["encode_s"] = time.perf_counter() - t2
    timing["total_s"] = time.perf_counter() - t0

    outputs = {p.relative_to(out_dir).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
               for p in written}
    if old is not None:
        _remove_stale(out_dir, old.get("outputs", {}), outputs)
    manifest = {
        "format": FORMAT_VERSION,
        "config": config,
        "tokenizer": {"file": bpe.TOKENIZER_FILE, "config_file": bpe.TOKENIZER_CONFIG_FILE,
                      "type": "byte-level BPE", "vocab_size": tok.get_vocab_size(),
                      "vocab_size_requested": vocab_size, "eos_id": eos_id, "pad_id": pad_id,
                      "special_tokens": list(bpe.SPECIAL_TOKENS)},
        "dtype": "uint16",
        "layout": "<split>/<domain>.npy: documents' ids, each followed by eos_id",
        "domains": domain_info,
        "totals": {k: {s: sum(i[k][s] for i in domain_info.values()) for s in SPLITS}
                   for k in ("documents", "chars", "bytes", "tokens")},
        "tools": tool_versions(),
        "timing": {k: round(v, 3) for k, v in timing.items()},
        "outputs": outputs,
        "documents": records,
    }
    atomic_write_text(out_dir / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")
    say(f"wrote {out_dir}: {manifest['totals']['tokens']['train']:,} train and "
        f"{manifest['totals']['tokens']['val']:,} validation tokens in {timing['total_s']:.1f} s")
    return {**manifest, "cached": False}


def _stale_reason(out_dir: Path, old: dict, config: dict) -> str | None:
    if old.get("config") != config:
        before = old.get("config") or {}
        changed = sorted(k for k in set(before) | set(config) if before.get(k) != config.get(k))
        return f"settings or sources changed ({', '.join(changed)})"
    problems = verify_outputs(out_dir, old.get("outputs") or {})
    if problems or not old.get("outputs"):
        return "output files do not match the manifest: " + ("; ".join(problems[:3]) or "none recorded")
    return None


def _remove_stale(out_dir: Path, old: dict, new: dict) -> None:
    for rel in old:
        parts = PurePosixPath(rel).parts
        if rel not in new and parts and not PurePosixPath(rel).is_absolute() and ".." not in parts:
            (out_dir / rel).unlink(missing_ok=True)


def _bar(enabled: bool, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="doc", disable=not enabled, leave=False)
