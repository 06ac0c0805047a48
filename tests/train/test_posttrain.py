"""SFT and GRPO: the assistant-only loss mask, packing boundaries, GRPO advantages and the
zero-advantage mask by hand, a policy-gradient step, the task's checker, and bad input."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from models import make_model, tiny_config

from moge.checkpoint import save_pretrained
from moge.cli import main
from moge.inference.tokenizer import chat_prompt, load_tokenizer
from moge.train.chat import ChatData, encode_conversation, load_conversations
from moge.train.config import TrainingError
from moge.train.packing import PAD_DOC, document_mask, first_fit, pack, packed_forward
from moge.train.rewards import Reward, repetition, resolve
from moge.train.rl import PromptData, RLConfig, RLTrainer, completion_logprobs, group_advantages, grpo_loss
from moge.train.sft import masked_ce
from moge.train.tasks import check_answer, parse_answer, well_formed, worked_answer


@pytest.fixture(scope="module")
def tok(corpus):
    return load_tokenizer(corpus / "data" / "tokenizer.json")


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _chat(user, answer):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


# ---- the loss mask ------------------------------------------------------------------------------------

def test_loss_mask_covers_the_assistant_tokens_and_the_turn_end_only(tok):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the moon"},
                {"role": "assistant", "content": "and stars"}, {"role": "user", "content": "sing"},
                {"role": "assistant", "content": "of love"}]
    conv = encode_conversation(messages, tok)
    stop = tok.turn_end_id
    # by hand: the generation prompt, the answer and the stop id; then the text up to the next open turn
    first = tok.encode(chat_prompt(messages[:2], tok).text)
    between = tok.encode("[unused9]用户：sing[unused10][unused9]助手：")
    expect_ids = first + tok.encode("and stars") + [stop] + between + tok.encode("of love") + [stop]
    expect_mask = [0] * len(first) + [1] * (len(tok.encode("and stars")) + 1) + [0] * len(between) \
        + [1] * (len(tok.encode("of love")) + 1)
    assert conv.ids == expect_ids and conv.mask == expect_mask
    # the loss: mean CE over exactly the masked targets
    logits = torch.randn(1, len(conv.ids) - 1, tok.vocab_size)
    x, y, m = conv.segment()
    got = masked_ce(logits, torch.tensor([y]), torch.tensor([m], dtype=torch.bool))
    picked = [t for t in range(len(y)) if m[t]]
    by_hand = sum(-F.log_softmax(logits[0, t], -1)[y[t]] for t in picked) / len(picked)
    torch.testing.assert_close(got, by_hand)


# ---- packing --------------------------------------------------------------------------------------------

def test_document_mask_and_first_fit_by_hand():
    docs = torch.tensor([[0, 0, 1, 1, 1, PAD_DOC]])
    expect = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0],
                           [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(document_mask(docs)[0, 0], expect)
    assert first_fit([5, 4, 3, 2, 7], rows=2, seq_len=8) == ([[0, 2], [1, 3]], [4])


def test_packed_rows_give_each_document_its_own_logits():
    model = make_model(tiny_config())
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 97, (n,), generator=gen).tolist() for n in (7, 5, 9, 3)]
    segments = [(d, d, [1] * len(d)) for d in docs]
    packed = pack(segments, [[0, 1], [2, 3]], seq_len=13, pad_id=0)
    assert packed.positions_BS[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 0]
    with torch.no_grad():
        out = packed_forward(model, packed.inputs_BS, packed.docs_BS, packed.positions_BS).logits
        for (r, start), d in zip([(0, 0), (0, 7), (1, 0), (1, 9)], docs):
            alone = model(torch.tensor([d])).logits[0]
            torch.testing.assert_close(out[r, start:start + len(d)], alone, rtol=1e-5, atol=1e-5)
        # without the boundaries the second document would see the first: the check above can fail
        plain = model(packed.inputs_BS).logits
        assert not torch.allclose(plain[0, 7:12], model(torch.tensor([docs[1]])).logits[0], atol=1e-3)


def test_sft_batches_mix_sources_by_ratio_and_are_deterministic(tok, tmp_path):
    a = _write(tmp_path / "a.jsonl", [_chat(f"moon {i}", "stars") for i in range(20)])
    b = _write(tmp_path / "b.jsonl", [_chat(f"night {i}", "love") for i in range(20)])
    data = ChatData([(str(a), 3.0), (str(b), 1.0)], tok, seq_len=128, seed=1)
    counts = torch.zeros(2)
    for step in range(40):
        packed, c = data.micro_batch(step, 0, 4)
        counts += torch.tensor(c, dtype=torch.float)
        assert packed.loss_mask_BS.sum() > 0 and not (packed.loss_mask_BS & ~packed.valid_BS).any()
    assert 2.4 < counts[0] / counts[1] < 3.8  # 3:1 by draw, up to sampling noise
    again, _ = data.micro_batch(7, 0, 4)
    assert torch.equal(again.inputs_BS, data.micro_batch(7, 0, 4)[0].inputs_BS)


# ---- GRPO -------------------------------------------------------------------------------------------------

def test_group_advantages_and_zero_advantage_mask_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    adv, keep = group_advantages(rewards, eps=0.0 + 1e-12)
    torch.testing.assert_close(adv[0], torch.tensor([1.0, -1.0, -1.0, 1.0]))  # mean .5, std .5
    s = math.sqrt(0.1875)  # mean .25: sqrt((3 * .0625 + .5625) / 4)
    torch.testing.assert_close(adv[2], torch.tensor([-0.25 / s, -0.25 / s, -0.25 / s, 0.75 / s]))
    assert torch.equal(adv[1], torch.zeros(4)) and keep.tolist() == [True, False, True]


def test_grpo_loss_by_hand_ratio_clip_kl_and_mask():
    adv = torch.tensor([2.0, -1.0])
    tokens = torch.tensor([[True, True], [True, False]])
    old = torch.zeros(2, 2)
    new = torch.tensor([[math.log(1.5), 0.0], [math.log(0.5), 5.0]])
    loss, stats = grpo_loss(new, old, adv, tokens, clip_eps=0.2)
    # token (0,0): min(1.5*2, 1.2*2) = 2.4; (0,1): 2; (1,0): min(.5*-1, .8*-1) = -.8; (1,1) masked out
    torch.testing.assert_close(loss, torch.tensor(-(2.4 + 2.0 - 0.8) / 3))
    assert stats["clip_fraction"] == pytest.approx(2 / 3)
    ref = torch.zeros(2, 2)
    with_kl, stats = grpo_loss(new, old, adv, tokens, clip_eps=0.2, ref_logp_NT=ref, kl_coef=0.5)
    k3 = [math.exp(-math.log(1.5)) + math.log(1.5) - 1, 0.0, math.exp(-math.log(0.5)) + math.log(0.5) - 1]
    torch.testing.assert_close(with_kl, torch.tensor(-(2.4 + 2.0 - 0.8) / 3 + 0.5 * sum(k3) / 3))


def test_a_policy_gradient_step_raises_the_rewarded_sample():
    model = make_model(tiny_config())
    model.train()
    prompt = [5, 9, 14, 3]
    good, bad = [21, 22, 23], [40, 41, 42]
    prompts, comps = [prompt, prompt], [good, bad]
    before, tokens, _, _ = completion_logprobs(model, prompts, comps, pad_id=0, temperature=1.0)
    adv, _ = group_advantages(torch.tensor([[1.0, 0.0]]))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    logp, _, _, _ = completion_logprobs(model, prompts, comps, pad_id=0, temperature=1.0)
    loss, _ = grpo_loss(logp, before.detach(), adv.reshape(-1), tokens, clip_eps=0.2)
    loss.backward()
    opt.step()
    with torch.no_grad():
        after, _, _, _ = completion_logprobs(model, prompts, comps, pad_id=0, temperature=1.0)
    assert after[0].sum() > before[0].sum() + 1e-3 and after[1].sum() < before[1].sum() - 1e-3
    # the log-probabilities are those of the plain forward
    full = F.log_softmax(model(torch.tensor([prompt + good])).logits[0], -1)
    torch.testing.assert_close(after[0], torch.stack([full[3 + i, t] for i, t in enumerate(good)]))


def test_task_checker_format_and_repetition():
    text = worked_answer(47, 385)
    assert text == "7 + 5 + 0 = 1 2, 4 + 8 + 1 = 1 3, 0 + 3 + 1 = 4, answer 4 3 2"
    assert check_answer(text, 432) and not check_answer(text, 433) and parse_answer("answer") is None
    assert well_formed(text) and not well_formed("answer 4 3 2 2 2") and not well_formed(text + " more")
    assert repetition("", [1, 2, 3, 4, 5, 6], {}) == 0.0
    # 9 windows of 4: the first 4 (1234, 2341, 3412, 4123) are new, the other 5 repeat them
    assert repetition("", [1, 2, 3, 4] * 3, {}) == pytest.approx(-5 / 9)
    assert repetition("", [1, 2, 3, 4, 5, 1, 2, 3, 4], {}) == 0.0  # 1 of 6 repeats: under the threshold
    assert repetition("", [1, 2, 3, 4, 5, 1, 2, 3, 4], {}, threshold=0.1) == pytest.approx(-1 / 6)


# ---- the RL trainer and bad input ----------------------------------------------------------------------------

@pytest.fixture
def rl_setup(corpus, tmp_path, tok):
    cfg = tiny_config(vocab_size=300, max_position_embeddings=256)
    model = make_model(cfg)
    save_pretrained(model, tmp_path / "init")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(corpus / "data" / name, tmp_path / "init" / name)
    prompts = _write(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": f"{i} + 1"}],
                                             "answer": str(i + 1)} for i in range(6)])
    return tmp_path, prompts


def _rl(tmp_path, prompts, **kw):
    base = dict(init=str(tmp_path / "init"), prompts=str(prompts), out=str(tmp_path / "rl"), steps=2,
                prompts_per_step=2, group_size=3, max_new_tokens=4, curriculum_pool=3, curriculum_samples=2)
    cfg = RLConfig(**(base | kw))
    return RLTrainer(cfg, PromptData(cfg.prompts, load_tokenizer(cfg.init)), log=kw.pop("log", lambda _m: None))


def test_rl_step_logs_balance_and_masks_groups(rl_setup):
    tmp_path, prompts = rl_setup
    trainer = _rl(tmp_path, prompts)
    calls = iter(range(10**6))
    trainer.rewards = [Reward("alternating", lambda text, ids, item: float(next(calls) % 2), 1.0)]
    row = trainer.train_step()
    assert row["masked_fraction"] == 0.0 and "imbalance" in row and "device_max_over_mean" in row
    assert row["imbalance"] == 0.0 and row["device_max_over_mean"] == 1.0  # MoGE: balanced by construction
    assert "loss" in row and not row.get("all_masked")


def test_an_all_masked_batch_is_logged_and_training_goes_on(rl_setup):
    tmp_path, prompts = rl_setup
    messages = []
    trainer = _rl(tmp_path, prompts, curriculum=False)
    trainer.log = messages.append
    trainer.rewards = [Reward("constant", lambda text, ids, item: 1.0, 1.0)]
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    rows = [trainer.train_step() for _ in range(2)]
    assert all(r["all_masked"] and r["masked_fraction"] == 1.0 for r in rows) and trainer.step == 2
    assert len(messages) == 2 and "zero-advantage mask" in messages[0]
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    # without the mask the same batch is trained on (advantages 0: only the balance terms move weights)
    unmasked = _rl(tmp_path, prompts, curriculum=False, zero_adv_mask=False, out=str(tmp_path / "rl2"))
    unmasked.rewards = trainer.rewards
    assert "all_masked" not in unmasked.train_step()


def test_a_reward_that_raises_names_itself_and_the_prompt(rl_setup):
    tmp_path, prompts = rl_setup
    trainer = _rl(tmp_path, prompts, curriculum=False)

    def broken(text, ids, item):
        raise KeyError("score")

    trainer.rewards = [Reward("broken", broken, 1.0)]
    with pytest.raises(TrainingError, match=r"reward 'broken' raised KeyError.*p.jsonl:\d+, sample 0, at step 0"):
        trainer.train_step()
    assert trainer.latest_checkpoint() is None
    with pytest.raises(ValueError, match="reward 'nope' is unknown"):
        resolve("nope")


def test_bad_chat_data_is_named_by_file_and_line(tok, tmp_path):
    bad_json = _write(tmp_path / "bad.jsonl", [_chat("a", "b"), '{"messages": [', _chat("c", "d")])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed JSON"):
        load_conversations(bad_json, tok, 128)
    no_answer = _write(tmp_path / "q.jsonl", [_chat("a", "b"), {"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(ValueError, match=r"q.jsonl:2: the conversation has no assistant turn"):
        load_conversations(no_answer, tok, 128)
    long = _write(tmp_path / "long.jsonl", [_chat("a", "b"), _chat("moon " * 50, "stars")])
    with pytest.raises(ValueError, match=r"long.jsonl:2: the conversation has \d+ tokens, longer than the context "
                                         r"of seq_len \+ 1 = 101"):
        load_conversations(long, tok, 100)
    no_messages = _write(tmp_path / "m.jsonl", [{"text": "x"}])
    with pytest.raises(ValueError, match=r"m.jsonl:1: field 'messages' must be a non-empty list"):
        load_conversations(no_messages, tok, 128)


def test_sft_cli_refuses_bad_data_without_writing_anything(rl_setup, tmp_path, capsys):
    root, _ = rl_setup
    bad = _write(tmp_path / "bad.jsonl", [_chat("a", "b"), "not json"])
    out = tmp_path / "sft"
    assert main(["sft", "--init", str(root / "init"), "--data", f"{bad}:3", "--out", str(out), "--steps", "1",
                 "--no-progress"]) == 2
    assert "bad.jsonl:2: malformed JSON" in capsys.readouterr().err and not out.exists()
    good = _write(tmp_path / "good.jsonl", [_chat(f"moon {i}", "stars") for i in range(4)])
    assert main(["sft", "--init", str(root / "init"), "--data", f"{good}:3", "--data", str(good), "--out", str(out),
                 "--steps", "2", "--save-every", "1", "--batch-size", "2", "--seq-len", "128", "--no-progress"]) == 0
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000001", "step-000002"]


def _even_share(text, ids, item):
    """A reward that depends on the sample: the share of even token ids."""
    return sum(1 for t in ids if t % 2 == 0) / max(1, len(ids))


def test_curriculum_samples_prompts_whose_pass_rate_is_neither_0_nor_1(rl_setup):
    tmp_path, prompts = rl_setup
    trainer = _rl(tmp_path, prompts, curriculum_every=100)
    trainer.step = 1  # not an estimation step: the table decides
    trainer.rates = {0: [0, 4], 1: [4, 4], 2: [2, 4], 3: [1, 4], 4: [0, 4], 5: [4, 4]}
    chosen, stats = trainer.choose_prompts()
    assert chosen == [2, 3] and stats["curriculum_mixed"] == 2
    trainer.rates = {0: [0, 4], 1: [4, 4], 2: [3, 4]}  # one mixed prompt, the rest filled from unestimated ones
    chosen, _ = trainer.choose_prompts()
    assert 2 in chosen and set(chosen) - {2} <= {3, 4, 5}


def test_rl_resume_is_bit_exact(rl_setup):
    tmp_path, prompts = rl_setup

    def make(out):
        t = _rl(tmp_path, prompts, out=str(tmp_path / out), steps=3, curriculum_every=2)
        t.rewards = [Reward("even", _even_share, 1.0)]
        return t

    full = make("a")
    expected = [full.train_step() for _ in range(3)]
    first = make("b")
    got = [first.train_step()]
    first.save()
    second = make("b")
    assert second.resume() and second.step == 1 and second.rates == first.rates
    got += [second.train_step() for _ in range(2)]
    keys = ("reward", "loss", "grad_norm", "masked_fraction", "completion_tokens")
    assert [[r.get(k) for k in keys] for r in got] == [[r.get(k) for k in keys] for r in expected]


def test_task_make_writes_disjoint_problems_and_a_corpus_with_the_task(corpus, tmp_path, capsys):
    from moge.data.shards import TokenShards
    from moge.train.rl import load_prompts

    out = tmp_path / "arith"
    assert main(["task", "make", "--out", str(out), "--corpus", str(corpus / "data"), "--max-digits", "2",
                 "--pretrain", "50", "--sft", "40", "--plain", "10", "--rl", "30", "--heldout", "20"]) == 0
    pair = lambda text: tuple(int(x.replace(" ", "")) for x in text.split(" + "))  # noqa: E731
    held = {pair(json.loads(line)["messages"][0]["content"]) for line in (out / "heldout.jsonl").open()}
    rl = {pair(json.loads(line)["messages"][0]["content"]) for line in (out / "rl_prompts.jsonl").open()}
    sft = {pair(json.loads(line)["messages"][0]["content"]) for line in (out / "sft_reasoning.jsonl").open()}
    assert len(held) == 20 and not held & rl and not held & sft
    for line in (out / "rl_prompts.jsonl").open():  # every answer is the sum
        item = json.loads(line)
        assert int(item["answer"]) == sum(pair(item["messages"][0]["content"]))
    shards = TokenShards(out / "corpus", verify=True)
    assert shards.domains[-1] == "arith" and shards.num_tokens("train", "arith") > 0
    tok = load_tokenizer(out / "corpus" / "tokenizer.json")
    first = shards.documents("arith", "train")[0]
    text = tok.decode(shards.tokens("train", "arith")[first["offset"]:first["offset"] + first["tokens"]].tolist())
    assert "助手：" in text and check_answer(text, sum(pair(text.split("用户：")[1].split("[unused10]")[0])))
    # an untrained model answers nothing right, and the evaluation says so
    root = tmp_path / "ckpt"
    save_pretrained(make_model(tiny_config(vocab_size=300, max_position_embeddings=256)), root)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(corpus / "data" / name, root / name)
    capsys.readouterr()
    assert main(["task", "eval", "--ckpt", str(root), "--problems", str(out / "heldout.jsonl"), "--limit", "4",
                 "--max-new-tokens", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == 0.0
    items, _ = load_prompts(out / "heldout.jsonl", tok)
    assert items[0]["where"].endswith("heldout.jsonl:1")


def test_rl_cli_end_to_end_and_resume(rl_setup, capsys):
    tmp_path, prompts = rl_setup
    common = ["rl", "--init", str(tmp_path / "init"), "--prompts", str(prompts), "--out", str(tmp_path / "cli"),
              "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "3", "--curriculum-pool", "2",
              "--save-every", "1", "--no-progress", "--reward", "correct", "--reward", "format=0.5", "--json"]
    assert main([*common, "--steps", "1"]) == 0
    assert main([*common, "--steps", "2"]) == 2  # refuses to overwrite a run
    assert main([*common, "--steps", "2", "--resume"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.rindex("{\n"):])["step"] == 2
    rows = [json.loads(line) for line in (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all("masked_fraction" in r for r in rows)
    saved = json.loads((tmp_path / "cli" / "train_config.json").read_text())
    assert saved["rewards"] == ["correct", "format=0.5"] and saved["zero_adv_mask"] is True
    assert main([*common, "--steps", "1", "--reward", "nope", "--out", str(tmp_path / "cli2")]) == 2
    assert "reward 'nope' is unknown" in capsys.readouterr().err
