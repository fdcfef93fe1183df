"""Native-resolution training and inference: patches at the slices' own pixel size, tumour-free
slices as negatives, sliding-window prediction whose slice call agrees with its mask."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from train_helpers import DATA, TINY_KWARGS

from lungnlb.checkpoint import load_model
from lungnlb.inference import Predictor, remove_small_components
from lungnlb.networks import build_model
from lungnlb.training.augment import patch_transforms
from lungnlb.training.dataset import SliceDataset, SliceSample
from lungnlb.training.trainer import TrainConfig, train
from lungnlb.training.validation import validation_score, validation_subset

PATCH = 32


def test_small_components_are_removed_per_slice():
    mask = np.zeros((2, 10, 10), bool)
    mask[0, 0:4, 0:4] = True  # 16 pixels: kept
    mask[0, 8, 8] = True  # 1 pixel: removed
    mask[1, 5:7, 5:7] = True  # 4 pixels: removed
    kept = remove_small_components(mask, 10)
    assert kept[0].sum() == 16 and not kept[1].any()


def test_a_nodules_small_last_slice_is_kept_with_the_slices_it_continues():
    mask = np.zeros((4, 12, 12), bool)
    mask[0, 2:6, 2:6] = True  # 16 pixels
    mask[1, 3:5, 3:5] = True  # 4 pixels below them: the nodule's last slice, kept
    mask[1, 9, 9] = True  # 1 pixel touching nothing: removed
    mask[3, 3:5, 3:5] = True  # 4 pixels, but slice 2 between is empty: removed
    kept = remove_small_components(mask, 10)
    assert kept[0].sum() == 16 and kept[1].sum() == 4 and kept[1, 3:5, 3:5].all()
    assert not kept[1, 9, 9] and not kept[3].any()


def test_the_lung_field_still_judges_each_slice_of_a_kept_volume_component():
    mask = np.zeros((2, 12, 12), bool)
    mask[:, 2:6, 2:6] = True
    field = np.zeros(mask.shape, bool)
    field[0, 2, 2] = True  # only the first slice's part touches the lungs
    kept = remove_small_components(mask, 10, field)
    assert kept[0].sum() == 16 and not kept[1].any()


def test_a_dice_zero_model_is_never_the_best():
    assert validation_score({"dice": 0.0, "f1": 0.99}) == 0.0
    assert validation_score({"dice": 0.5, "f1": 1.0}) == pytest.approx(2 / 3)
    assert validation_score({"f1": 0.8}) == pytest.approx(0.8)
    assert validation_score({}) == float("-inf")


def test_a_model_that_calls_tumour_free_slices_tumour_loses_however_high_its_recall():
    calls_all_tumour = {"dice": 0.8, "f1": 0.97, "specificity": 0.0}
    careful = {"dice": 0.78, "f1": 0.95, "specificity": 0.9}
    assert validation_score(calls_all_tumour) == 0.0
    assert validation_score(careful) == pytest.approx(3 / (1 / 0.78 + 1 / 0.95 + 1 / 0.9))


def test_the_validation_draw_keeps_every_whole_tumour_free_slice_and_the_mix_of_the_rest():
    whole, crop = np.zeros((192, 192), np.float32), np.zeros((32, 32), np.float32)
    nodule = np.zeros((32, 32), bool)
    nodule[10:14, 10:14] = True
    free = [SliceSample(f"f{i}", f"p{i}", "s", 0, whole, None, 0) for i in range(6)]
    weak = [SliceSample(f"w{i}", f"q{i}", "s", 0, whole, None, 1) for i in range(20)]
    crops = [SliceSample(f"c{i}", f"r{i}", "s", 0, crop, nodule, 1) for i in range(60)]
    drawn = validation_subset(crops[:30] + free + weak + crops[30:], limit=26, seed=0)
    names = [sample.image_id for sample in drawn]
    assert len(drawn) == 26 and all(f"f{i}" in names for i in range(6))
    assert sum(name.startswith("w") for name in names) == 5 and sum(name.startswith("c") for name in names) == 15
    again = validation_subset(crops[:30] + free + weak + crops[30:], limit=26, seed=0)
    assert names == [sample.image_id for sample in again]


def test_patch_dataset_pads_draws_and_labels_patches():
    image = np.full((20, 24), 0.4, np.float32)
    mask = np.zeros((20, 24), bool)
    mask[8:12, 10:14] = True
    tumour = SliceSample("a", "p", "s", 0, image, mask, 1)
    free = SliceSample("b", "q", "s", 0, image.copy(), None, 0)
    dataset = SliceDataset([tumour, free], patch_transforms(0, PATCH, air=0.2, pos_fraction=0.99, augment=False),
                           patches=True)
    item, negative = dataset[0], dataset[1]
    assert item["image"].shape == (1, PATCH, PATCH) and float(item["image"].min()) == pytest.approx(0.2)  # air pad
    assert item["mask"].sum() == 16 and item["label"].item() == 1.0 and item["has_mask"]
    assert negative["mask"].sum() == 0 and negative["label"].item() == 0.0 and negative["has_mask"]
    with pytest.raises(ValueError, match="tumour-free label"):
        SliceDataset([SliceSample("c", "r", "s", 0, image, None, 1)], None, patches=True)


def _native_predictor(model):
    config = {"model": {"name": "unet_sl_nlb", "kwargs": TINY_KWARGS}, "input_size": [PATCH, PATCH],
              "patch_size": [PATCH, PATCH], "threshold": 0.5}
    return Predictor(model, config)


def test_sliding_window_keeps_the_size_and_calls_a_slice_by_its_mask():
    torch.manual_seed(0)
    predictor = _native_predictor(build_model("unet_sl_nlb", **TINY_KWARGS))
    volume = np.random.default_rng(0).uniform(0, 1, (3, 50, 70)).astype(np.float32)
    probability, slice_probability = predictor.predict_normalized(volume)
    assert probability.shape == volume.shape
    assert np.allclose(slice_probability, probability.reshape(3, -1).max(1))
    called = slice_probability > predictor.threshold
    assert np.array_equal(called, (probability > predictor.threshold).reshape(3, -1).any(1))
    small, _ = predictor.predict_normalized(volume[:, :10, :12])  # smaller than one window: padded with air
    assert small.shape == (3, 10, 12)


def test_a_volume_shared_among_threads_gives_each_slice_its_own_prediction(monkeypatch):
    from lungnlb import inference

    torch.manual_seed(0)
    predictor = _native_predictor(build_model("unet_sl_nlb", **TINY_KWARGS))
    volume = np.random.default_rng(1).uniform(0.3, 1, (5, 70, 90)).astype(np.float32)
    alone = [predictor.window_probability(plane[None])[0][0] for plane in volume]  # before components join slices
    before, seen = torch.get_num_threads(), set()
    model = predictor.model
    monkeypatch.setattr(predictor, "model",
                        lambda x: seen.add((threading.get_ident(), torch.get_num_threads(), torch.is_grad_enabled())) or model(x))
    torch.set_num_threads(3)
    try:
        shared, _ = predictor.window_probability(volume)
        assert {(t, g) for _, t, g in seen} == {(1, False)}  # one torch thread each, without autograd
        assert len({ident for ident, _, _ in seen}) > 1 and torch.get_num_threads() == 3  # and the setting is back
        assert np.allclose(shared, np.stack(alone), atol=1e-5)
        seen.clear()
        with inference.SLICE_SHARING:  # another volume is sharing its slices: this one leaves torch alone
            unshared, _ = predictor.window_probability(volume)
        assert {(t, g) for _, t, g in seen} == {(3, False)} and len({ident for ident, _, _ in seen}) == 1
        assert np.allclose(unshared, shared, atol=1e-5)
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_native_training_on_real_crops_writes_a_sliding_window_checkpoint(tmp_path):
    from lungnlb.prepare import prepare

    src = tmp_path / "src"
    src.mkdir()
    for crop in sorted((DATA / "lidc-nodules" / "crops").glob("*.npz"))[:8]:
        (src / crop.name).symlink_to(crop)
    prepare(src, tmp_path / "studies", progress=False)
    config = TrainConfig(data=str(tmp_path / "studies"), out=str(tmp_path / "run"), model="unet_sl_nlb",
                         model_kwargs=TINY_KWARGS, patch_size=PATCH, steps=4, batch_size=4, val_every=2,
                         val_fraction=0.25, test_fraction=0.0, progress=False, tensorboard=False)
    result = train(config)
    model, saved = load_model(result["best"])
    assert saved["patch_size"] == [PATCH, PATCH] and saved["slice_size"] == PATCH
    assert saved["intensity"]["window"] and "dice" in saved["metrics"]
    predictor = Predictor(model, saved)
    assert predictor.native
    probability, _ = predictor.predict_normalized(np.full((1, 72, 72), 0.3, np.float32))
    assert probability.shape == (1, 72, 72)


def test_windows_cover_the_body_only():
    from lungnlb.inference import body_box

    plane = np.full((40, 50), 0.1, np.float32)
    plane[5:20, 10:30] = 0.6
    assert body_box(plane, 0.3) == (slice(5, 20), slice(10, 30))
    assert body_box(np.zeros((4, 4)), 0.3) is None
    torch.manual_seed(0)
    predictor = _native_predictor(build_model("unet_sl_nlb", **TINY_KWARGS))
    air_only = np.full((1, 40, 40), predictor.air(), np.float32)
    probability, slice_probability = predictor.predict_normalized(air_only)
    assert not probability.any() and slice_probability[0] == 0.0



def test_validation_fits_the_mask_threshold_with_the_best_score():
    from lungnlb.training.trainer import checkpoint_config
    from lungnlb.training.validation import SEG_THRESHOLDS, window_metrics

    torch.manual_seed(0)
    predictor = _native_predictor(build_model("unet_sl_nlb", **TINY_KWARGS))
    rng = np.random.default_rng(0)
    tumour = np.zeros((40, 40), bool)
    tumour[10:20, 10:20] = True
    samples = [SliceSample("t", "p", "s", 0, rng.uniform(0, 1, (40, 40)).astype(np.float32), tumour, 1),
               SliceSample("f", "q", "s", 0, rng.uniform(0, 1, (40, 40)).astype(np.float32), None, 0)]
    seen = {}
    best = window_metrics(predictor.model, samples, torch.device("cpu"), predictor.config,
                          report=lambda threshold, metrics: seen.update({threshold: validation_score(metrics)}))
    assert sorted(seen) == sorted(SEG_THRESHOLDS)
    assert best["threshold"] == max(seen, key=lambda t: (seen[t], -SEG_THRESHOLDS.index(t)))
    config = TrainConfig(data="d", out="o", patch_size=PATCH)
    from lungnlb.io.intensity import IntensityMapping

    assert checkpoint_config(config, {}, best, 1, IntensityMapping())["threshold"] == best["threshold"]


def test_inference_precision_is_bfloat16_only_where_asked_or_in_the_cpus_hardware(monkeypatch):
    from lungnlb.networks import inference_form as form

    cpu = torch.device("cpu")
    assert form.inference_precision(cpu, "float32") is torch.float32
    assert form.inference_precision(cpu, "bfloat16") is torch.bfloat16
    assert form.inference_precision(torch.device("cuda"), "auto") is torch.float32
    monkeypatch.setattr(form, "cpu_has_bfloat16", lambda: False)
    assert form.inference_precision(cpu) is torch.float32
    monkeypatch.setattr(form, "cpu_has_bfloat16", lambda: True)
    assert form.inference_precision(cpu) is torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        form.inference_precision(cpu, "float16")


def test_the_shipped_weights_mark_the_same_pixels_in_bfloat16_as_in_float32():
    """On real CT (the bundled Lung-PET-CT-Dx slices and an LIDC nodule crop), the bfloat16 forward
    changes the mask at the threshold by at most 2 % of its pixels and no slice's call."""
    from lungnlb.io import read_image

    exact, fast = (Predictor.from_checkpoint(precision=p) for p in ("float32", "bfloat16"))
    images = [read_image("sample_data/studies/Lung_Dx-A0001_2.000000-5mm-40805.nii.gz").array[:3],
              read_image("sample_data/studies/LIDC-IDRI-0001_npz_0001_NI000_slice000.nii.gz").array]
    marked = 0
    for image in images:
        reference, result = exact.predict(image, "hu"), fast.predict(image, "hu")
        assert result.probability.dtype == np.float32
        expected, mask = reference.probability > exact.threshold, result.probability > fast.threshold
        assert np.logical_xor(mask, expected).sum() <= 0.02 * max(1, expected.sum())
        assert np.array_equal(np.atleast_1d(reference.slice_probability) > exact.threshold,
                              np.atleast_1d(result.slice_probability) > fast.threshold)
        marked += int(expected.sum())
    assert marked > 0  # the comparison saw a mask
