"""Small studies folders for the app from the real LIDC data in ../shared/data, and a tiny
untrained-but-valid checkpoint (for `benchmarks.server` and the app tests)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lungnlb.checkpoint import save_checkpoint
from lungnlb.data.sources import LIDC_ATTRIBUTION
from lungnlb.data.studies import REFERENCE_TAG, image_path, label_path, sidecar_path
from lungnlb.io import list_dicom_series, read_dicom_series, read_npz_slices, write_nifti
from lungnlb.io.atomic import atomic_write_text
from lungnlb.networks import build_model

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY_MODEL = {"name": "unet_sl_nlb", "kwargs": {"features": [8, 8, 16, 16, 32, 8], "grid": 4}, "in_channels": 1}
TINY_INPUT = [128, 128]


def lidc_dir() -> Path:
    folder = SHARED_DATA / "lidc-idri"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is missing: the app tests need the shared LIDC data (see ../shared/data/README.md)")
    return folder


def write_labelled_slice(root: Path, image_id: str, item) -> None:
    """One 2D LIDC slice (`read_npz_slices` item) with its radiologist mask as the `original` label."""
    write_nifti(item.image.array, item.image.affine, image_path(root, image_id))
    write_nifti(item.mask.astype(np.uint8), item.image.affine, label_path(root, image_id, REFERENCE_TAG), dtype=np.uint8)
    write_sidecar(root, image_id, item.image.intensity, [0], item.patient)


def build_studies(root: Path, slices_per_file: int = 3, files: int = 2) -> dict[str, list[str]]:
    """2D LIDC slices with radiologist `original` labels, plus one unlabelled CT volume (DICOM series)."""
    slices = []
    for npz in sorted((lidc_dir() / "slices").glob("*.npz"))[:files]:
        for index, item in enumerate(read_npz_slices(npz)[:slices_per_file]):
            image_id = f"{item.patient}_s{index}"
            write_labelled_slice(root, image_id, item)
            slices.append(image_id)
    volume = read_dicom_series(list_dicom_series(lidc_dir() / "dicom")[0])
    write_nifti(volume.array, volume.affine, image_path(root, "volume_0"))
    write_sidecar(root, "volume_0", "hu", [], "volume")
    return {"slices": slices, "volumes": ["volume_0"]}


def write_sidecar(root: Path, image_id: str, intensity: str, labelled: list[int], case: str) -> None:
    meta = {"source": "lidc-idri", "case": case, "intensity": intensity, "labelled_slices": labelled,
            "label_method": "radiologist" if labelled else None, "attribution": LIDC_ATTRIBUTION}
    atomic_write_text(sidecar_path(root, image_id), json.dumps(meta))


def tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """A small NLB U-Net (random weights, fixed seed) saved as a real checkpoint."""
    import torch

    torch.manual_seed(seed)
    model = build_model(TINY_MODEL["name"], **TINY_MODEL["kwargs"])
    config = {"model": TINY_MODEL, "input_size": TINY_INPUT, "intensity": {"window": None}, "threshold": 0.5}
    return save_checkpoint(path, model, config)
