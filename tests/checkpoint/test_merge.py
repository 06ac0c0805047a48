"""Checkpoint merging equals the paper's formula computed by hand."""

import pytest
import torch

from moge.checkpoint import load_pretrained, save_pretrained
from moge.checkpoint.merge import merge_checkpoints, merge_state_dicts
from models import smallest_config
from moge.nn.model import PanguProMoEForCausalLM

CFG = smallest_config(eos_token_id=2)


def test_formula_by_hand():
    base = {"w": torch.tensor([1.0, 2.0]), "step": torch.tensor([3])}
    g1 = [{"w": torch.tensor([3.0, 2.0]), "step": torch.tensor([9])},
          {"w": torch.tensor([5.0, 6.0]), "step": torch.tensor([9])}]
    g2 = [{"w": torch.tensor([0.0, 0.0]), "step": torch.tensor([9])}]
    out = merge_state_dicts(base, [g1, g2], [0.5, 0.25])
    # base + 0.5 * mean([2,0],[4,4]) + 0.25 * [-1,-2] = [1,2] + [1.5,1] + [-0.25,-0.5]
    torch.testing.assert_close(out["w"], torch.tensor([2.25, 2.5]))
    assert out["step"].item() == 3  # integer tensors are not averaged


def test_single_checkpoint_lambda_one_reproduces_it_and_zero_keeps_base():
    torch.manual_seed(0)
    a, b = (PanguProMoEForCausalLM(CFG).init_weights(seed=s).state_dict() for s in (0, 1))
    one = merge_state_dicts(a, [[b]], [1.0])
    zero = merge_state_dicts(a, [[b]], [0.0])
    for k in a:
        torch.testing.assert_close(one[k], b[k])
        torch.testing.assert_close(zero[k], a[k])


def test_merge_checkpoints_on_disk(tmp_path):
    models = [PanguProMoEForCausalLM(CFG).init_weights(seed=s) for s in range(3)]
    for i, m in enumerate(models):
        save_pretrained(m, tmp_path / f"c{i}")
    merge_checkpoints(tmp_path / "c0", [[tmp_path / "c1", tmp_path / "c2"]], [0.5], tmp_path / "merged")
    got = load_pretrained(tmp_path / "merged").state_dict()
    sds = [m.state_dict() for m in models]
    for k in got:
        expected = sds[0][k] + 0.5 * ((sds[1][k] - sds[0][k]) + (sds[2][k] - sds[0][k])) / 2
        torch.testing.assert_close(got[k], expected)


def test_bad_merges(tmp_path):
    base = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match="2 checkpoint groups but 1 lambdas"):
        merge_state_dicts(base, [[base], [base]], [1.0])
    with pytest.raises(ValueError, match="shape"):
        merge_state_dicts(base, [[{"w": torch.zeros(3)}]], [1.0])
    with pytest.raises(ValueError, match="missing"):
        merge_state_dicts(base, [[{"v": torch.zeros(2)}]], [1.0])
    save_pretrained(PanguProMoEForCausalLM(CFG).init_weights(seed=0), tmp_path / "a")
    save_pretrained(PanguProMoEForCausalLM(CFG.replace(hidden_size=32)).init_weights(seed=0), tmp_path / "b")
    with pytest.raises(ValueError, match="different model config"):
        merge_checkpoints(tmp_path / "a", [[tmp_path / "b"]], [1.0], tmp_path / "out")
