"""torch.compile traces the MoE block and the whole model without graph breaks (so the hot path
holds no host sync) and computes what eager mode computes.

`fullgraph=True` turns any graph break into an error. The block compiles with inductor (C++ code
generation, about 25 s cold on a two-core CPU); the whole model with aot_eager, which traces the same
graphs (Dynamo and AOTAutograd) without generating code: inductor needs about a minute per shape
for the whole model on such a CPU (57 s for a prefill, 38 s for a decode step)."""

import pytest
import torch
from test_model import TINY, make_model

from moge.nn.experts import SwiGLUExperts
from moge.nn.model import KVCache
from moge.nn.moe import MoGEBlock


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _block(seed=0):
    torch.manual_seed(seed)
    block = MoGEBlock(TINY.moe())  # 8 experts in 4 groups, 4 per token, one shared expert
    with torch.no_grad():
        block.router.router_scale.uniform_(0.5, 1.5)
    return block


def test_moe_block_compiles_with_inductor_and_equals_eager():
    block = _block()
    x = torch.randn(2, 5, TINY.hidden_size)
    with torch.no_grad():
        got = torch.compile(block, backend="inductor", fullgraph=True)(x)
        torch.testing.assert_close(got, block(x), atol=1e-5, rtol=1e-5)


def test_one_token_block_compiles_without_the_eager_list_shortcut():
    """Eager CPU decoding reads one token's expert ids into a Python list; compiled code must not."""
    block = _block()
    x = torch.randn(1, 1, TINY.hidden_size)
    with torch.no_grad():
        got = torch.compile(block, backend="aot_eager", fullgraph=True)(x)
        torch.testing.assert_close(got, block(x), atol=1e-5, rtol=1e-5)


def test_moe_block_backward_compiles_and_equals_eager():
    """Training: the compiled grouped_mm's hand-written backward against torch's eager autograd."""
    block = _block(1)
    x = torch.randn(3, 4, TINY.hidden_size)
    g = torch.randn_like(x)

    def run(module):
        block.zero_grad()
        xi = x.clone().requires_grad_()
        y = module(xi)
        y.backward(g)
        return [y.detach(), xi.grad] + [p.grad.clone() for p in block.parameters() if p.grad is not None]

    eager = run(block)
    compiled = run(torch.compile(block, backend="aot_eager", fullgraph=True))
    assert len(compiled) == len(eager) == 2 + sum(1 for _ in block.parameters())
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_auto_backend_has_no_graph_break_where_the_loop_kernel_has_one():
    """300 tokens: eager CPU `auto` would pick the loop kernel, which needs its row counts on the
    host by nature. Under compile `auto` must pick grouped_mm; an explicit loop request breaks."""
    torch.manual_seed(0)
    experts = SwiGLUExperts(8, 32, 16)
    x, ids, w = torch.randn(300, 32), torch.rand(300, 8).argsort(-1)[:, :4], torch.rand(300, 4)
    assert experts.resolve_backend(x, ids.numel()) == "loop"
    auto = torch._dynamo.explain(lambda a, b, c: experts(a, b, c))(x, ids, w)
    loop = torch._dynamo.explain(lambda a, b, c: experts(a, b, c, backend="loop"))(x, ids, w)
    assert auto.graph_break_count == 0
    assert loop.graph_break_count >= 1


@pytest.mark.parametrize("padded", [False, True])
def test_model_prefill_and_cached_decode_step_compile_and_equal_eager(padded):
    """A whole forward (prefill into a KVCache) and one decode step, with and without left padding
    (the padded case builds SDPA masks from the cache's host-side `padded` record)."""
    model = make_model()
    ids = torch.randint(3, TINY.vocab_size, (2, 7))
    mask = None
    if padded:
        mask = torch.ones(2, 6, dtype=torch.long)
        mask[1, :2] = 0
        ids[1, :2] = 0
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    caches = [KVCache.allocate(TINY, 2, 16, torch.float32) for _ in range(2)]
    with torch.no_grad():
        outs = [m(ids[:, :6], cache=c, attention_mask=mask).logits for m, c in zip((compiled, model), caches)]
        torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
        steps = [m(ids[:, 6:], cache=c).logits for m, c in zip((compiled, model), caches)]
    torch.testing.assert_close(steps[0], steps[1], atol=1e-5, rtol=1e-5)
    assert caches[0].length == caches[1].length == 7
    assert caches[0].padded == caches[1].padded == padded
    torch.testing.assert_close(caches[0].k, caches[1].k, atol=1e-5, rtol=1e-5)
    assert torch.equal(caches[0].valid_BT, caches[1].valid_BT)


def test_compiled_forward_still_refuses_out_of_range_ids():
    """Under compile the id check is a device-side assert instead of an eager ValueError."""
    model = make_model()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        compiled(torch.tensor([[1, 2]]))
        with pytest.raises(RuntimeError, match="token id is out of range: valid ids are 0..96"):
            compiled(torch.tensor([[1, TINY.vocab_size]]))
