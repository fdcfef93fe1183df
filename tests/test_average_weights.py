"""experiments.average_weights: the weighted mean of checkpoints of one model."""

import pytest
import torch

from experiments.average_weights import average_state_dicts, main
from lungnlb.checkpoint import load_model, read_config, save_checkpoint
from lungnlb.networks import build_model


def test_floating_tensors_are_weighted_and_counters_come_from_the_first():
    first = {"w": torch.tensor([0.0, 4.0]), "n": torch.tensor(3)}
    second = {"w": torch.tensor([2.0, 0.0]), "n": torch.tensor(9)}
    averaged = average_state_dicts([first, second], [0.25, 0.75])
    assert torch.allclose(averaged["w"], torch.tensor([1.5, 1.0]))
    assert averaged["n"].item() == 3


@pytest.mark.parametrize("fractions", [[0.5, 0.6], [1.5, -0.5], [1.0]])
def test_fractions_must_be_one_per_checkpoint_non_negative_and_sum_to_one(fractions):
    state = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match="fraction"):
        average_state_dicts([state, state], fractions)


def test_other_tensors_or_shapes_are_refused_by_name():
    with pytest.raises(ValueError, match="other tensors"):
        average_state_dicts([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}], [0.5, 0.5])
    with pytest.raises(ValueError, match="tensor a has different shapes"):
        average_state_dicts([{"a": torch.zeros(1)}, {"a": torch.zeros(2)}], [0.5, 0.5])


def test_the_averaged_checkpoint_loads_and_drops_the_first_ones_own_probe(tmp_path):
    config = {"model": {"name": "unet", "kwargs": {}}, "threshold": 0.3, "slice_probe": {"coef": [1.0]}, "step": 5}
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(save_checkpoint(tmp_path / f"m{seed}", build_model("unet"), config))
    assert main([str(p) for p in paths] + ["--fractions", "0.5", "0.5", "--out", str(tmp_path / "mean")]) == 0
    model, averaged_config = load_model(tmp_path / "mean")
    states = [torch.load(p, weights_only=True) for p in paths]
    key = next(k for k, v in states[0].items() if v.is_floating_point() and not torch.equal(v, states[1][k]))
    assert torch.allclose(model.state_dict()[key], (states[0][key] + states[1][key]) / 2, atol=1e-6)
    assert averaged_config["threshold"] == 0.3
    assert "slice_probe" not in averaged_config and "step" not in averaged_config
    assert [entry["fraction"] for entry in read_config(tmp_path / "mean")["averaged_from"]] == [0.5, 0.5]
