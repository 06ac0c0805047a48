"""Multi-token prediction (DeepSeek-V3 style MTP module) and speculative decoding with it: shapes,
loss wiring, checkpoints, KV rollback, greedy identity with plain decoding, and the sampled
distribution against the exact target distribution."""

import argparse
import itertools
import json

import pytest
import torch

from moge.checkpoint import load_pretrained, save_pretrained
from moge.cli import main
from moge.commands.train import add_train_arguments, train_config_from_args
from moge.config import ModelConfig
from moge.inference.generate import Sampling, generate, sampling_probs
from moge.nn.model import KVCache, PanguProMoEForCausalLM
from moge.inference.speculative import speculative_generate
from moge.train.step import micro_batch_loss
from moge.train.trainer import TrainConfig, Trainer, build_model
from models import smallest_config, tiny_config

TINY = tiny_config(eos_token_id=2, rope_theta=10000.0, num_mtp_modules=1)


def make_model(cfg=TINY, std=0.2, seed=1):
    return PanguProMoEForCausalLM(cfg).init_weights(std, seed=seed).eval()


# ---- the module ---------------------------------------------------------------------------------


def test_mtp_forward_shapes_keys_and_errors():
    model = make_model()
    ids = torch.randint(3, 97, (2, 9))
    out = model(ids, return_routing=True)
    assert out.pre_norm_hidden.shape == (2, 9, 32) and len(out.routing) == 2
    mtp = model.mtp_forward(out.pre_norm_hidden[:, :-1], ids[:, 1:], return_routing=True)
    assert mtp.logits.shape == (2, 8, 97) and mtp.pre_norm_hidden.shape == (2, 8, 32)
    assert len(mtp.routing) == 1 and mtp.routing[0].experts_TK.shape == (16, 4)
    names = [n for n, _ in model.named_parameters() if n.startswith("model.mtp.")]
    assert {"model.mtp.0.eh_proj.weight", "model.mtp.0.hnorm.weight", "model.mtp.0.enorm.weight",
            "model.mtp.0.norm.weight", "model.mtp.0.self_attn.q_proj.weight"} <= set(names)
    assert dict(model.named_parameters())["model.mtp.0.eh_proj.weight"].shape == (32, 64)
    # counted like the config's arithmetic
    assert model.num_parameters()["total"] == TINY.parameter_counts()["total"]
    # no module / bad shapes
    plain = make_model(TINY.replace(num_mtp_modules=0))
    assert not any(".mtp." in n for n, _ in plain.named_parameters())
    with pytest.raises(ValueError, match="no MTP module"):
        plain.mtp_forward(out.pre_norm_hidden, ids)
    with pytest.raises(ValueError, match="next_ids"):
        model.mtp_forward(out.pre_norm_hidden, ids[:, 1:])
    with pytest.raises(ValueError, match="num_mtp_modules"):
        TINY.replace(num_mtp_modules=2)


def test_trunk_initialisation_does_not_depend_on_the_mtp_module():
    a = make_model(TINY.replace(num_mtp_modules=0), std=0.02, seed=5).state_dict()
    b = make_model(TINY, std=0.02, seed=5).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mtp_with_cache_in_chunks_equals_one_pass():
    model = make_model()
    ids = torch.randint(3, 97, (2, 12))
    with torch.no_grad():
        h = model(ids).pre_norm_hidden
        full = model.mtp_forward(h[:, :-1], ids[:, 1:]).logits
        cache = KVCache.allocate(TINY.replace(num_layers=1), 2, 16, torch.float32)
        parts = [model.mtp_forward(h[:, a:b], ids[:, a + 1:b + 1], cache=cache).logits
                 for a, b in [(0, 5), (5, 6), (6, 11)]]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_config_json_and_checkpoint_round_trip(tmp_path):
    model = make_model()
    assert TINY.to_hf_dict()["num_nextn_predict_layers"] == 1
    assert "num_nextn_predict_layers" not in TINY.replace(num_mtp_modules=0).to_hf_dict()  # old layout unchanged
    assert ModelConfig.from_hf_dict(TINY.to_hf_dict()) == TINY
    save_pretrained(model, tmp_path / "ckpt")
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.mtp.0.mlp.experts.7.down_proj.weight" in index  # per-expert keys, as for the trunk
    assert "model.mtp.0.mlp.gate.weight" in index
    back = load_pretrained(tmp_path / "ckpt")
    assert back.config.num_mtp_modules == 1
    sd, sd2 = model.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    # a checkpoint without the module loads as before
    plain = make_model(TINY.replace(num_mtp_modules=0))
    save_pretrained(plain, tmp_path / "plain")
    assert load_pretrained(tmp_path / "plain").config.num_mtp_modules == 0


