"""Checkpoints: the released key layout, bit-exact round trips, dtype conversion, safe overwrites and
clear errors for every kind of bad file."""

import dataclasses
import json
import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moge import checkpoint as ck
from moge.checkpoint import (
    CheckpointError,
    from_release_state_dict,
    load_pretrained,
    load_state_dict_into,
    release_state_dict,
    save_pretrained,
)
from moge.checkpoint import save as ck_save
from moge.checkpoint.build import meta_model
from moge.config import PRESETS
from moge.errors import MissingFileError
from moge.nn.model import PanguProMoEForCausalLM
from moge.nn.routing import Router
from models import tiny_config

# Same structure as the release, small: 2 layers, 8 experts in 4 groups, shared expert, biases.
SMALL = tiny_config(vocab_size=101)
SHARD = 6000  # bytes: splits SMALL (fp32) into many shards


def make_model(cfg=SMALL, seed=0):
    torch.manual_seed(seed)
    model = PanguProMoEForCausalLM(cfg)
    with torch.no_grad():  # no parameter left at a constant init value (ones, zeros)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def logits(model, seed=1):
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def files_of(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def index_of(directory):
    return json.loads((directory / ck.INDEX_NAME).read_text())


def release_keys_from_spec(cfg):
    """The release's key list, written from the specification rather than from moge.checkpoint.layout."""
    keys = {"model.embed_tokens.weight": [cfg.vocab_size, cfg.hidden_size], "model.norm.weight": [cfg.hidden_size],
            "lm_head.weight": [cfg.vocab_size, cfg.hidden_size]}
    d, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_size, cfg.num_kv_heads * cfg.head_size
    f, s, n = cfg.expert_intermediate_size, cfg.shared_expert_intermediate_size, cfg.num_experts
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        keys.update({p + "input_layernorm.weight": [d], p + "post_attention_layernorm.weight": [d],
                     p + "self_attn.q_proj.weight": [q, d], p + "self_attn.q_proj.bias": [q],
                     p + "self_attn.k_proj.weight": [kv, d], p + "self_attn.k_proj.bias": [kv],
                     p + "self_attn.v_proj.weight": [kv, d], p + "self_attn.v_proj.bias": [kv],
                     p + "self_attn.o_proj.weight": [d, q], p + "self_attn.o_proj.bias": [d],
                     p + "mlp.gate.weight": [n, d], p + "mlp.router_scale": [1, n],
                     p + "mlp.shared_expert.gate_proj.weight": [s, d], p + "mlp.shared_expert.up_proj.weight": [s, d],
                     p + "mlp.shared_expert.down_proj.weight": [d, s]})
        for e in range(n):
            keys.update({p + f"mlp.experts.{e}.gate_proj.weight": [f, d], p + f"mlp.experts.{e}.up_proj.weight": [f, d],
                         p + f"mlp.experts.{e}.down_proj.weight": [d, f]})
    return keys


def saved_shapes(directory):
    out = {}
    for name in set(index_of(directory)["weight_map"].values()):
        with safe_open(directory / name, framework="pt") as f:
            out.update({k: f.get_slice(k).get_shape() for k in f.keys()})
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """SMALL saved in fp32 over several shards (read-only for the tests that share it)."""
    directory = tmp_path_factory.mktemp("ckpt") / "small"
    model = make_model()
    save_pretrained(model, directory, max_shard_bytes=SHARD)
    return model, directory


def copy_of(saved_dir, tmp_path):
    out = tmp_path / "copy"
    out.mkdir()
    for name, data in files_of(saved_dir).items():
        (out / name).write_bytes(data)
    return out


# ---- layout -------------------------------------------------------------------------------------


def test_keys_and_shapes_are_the_release_layout(saved):
    _, directory = saved
    assert saved_shapes(directory) == release_keys_from_spec(SMALL)
    index = index_of(directory)
    assert set(index["weight_map"]) == set(release_keys_from_spec(SMALL))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", s) for s in shards)
    assert index["metadata"]["total_size"] == sum(
        (directory / s).stat().st_size for s in shards) - sum(_header_bytes(directory / s) for s in shards)
    assert json.loads((directory / "config.json").read_text())["model_type"] == "PanguProMoE"


def _header_bytes(path):
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def test_expert_tensors_are_the_slices_of_the_stacked_weights(saved):
    model, _ = saved
    rel = release_state_dict(model)
    experts = model.model.layers[1].mlp.experts
    f = SMALL.expert_intermediate_size
    assert torch.equal(rel["model.layers.1.mlp.experts.5.gate_proj.weight"], experts.gate_up_proj[5, :f])
    assert torch.equal(rel["model.layers.1.mlp.experts.5.up_proj.weight"], experts.gate_up_proj[5, f:])
    assert torch.equal(rel["model.layers.1.mlp.experts.5.down_proj.weight"], experts.down_proj[5])
    assert torch.equal(rel["model.layers.1.mlp.router_scale"], model.model.layers[1].mlp.router.router_scale)
    back = from_release_state_dict(rel, SMALL)
    ours = model.state_dict()
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)


