"""Export: TorchScript matches the eager model; the MONAI bundle runs on a NIfTI slice like Predictor."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from train_helpers import TINY_KWARGS

from lungnlb.checkpoint import save_checkpoint
from lungnlb.export import export_bundle, export_torchscript
from lungnlb.inference import Predictor
from lungnlb.io import axial_affine, read_image, write_nifti
from lungnlb.networks import build_model

CONFIG = {"model": {"name": "unet_sl_nlb", "kwargs": TINY_KWARGS}, "input_size": [32, 32], "threshold": 0.5,
          "training_data": {"sources": {"synthetic": {"licence": "none"}}}}


NATIVE_CONFIG = {**CONFIG, "patch_size": [32, 32], "slice_size": 32}


def tiny_checkpoint(tmp_path, config=CONFIG):
    torch.manual_seed(0)
    model = build_model("unet_sl_nlb", **TINY_KWARGS)
    return save_checkpoint(tmp_path / "ckpt", model, config), model


def test_torchscript_matches_eager(tmp_path):
    weights, model = tiny_checkpoint(tmp_path)
    path = export_torchscript(weights, tmp_path / "model.ts")
    extra = {"config.json": ""}
    scripted = torch.jit.load(str(path), _extra_files=extra)
    assert json.loads(extra["config.json"])["model"]["name"] == "unet_sl_nlb"
    x = torch.rand(2, 1, 32, 32)
    seg, cls = scripted(x)
    expected = model.eval()(x)
    assert torch.allclose(seg, expected["seg"], atol=1e-5) and torch.allclose(cls, expected["cls"], atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("config", [CONFIG, NATIVE_CONFIG], ids=["whole_slice", "native"])
def test_monai_bundle_runs_on_a_nifti_slice(tmp_path, config):
    """The bundle predicts a slice as `Predictor` does: resized for a whole-slice checkpoint, by the
    Gaussian sliding window with small components removed for a native-resolution one."""
    weights, _ = tiny_checkpoint(tmp_path, config)
    bundle = export_bundle(weights, tmp_path / "bundle")
    for name in ("configs/metadata.json", "configs/inference.json", "models/model.pt", "docs/README.md"):
        assert (bundle / name).is_file(), name
    rng = np.random.default_rng(0)
    hu = rng.normal(-700, 300, (48, 40)).astype(np.float32)
    image_path = write_nifti(hu, axial_affine((0.7, 0.7)), tmp_path / "slice.nii.gz")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
               "--bundle_root", str(bundle), "--input_file", str(image_path), "--output_dir", str(out)]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    written = list(out.glob("*.nii.gz"))
    assert len(written) == 1
    mask = read_image(written[0]).array
    assert mask.shape == hu.shape
    # the bundle computes in float32; Predictor would compute in bfloat16 on a CPU that has it
    expected = Predictor.from_checkpoint(weights, precision="float32").predict(hu, "hu").probability > 0.5
    assert 0.01 < expected.mean() < 0.99, "the untrained model should mark some pixels and not others"
    assert np.mean((mask > 0.5) == expected) > 0.99
    inference = json.loads((bundle / "configs" / "inference.json").read_text())
    assert inference["inferer"]["_target_"] == ("SlidingWindowInferer" if "patch_size" in config else "SimpleInferer")


@pytest.mark.slow
def test_the_bundle_of_the_shipped_weights_keeps_only_lung_components_as_predictor_does(tmp_path):
    """On a real whole CT slice (the bundled Lung-PET-CT-Dx sample), the bundle's mask is Predictor's
    mask, lung field included: no component that misses the lungs."""
    from lungnlb.checkpoint import default_checkpoint_path

    volume = read_image("sample_data/studies/Lung_Dx-A0001_2.000000-5mm-40805.nii.gz").array
    bundle = export_bundle(default_checkpoint_path(), tmp_path / "bundle")
    predictor = Predictor.from_checkpoint(precision="float32")  # as the bundle computes
    every_window = Predictor(predictor.model, {**predictor.config, "lung_filter": False}, precision="float32")
    kept, removed = 0, 0
    for z in (1, 2):  # the shipped weights mark a nodule-like spot in the lungs on one, outside them on the other
        image_path = write_nifti(volume[z], axial_affine((0.7, 0.7)), tmp_path / f"slice{z}.nii.gz")
        out = tmp_path / f"out{z}"
        command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
                   "--bundle_root", str(bundle), "--input_file", str(image_path), "--output_dir", str(out)]
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        mask = read_image(next(out.glob("*.nii.gz"))).array > 0.5
        expected = predictor.predict(volume[z], "hu").probability > predictor.threshold
        unfiltered = every_window.predict(volume[z], "hu").probability > predictor.threshold
        assert np.logical_xor(mask, expected).sum() <= 0.02 * max(1, expected.sum())
        kept, removed = kept + int(expected.sum()), removed + int(unfiltered.sum() - expected.sum())
    assert kept > 0 and removed > 0  # the field keeps something and removes something here