# ---- joint training ----------------------------------------------------------------------------


class FakeData:
    vocab_size, eos_id, pad_id, tokenizer_path = 97, 2, 0, None
    domains = ["a", "b"]

    def train_batch(self, step, micro, batch_size):
        return torch.randint(3, 97, (batch_size, 17), generator=torch.Generator().manual_seed(step * 7 + micro))

    def val_batches(self, domain, windows, batch_size):
        yield torch.randint(3, 97, (batch_size, 17), generator=torch.Generator().manual_seed(len(domain)))


def _trainer(tmp_path, cfg_model, **kw):
    path = tmp_path / f"model-{cfg_model.num_mtp_modules}.json"
    cfg_model.to_json(path)
    cfg = TrainConfig(model=str(path), out=str(tmp_path / "run"), batch_size=4, seq_len=16, warmup=1, lr=1e-2,
                      **kw)
    return Trainer(cfg, FakeData(), log=lambda _m: None)


def test_zero_mtp_weight_leaves_training_bit_identical(tmp_path):
    plain = _trainer(tmp_path, TINY.replace(num_mtp_modules=0))
    with_module = _trainer(tmp_path, TINY.replace(num_mtp_modules=0), mtp_modules=1)  # --mtp, weight 0
    assert with_module.model.config.num_mtp_modules == 1
    rows_a = [plain.train_step() for _ in range(3)]
    rows_b = [with_module.train_step() for _ in range(3)]
    assert [r["ce"] for r in rows_a] == [r["ce"] for r in rows_b] and "mtp" not in rows_b[0]
    sa, sb = plain.model.state_dict(), with_module.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_mtp_loss_reaches_the_module_and_is_logged(tmp_path):
    trainer = _trainer(tmp_path, TINY, mtp_loss_weight=0.5)
    x_y = FakeData().train_batch(0, 0, 4)
    loss, stats = micro_batch_loss(trainer.model, trainer.model_cfg, trainer.cfg, x_y[:, :-1], x_y[:, 1:])
    loss.backward()
    grads = {n: p.grad for n, p in trainer.model.named_parameters() if n.startswith("model.mtp.")}
    assert grads and all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "experts" not in n)
    assert "mtp" in stats and stats["mtp"] > 0
    # the logged MTP CE is CE of predicting y_{t+1} from position t
    with torch.no_grad():
        out = trainer.model(x_y[:, :-1])
        m = trainer.model.mtp_forward(out.pre_norm_hidden[:, :-1], x_y[:, 1:-1]).logits
        expect = torch.nn.functional.cross_entropy(m.reshape(-1, 97), x_y[:, 2:].reshape(-1))
    assert stats["mtp"] == pytest.approx(float(expect), rel=1e-5)
    val = trainer.evaluate()
    assert set(val) == {"a", "b", "mtp/a", "mtp/b"}


def test_mtp_bad_settings():
    with pytest.raises(ValueError, match="MTP module"):
        build_model(TINY.replace(num_mtp_modules=0), TrainConfig(mtp_loss_weight=0.3))
    with pytest.raises(ValueError, match="mtp_loss_weight"):
        TrainConfig(mtp_loss_weight=-1.0)
    with pytest.raises(ValueError, match="mtp_modules"):
        TrainConfig(mtp_modules=2)
    p = argparse.ArgumentParser()
    add_train_arguments(p)
    cfg = train_config_from_args(p.parse_args(["--mtp", "--mtp-weight", "0.3"]))
    assert cfg.mtp_modules == 1 and cfg.mtp_loss_weight == 0.3


# ---- KV rollback -------------------------------------------------------------------------------


def test_kv_rollback_then_continue_equals_recomputation():
    model = make_model()
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]  # padded batch
    ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 10, 11, 12]])
    mask = (ids != 0).long()
    with torch.inference_mode():
        cache = KVCache.allocate(TINY, 2, 16, torch.float32)
        model(ids, cache=cache, attention_mask=mask)
        model(torch.tensor([[20, 21, 22], [30, 31, 32]]), cache=cache)  # last token + 2 drafts
        cache.truncate(6)  # keep the last token only: both drafts rejected
        with pytest.raises(ValueError, match="length"):
            cache.truncate(7)
        got = model(torch.tensor([[40, 41], [42, 43]]), cache=cache).logits
        for row, (p, cont) in enumerate(zip(prompts, [[20, 40, 41], [30, 42, 43]])):
            want = model(torch.tensor([p + cont])).logits[0, -2:]
            torch.testing.assert_close(got[row], want, atol=1e-5, rtol=1e-5)