# ---- round trips --------------------------------------------------------------------------------


def test_round_trip_is_bit_exact_on_the_tiny_preset(tmp_path):
    cfg = PRESETS["moge-tiny"]
    model = make_model(cfg)
    save_pretrained(model, tmp_path / "a", max_shard_bytes=3 * 2**20)
    loaded = load_pretrained(tmp_path / "a")
    save_pretrained(loaded, tmp_path / "b", max_shard_bytes=3 * 2**20)
    a, b = files_of(tmp_path / "a"), files_of(tmp_path / "b")
    assert len([n for n in a if n.endswith(".safetensors")]) > 2
    assert a.keys() == b.keys() and all(a[n] == b[n] for n in a)  # shards, index and config byte for byte
    for (k, x), (k2, y) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), k
    assert torch.equal(logits(model), logits(loaded))
    assert loaded.config == cfg


def test_loaded_model_is_complete_with_rebuilt_buffers(saved):
    model, directory = saved
    loaded = load_pretrained(directory)
    fresh = PanguProMoEForCausalLM(SMALL)
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    assert dict(loaded.named_buffers()).keys() == dict(fresh.named_buffers()).keys()
    for (name, b), (_, want) in zip(loaded.named_buffers(), fresh.named_buffers(), strict=True):
        assert torch.equal(b, want), name
    assert all(p.requires_grad for p in loaded.parameters())
    assert torch.equal(logits(loaded), logits(model))


def test_load_into_an_existing_model_in_place(saved):
    model, directory = saved
    target = make_model(seed=5)
    weight = target.model.layers[0].mlp.experts.gate_up_proj
    load_state_dict_into(target, directory)
    assert target.model.layers[0].mlp.experts.gate_up_proj is weight
    assert torch.equal(logits(target), logits(model))
    with pytest.raises(ValueError, match="meta device"):
        load_state_dict_into(meta_model(SMALL), directory)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, "bf16"])
def test_dtype_conversion_on_load_and_save(saved, tmp_path, dtype):
    model, directory = saved
    want = ck.resolve_dtype(dtype)
    loaded = load_pretrained(directory, dtype=dtype)
    for (k, x), y in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert y.dtype == want and torch.equal(y, x.to(want)), k
    save_pretrained(model, tmp_path / "half", dtype=dtype)
    reloaded = load_pretrained(tmp_path / "half")  # default: the dtype in the files
    assert all(t.dtype == want for t in reloaded.state_dict().values())
    up = load_pretrained(tmp_path / "half", dtype=torch.float32)
    pairs = zip(up.state_dict().values(), reloaded.state_dict().values(), strict=True)
    assert all(torch.equal(u, r.float()) for u, r in pairs)
    with pytest.raises(ValueError, match="dtype='int8'"):
        load_pretrained(directory, dtype="int8")


def test_tied_embeddings_save_lm_head_once(tmp_path):
    cfg = SMALL.replace(tie_word_embeddings=True)
    model = make_model(cfg)
    save_pretrained(model, tmp_path / "tied")
    assert "lm_head.weight" not in index_of(tmp_path / "tied")["weight_map"]
    loaded = load_pretrained(tmp_path / "tied")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded), logits(model))


def test_dense_model_round_trip(tmp_path):
    cfg = SMALL.replace(num_experts=0, intermediate_size=40, top_k=1, num_groups=1, router="topk",
                        shared_expert_intermediate_size=0)
    model = make_model(cfg)
    save_pretrained(model, tmp_path / "dense")
    assert "model.layers.0.mlp.gate_proj.weight" in index_of(tmp_path / "dense")["weight_map"]
    assert torch.equal(logits(load_pretrained(tmp_path / "dense")), logits(model))


def test_expert_bias_is_saved_under_our_key_and_optional_on_load(saved, tmp_path):
    model = make_model()
    block = model.model.layers[1].mlp
    block.cfg = dataclasses.replace(block.cfg, aux_free_bias=True)
    block.router = Router(block.cfg)
    with torch.no_grad():
        block.router.gate.weight.normal_()
        block.router.expert_bias.copy_(torch.linspace(-1, 1, SMALL.num_experts))
    save_pretrained(model, tmp_path / "bias")
    assert "model.layers.1.mlp.router.expert_bias" in index_of(tmp_path / "bias")["weight_map"]
    loaded = load_pretrained(tmp_path / "bias")
    assert torch.equal(loaded.model.layers[1].mlp.router.expert_bias, block.router.expert_bias)
    assert loaded.model.layers[0].mlp.router.expert_bias is None
    assert torch.equal(logits(loaded), logits(model))
    # a checkpoint without the bias loads into a model that has one: the bias keeps its value
    _, plain = saved
    load_state_dict_into(model, plain)
    assert torch.equal(block.router.expert_bias, torch.linspace(-1, 1, SMALL.num_experts))


def with_biased_routers(model):
    """Every router (main layers and MTP modules) rebuilt with the aux-loss-free bias, as training with
    a bias update rate does, holding distinct non-zero biases and non-trivial gate weights."""
    routers = [(n, m) for n, m in model.named_modules() if isinstance(m, Router)]
    for i, (name, router) in enumerate(routers):
        parent, _, attr = name.rpartition(".")
        biased = Router(dataclasses.replace(router.cfg, aux_free_bias=True))
        with torch.no_grad():
            biased.gate.weight.copy_(torch.randn_like(biased.gate.weight))
            biased.router_scale.copy_(router.router_scale)
            biased.expert_bias.copy_(torch.linspace(-1, 1, router.cfg.num_experts).roll(i) * (i + 1))
        setattr(model.get_submodule(parent), attr, biased)
    return model


def mtp_logits(model, seed=2):
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        hidden = model(ids).pre_norm_hidden
        return model.mtp_forward(hidden, ids.roll(-1, dims=1)).logits


def test_every_router_bias_round_trips_including_the_mtp_modules(tmp_path):
    # regression: the loader only gave the main layers' routers a place for expert_bias, so a model
    # trained with --mtp and a bias update rate wrote checkpoints that did not load
    model = with_biased_routers(make_model(SMALL.replace(num_mtp_modules=1)))
    biases = {n: b for n, b in model.named_buffers() if n.endswith("expert_bias")}
    assert "model.mtp.0.mlp.router.expert_bias" in biases and len(biases) == SMALL.num_layers + 1
    save_pretrained(model, tmp_path / "mtp", max_shard_bytes=SHARD)
    loaded = load_pretrained(tmp_path / "mtp")
    back = {n: b for n, b in loaded.named_buffers() if n.endswith("expert_bias")}
    assert back.keys() == biases.keys() and all(torch.equal(back[n], biases[n]) for n in biases)
    for (k, x), (k2, y) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(x, y), k
    assert torch.equal(logits(loaded), logits(model))
    assert torch.equal(mtp_logits(loaded), mtp_logits(model))
    # the release-layout conversion from a config gives the biased routers a place too
    ours = from_release_state_dict(release_state_dict(model), model.config)
    assert all(torch.equal(ours[n], biases[n]) for n in biases)


