"""GPU checks on one CUDA device (marked `gpu`: excluded by default, skipped without CUDA; run them
with `bash scripts/gpu_check.sh` or `pytest -m gpu tests/gpu`).

Each check compares against the CPU in float32 and records its numbers (max |diff|, milliseconds)
in a JSON file named by MOGE_GPU_REPORT, which the script prints as a table. Tolerances: float32
on the GPU vs the CPU, 1e-4 (TF32 is off: torch's default for matmuls); bfloat16, 5e-2 relative to
the largest logit (bf16 keeps 8 bits of mantissa).
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from moge.inference.generate import generate
from moge.nn.experts import SwiGLUExperts
from models import make_model, tiny_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                   reason="needs a CUDA device (torch.cuda.is_available())")]

CFG = tiny_config(vocab_size=61, max_position_embeddings=128)
FP32_TOL, BF16_REL_TOL = 1e-4, 5e-2
CUDA = torch.device("cuda", 0)


@pytest.fixture(scope="module")
def report():
    rows: list[dict] = []
    yield rows
    path = os.environ.get("MOGE_GPU_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(CUDA), "torch": torch.__version__, "checks": rows}, f,
                      indent=2)


def _timed(fn, repeat: int = 3):
    out = fn()  # warm-up (kernel selection, caches)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    torch.cuda.synchronize()
    return out, 1000 * (time.perf_counter() - t0) / repeat


def _ids(batch=2, seq=16, seed=0):
    return torch.randint(0, CFG.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_layer_on_cuda_matches_cpu_fp32(report, dtype):
    block = make_model(CFG).model.layers[0].mlp  # non-trivial router, experts and shared expert
    x = torch.randn(64, CFG.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = block(x.unsqueeze(0)).float()
        gpu = block.to(CUDA, dtype)
        got, ms = _timed(lambda: gpu(x.to(CUDA, dtype).unsqueeze(0)))
    err = float((got.float().cpu() - ref).abs().max())
    tol = FP32_TOL if dtype == torch.float32 else BF16_REL_TOL * float(ref.abs().max())
    report.append({"check": f"MoE layer {str(dtype)[6:]}", "max_abs_diff": err, "tol": tol, "ms": ms})
    assert err < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_on_cuda_matches_cpu_fp32(report, dtype):
    model = make_model(CFG)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits.float()
        gpu = model.to(CUDA, dtype)
        out, ms = _timed(lambda: gpu(ids.to(CUDA)).logits)
    assert out.device.type == "cuda"
    err = float((out.float().cpu() - ref).abs().max())
    tol = FP32_TOL if dtype == torch.float32 else BF16_REL_TOL * float(ref.abs().max())
    report.append({"check": f"model logits {str(dtype)[6:]}", "max_abs_diff": err, "tol": tol, "ms": ms})
    assert err < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_on_cuda_matches_the_reference(report, dtype):
    torch.manual_seed(0)
    experts = SwiGLUExperts(8, 64, 128)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.05)
    torch.nn.init.normal_(experts.down_proj, std=0.05)
    x = torch.randn(256, 64)
    experts_TK = torch.randint(0, 8, (256, 2))
    weights_TK = torch.rand(256, 2)
    with torch.no_grad():
        ref = experts(x, experts_TK, weights_TK, backend="reference")
        experts = experts.to(CUDA, dtype)
        args = (x.to(CUDA, dtype), experts_TK.to(CUDA), weights_TK.to(CUDA, dtype))
        got, ms = _timed(lambda: experts(*args, backend="grouped_mm"))
        auto = experts.resolve_backend(args[0], experts_TK.numel())
    err = float((got.float().cpu() - ref).abs().max())
    tol = FP32_TOL if dtype == torch.float32 else BF16_REL_TOL * float(ref.abs().max())
    report.append({"check": f"grouped_mm {str(dtype)[6:]} (auto picks {auto})", "max_abs_diff": err, "tol": tol,
                   "ms": ms})
    assert err < tol


def test_training_step_on_cuda_matches_cpu(report):
    import torch.nn.functional as F

    def step(device):
        model = make_model(CFG).train().to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ids = _ids(4, 32, seed=2).to(device)
        losses = []
        for _ in range(3):
            logits = model(ids[:, :-1]).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        return losses, model

    ref, ref_model = step("cpu")
    t0 = time.perf_counter()
    got, gpu_model = step(CUDA)
    torch.cuda.synchronize()
    ms = 1000 * (time.perf_counter() - t0) / 3
    err = max(abs(a - b) for a, b in zip(got, ref))
    weights = max(float((p.cpu() - q).abs().max()) for p, q in zip(gpu_model.parameters(), ref_model.parameters()))
    report.append({"check": "training step fp32 (loss)", "max_abs_diff": err, "tol": 1e-3, "ms": ms})
    report.append({"check": "training step fp32 (weights after 3 steps)", "max_abs_diff": weights, "tol": 1e-3,
                   "ms": None})
    assert err < 1e-3 and weights < 1e-3


def test_generation_on_cuda_equals_cpu(report):
    model = make_model(CFG)
    prompts = [[1, 2, 3, 4], [5, 6, 7]]
    want = generate(model, prompts, max_new_tokens=16, stop_ids=[]).tokens
    gpu = model.to(CUDA)
    t0 = time.perf_counter()
    res = generate(gpu, prompts, max_new_tokens=16, stop_ids=[])
    ms = 1000 * (time.perf_counter() - t0)
    report.append({"check": "greedy generation fp32 (tokens differ)", "max_abs_diff": float(res.tokens != want),
                   "tol": 0, "ms": ms, "decode_tok_s": res.decode_tokens_per_s})
    assert res.tokens == want


def _quantized_on_cuda_equals_cpu(report, model, label: str, seed: int) -> None:
    """A quantized model's logits and greedy tokens on the GPU against the CPU's."""
    prompts = [[1, 2, 3, 4], [5, 6, 7]]
    ids = _ids(2, 24, seed=seed)
    with torch.no_grad():
        ref = model(ids).logits
    want = generate(model, prompts, max_new_tokens=16, stop_ids=[]).tokens
    gpu = model.to(CUDA)
    with torch.no_grad():
        logits, ms = _timed(lambda: gpu(ids.to(CUDA)).logits)
    res = generate(gpu, prompts, max_new_tokens=16, stop_ids=[])
    err = float((logits.cpu() - ref).abs().max())
    report.append({"check": f"{label} logits", "max_abs_diff": err, "tol": FP32_TOL, "ms": ms})
    report.append({"check": f"{label} greedy generation (tokens differ)", "max_abs_diff": float(res.tokens != want),
                   "tol": 0, "ms": None, "decode_tok_s": res.decode_tokens_per_s})
    assert err < FP32_TOL and res.tokens == want


def test_quantized_generation_on_cuda_equals_cpu(report):
    from moge.quant import quantize_model

    model = make_model(CFG)
    quantize_model(model)
    _quantized_on_cuda_equals_cpu(report, model, "W8A8 (int8 _int_mm on cuda)", seed=3)


def test_generate_command_places_the_model_on_cuda(report, tmp_path, capsys):
    from moge.checkpoint import save_pretrained
    from moge.cli import main

    save_pretrained(make_model(CFG), tmp_path, dtype="bf16")
    args = ["generate", "--model", str(tmp_path), "--token-ids", "1,2,3", "--max-new-tokens", "8", "--json"]
    assert main([*args, "--device", "cpu", "--dtype", "float32"]) == 0
    cpu = json.loads(capsys.readouterr().out)
    assert main([*args, "--device", "cuda", "--dtype", "float32"]) == 0
    gpu = json.loads(capsys.readouterr().out)
    assert main([*args, "--device", "cuda"]) == 0  # the checkpoint's bf16, on the GPU: runs, no CPU warning
    captured = capsys.readouterr()
    assert "warning" not in captured.err
    report.append({"check": "moge generate --device cuda (tokens differ from cpu)",
                   "max_abs_diff": float(gpu["completions"] != cpu["completions"]), "tol": 0, "ms": None,
                   "decode_tok_s": gpu["decode_tokens_per_s"]})
    assert gpu["completions"] == cpu["completions"]


def test_serving_engine_on_cuda_equals_cpu(report):
    """The engine's paged KV cache, plans and sampling on the device: every request equals the CPU
    engine's tokens (greedy), with requests joining the running batch."""
    from moge.inference.engine import Engine, EngineConfig, Request

    def serve(model):
        engine = Engine(model, EngineConfig(kv_blocks=64, block_size=16, max_running=4, step_tokens=32))
        pending = [Request(str(i), [(7 * i + j) % CFG.vocab_size for j in range(5 + 3 * i)], 12) for i in range(6)]
        tokens = {}
        while pending or engine.has_work():
            if pending:
                engine.add(pending.pop(0))
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.token_ids)
        return tokens

    model = make_model(CFG)
    want = serve(model)
    t0 = time.perf_counter()
    got = serve(model.to(CUDA))
    ms = 1000 * (time.perf_counter() - t0)
    report.append({"check": "serving engine fp32 (requests that differ)", "tol": 0, "ms": ms,
                   "max_abs_diff": float(sum(got[k] != want[k] for k in want))})
    assert got == want


