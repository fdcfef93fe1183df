"""Shared by tests/test_app*.py and benchmarks/server.py: small studies folders from the real
LIDC data in ../shared/data, and a tiny untrained-but-valid checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from lungnlb.checkpoint import save_checkpoint
from lungnlb.io import list_dicom_series, read_dicom_series, read_npz_slices, write_nifti
from lungnlb.networks import build_model

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "apps" / "lungnlb"
SHARED_DATA = REPO.parent / "shared" / "data"
TINY_MODEL = {"name": "unet_sl_nlb", "kwargs": {"features": [8, 8, 16, 16, 32, 8], "grid": 4}, "in_channels": 1}
TINY_INPUT = [128, 128]


def lidc_dir() -> Path:
    folder = SHARED_DATA / "lidc-idri"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is missing: the app tests need the shared LIDC data (see ../shared/data/README.md)")
    return folder


def build_studies(root: Path, slices_per_file: int = 3, files: int = 2) -> dict[str, list[str]]:
    """2D LIDC slices with radiologist `original` labels, plus one unlabelled CT volume (DICOM series)."""
    (root / "labels" / "original").mkdir(parents=True, exist_ok=True)
    (root / "meta").mkdir(exist_ok=True)
    slices, volumes = [], []
    for npz in sorted((lidc_dir() / "slices").glob("*.npz"))[:files]:
        for index, item in enumerate(read_npz_slices(npz)[:slices_per_file]):
            image_id = f"{item.patient}_s{index}"
            write_nifti(item.image.array, item.image.affine, root / f"{image_id}.nii.gz")
            write_nifti(item.mask.astype(np.uint8), item.image.affine, root / "labels" / "original" / f"{image_id}.nii.gz", dtype=np.uint8)
            _sidecar(root, image_id, item.image.intensity, [0], item.patient)
            slices.append(image_id)
    series = list_dicom_series(lidc_dir() / "dicom")[0]
    volume = read_dicom_series(series)
    write_nifti(volume.array, volume.affine, root / "volume_0.nii.gz")
    _sidecar(root, "volume_0", "hu", [], "volume")
    volumes.append("volume_0")
    return {"slices": slices, "volumes": volumes}


def shipped_weights_held_out() -> set[str]:
    """Cases the shipped default weights were *not* trained on (from their checkpoint config)."""
    from lungnlb.checkpoint import default_checkpoint_path

    path = default_checkpoint_path()
    if path is None:
        raise FileNotFoundError("lungnlb ships no default weights (lungnlb.checkpoint.default_checkpoint_path() is None)")
    config = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    return set(config["training_data"]["held_out_cases"]["test"])


def build_training_patient_studies(root: Path, count: int) -> list[str]:
    """`count` 2D LIDC slices with radiologist `original` labels from a patient the shipped
    weights were trained on (so the model agrees with those labels), one tumour slice each."""
    (root / "labels" / "original").mkdir(parents=True, exist_ok=True)
    (root / "meta").mkdir(exist_ok=True)
    held_out = shipped_weights_held_out()
    npz = next(p for p in sorted((lidc_dir() / "slices").glob("*.npz")) if read_npz_slices(p)[0].patient not in held_out)
    items = [item for item in read_npz_slices(npz) if item.mask.any()][:count]
    ids = []
    for index, item in enumerate(items):
        image_id = f"{item.patient}_t{index}"
        write_nifti(item.image.array, item.image.affine, root / f"{image_id}.nii.gz")
        write_nifti(item.mask.astype(np.uint8), item.image.affine, root / "labels" / "original" / f"{image_id}.nii.gz", dtype=np.uint8)
        _sidecar(root, image_id, item.image.intensity, [0], item.patient)
        ids.append(image_id)
    return ids


def _sidecar(root: Path, image_id: str, intensity: str, labelled: list[int], case: str) -> None:
    meta = {"source": "lidc-idri", "case": case, "intensity": intensity, "labelled_slices": labelled,
            "label_method": "radiologist" if labelled else None,
            "attribution": "Armato SG III et al., Data From LIDC-IDRI, TCIA 2015, doi:10.7937/K9/TCIA.2015.LO9QL9SX (CC BY 3.0)"}
    (root / "meta" / f"{image_id}.json").write_text(json.dumps(meta), encoding="utf-8")


def tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """A small NLB U-Net (random weights, fixed seed) saved as a real checkpoint."""
    import torch

    torch.manual_seed(seed)
    model = build_model(TINY_MODEL["name"], **TINY_MODEL["kwargs"])
    config = {"model": TINY_MODEL, "input_size": TINY_INPUT, "intensity": {"window": None}, "threshold": 0.5}
    return save_checkpoint(path, model, config)


@contextmanager
def in_process_client(studies: Path, conf: dict[str, str], **settings_values) -> Iterator:
    """MONAI Label's FastAPI app with the LungNLB app on `studies`, served in-process by FastAPI's
    TestClient (start-up and shutdown run as in the real server); `settings_values` override
    MONAI Label settings for this client only."""
    from fastapi.testclient import TestClient
    from monailabel.config import settings
    from monailabel.interfaces.utils.app import clear_cache

    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), str(APP_DIR)])  # async tasks read it
    values = {"MONAI_LABEL_APP_DIR": str(APP_DIR), "MONAI_LABEL_STUDIES": str(studies), "MONAI_LABEL_APP_CONF": conf,
              "MONAI_LABEL_DATASTORE_AUTO_RELOAD": False, "MONAI_LABEL_AUTO_UPDATE_SCORING": False, **settings_values}
    previous = {key: getattr(settings, key) for key in values}
    for key, value in values.items():
        setattr(settings, key, value)
    clear_cache()
    from monailabel.app import app

    try:
        with TestClient(app) as test_client:
            yield test_client
    finally:
        clear_cache()
        for key in settings_values:
            setattr(settings, key, previous[key])


def studies_snapshot(studies: Path) -> dict[str, str]:
    """Digest of every file the datastore owns (images, labels, datastore JSON, provenance)."""
    return {
        str(p.relative_to(studies)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(studies.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }
