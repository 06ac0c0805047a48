"""transformers interop: Auto classes on a released-layout directory, same logits and same greedy
tokens as our own model and generate loop, padded batches, the cache, dtype, and lazy registration."""

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache  # noqa: E402

from moge.checkpoint import save_pretrained  # noqa: E402
from moge.config import ModelConfig  # noqa: E402
from moge.inference.generate import generate  # noqa: E402
from moge.hf.model import PanguProMoEConfig, PanguProMoEForCausalLM  # noqa: E402
from moge.nn.model import PanguProMoEForCausalLM as OurModel  # noqa: E402
from models import tiny_config  # noqa: E402

TINY = tiny_config(eos_token_id=2)
PROMPTS = [[5, 17, 33, 8, 91, 44, 12, 60], [70, 3, 29, 51]]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny random model (non-trivial biases and norms) saved in the released layout."""
    torch.manual_seed(0)
    model = OurModel(TINY)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("router_scale") or name.endswith("norm.weight") or "layernorm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    directory = tmp_path_factory.mktemp("ckpt")
    save_pretrained(model.eval(), directory)
    return model, directory


@pytest.fixture(scope="module")
def hf_model(saved):
    return AutoModelForCausalLM.from_pretrained(saved[1])


def cut_at_eos(tokens, eos):
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def test_auto_config_round_trips_the_release_keys(saved, tmp_path):
    _, directory = saved
    config = AutoConfig.from_pretrained(directory)
    assert isinstance(config, PanguProMoEConfig) and config.model_type == "PanguProMoE"
    assert config.moge_config() == TINY
    file_keys = json.loads((directory / "config.json").read_text())
    as_dict = config.to_dict()
    for key, value in file_keys.items():
        if key != "torch_dtype":
            assert as_dict[key] == value, key
    config.save_pretrained(tmp_path)
    assert ModelConfig.from_json(tmp_path) == TINY


def test_config_defaults_are_the_release_and_bad_values_fail_with_our_message():
    assert PanguProMoEConfig().moge_config() == ModelConfig()
    with pytest.raises(ValueError, match="num_groups"):
        PanguProMoEConfig(num_experts=63)


def test_auto_model_gives_our_logits(saved, hf_model):
    ours, _ = saved
    assert isinstance(hf_model, PanguProMoEForCausalLM) and not hf_model.training
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        out = hf_model(ids)
        expected = ours(ids).logits
    assert out.logits.dtype == torch.float32
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=0)
    assert dict(hf_model.named_parameters()).keys() == dict(ours.named_parameters()).keys()
    with torch.no_grad():
        last = hf_model(ids, logits_to_keep=1, use_cache=False)
    torch.testing.assert_close(last.logits, expected[:, -1:])
    assert last.cache is None


def test_cached_steps_match_a_full_forward(hf_model):
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        full = hf_model(ids, use_cache=False).logits
        cache = DynamicCache(config=hf_model.config)
        first = hf_model(ids[:, :5], cache=cache, use_cache=True)
        assert first.cache is cache and cache.get_seq_length() == 5
        rest = [hf_model(ids[:, i:i + 1], cache=cache, use_cache=True).logits for i in range(5, ids.shape[1])]
    torch.testing.assert_close(torch.cat([first.logits, *rest], dim=1), full, rtol=1e-5, atol=1e-5)


def test_greedy_generate_equals_ours(saved, hf_model):
    ours, _ = saved
    expected = generate(ours, PROMPTS[:1], max_new_tokens=5).tokens[0]
    out = hf_model.generate(torch.tensor(PROMPTS[:1]), max_new_tokens=5, do_sample=False)
    assert cut_at_eos(out[0, len(PROMPTS[0]):].tolist(), TINY.eos_token_id) == expected


def test_left_padded_batch_equals_ours_and_each_prompt_alone(saved, hf_model):
    ours, _ = saved
    longest = max(len(p) for p in PROMPTS)
    ids = torch.tensor([[TINY.pad_token_id] * (longest - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in PROMPTS])
    out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    got = [cut_at_eos(row[longest:].tolist(), TINY.eos_token_id) for row in out]
    assert got == generate(ours, PROMPTS, max_new_tokens=5).tokens
    assert got == [generate(ours, [p], max_new_tokens=5).tokens[0] for p in PROMPTS]


def test_dtype_option_and_save_pretrained_round_trip(saved, hf_model, tmp_path):
    _, directory = saved
    bf16 = AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert bf16(torch.tensor([PROMPTS[1]])).logits.dtype == torch.float32
    hf_model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto")
    for (name, a), b in zip(hf_model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_loading_errors_are_clear(saved, tmp_path):
    _, directory = saved
    with pytest.raises(FileNotFoundError, match="local checkpoint directory"):
        PanguProMoEForCausalLM.from_pretrained(tmp_path / "absent")
    with pytest.raises(TypeError, match="quantization_config"):
        PanguProMoEForCausalLM.from_pretrained(directory, quantization_config={})
    with pytest.raises(ValueError, match="inputs_embeds"):
        PanguProMoEForCausalLM.from_pretrained(directory)(inputs_embeds=torch.zeros(1, 2, TINY.hidden_size))


def test_import_moge_registers_lazily(saved):
    """A fresh interpreter: `import moge` leaves transformers unloaded, yet the Auto classes work."""
    _, directory = saved
    code = (
        "import sys, moge\n"
        "assert 'transformers' not in sys.modules\n"
        "from transformers import AutoConfig, AutoModelForCausalLM\n"
        f"print(type(AutoConfig.from_pretrained({str(directory)!r})).__name__)\n"
        f"print(type(AutoModelForCausalLM.from_pretrained({str(directory)!r})).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["PanguProMoEConfig", "PanguProMoEForCausalLM"]