def test_a_run_trained_with_mtp_and_bias_updates_loads_back(corpus, tmp_path):
    from moge.train.trainer import TrainConfig, Trainer, load_data

    cfg = TrainConfig(model=str(corpus / "tiny.json"), data=str(corpus / "data"), out=str(tmp_path / "run"),
                      steps=2, batch_size=4, seq_len=16, warmup=1, lr=1e-2, eval_every=100, save_every=100,
                      bias_update_rate=0.01, mtp_modules=1, mtp_loss_weight=0.3)
    trainer = Trainer(cfg, load_data(cfg), log=lambda _m: None)
    for _ in range(2):
        trainer.train_step()
    path = trainer.save()
    trained = trainer.model.eval()
    biases = {n: b for n, b in trained.named_buffers() if n.endswith("expert_bias")}
    assert "model.mtp.0.mlp.router.expert_bias" in biases and any(b.abs().sum() > 0 for b in biases.values())
    loaded = load_pretrained(path)
    for (k, x), (k2, y) in zip(trained.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(x, y), k
    assert torch.equal(logits(loaded), logits(trained))
    assert torch.equal(mtp_logits(loaded), mtp_logits(trained))


# ---- overwriting --------------------------------------------------------------------------------


def test_saving_over_a_checkpoint_leaves_no_stale_shards(tmp_path):
    directory = tmp_path / "ck"
    save_pretrained(make_model(seed=1), directory, max_shard_bytes=SHARD)
    (directory / "tokenizer.model").write_bytes(b"kept")
    (directory / "model.safetensors").write_bytes(b"stale single file")
    second = make_model(seed=2)
    save_pretrained(second, directory, max_shard_bytes=4 * SHARD)
    index = index_of(directory)
    shards = {n for n in os.listdir(directory) if n.endswith(".safetensors")}
    assert shards == set(index["weight_map"].values())
    assert (directory / "tokenizer.model").read_bytes() == b"kept"
    assert not [n for n in os.listdir(directory) if n.startswith(".")]
    assert torch.equal(logits(load_pretrained(directory)), logits(second))


def test_a_failed_save_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    directory = tmp_path / "ck"
    first = make_model(seed=1)
    save_pretrained(first, directory, max_shard_bytes=SHARD)
    before = files_of(directory)
    original, calls = ck_save.write_safetensors, []

    def failing(path, tensors, target=None):
        calls.append(1)
        if len(calls) == 3:
            path.write_bytes(b"half a shard")  # the disk fills up in the middle of the third shard
            raise OSError("disk full")
        return original(path, tensors, target)

    monkeypatch.setattr(ck_save, "write_safetensors", failing)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(make_model(seed=2), directory, max_shard_bytes=SHARD)
    assert files_of(directory) == before  # no staging leftovers, nothing replaced
    assert torch.equal(logits(load_pretrained(directory)), logits(first))


# ---- bad input ----------------------------------------------------------------------------------


def rewrite_shard(directory, key, change):
    """Apply `change(tensors)` to the shard holding `key` and keep the index in step."""
    index = index_of(directory)
    name = index["weight_map"][key]
    tensors = load_file(directory / name)
    change(tensors)
    save_file(tensors, directory / name, metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != name}
    index["weight_map"].update(dict.fromkeys(tensors, name))
    (directory / ck.INDEX_NAME).write_text(json.dumps(index))


def test_missing_key_is_named(saved, tmp_path):
    directory = copy_of(saved[1], tmp_path)
    key = "model.layers.1.mlp.experts.3.up_proj.weight"
    rewrite_shard(directory, key, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): " + re.escape(key)):
        load_pretrained(directory)


def test_unexpected_key_is_named(saved, tmp_path):
    directory = copy_of(saved[1], tmp_path)
    key = "model.norm.weight"
    rewrite_shard(directory, key, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): model\.layers\.0\.mlp\.extra\.weight"):
        load_pretrained(directory)


def test_wrong_shape_names_key_and_both_shapes(saved, tmp_path):
    directory = copy_of(saved[1], tmp_path)
    key = "model.layers.0.mlp.router_scale"
    rewrite_shard(directory, key, lambda t: t.update({key: torch.ones(SMALL.num_experts)}))
    with pytest.raises(CheckpointError, match=re.escape(f"{key}: expected shape [1, 8], found [8]")):
        load_pretrained(directory)


def test_index_and_shard_disagreeing(saved, tmp_path):
    directory = copy_of(saved[1], tmp_path)
    index = index_of(directory)
    name = index["weight_map"]["model.norm.weight"]
    index["weight_map"]["model.ghost.weight"] = name
    (directory / ck.INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"keys in {name} that the file does not hold: model.ghost.weight"):
        load_pretrained(directory)
    index["weight_map"]["model.ghost.weight"] = "../outside.safetensors"
    (directory / ck.INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        load_pretrained(directory)


def test_truncated_shard_is_named(saved, tmp_path):
    directory = copy_of(saved[1], tmp_path)
    name = sorted(set(index_of(directory)["weight_map"].values()))[1]
    data = (directory / name).read_bytes()
    (directory / name).write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=re.escape(name) + ".*truncated or corrupted"):
        load_pretrained(directory)


def test_corrupted_header_is_named(saved, tmp_path):
    directory = copy_of(saved[1], tmp_path)
    name = sorted(set(index_of(directory)["weight_map"].values()))[0]
    data = bytearray((directory / name).read_bytes())
    data[8:20] = b"#" * 12  # the JSON header
    (directory / name).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=re.escape(name)):
        load_pretrained(directory)
    (directory / name).write_bytes((10**15).to_bytes(8, "little") + bytes(data[8:]))  # absurd header length
    with pytest.raises(CheckpointError, match=re.escape(name)):
        load_pretrained(directory)