@pytest.mark.parametrize("scheme", ["int8-wo", "int4-wo"])
def test_weight_only_generation_on_cuda_equals_cpu(report, scheme):
    """Weight-only int8/int4 on the GPU (dequantize + matmul) against the CPU's C++ kernel."""
    from moge.quant import quantize_weight_only

    cfg = tiny_config(vocab_size=61, hidden_size=64, expert_intermediate_size=32, shared_expert_intermediate_size=64,
                      max_position_embeddings=128)
    model = make_model(cfg)
    quantize_weight_only(model, scheme)
    _quantized_on_cuda_equals_cpu(report, model, scheme, seed=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_decode_on_cuda_equals_eager(report, dtype):
    """The static-cache decode step compiled with CUDA graphs (mode reduce-overhead) gives the eager
    GPU generation's tokens; a second generation replays the captured graph."""
    model = make_model(CFG).to(CUDA, dtype)
    prompts = [[1, 2, 3, 4], [5, 6, 7]]
    want = generate(model, prompts, max_new_tokens=24, stop_ids=[])
    first = generate(model, prompts, max_new_tokens=24, stop_ids=[], compile=True)
    again = generate(model, prompts, max_new_tokens=24, stop_ids=[], compile=True)
    differ = sum(a != b for a, b in zip(again.tokens, want.tokens)) + sum(
        a != b for a, b in zip(first.tokens, want.tokens))
    report.append({"check": f"compiled decode {str(dtype)[6:]} (rows that differ)", "max_abs_diff": float(differ),
                   "tol": 0, "ms": 1000 * again.decode_s / max(again.decode_steps, 1),
                   "decode_tok_s": again.decode_tokens_per_s})
    report.append({"check": f"eager decode {str(dtype)[6:]}", "max_abs_diff": 0.0, "tol": 0,
                   "ms": 1000 * want.decode_s / max(want.decode_steps, 1), "decode_tok_s": want.decode_tokens_per_s})
    assert differ == 0
