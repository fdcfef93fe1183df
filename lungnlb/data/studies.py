"""The studies folder contract (what `lungnlb prepare` writes and MONAI Label serves):

    <studies>/<image_id>.nii.gz               image: a 2D slice or a (Z, Y, X) volume
    <studies>/labels/<tag>/<image_id>.nii.gz  uint8 masks; tag "original" is the reference,
                                              "reader1".."reader4" one radiologist each (LIDC crops)
    <studies>/meta/<image_id>.json            sidecar: case (patient), source, intensity, which slices
                                              are labelled and their class, provenance

`slice_plan` turns one sidecar into the labelled slices of its image: (z, has_mask, class_label).
Every reader and writer of `meta/` goes through this module (the io layer below knows file formats,
not this layout), so a datastore that is not a folder needs only this module's functions again.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lungnlb.io.atomic import atomic_write_text
from lungnlb.io.image import INTENSITY_KINDS, ImageData
from lungnlb.io.reader import read_image

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


def is_studies_folder(path: str | Path) -> bool:
    """Whether ``path`` is a prepared studies folder (it has the sidecar folder)."""
    return (Path(path) / SIDECAR_DIR).is_dir()


def image_id_of(path: str | Path) -> str:
    """The image id of an image file of a studies folder (its name without ``.nii.gz``, ``.nii``, ``.nrrd``)."""
    return Path(path).name.removesuffix(".gz").removesuffix(".nii").removesuffix(".nrrd")


def _load(path: Path) -> dict[str, Any]:
    record = json.loads(path.read_text(encoding="utf-8"))  # a bad file raises ValueError (JSON or UTF-8)
    if not isinstance(record, dict):
        raise ValueError(f"sidecar {path} is not a JSON object")
    return record


def read_sidecar(studies: str | Path, image_id: str) -> dict[str, Any] | None:
    """The sidecar of ``image_id`` (None when it has none); ValueError when it is not a JSON object."""
    path = sidecar_path(studies, image_id)
    return _load(path) if path.is_file() else None


def write_sidecar(studies: str | Path, image_id: str, sidecar: dict[str, Any]) -> Path:
    """Write the sidecar of ``image_id`` atomically (keys sorted, so rewrites diff cleanly)."""
    return atomic_write_text(sidecar_path(studies, image_id), json.dumps(sidecar, indent=1, sort_keys=True))


def iter_sidecars(studies: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(image_id, sidecar) for every sidecar of a studies folder, by id; none when there is no meta/."""
    for path in sorted((Path(studies) / SIDECAR_DIR).glob("*.json")):
        yield path.name[: -len(".json")], _load(path)


def read_study_image(path: str | Path, intensity: str | None = None) -> ImageData:
    """`read_image`, with the intensity kind the sidecar records when ``path`` is an image of a
    studies folder (``<studies>/<id>.nii.gz`` beside ``<studies>/meta/<id>.json``) and ``intensity``
    is not given: a NIfTI file does not say whether it holds HU, 8-bit or normalised values."""
    path = Path(path)
    if intensity is None and path.is_file():
        sidecar = read_sidecar(path.parent, image_id_of(path)) or {}
        intensity = sidecar.get("intensity") if sidecar.get("intensity") in INTENSITY_KINDS else None
    return read_image(path, intensity)


def read_records(studies: str | Path) -> list[dict[str, Any]]:
    """Read every sidecar of a prepared studies folder; each record gets `image_id`."""
    studies = Path(studies)
    if not is_studies_folder(studies):
        raise FileNotFoundError(f"{studies} is not a prepared studies folder: no meta/ folder of sidecars")
    records = []
    for image_id, record in iter_sidecars(studies):
        record["image_id"] = image_id
        for key in REQUIRED_FIELDS:
            if key not in record:
                raise ValueError(f"sidecar {sidecar_path(studies, image_id)} has no '{key}'")
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
