"""Shared helpers for the training / evaluation / export tests: tiny models and prepared folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lungnlb.io import axial_affine, write_nifti

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TINY_KWARGS = {"features": [4, 4, 8, 8, 16, 4], "grid": 2}


def write_study(studies: Path, image_id: str, array: np.ndarray, sidecar: dict, mask: np.ndarray | None) -> None:
    """Write one image (+ mask) + sidecar in the prepared studies layout."""
    affine = axial_affine((1.0, 1.0))
    write_nifti(array, affine, studies / f"{image_id}.nii.gz")
    if mask is not None:
        write_nifti(mask.astype(np.uint8), affine, studies / "labels" / "original" / f"{image_id}.nii.gz", np.uint8)
    (studies / "meta").mkdir(parents=True, exist_ok=True)
    (studies / "meta" / f"{image_id}.json").write_text(json.dumps(sidecar))


def synthetic_studies(root: Path, n_cases: int = 6, size: int = 40, seed: int = 0) -> Path:
    """Shape-only test data: bright discs (tumour, with mask) or none, HU-like, 2 slices per case,
    plus one 3-slice volume and one class-only 8-bit slice per case pair."""
    rng = np.random.default_rng(seed)
    studies = root / "studies"
    yy, xx = np.mgrid[:size, :size]
    for case in range(n_cases):
        for k in range(2):
            image = rng.normal(-800, 50, (size, size)).astype(np.float32)
            mask = np.zeros((size, size), bool)
            if (case + k) % 2 == 0:
                cy, cx = rng.integers(10, size - 10, 2)
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 < 25
                image[mask] = 40.0
            write_study(studies, f"c{case}_s{k}", image,
                        {"source": "synthetic", "case": f"case{case}", "intensity": "hu",
                         "class_label": int(mask.any()), "label_method": "radiologist", "labelled_slices": [0]},
                        mask)
        if case % 2 == 0:
            write_study(studies, f"c{case}_cls", rng.uniform(0, 255, (size + 8, size)).astype(np.float32),
                        {"source": "synthetic8bit", "case": f"block{case}", "intensity": "windowed8bit",
                         "class_label": case % 4 // 2, "label_method": None, "labelled_slices": []}, None)
    volume = rng.normal(-800, 50, (3, size, size)).astype(np.float32)
    volume_mask = np.zeros_like(volume, bool)
    volume_mask[1, 10:20, 10:20] = True
    volume[volume_mask] = 40.0
    write_study(studies, "vol0", volume,
                {"source": "synthetic", "case": "case0", "intensity": "hu", "class_label": 1,
                 "label_method": "watershed", "labelled_slices": [1], "slice_class_labels": {"1": 1, "2": 0}},
                volume_mask)
    return studies
