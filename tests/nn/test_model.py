"""The decoder against a plain reference written from the paper/release description; KV cache,
padding and bad input."""

import math

import pytest
import torch

from moge.config import PRESETS
from moge.inference.generate import Sampling, generate
from moge.nn.model import KVCache, PanguProMoEForCausalLM, rope_cos_sin, rope_tables
from models import make_model, tiny_config

TINY = tiny_config()


def reference_logits(model, ids):
    """Token by token, from the definitions: pre-norm RMSNorm, GQA with biases, rotate-half RoPE over
    the full head dim, causal softmax attention, MoGE (global softmax, top-K' per group, router_scale,
    no renormalisation) plus the un-gated shared expert, final norm, untied lm_head."""
    cfg = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    D, H, KV, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_size
    per, kp, Fe = cfg.num_experts // cfg.num_groups, cfg.top_k // cfg.num_groups, cfg.expert_intermediate_size

    def rms(x, w):
        return x / torch.sqrt((x * x).mean() + cfg.rms_norm_eps) * w

    def rope(v, pos):
        out = torch.empty_like(v)
        for i in range(hd // 2):
            ang = pos / cfg.rope_theta ** (2 * i / hd)
            c, s = math.cos(ang), math.sin(ang)
            out[i] = v[i] * c - v[i + hd // 2] * s
            out[i + hd // 2] = v[i + hd // 2] * c + v[i] * s
        return out

    def silu(x):
        return x / (1 + torch.exp(-x))

    S = len(ids)
    hs = [sd["model.embed_tokens.weight"][t].clone() for t in ids]
    for layer in range(cfg.num_layers):
        p = f"model.layers.{layer}."
        lin = lambda name, x, p=p: sd[p + name + ".weight"] @ x + sd[p + name + ".bias"]  # noqa: E731
        keys, vals, new = [], [], []
        for t in range(S):
            x = rms(hs[t], sd[p + "input_layernorm.weight"])
            q, k, v = lin("self_attn.q_proj", x), lin("self_attn.k_proj", x), lin("self_attn.v_proj", x)
            keys.append([rope(k[j * hd:(j + 1) * hd], t) for j in range(KV)])
            vals.append([v[j * hd:(j + 1) * hd] for j in range(KV)])
            heads = []
            for h in range(H):
                g = h // (H // KV)
                qh = rope(q[h * hd:(h + 1) * hd], t)
                scores = torch.stack([qh @ keys[u][g] for u in range(t + 1)]) / math.sqrt(hd)
                w = torch.softmax(scores, 0)
                heads.append(sum(w[u] * vals[u][g] for u in range(t + 1)))
            new.append(hs[t] + lin("self_attn.o_proj", torch.cat(heads)))
        hs = new
        for t in range(S):
            x = rms(hs[t], sd[p + "post_attention_layernorm.weight"])
            s = torch.softmax(sd[p + "mlp.router.gate.weight"] @ x, 0)
            y = torch.zeros(D, dtype=torch.float64)
            for j in range(cfg.num_groups):
                for local in s[j * per:(j + 1) * per].topk(kp).indices.tolist():
                    e = j * per + local
                    gu = sd[p + "mlp.experts.gate_up_proj"][e]
                    h_ = silu(gu[:Fe] @ x) * (gu[Fe:] @ x)
                    y += s[e] * sd[p + "mlp.router.router_scale"][0, e] * (sd[p + "mlp.experts.down_proj"][e] @ h_)
            se = p + "mlp.shared_expert."
            y += sd[se + "down_proj.weight"] @ (silu(sd[se + "gate_proj.weight"] @ x) * (sd[se + "up_proj.weight"] @ x))
            hs[t] = hs[t] + y
    out = torch.stack([rms(h, sd["model.norm.weight"]) for h in hs]) @ sd["lm_head.weight"].T
    return out.float()


def test_model_equals_reference_forward():
    model = make_model()
    ids = [5, 17, 3, 88, 42, 7]
    got = model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(got, reference_logits(model, ids), atol=1e-4, rtol=1e-4)
    assert got.dtype == torch.float32


def test_cached_decode_equals_full_recomputation():
    model = make_model()
    ids = torch.randint(0, TINY.vocab_size, (2, 11))
    full = model(ids).logits
    cache = KVCache.allocate(TINY, 2, 16, torch.float32)
    pieces = [model(ids[:, :5], cache=cache).logits]
    for t in range(5, 11):
        pieces.append(model(ids[:, t:t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)


def test_padded_batch_generation_equals_prompts_one_by_one():
    model = make_model()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    batched = generate(model, prompts, max_new_tokens=6, stop_ids=[])
    for row, p in enumerate(prompts):
        alone = generate(model, [p], max_new_tokens=6, stop_ids=[])
        assert batched.tokens[row] == alone.tokens[0]
    # and the padded forward's logits equal the unpadded ones at real positions
    ids = torch.tensor([[0, 0, 0, 12, 13]])
    mask = torch.tensor([[0, 0, 0, 1, 1]])
    torch.testing.assert_close(model(ids, attention_mask=mask).logits[:, 3:], model(ids[:, 3:]).logits,
                               atol=1e-5, rtol=1e-5)


def test_greedy_generation_matches_argmax_of_full_forward():
    model = make_model()
    prompt = [3, 1, 4, 1, 5]
    res = generate(model, [prompt], max_new_tokens=5, stop_ids=[])
    seq = list(prompt)
    for _ in range(5):
        seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert res.tokens[0] == seq[len(prompt):]


def test_sampling_is_seeded_and_respects_top_k_and_stop_tokens():
    model = make_model()
    s = Sampling(temperature=0.8, top_k=5, top_p=0.9, seed=123)
    a = generate(model, [[1, 2, 3]], max_new_tokens=8, sampling=s, stop_ids=[])
    b = generate(model, [[1, 2, 3]], max_new_tokens=8, sampling=s, stop_ids=[])
    assert a.tokens == b.tokens
    first = generate(model, [[1, 2, 3]], max_new_tokens=8, stop_ids=[]).tokens[0][0]
    stopped = generate(model, [[1, 2, 3]], max_new_tokens=8, stop_ids=[first])
    assert stopped.tokens[0] == [first] and stopped.finished == [True]
    streamed = []
    generate(model, [[1, 2, 3]], max_new_tokens=4, stop_ids=[], on_token=lambda r, t: streamed.append((r, t)))
    assert [t for _, t in streamed] == generate(model, [[1, 2, 3]], max_new_tokens=4, stop_ids=[]).tokens[0]


def test_top_k_one_sampling_is_greedy():
    model = make_model()
    greedy = generate(model, [[4, 5]], max_new_tokens=5, stop_ids=[]).tokens
    topk1 = generate(model, [[4, 5]], max_new_tokens=5, stop_ids=[], sampling=Sampling(1.0, top_k=1, seed=0)).tokens
    assert greedy == topk1


def test_bad_input():
    model = make_model()
    with pytest.raises(ValueError, match="token id 97 is out of range: valid ids are 0..96"):
        model(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="position 64 is out of range: valid positions are 0..63"):
        model(torch.tensor([[1, 2]]), positions=torch.tensor([[0, 64]]))
    with pytest.raises(ValueError, match="next_ids token id 97 is out of range"):
        make_model(TINY.replace(num_mtp_modules=1)).mtp_forward(torch.zeros(1, 1, TINY.hidden_size),
                                                               torch.tensor([[97]]))
    with pytest.raises(ValueError, match="exceeds the context of 64"):
        generate(model, [[1] * 60], max_new_tokens=10)
    with pytest.raises(ValueError, match="prompt 1: token id -1"):
        generate(model, [[1], [-1]], max_new_tokens=2)
    with pytest.raises(ValueError, match="temperature=-1"):
        Sampling(temperature=-1)
    with pytest.raises(ValueError, match="top_p=0"):
        Sampling(top_p=0)


def test_rope_tables_are_built_once_and_equal_the_float64_formula():
    """RoPE reads cached cos/sin rows; they are bit-equal to computing each position's angle in
    float64 and rounding once, as the model did per call before the tables."""
    pos = torch.tensor([[0, 5, 63], [1, 2, 40]])
    cos, sin = rope_cos_sin(pos, 8, 10000.0, 64)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8))
    angles = pos.double().unsqueeze(-1) * inv_freq
    angles = torch.cat([angles, angles], -1).unsqueeze(1)
    assert cos.shape == (2, 1, 3, 8) and cos.dtype == torch.float32
    assert torch.equal(cos, angles.cos().float()) and torch.equal(sin, angles.sin().float())
    first = rope_tables(8, 10000.0, 64, torch.device("cpu"))
    assert rope_tables(8, 10000.0, 64, torch.device("cpu"))[0] is first[0]  # cached, not rebuilt
    assert rope_tables(8, 10000.0, 64, torch.device("cpu"), torch.float64)[0].dtype == torch.float64


def test_cache_records_padding_on_the_host():
    """Whether a decode step needs a mask is a host fact (a padding mask was passed), not read from
    the device; the masked decode still equals the row decoded alone."""
    model = make_model()
    plain = KVCache.allocate(TINY, 1, 8, torch.float32)
    model(torch.tensor([[5, 6, 7]]), cache=plain)
    assert not plain.padded
    padded = KVCache.allocate(TINY, 2, 8, torch.float32)
    model(torch.tensor([[0, 5, 6, 7], [4, 5, 6, 7]]), cache=padded, attention_mask=torch.tensor([[0, 1, 1, 1],
                                                                                                 [1, 1, 1, 1]]))
    assert padded.padded
    step = model(torch.tensor([[9], [9]]), cache=padded).logits[0]
    torch.testing.assert_close(step, model(torch.tensor([[9]]), cache=plain).logits[0], atol=1e-5, rtol=1e-5)


def test_pangu_parameter_counts_on_meta_device():
    with torch.device("meta"):
        model = PanguProMoEForCausalLM(PRESETS["pangu-pro-moe"])
    counts = model.num_parameters()
    assert counts == {"total": 71_988_781_056, "activated": 16_498_139_136}


def test_routing_results_returned_on_request():
    model = make_model()
    out = model(torch.tensor([[1, 2, 3]]), return_routing=True)
    assert len(out.routing) == TINY.num_layers
    assert out.routing[0].experts_TK.shape == (3, TINY.top_k)
    assert model(torch.tensor([[1, 2, 3]])).routing is None


def test_dense_config_builds_and_runs():
    cfg = TINY.replace(num_experts=0, intermediate_size=40, shared_expert_intermediate_size=0)
    model = make_model(cfg)
    assert model(torch.tensor([[1, 2]])).logits.shape == (1, 2, cfg.vocab_size)
