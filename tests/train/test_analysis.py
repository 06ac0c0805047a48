"""Routing analyses on a small model: structure of the statistics and MoGE invariants."""

import torch

from models import tiny_config
from moge.nn.model import PanguProMoEForCausalLM
from moge.train.analysis import analyze, collect_routing, imbalance_by_batch_size, plot_analysis

CFG = tiny_config(vocab_size=64, num_layers=3, num_heads=2, num_kv_heads=1, expert_intermediate_size=8,
                  shared_expert_intermediate_size=8, max_position_embeddings=1024, eos_token_id=2)


def _trace(cfg):
    model = PanguProMoEForCausalLM(cfg).init_weights(std=0.5, seed=0)
    g = torch.Generator().manual_seed(0)
    batches = {"a": [torch.randint(0, 64, (2, 16), generator=g)], "b": [torch.randint(0, 64, (3, 16), generator=g)]}
    return collect_routing(model, batches)


def test_moge_statistics(tmp_path):
    stats = analyze(_trace(CFG))
    assert stats["layers_shown"] == [0, 1, 2]
    for entry in stats["layers"]:
        assert entry["coactivation_same_group_pairs"] == 0  # MoGE never picks two experts of one group
        assert entry["coactivation_cross_group_pairs"] > 0
        assert abs(sum(entry["global_share"]) - 1) < 1e-9
        for row in entry["imbalance_by_batch_size"]:
            assert row["mean_is"] == 0.0 and row["mean_max_over_mean"] == 1.0
    shares = stats["per_domain_share"]["0"]
    assert set(shares) == {"a", "b"} and abs(sum(shares["a"]) - 1) < 1e-9
    paths = plot_analysis(stats, tmp_path)
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_topk_statistics_show_same_group_coactivation():
    stats = analyze(_trace(CFG.replace(router="topk")))
    assert sum(e["coactivation_same_group_pairs"] for e in stats["layers"]) > 0


def test_imbalance_by_batch_size_hand_example():
    ids = torch.tensor([[0], [0], [1], [3]])  # 4 experts on 2 devices; batches of 2 tokens
    rows = imbalance_by_batch_size(ids, 4, 2, sizes=[2, 4, 8])
    assert [r["tokens"] for r in rows] == [2, 4]
    assert rows[0]["mean_is"] == 0.5 and rows[0]["batches"] == 2  # [2,0] -> 1.0 ; [1,1] -> 0
    assert rows[1]["mean_is"] == 0.5  # loads [3, 1] over 4 tokens