# ---- greedy identity ---------------------------------------------------------------------------


def _with_oracle_drafts(monkeypatch, model, reference, miss_every):
    """Make the MTP module propose the reference continuation (each row's own token sequence),
    except at positions where (position + row) % miss_every == 0, so that drafts are mostly
    accepted, rows accept different numbers (holes in a batch's caches) and the accept, bonus and
    rollback paths all run."""
    original = model.mtp_forward

    def drafting(hidden, next_ids, *, cache=None, **kw):
        out = original(hidden, next_ids, cache=cache, **kw)
        length, S = cache.length, out.logits.shape[1]
        valid = cache.valid_BT[:, :length]
        position = valid.long().cumsum(-1) - 1
        for row, seq in enumerate(reference):
            for i in range(S):
                col = length - S + i
                target = int(position[row, col]) + 2  # slot t predicts the token at t + 2
                if valid[row, col] and target < len(seq) and (target + row) % miss_every:
                    out.logits[row, i, seq[target]] += 1e4
        return out

    monkeypatch.setattr(model, "mtp_forward", drafting)


@pytest.mark.parametrize("prompts", [[[5, 6, 7, 8]], [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]])
def test_greedy_output_equals_plain_greedy(monkeypatch, prompts):
    model = make_model()
    stops = [[], [3, 4]]
    for stop in stops:
        plain = generate(model, prompts, max_new_tokens=20, stop_ids=stop)
        for k in (1, 3):
            spec = speculative_generate(model, prompts, max_new_tokens=20, stop_ids=stop, num_draft=k)
            assert spec.tokens == plain.tokens and spec.finished == plain.finished
    # with drafts that are mostly right: multi-token acceptance, bonus tokens, rollbacks
    plain = generate(model, prompts, max_new_tokens=20, stop_ids=[])
    _with_oracle_drafts(monkeypatch, model, [p + t for p, t in zip(prompts, plain.tokens)], miss_every=5)
    for k in (1, 2, 4):
        spec = speculative_generate(model, prompts, max_new_tokens=20, stop_ids=[], num_draft=k)
        assert spec.tokens == plain.tokens and spec.accepted == spec.emitted_drafts  # each row its own run
        assert spec.acceptance_rate > 0.4 and spec.decode_steps < 19
    streamed = []
    spec = speculative_generate(model, prompts, max_new_tokens=7, stop_ids=[], num_draft=3,
                                on_token=lambda r, t: streamed.append((r, t)))
    assert spec.tokens == [t[:7] for t in plain.tokens] and len(streamed) == 7 * len(prompts)


def test_bad_input():
    model = make_model()
    with pytest.raises(ValueError, match="num_draft"):
        speculative_generate(model, [[1, 2]], num_draft=0)
    with pytest.raises(ValueError, match="MTP module"):
        speculative_generate(make_model(TINY.replace(num_mtp_modules=0)), [[1, 2]])
    with pytest.raises(ValueError, match="max_new_tokens"):
        speculative_generate(model, [[1, 2]], max_new_tokens=0)
    with pytest.raises(ValueError, match="out of range"):
        speculative_generate(model, [[1, 999]])
    with pytest.raises(ValueError, match="context"):
        speculative_generate(model, [[1, 2]], max_new_tokens=63)
    one = speculative_generate(model, [[1, 2]], max_new_tokens=1, stop_ids=[])
    assert len(one.tokens[0]) == 1 and one.drafted == 0


# ---- sampling follows the target distribution ----------------------------------------------------

SMALL = smallest_config(vocab_size=8, max_position_embeddings=32, eos_token_id=None, bos_token_id=None, pad_token_id=0,
                        num_mtp_modules=1)


