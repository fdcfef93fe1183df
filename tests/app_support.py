"""Shared by the app tests: a studies folder from a patient the shipped weights were trained on, the
app served in-process, and a digest of a studies folder. The studies folders and the tiny checkpoint
that `benchmarks.server` uses as well live in `benchmarks.app_studies`."""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from benchmarks.app_server import APP_DIR, REPO
from benchmarks.app_studies import lidc_dir, write_labelled_slice
from lungnlb.io import read_npz_slices


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
    held_out = shipped_weights_held_out()
    npz = next(p for p in sorted((lidc_dir() / "slices").glob("*.npz")) if read_npz_slices(p)[0].patient not in held_out)
    items = [item for item in read_npz_slices(npz) if item.mask.any()][:count]
    ids = []
    for index, item in enumerate(items):
        image_id = f"{item.patient}_t{index}"
        write_labelled_slice(root, image_id, item)
        ids.append(image_id)
    return ids


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
        with TestClient(app, base_url="http://127.0.0.1") as test_client:  # the server answers to loopback names only
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