def test_missing_shard_file_is_named(saved, tmp_path):
    directory = copy_of(saved[1], tmp_path)
    name = sorted(set(index_of(directory)["weight_map"].values()))[-1]
    (directory / name).unlink()
    with pytest.raises(CheckpointError, match=f"do not exist.*{re.escape(name)}") as error:
        load_pretrained(directory)
    assert isinstance(error.value, FileNotFoundError)


def test_config_missing_or_invalid(saved, tmp_path):
    directory = copy_of(saved[1], tmp_path)
    (directory / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not a valid model config"):
        load_pretrained(directory)
    (directory / "config.json").write_text(json.dumps({"hidden_size": -1}))
    with pytest.raises(CheckpointError, match="hidden_size=-1"):
        load_pretrained(directory)
    (directory / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing") as missing:
        load_pretrained(directory)
    with pytest.raises(CheckpointError, match="does not exist") as nowhere:
        load_pretrained(tmp_path / "nowhere")
    # a file that is not there is also what callers catching FileNotFoundError expect
    assert isinstance(missing.value, MissingFileError) and isinstance(nowhere.value, FileNotFoundError)


def test_pickle_files_are_refused_unless_opted_in(saved, tmp_path):
    model, directory = saved
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_bytes((directory / "config.json").read_bytes())
    torch.save({k: v.clone() for k, v in release_state_dict(model).items()}, pickled / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*refused.*allow_pickle=True"):
        load_pretrained(pickled)
    assert torch.equal(logits(load_pretrained(pickled, allow_pickle=True)), logits(model))
    torch.save({"weights": [1, 2]}, pickled / "pytorch_model.bin")  # not a dict of tensors
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        load_pretrained(pickled, allow_pickle=True)
    (pickled / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match="holds no weights"):
        load_pretrained(pickled)
