"""The studies folder contract (what `lungnlb prepare` writes and MONAI Label serves):

    <studies>/<image_id>.nii.gz               image: a 2D slice or a (Z, Y, X) volume
    <studies>/labels/<tag>/<image_id>.nii.gz  uint8 masks; tag "original" is the reference,
                                              "reader1".."reader4" one radiologist each (LIDC crops)
    <studies>/meta/<image_id>.json            sidecar: case (patient), source, intensity, which slices
                                              are labelled and their class, provenance

`slice_plan` turns one sidecar into the labelled slices of its image: (z, has_mask, class_label).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

IMAGE_SUFFIX = ".nii.gz"
SIDECAR_DIR = "meta"
REFERENCE_TAG = "original"
REQUIRED_FIELDS = ("case", "source", "intensity")


def image_path(studies: str | Path, image_id: str) -> Path:
    """Path of an image in a studies folder."""
    return Path(studies) / f"{image_id}{IMAGE_SUFFIX}"


def label_path(studies: str | Path, image_id: str, tag: str = REFERENCE_TAG) -> Path:
    """Path of the label of ``image_id`` under ``tag`` (it may not exist)."""
    return Path(studies) / "labels" / tag / f"{image_id}{IMAGE_SUFFIX}"


def sidecar_path(studies: str | Path, image_id: str) -> Path:
    """Path of the sidecar JSON of ``image_id`` (it may not exist)."""
    return Path(studies) / SIDECAR_DIR / f"{image_id}.json"


def read_records(studies: str | Path) -> list[dict[str, Any]]:
    """Read every sidecar of a prepared studies folder; each record gets `image_id`."""
    studies = Path(studies)
    meta_dir = studies / SIDECAR_DIR
    if not meta_dir.is_dir():
        raise FileNotFoundError(f"{studies} is not a prepared studies folder: no meta/ folder of sidecars")
    records = []
    for meta_path in sorted(meta_dir.glob("*.json")):
        record = json.loads(meta_path.read_text(encoding="utf-8"))
        record["image_id"] = meta_path.name[: -len(".json")]
        for key in REQUIRED_FIELDS:
            if key not in record:
                raise ValueError(f"sidecar {meta_path} has no '{key}'")
        records.append(record)
    if not records:
        raise ValueError(f"prepared studies folder {studies} has no sidecars in meta/")
    return records


def slice_plan(record: dict[str, Any], mask, ndim: int) -> list[tuple[int, bool, int | None]]:
    """(z, has_mask, class_label) for every labelled slice of one image.

    A 2D image is one slice (z = 0). In a volume, each z of `labelled_slices` has a meaningful mask
    (its class: `slice_class_labels[z]`, else whether the mask is non-empty — except in a crop,
    whose slices are all centred on a nodule, so an empty mask there says nothing about the slice);
    each further z of `slice_class_labels` is classification-only.
    """
    if ndim == 2:
        has_mask = mask is not None and 0 in record.get("labelled_slices", [0])
        label = record.get("class_label")
        if label is None and has_mask:
            label = int(mask.any())
        return [(0, has_mask, label)] if has_mask or label is not None else []
    known = {int(z): int(v) for z, v in (record.get("slice_class_labels") or {}).items() if v is not None}
    plan = []
    labelled = sorted(int(z) for z in record.get("labelled_slices", [])) if mask is not None else []
    for z in labelled:
        plan.append((z, True, known.get(z, None if record.get("crop") else int(mask[z].any()))))
    plan += [(z, False, label) for z, label in sorted(known.items()) if z not in set(labelled)]
    return plan
