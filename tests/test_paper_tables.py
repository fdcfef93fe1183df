"""The paper tables: every row's input under the native recipe, result files that merge, the nnU-Net export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments import nnunet_row, paper_tables
from lungnlb.networks import build_model, is_segmentation_model
from lungnlb.training.dataset import SliceSample


@pytest.mark.parametrize("row", paper_tables.ROWS + [paper_tables.CHEBYSHEV])
def test_every_row_trains_a_step_on_the_recipes_input(tmp_path, row):
    config = paper_tables.row_config(row, 0, paper_tables.BUDGETS["cpu"], tmp_path, tmp_path / "split.json", tmp_path)
    assert config.time_budget_s == paper_tables.BUDGETS["cpu"]["seconds"] and config.batch_size == 16
    if is_segmentation_model(config.model):
        assert config.patch_size == 64  # the NLB rows' grid of 4 lets all of them take the shipped 64-pixel patches
    else:
        assert config.patch_size is None and config.input_size == paper_tables.CLASSIFIER_INPUT
    size = config.patch_size or config.input_size
    model = build_model(config.model, **config.model_kwargs)
    output = model(torch.rand(2, 1, size, size))
    if is_segmentation_model(config.model):
        assert output["seg"].shape == (2, 1, size, size)
    loss = sum(value.float().mean() for value in output.values())
    loss.backward()
    first = next(model.parameters())
    assert torch.isfinite(loss) and first.grad is not None and first.grad.abs().sum() > 0  # reaches the input layer


def test_a_row_that_cannot_take_64_pixels_gets_the_smallest_patch_it_can():
    assert paper_tables.patch_size_for("unet_sl_nlb", {"grid": 8}) == 128  # divisor 128
    assert paper_tables.patch_size_for("deeplabv3plus", {}, wanted=48) == 64  # divisor 32
    assert paper_tables.patch_size_for("unet_sl_nlb", {"grid": 4}) == 64


def _run(row: str, seed: int, dice: float) -> dict:
    return {"row": row, "seed": seed, "dice": dice, "iou": dice / 2, "precision": 0.5, "recall": 0.5, "f1": 0.5,
            "specificity": 0.25,
            "patch_size": 64, "steps": 100 + seed, "train_seconds": 240.0, "seconds": 300.0}


def _fresh(budget: str = "cpu", sha: str = "abc") -> dict:
    return {"budget": budget, "settings": paper_tables.settings(paper_tables.BUDGETS[budget]),
            "split": {"file": "native_split.json", "cases_sha256": sha, "test_images": 2, "test_cases": ["p1", "p2"],
                      "test_patients_with_crops": 2}}


def test_parts_merge_replacing_only_the_same_row_and_seed(tmp_path):
    path = tmp_path / "tables.json"
    paper_tables.merge_into(path, _fresh(), [_run("unet_sl_nlb", 0, 0.1), _run("unet", 0, 0.2)])
    paper_tables.merge_into(path, _fresh(), [_run("unet", 1, 0.4)])
    result = paper_tables.merge_into(path, _fresh(), [_run("unet", 0, 0.6)])
    assert [(r["row"], r["seed"], r["dice"]) for r in result["runs"]] == [
        ("unet", 0, 0.6), ("unet", 1, 0.4), ("unet_sl_nlb", 0, 0.1)]
    assert json.loads(path.read_text()) == result
    assert not list(tmp_path.glob(".*tmp"))
    text = paper_tables.markdown(result)
    assert "| unet | 2 | 0.500 ± 0.141 | 0.250 ± 0.071 |" in text  # Table II: two seeds, mean ± sd
    assert "| unet_sl_nlb | 1 | 0.100 ± 0.000 |" in text
    assert "| unet | 2 | 0.500 ± 0.000 | 0.500 ± 0.000 | 0.250 ± 0.000 | 0.500 ± 0.000 | – |" in text  # Table I
    assert "| unet | 1 | 64 px patches | 101 | 240 | 300 | – |" in text


@pytest.mark.parametrize("other", [_fresh(budget="gpu"), _fresh(sha="another split")])
def test_runs_of_another_budget_or_split_are_refused(tmp_path, other):
    path = tmp_path / "tables.json"
    paper_tables.merge_into(path, _fresh(), [_run("unet", 0, 0.2)])
    before = path.read_bytes()
    with pytest.raises(ValueError, match="refusing to merge"):
        paper_tables.merge_into(path, other, [_run("unet", 1, 0.4)])
    assert path.read_bytes() == before


def test_the_earlier_whole_slice_result_file_still_renders():
    path = Path(paper_tables.ROOT) / "experiments" / "results" / "paper_tables_cpu.json"
    text = paper_tables.markdown(json.loads(path.read_text()))
    assert "| unet_sl_nlb | 3 | 0.826 ± 0.103 | 0.874 ± 0.062 | – |" in text and "### Runs" not in text


def _sample(image_id: str, z: int, mask: np.ndarray | None, label: int | None) -> SliceSample:
    return SliceSample(image_id, "case", "synthetic", z, np.full((6, 8), 0.25, np.float32), mask, label)


def test_nnunet_export_writes_the_slices_with_a_known_truth(tmp_path):
    import SimpleITK as sitk

    lesion = np.zeros((6, 8), bool)
    lesion[2:4, 3:5] = True
    train = [_sample("LIDC-IDRI-0001_crop_n00", 0, lesion, 1), _sample("iq/normal 1", 0, None, 0),
             _sample("iq/malignant", 0, None, 1), _sample("empty-mask", 0, np.zeros((6, 8), bool), 1)]
    val = [_sample("LIDC-IDRI-0002_crop_n00", 3, lesion, 1)]
    fold = nnunet_row.export_dataset(train, val, tmp_path)
    assert fold == {"train": ["LIDC-IDRI-0001-crop-n00_z000", "iq-normal-1_z000"], "val": ["LIDC-IDRI-0002-crop-n00_z003"]}
    folder = tmp_path / nnunet_row.DATASET_NAME
    dataset = json.loads((folder / "dataset.json").read_text())
    assert dataset["numTraining"] == 3 and dataset["labels"] == {"background": 0, "tumour": 1}
    image = sitk.ReadImage(str(folder / "imagesTr" / "LIDC-IDRI-0001-crop-n00_z000_0000.nii.gz"))
    assert image.GetSpacing() == (1.0, 1.0) and np.allclose(sitk.GetArrayFromImage(image), 0.25)
    assert (sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / "LIDC-IDRI-0001-crop-n00_z000.nii.gz")))
            == lesion).all()
    assert not sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / "iq-normal-1_z000.nii.gz"))).any()


class _HalfProbability:
    """Stands in for nnU-Net's predictor: foreground probability 0.9 on the left half of a slice, 0.1 elsewhere."""

    def predict_single_npy_array(self, image, properties, previous, output, probabilities):
        assert image.shape[:2] == (1, 1) and properties == {"spacing": [999.0, 1.0, 1.0]} and probabilities
        foreground = np.full(image.shape[1:], 0.1, np.float32)
        foreground[..., : image.shape[-1] // 2] = 0.9
        return None, np.stack([1 - foreground, foreground])


def test_nnunet_slices_serve_the_libraries_evaluation(tmp_path):
    from train_helpers import synthetic_studies

    from lungnlb.evaluation.evaluate import evaluate
    from lungnlb.io.intensity import IntensityMapping

    studies = synthetic_studies(tmp_path)
    report, results = evaluate(studies, nnunet_row.NnUNetSlices(_HalfProbability(), IntensityMapping()), n_bootstrap=0)
    assert report["n_tumour_slices"] > 0 and 0 < report["dice"] < 1
    assert all(r.score == pytest.approx(0.9) for r in results)  # the slice probability is the mask's maximum
    assert all(r.probability.shape == r.image.shape for r in results)
