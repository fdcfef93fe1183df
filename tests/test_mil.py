"""MIL on whole slices: the window grid over the lung field, the score and loss, the window chosen,
the tumour-free windows appended to a batch, and a run that trains on both kinds of slice."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from train_helpers import DATA, TINY_KWARGS, synthetic_studies, write_study

from lungnlb.io import read_image
from lungnlb.io.intensity import IntensityMapping, to_model_input
from lungnlb.training.dataset import SliceSample, is_weak_positive, is_whole_tumour_free
from lungnlb.training.trainer import TrainConfig, train
from lungnlb.training.mil import (
    SliceBags,
    grid_windows,
    mil_loss,
    top_k_logit,
    with_tumour_free,
)


def _weak(image: np.ndarray, image_id: str = "iq_1") -> SliceSample:
    return SliceSample(image_id, "block", "iq-othnccd", 0, image.astype(np.float32), None, 1)


@pytest.mark.parametrize("offset", [(0, 0), (7, 31), (15, 1)])
def test_the_grid_covers_the_field_with_windows_inside_the_slice(offset):
    field = np.zeros((100, 90), bool)
    field[5:60, 20:88] = True
    field[70:97, 3:9] = True
    corners = grid_windows(field, 16, offset)
    covered = np.zeros_like(field)
    for y, x in corners:
        assert 0 <= y <= 100 - 16 and 0 <= x <= 90 - 16
        assert field[y:y + 16, x:x + 16].any()
        covered[y:y + 16, x:x + 16] = True
    assert covered[field].all()
    assert len(corners) < ((100 + 15) // 16) * ((90 + 15) // 16)  # windows without field are left out


def test_the_score_is_the_mean_of_the_top_k_logits_and_the_loss_its_bce_against_tumour():
    logits = torch.full((2, 1, 8, 8), -4.0)
    logits[0, 0, :2, :5] = 3.0  # ten pixels at 3
    logits[1, 0, 0, :5] = 3.0  # five at 3, the rest -4
    assert torch.allclose(top_k_logit(logits, 10), torch.tensor([3.0, -0.5]))
    expected = (math.log1p(math.exp(-3.0)) + math.log1p(math.exp(0.5))) / 2
    assert mil_loss(logits, 10).item() == pytest.approx(expected, rel=1e-5)


class Brightness(torch.nn.Module):
    """A stand-in model whose seg logit is the input itself."""

    def forward(self, windows: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"seg": windows * 10.0 - 5.0}


def test_the_chosen_window_holds_what_the_model_ranks_highest():
    image = np.full((256, 256), 0.3, np.float32)
    image[:, :20] = 0.0  # air beside the patient
    image[150:160, 100:110] = 0.9  # the one bright spot
    weak = SliceBags([_weak(image)], size=32, mapping=IntensityMapping())
    held = []
    for seed in range(8):
        window = weak.draw(Brightness(), np.random.default_rng(seed), 1, torch.device("cpu"))
        assert window.shape == (1, 1, 32, 32)
        held.append(int((window >= 0.9).sum()))
    assert min(held) >= 10  # at least the k pixels the score ranks, wherever the grid cuts the spot
    assert max(held) == 100  # and a shifted grid holds it whole


def test_only_whole_slices_known_by_class_are_bags():
    whole = np.zeros((256, 256), np.float32)
    crop = np.zeros((64, 64), np.float32)
    assert is_weak_positive(_weak(whole)) and not is_whole_tumour_free(_weak(whole))
    assert not is_weak_positive(_weak(crop))
    free = SliceSample("n", "c", "iq", 0, whole, None, 0)
    assert is_whole_tumour_free(free) and not is_weak_positive(free)
    assert is_whole_tumour_free(SliceSample("far", "c", "ct", 0, whole, np.zeros((256, 256), bool), 0))
    assert not is_whole_tumour_free(SliceSample("c", "c", "ct", 0, crop, None, 0))
    masked = SliceSample("m", "c", "lidc", 0, whole, np.ones((256, 256), bool), 1)
    assert not is_weak_positive(masked) and not is_whole_tumour_free(masked)
    with pytest.raises(ValueError, match="whole tumour slices without a mask or whole tumour-free"):
        SliceBags([masked], 32, IntensityMapping())


def test_tumour_free_windows_join_the_batch_with_an_empty_mask_and_a_no_tumour_label():
    batch = {"image": torch.rand(2, 1, 8, 8), "mask": torch.ones(2, 1, 8, 8), "has_mask": torch.tensor([True, False]),
             "label": torch.ones(2, 1), "has_label": torch.tensor([True, False])}
    joined = with_tumour_free(batch, torch.rand(3, 1, 8, 8))
    assert joined["image"].shape == (5, 1, 8, 8) and torch.equal(joined["image"][:2], batch["image"])
    assert joined["mask"][2:].sum() == 0 and joined["mask"][:2].sum() == 128
    assert joined["has_mask"].tolist() == [True, False, True, True, True]
    assert joined["label"].reshape(-1).tolist() == [1, 1, 0, 0, 0]
    assert joined["has_label"].tolist() == [True, False, True, True, True]


def test_a_real_iq_tumour_slice_gives_windows_over_its_body():
    """No lungs are sought on the IQ-OTH/NCCD JPEGs (`lungnlb.inference.has_lung_grey_levels`): the
    grid covers the patient, not the air around."""
    path = sorted((DATA / "iq-othnccd" / "malignant").glob("*.jpg"))[10]
    image = read_image(path)
    plane = to_model_input(image.array, image.intensity, IntensityMapping())
    air = IntensityMapping().air()
    weak = SliceBags([_weak(plane)], size=64, mapping=IntensityMapping())
    assert np.array_equal(weak.fields[0], plane > air + 0.05)
    windows = weak.candidates(0, (0, 0))
    assert 4 <= len(windows) < (512 // 64) ** 2
    assert all((window > air + 0.05).any() for window in windows[:, 0].numpy())


def _with_weak_slices(root):
    studies = synthetic_studies(root, n_cases=6, size=40)
    rng = np.random.default_rng(1)
    for block in range(4):  # whole 8-bit tumour slices: class only, no mask
        write_study(studies, f"w{block}", rng.uniform(0, 255, (192, 192)).astype(np.float32),
                    {"source": "synthetic8bit", "case": f"weak{block}", "intensity": "windowed8bit",
                     "class_label": 1, "label_method": None, "labelled_slices": []}, None)
    for block in range(2):  # whole 8-bit tumour-free slices
        write_study(studies, f"f{block}", rng.uniform(0, 255, (192, 192)).astype(np.float32),
                    {"source": "synthetic8bit", "case": f"free{block}", "intensity": "windowed8bit",
                     "class_label": 0, "label_method": None, "labelled_slices": []}, None)
    return studies


def test_a_run_trains_on_weak_positives_and_top_negatives_and_records_them(tmp_path, monkeypatch):
    studies = _with_weak_slices(tmp_path)
    drawn = []
    draw = SliceBags.draw
    monkeypatch.setattr(SliceBags, "draw", lambda self, *args: drawn.append(draw(self, *args)) or drawn[-1])
    config = TrainConfig(data=str(studies), out=str(tmp_path / "run"), model="unet_sl_nlb", model_kwargs=TINY_KWARGS,
                         patch_size=32, steps=3, batch_size=4, val_every=3, all_data=True, progress=False,
                         tensorboard=False, weak_positives=2, top_negatives=1)
    result = train(config)
    summary = json.loads((tmp_path / "run" / "best.json").read_text())["training_data"]
    assert [tuple(windows.shape) for windows in drawn] == [(2, 1, 32, 32), (1, 1, 32, 32)] * 3  # every step
    assert summary["sources"]["synthetic8bit"]["positive_slices"] == 4  # the 48 x 40 tumour block is no whole slice
    assert {f"weak{block}" for block in range(4)} <= set(summary["train_cases"])
    assert result["best"].is_file()


def test_mil_needs_native_training_and_its_kind_of_slice(tmp_path):
    studies = _with_weak_slices(tmp_path)
    common = dict(data=str(studies), model="unet_sl_nlb", model_kwargs=TINY_KWARGS, steps=1, batch_size=2,
                  all_data=True, progress=False, tensorboard=False, weak_positives=1)
    with pytest.raises(ValueError, match="native-resolution"):
        train(TrainConfig(out=str(tmp_path / "a"), input_size=32, **common))
    plain = synthetic_studies(tmp_path / "plain", n_cases=4, size=40)
    with pytest.raises(ValueError, match="no tumour slice without a mask"):
        train(TrainConfig(**{**common, "data": str(plain)}, out=str(tmp_path / "b"), patch_size=32))
    with pytest.raises(ValueError, match="no tumour-free whole slice"):
        train(TrainConfig(**{**common, "data": str(plain), "weak_positives": 0}, out=str(tmp_path / "c"),
                          patch_size=32, top_negatives=1))
