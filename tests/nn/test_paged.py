"""The paged KV cache: a flat batch of sequences, each at its own context length and feeding its own
number of new tokens, attends exactly as each sequence run whole does."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import make_model, tiny_config

from moge.nn.paged import KVPool, PagedBatch, Span

CFG = tiny_config(max_position_embeddings=64)


@pytest.fixture(scope="module")
def model():
    return make_model(CFG)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 30), st.integers(0, 30)), min_size=1, max_size=5),
       st.sampled_from([1, 2, 5, 16]), st.randoms(use_true_random=False))
def test_a_flat_batch_over_the_pool_equals_each_sequence_run_whole(model, shapes, block_size, rng):
    """Each sequence first caches `past` positions (one step), then feeds `new` more in a shared step
    with the others; the logits of the new positions equal a plain forward over the whole sequence."""
    seqs = [(new, past) for new, past in shapes]
    blocks = sum(-(-(past + new) // block_size) for new, past in seqs) + 3
    pool = KVPool.allocate(CFG, CFG.num_layers, blocks, block_size, torch.float32)
    free = list(range(blocks))
    rng.shuffle(free)  # blocks anywhere in the pool, in any order
    g = torch.Generator().manual_seed(len(seqs))
    tables, ids = [], []
    for new, past in seqs:
        tables.append(tuple(free.pop() for _ in range(-(-(past + new) // block_size))))
        ids.append(torch.randint(0, CFG.vocab_size, (past + new,), generator=g))
    with torch.no_grad():
        first = [(t, i, past) for t, i, (new, past) in zip(tables, ids, seqs) if past]
        if first:
            model(torch.cat([i[:past] for _, i, past in first]).view(1, -1),
                  cache=PagedBatch(pool, [Span(t, past, past) for t, _, past in first]))
        spans = [Span(t, past + new, new) for t, (new, past) in zip(tables, seqs)]
        flat = torch.cat([i[past:] for i, (new, past) in zip(ids, seqs)]).view(1, -1)
        got = model(flat, cache=PagedBatch(pool, spans)).logits[0]
        start = 0
        for i, (new, past) in zip(ids, seqs):
            whole = model(i.view(1, -1)).logits[0, past:]
            torch.testing.assert_close(got[start:start + new], whole, rtol=1e-5, atol=1e-5)
            start += new


def test_spans_that_do_not_fit_their_blocks_are_refused():
    pool = KVPool.allocate(CFG, CFG.num_layers, 4, 4, torch.float32)
    with pytest.raises(ValueError, match="needs 3 blocks"):
        PagedBatch(pool, [Span((0, 1), 9, 1)])
    with pytest.raises(ValueError, match="1 <= new <= context"):
        PagedBatch(pool, [Span((0,), 2, 3)])