def _exact_marginals(model, prompt, new, sampling):
    """Exact distribution of each of the first `new` generated tokens: the chain rule over every
    continuation (V^(new-1) sequences, one forward)."""
    V = model.config.vocab_size
    conts = torch.tensor(list(itertools.product(range(V), repeat=new - 1)))
    ids = torch.cat([torch.tensor(prompt).expand(len(conts), -1), conts], dim=1)
    with torch.no_grad():
        logits = model(ids).logits[:, len(prompt) - 1:]  # [N, new, V]
    probs = sampling_probs(logits.reshape(-1, V), sampling).view(len(conts), new, V).double()
    joint = torch.ones(len(conts), dtype=torch.float64)  # P(x_1..x_{new-1}) of each continuation
    marginals = []
    for i in range(new):
        # each prefix x_1..x_{i} appears V^(new-1-i) times among the continuations
        dup = V ** (new - 1 - i)
        marginals.append((joint.unsqueeze(-1) * probs[:, i]).sum(0) / dup)
        if i < new - 1:
            joint = joint * probs[torch.arange(len(conts)), i, conts[:, i]]
    return marginals


def _tv(samples, exact):
    counts = torch.bincount(torch.tensor(samples), minlength=len(exact)).double()
    return 0.5 * float((counts / counts.sum() - exact).abs().sum())


@pytest.mark.parametrize("sampling,num_draft,rows,bound", [
    (Sampling(temperature=1.0), 2, 20000, 0.02),
    (Sampling(temperature=0.8, top_k=5, top_p=0.9), 1, 10000, 0.03),
])
def test_sampled_tokens_follow_the_target_distribution(sampling, num_draft, rows, bound):
    """Many rows of one prompt in one batch; every row runs its own accept / resample / bonus
    chain (rows that accept fewer drafts get holes in the caches). The marginal of each of the
    first 4 generated tokens must match the exact target distribution: the sampling noise is
    about bound / 3 in total variation, while wrong rules move at least one marginal by more
    (keeping every draft: 0.3 and up; resampling from p instead of norm(max(0, p - q)): 0.07 and up;
    the bonus token from the residual: 0.03)."""
    model = make_model(SMALL, std=1.0, seed=7)  # a seed whose MTP module's drafts are neither always nor never kept
    prompt, new = [1, 2, 3], 4
    exact = _exact_marginals(model, prompt, new, sampling)
    seeded = Sampling(sampling.temperature, sampling.top_k, sampling.top_p, seed=11)
    res = speculative_generate(model, [prompt] * rows, max_new_tokens=new, sampling=seeded, num_draft=num_draft)
    assert 0.1 < res.acceptance_rate < 0.9 and res.accepted == res.emitted_drafts
    for i in range(new):
        assert _tv([t[i] for t in res.tokens], exact[i]) < bound
    # the first token comes from the prefill exactly as in generate()
    plain = generate(model, [prompt] * rows, max_new_tokens=1, sampling=seeded)
    assert [t[0] for t in res.tokens] == [t[0] for t in plain.tokens]


# ---- command line ------------------------------------------------------------------------------


def test_generate_cli_speculative_json(tmp_path, capsys):
    save_pretrained(make_model(), tmp_path / "ckpt")
    args = ["generate", "--model", str(tmp_path / "ckpt"), "--token-ids", "5,6,7", "--max-new-tokens", "6",
            "--threads", "1", "--json"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(args + ["--speculative", "--num-draft", "2"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert spec["completions"][0]["tokens"] == plain["completions"][0]["tokens"]
    assert spec["speculative"]["num_draft"] == 2 and 0 <= spec["speculative"]["acceptance_rate"] <= 1


# ---- under expert parallelism: ranks in lockstep, each decoding its own rows ------------------------------

def _lockstep_worker(rank, world, num_draft):
    from moge.parallel import ExpertParallel, parallelize
    from moge.parallel.lockstep import all_ranks_done, min_over_ranks

    # each rank its own rows and lengths: rank 0 finishes long before rank 1 and keeps stepping
    prompts = [[5, 6, 7], [8, 9]] if rank == 0 else [[10, 11, 12, 13]]
    max_new = 3 if rank == 0 else 12
    model = make_model()
    want = generate(model, prompts, max_new_tokens=max_new, stop_ids=[]).tokens
    alone = speculative_generate(model, prompts, max_new_tokens=max_new, stop_ids=[], num_draft=num_draft).tokens
    split = parallelize(model, ExpertParallel(world))
    got = speculative_generate(split, prompts, max_new_tokens=max_new, stop_ids=[], num_draft=num_draft,
                               all_done=all_ranks_done, agree_min=min_over_ranks)
    return {"want": want, "alone": alone, "got": got.tokens}


@pytest.mark.parametrize("num_draft", [1, 2])
def test_speculative_under_expert_parallel_equals_greedy(num_draft):
    from moge.parallel.launch import spawn

    for r in spawn(_lockstep_worker, 2, num_draft):
        assert r["got"] == r["alone"] == r["want"]
