import os

import pytest
import torch
from hypothesis import settings

from moge.data.corpus import Document
from moge.data.prepare import prepare
from moge.data.sources import Source
from models import tiny_config

# Small, fast and repeatable: CI has 2 cores.
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=60, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
# One intra-op thread: tiny test shapes gain nothing from more, and oversubscribed OpenMP barriers
# (other processes on the same cores) make small ops orders of magnitude slower.
torch.set_num_threads(1)


# A generated corpus for the trainer tests: no download, a few seconds to prepare.
WORDS = {"verse": "thou art the moon and stars shall sing of love and night".split(),
         "prose": "the report shows that the market grew by ten percent this year".split()}


def _docs(domain):
    import random

    rng = random.Random(domain)
    return [Document(domain, f"{domain}_{i}", "\n".join(" ".join(rng.choice(WORDS[domain]) for _ in range(12))
                                                          for _ in range(40)), f"{domain} {i}") for i in range(6)]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A prepared two-domain corpus (generated text, BPE 300) and tiny MoGE / top-K model configs."""
    root = tmp_path_factory.mktemp("corpus")
    sources = [Source(d, f"generated {d}", "generated for tests", lambda _p, d=d: _docs(d)) for d in WORDS]
    prepare(root / "data", cache_dir=root / "cache", sources=sources, vocab_size=300, val_fraction=0.2)
    cfg = tiny_config(vocab_size=300, num_heads=2, num_kv_heads=1, shared_expert_intermediate_size=16)
    cfg.to_json(root / "tiny.json")
    cfg.replace(router="topk").to_json(root / "tiny-topk.json")
    return root
