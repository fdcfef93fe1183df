"""Hard-negative mining, the draw share of its crops, and a run starting from a checkpoint's weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from train_helpers import TINY_KWARGS

from lungnlb.checkpoint import save_checkpoint
from lungnlb.networks import build_model
from lungnlb.training.dataset import SliceSample
from lungnlb.training.hard_negatives import crop_around, false_alarm_centres, mine_hard_negatives
from lungnlb.training.trainer import TrainConfig, data_summary, initial_network, sample_weights


def _sample(image_id: str, size: int, mask: np.ndarray | None, class_label: int | None) -> SliceSample:
    image = np.arange(size * size, dtype=np.float32).reshape(size, size) / (size * size)
    return SliceSample(image_id, image_id.split("_")[0], "lidc-idri", 0, image, mask, class_label)


class MarksASquare:
    """A stand-in predictor that marks one 5 x 5 square centred at (row, column) of every slice."""

    threshold = 0.5

    def __init__(self, row: int, column: int) -> None:
        self.row, self.column = row, column

    def predict_normalized(self, volume: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probability = np.zeros(volume.shape, np.float32)
        probability[:, self.row - 2:self.row + 3, self.column - 2:self.column + 3] = 0.9
        return probability, probability.reshape(len(probability), -1).max(axis=1)


def test_false_alarms_are_the_components_clear_of_the_truth():
    predicted = np.zeros((60, 60), bool)
    predicted[10:14, 10:14] = True  # far from the lesion: a false alarm
    predicted[30:34, 40:44] = True  # 3 px from the lesion: its border, not a false alarm
    truth = np.zeros((60, 60), bool)
    truth[30:34, 47:52] = True
    assert false_alarm_centres(predicted, truth, clearance_px=5) == [(12, 12)]
    assert len(false_alarm_centres(predicted, truth, clearance_px=2)) == 2
    assert false_alarm_centres(predicted, np.zeros_like(truth), 5) == [(12, 12), (32, 42)]


def test_crops_are_shifted_inside_the_slice():
    assert crop_around((300, 300), (10, 150), 96) == (slice(0, 96), slice(102, 198))
    assert crop_around((300, 300), (299, 299), 96) == (slice(204, 300), slice(204, 300))
    assert crop_around((50, 300), (25, 25), 96) == (slice(0, 50), slice(0, 96))


def test_mining_crops_whole_slices_around_each_false_alarm():
    lesion = np.zeros((256, 256), bool)
    lesion[150:160, 200:210] = True
    free = _sample("A_free", 256, None, 0)
    with_lesion = _sample("B_lesion", 256, lesion, 1)
    crop = _sample("C_crop", 64, np.zeros((64, 64), bool), 0)  # not a whole slice: not mined
    unknown = _sample("D_unknown", 256, None, 1)  # a tumour slice without a mask: truth unknown
    mined = mine_hard_negatives(MarksASquare(100, 180), [free, with_lesion, crop, unknown], size=96)
    assert [m.image_id for m in mined] == ["A_free#hard0", "B_lesion#hard0"]
    box = (slice(52, 148), slice(132, 228))
    for sample, source in zip(mined, (free, with_lesion)):
        assert sample.hard_negative and sample.case == source.case
        assert np.array_equal(sample.image, source.image[box])
    assert mined[0].class_label == 0 and not mined[0].mask.any()
    assert mined[1].class_label == 0 and not mined[1].mask.any()  # the lesion lies outside the crop
    near = mine_hard_negatives(MarksASquare(140, 205), [with_lesion], size=96)
    assert near[0].class_label == 1 and near[0].mask.sum() == lesion[92:188, 157:253].sum()
    assert mine_hard_negatives(MarksASquare(155, 205), [with_lesion]) == []  # on the lesion: a hit


def test_hard_negatives_are_drawn_with_their_share():
    ordinary = [_sample(f"P{i}", 8, np.ones((8, 8), bool), 1) for i in range(3)]
    ordinary += [_sample(f"N{i}", 8, None, 0) for i in range(5)]
    hard = [SliceSample(f"H{i}", "H", "lidc-idri", 0, np.zeros((8, 8), np.float32), np.zeros((8, 8), bool), 0,
                        hard_negative=True) for i in range(4)]
    weights = sample_weights(ordinary + hard, seg_fraction=0.7, hard_fraction=0.2)
    share = weights / weights.sum()
    assert share[8:].sum() == pytest.approx(0.2) and np.allclose(share[8:], 0.05)
    assert share[:3].sum() == pytest.approx(0.8 * 0.7) and share[3:8].sum() == pytest.approx(0.8 * 0.3)
    assert np.allclose(sample_weights(ordinary, 0.7, hard_fraction=0.2), sample_weights(ordinary, 0.7))
    summary = data_summary("studies", ordinary + hard, {"seed": 0, "cases": {"val": [], "test": []}})
    assert summary["train_slices"] == 8 and summary["hard_negative_crops"] == 4
    assert summary["sources"]["lidc-idri"]["images"] == 8


def test_tumour_free_slices_with_an_empty_mask_are_drawn_with_the_tumour_free_share():
    """The far slices of a CT series (an empty mask) are tumour-free draws like the JPEG normals
    (no mask), not lesion draws: the share of lesion slices is `seg_fraction`."""
    lesions = [_sample(f"P{i}", 8, np.ones((8, 8), bool), 1) for i in range(2)]
    empty = [_sample(f"E{i}", 8, np.zeros((8, 8), bool), 0) for i in range(3)]
    no_mask = [_sample(f"N{i}", 8, None, 0) for i in range(3)]
    share = sample_weights(lesions + empty + no_mask, seg_fraction=0.7)
    share = share / share.sum()
    assert share[:2].sum() == pytest.approx(0.7) and np.allclose(share[2:], 0.05)


def test_a_run_starts_from_the_weights_of_the_same_model_only(tmp_path):
    torch.manual_seed(0)
    model = build_model("unet_sl_nlb", in_channels=1, **TINY_KWARGS)
    path = save_checkpoint(tmp_path / "start", model, {"model": {"name": "unet_sl_nlb", "kwargs": TINY_KWARGS}})
    config = TrainConfig(data="d", out="o", model="unet_sl_nlb", model_kwargs=TINY_KWARGS, init=str(path))
    started = initial_network(config)
    assert all(torch.equal(a, b) for a, b in zip(started.state_dict().values(), model.state_dict().values()))
    other = TrainConfig(data="d", out="o", model="unet_sl_nlb", model_kwargs={**TINY_KWARGS, "grid": 4}, init=str(path))
    with pytest.raises(ValueError, match="holds unet_sl_nlb"):
        initial_network(other)


def test_hard_negatives_need_native_training():
    from lungnlb.training.trainer import hard_negative_crops

    config = TrainConfig(data="d", out="o", hard_negatives_from="any.pt")
    with pytest.raises(ValueError, match="--patch-size"):
        hard_negative_crops(config, [])
    every_draw = TrainConfig(data="d", out="o", patch_size=64, hard_negatives_from="any.pt", hard_negative_fraction=1.0)
    with pytest.raises(ValueError, match="--hard-negative-fraction"):
        hard_negative_crops(every_draw, [])
