"""Config validation names the field, the value and what is valid; HF config.json round trip."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moge.config import PRESETS, ModelConfig, MoEConfig, load_model_config
from moge.errors import ConfigError


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(num_experts=10, num_groups=4, top_k=4), r"num_groups=4 is invalid: must divide num_experts=10"),
    (dict(num_experts=16, num_groups=4, top_k=6), r"top_k=6 is invalid: must be a multiple of num_groups=4"),
    (dict(num_experts=8, num_groups=4, top_k=12), r"top_k=12 is invalid: must be <= num_experts=8"),
    (dict(num_experts=16, num_groups=8, top_k=16, expert_intermediate_size=4), None),
    (dict(num_experts=0), r"num_experts=0 is invalid: must be a positive integer"),
    (dict(hidden_size=-3), r"hidden_size=-3 is invalid"),
    (dict(top_k=0), r"top_k=0 is invalid"),
    (dict(router="hash"), r"router='hash' is invalid: choose one of"),
    (dict(backend="cuda"), r"backend='cuda' is invalid"),
    (dict(router="group_limited", topk_groups=9), r"topk_groups=9 is invalid: must be <= num_groups=8"),
    (dict(expert_to_group=(0, 1)), r"expert_to_group=.* needs one group id per expert"),
    (dict(num_experts=4, num_groups=2, top_k=2, expert_to_group=(0, 0, 0, 1)),
     r"must put exactly 2 experts in each"),
    (dict(shared_expert_sizes=(8, 0)), r"shared_expert_sizes\[1\]=0 is invalid"),
])
def test_moe_config_errors(kwargs, pattern):
    full = dict(hidden_size=8, expert_intermediate_size=4) | kwargs
    if pattern is None:
        MoEConfig(**full)  # K' = N/M is allowed (every expert chosen)
        return
    with pytest.raises(ValueError, match=pattern):
        MoEConfig(**full)


def test_k_prime_greater_than_group_size_is_rejected():
    # 4 groups of 2 experts, K'=3 > 2 (any K' > N/M also means K > N)
    with pytest.raises(ValueError, match="top_k=12 is invalid"):
        MoEConfig(hidden_size=8, expert_intermediate_size=4, num_experts=8, num_groups=4, top_k=12)


@given(n_per=st.integers(1, 8), m=st.integers(1, 8), kp=st.integers(1, 8))
def test_valid_grouped_configs_construct(n_per, m, kp):
    if kp > n_per:
        with pytest.raises(ValueError):
            MoEConfig(hidden_size=8, expert_intermediate_size=4, num_experts=n_per * m, num_groups=m, top_k=kp * m)
    else:
        c = MoEConfig(hidden_size=8, expert_intermediate_size=4, num_experts=n_per * m, num_groups=m, top_k=kp * m)
        assert c.top_k_per_group == kp and c.experts_per_group == n_per


def test_pangu_parameter_counts_match_the_paper_exactly():
    counts = PRESETS["pangu-pro-moe"].parameter_counts()
    assert counts["total"] == 71_988_781_056
    assert counts["activated"] == 16_498_139_136
    assert counts["per_layer_total"] == 1_467_045_952
    assert counts["attention_per_layer"] == 62_926_848


def test_hf_config_round_trip(tmp_path):
    cfg = PRESETS["pangu-pro-moe"]
    d = cfg.to_hf_dict()
    assert d["model_type"] == "PanguProMoE" and d["architectures"] == ["PanguProMoEForCausalLM"]
    assert d["num_experts"] == 64 and d["num_experts_per_tok"] == 8 and d["moe_intermediate_size"] == 1344
    cfg.to_json(tmp_path / "config.json")
    assert load_model_config(tmp_path) == cfg


def test_release_style_config_without_our_fields_gets_release_defaults(tmp_path):
    release = {"architectures": ["PanguProMoEForCausalLM"], "model_type": "PanguProMoE", "hidden_act": "silu",
               "vocab_size": 153376, "hidden_size": 5120, "num_hidden_layers": 48, "num_attention_heads": 40,
               "num_key_value_heads": 8, "num_experts": 64, "num_experts_per_tok": 8,
               "moe_intermediate_size": 1344, "shared_expert_intermediate_size": 5376, "rms_norm_eps": 1e-5,
               "rope_theta": 16000000.0, "max_position_embeddings": 131072, "tie_word_embeddings": False,
               "bos_token_id": 1, "eos_token_id": 45892, "pad_token_id": 0, "torch_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(release))
    cfg = ModelConfig.from_json(tmp_path / "config.json")
    assert cfg == PRESETS["pangu-pro-moe"]
    assert cfg.moe().top_k_per_group == 1


@pytest.mark.parametrize("changes,pattern", [
    (dict(num_heads=7), r"num_heads=7 is invalid: must divide hidden_size=5120"),
    (dict(num_kv_heads=3), r"num_kv_heads=3 is invalid: must divide num_heads=40"),
    (dict(num_groups=7), r"num_groups=7 is invalid"),
    (dict(eos_token_id=10**6), r"eos_token_id=1000000 is invalid"),
    (dict(num_experts=0, intermediate_size=0), r"intermediate_size=0 is invalid"),
])
def test_model_config_errors(changes, pattern):
    with pytest.raises(ValueError, match=pattern):
        PRESETS["pangu-pro-moe"].replace(**changes)


def test_bad_config_files(tmp_path):
    with pytest.raises(ValueError, match="neither a preset"):
        load_model_config("no-such-model")
    p = tmp_path / "config.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model_config(p)
    p.write_text(json.dumps({"hidden_act": "gelu"}))
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        load_model_config(p)


QWEN2_MOE = {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_act": "silu",
             "vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
             "shared_expert_intermediate_size": 64, "intermediate_size": 128, "norm_topk_prob": False,
             "mlp_only_layers": [], "decoder_sparse_step": 1, "eos_token_id": [2, 3], "bos_token_id": 1}


def test_qwen2_moe_config_is_refused_naming_the_field():
    """Its gated shared expert and bias-free o_proj are not this model: refuse, do not load as MoGE."""
    with pytest.raises(ConfigError, match=r"model_type='qwen2_moe' is invalid: .*shared_expert_gate"):
        ModelConfig.from_hf_dict(QWEN2_MOE)


def test_another_family_without_our_routing_fields_is_refused(tmp_path):
    foreign = PRESETS["moge-tiny"].to_hf_dict() | {"model_type": "mixtral"}
    del foreign["num_expert_groups"], foreign["moe_router"]
    (tmp_path / "config.json").write_text(json.dumps(foreign))
    with pytest.raises(ConfigError, match=r"model_type='mixtral' is invalid: .*num_expert_groups or moe_router"):
        load_model_config(tmp_path)


def test_another_family_that_states_its_routing_is_mapped():
    d = {k: v for k, v in QWEN2_MOE.items() if k != "model_type"} | {
        "model_type": "custom_moe", "moe_router": "softmax_topk", "norm_topk_prob": True, "eos_token_id": [2]}
    cfg = ModelConfig.from_hf_dict(d)
    assert (cfg.router, cfg.renormalize, cfg.top_k, cfg.eos_token_id) == ("softmax_topk", True, 2, 2)
    assert (cfg.num_experts, cfg.expert_intermediate_size, cfg.shared_expert_intermediate_size) == (8, 32, 64)
    assert ModelConfig.from_hf_dict(d | {"norm_topk_prob": False}).renormalize is False


@pytest.mark.parametrize("changes,pattern", [
    ({"mlp_only_layers": [0]}, r"mlp_only_layers=\[0\] is invalid: must be empty"),
    ({"decoder_sparse_step": 2}, r"decoder_sparse_step=2 is invalid: must be 1"),
    ({"eos_token_id": [2, 3]}, r"eos_token_id=\[2, 3\] is invalid: give one id"),
    ({"norm_topk_prob": True, "moe_renormalize": False}, r"norm_topk_prob=True is invalid: contradicts"),
])
def test_fields_this_model_cannot_honour_are_refused(changes, pattern):
    d = PRESETS["moge-tiny"].to_hf_dict() | changes
    with pytest.raises(ConfigError, match=pattern):
        ModelConfig.from_hf_dict(d)


def test_release_style_fields_that_match_this_model_still_load():
    d = PRESETS["moge-tiny"].to_hf_dict() | {"mlp_only_layers": [], "decoder_sparse_step": 1, "eos_token_id": [2]}
    assert ModelConfig.from_hf_dict(d) == PRESETS["moge-tiny"]


def test_deepseek_tiny_is_moge_tiny_with_deepseek_v3_routing():
    import torch

    from moge.nn.model import PanguProMoEForCausalLM

    ds, moge = PRESETS["deepseek-tiny"], PRESETS["moge-tiny"]
    assert (ds.router, ds.topk_groups) == ("group_limited", 2)
    assert ds.replace(router="grouped", topk_groups=4) == moge  # every other field is moge-tiny's
    with torch.device("meta"):
        ds_counts = PanguProMoEForCausalLM(ds).num_parameters()
        moge_counts = PanguProMoEForCausalLM(moge).num_parameters()
    assert ds_counts == moge_counts
    assert ds.parameter_counts()["activated"] == moge.parameter_counts()["activated"] == moge_counts["activated"]


def test_group_limited_config_round_trips(tmp_path):
    cfg = PRESETS["deepseek-tiny"]
    d = cfg.to_hf_dict()
    assert (d["moe_router"], d["moe_topk_groups"], d["num_expert_groups"]) == ("group_limited", 2, 4)
    cfg.to_json(tmp_path / "config.json")
    assert load_model_config(tmp_path) == cfg
    assert load_model_config("deepseek-tiny") is cfg


def test_deepseek_tiny_trains_and_updates_its_selection_bias(corpus, tmp_path):
    import math

    import torch

    from moge.nn.routing import Router
    from moge.train.config import TrainConfig
    from moge.train.data import load_data
    from moge.train.trainer import Trainer

    cfg = TrainConfig(model="deepseek-tiny", data=str(corpus / "data"), out=str(tmp_path / "run"), steps=3,
                      batch_size=4, seq_len=16, warmup=1, lr=1e-2, eval_every=100, eval_windows=2, save_every=100,
                      bias_update_rate=1e-2)
    trainer = Trainer(cfg, load_data(cfg), log=lambda _m: None)
    routers = [m for m in trainer.model.modules() if isinstance(m, Router)]
    assert len(routers) == 4 and all(r.cfg.router == "group_limited" and r.cfg.topk_groups == 2 for r in routers)
    for _ in range(3):
        before = [r.expert_bias.clone() for r in routers]
        row = trainer.train_step()
        assert math.isfinite(row["ce"]) and math.isfinite(row["aux"])
        for r, b in zip(routers, before):
            # one sign update per optimizer step: each expert's bias moves by -rate, 0 or +rate, and
            # an unbalanced layer moves some
            step = (r.expert_bias - b) / 1e-2
            torch.testing.assert_close(step, step.round().clamp(-1, 1))
            assert step.abs().sum() > 0
