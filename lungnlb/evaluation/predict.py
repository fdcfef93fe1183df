"""Predict every labelled slice of a prepared studies folder, patient by patient.

For each patient (the sidecar ``case``): read its images, reference masks (tag ``original``) and,
where the sidecar lists ``reader_tags``, each radiologist's mask; drop the slices that reach the
folder twice (`lungnlb.evaluation.duplicates`); map each image with the checkpoint's intensity
mapping; predict whole slices as they are and crops by the crop rule (`lungnlb.evaluation.crops`).
Patients in ``exclude_cases`` (those a checkpoint trained or was selected on) are not predicted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from lungnlb.data.studies import image_path, label_path, read_records, slice_plan
from lungnlb.evaluation.crops import predict_crops
from lungnlb.evaluation.duplicates import SliceKey, find_duplicates


@dataclass
class SliceResult:
    """One predicted slice.

    reference: the reference mask (Y, X) bool, or None where the slice has no mask; readers: each
    radiologist's mask on this slice by label tag; image: the model input in [0, 1]; probability:
    the predicted mask probability (None for classification-only models); score: the slice's
    tumour probability; crop: the slice is a nodule crop (never a tumour-free example).
    """

    image_id: str
    case: str
    source: str
    z: int
    crop: bool
    class_label: int | None
    score: float
    image: np.ndarray
    reference: np.ndarray | None
    probability: np.ndarray | None
    readers: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def mask(self) -> np.ndarray | None:
        """The reference mask (the name figures and older callers use)."""
        return self.reference


@dataclass
class LoadedImage:
    """One image of a patient with its labels, as 3D arrays (a 2D image becomes one slice)."""

    record: dict[str, Any]
    raw: np.ndarray
    reference: np.ndarray | None
    readers: dict[str, np.ndarray]
    plan: list[tuple[int, bool, int | None]]


def _as_volume(array: np.ndarray) -> np.ndarray:
    return array[None] if array.ndim == 2 else array


def load_image(studies: Path, record: dict[str, Any]) -> LoadedImage:
    """Read one image, its reference and reader masks, and its slice plan."""
    from lungnlb.io import read_image

    image_id = record["image_id"]
    image = read_image(image_path(studies, image_id))
    path = label_path(studies, image_id)
    reference = read_image(path).array > 0.5 if path.is_file() else None
    if reference is not None and reference.shape != image.array.shape:
        raise ValueError(f"{path}: mask shape {reference.shape} differs from the image's {image.array.shape}")
    readers = {}
    for tag in record.get("reader_tags") or []:
        reader_path = label_path(studies, image_id, tag)
        if reader_path.is_file():
            readers[tag] = _as_volume(read_image(reader_path).array > 0.5)
    plan = slice_plan(record, reference, image.array.ndim)
    raw = _as_volume(np.asarray(image.array, np.float32))
    return LoadedImage(record, raw, None if reference is None else _as_volume(reference), readers, plan)


def drop_duplicates(images: list[LoadedImage]) -> list[dict[str, Any]]:
    """Remove repeated whole slices from the images' plans (merging masks of same-pipeline copies)."""
    by_id = {loaded.record["image_id"]: loaded for loaded in images}
    keys = [SliceKey(loaded.record["image_id"], z, loaded.record["case"], loaded.record["intensity"], loaded.raw[z])
            for loaded in images if not loaded.record.get("crop") for z, _, _ in loaded.plan]
    removed = []
    for kept, gone, r in find_duplicates(keys):
        source, target = by_id[gone.image_id], by_id[kept.image_id]
        source.plan = [entry for entry in source.plan if entry[0] != gone.z]
        same_pipeline = kept.intensity == gone.intensity
        if same_pipeline and source.reference is not None and target.reference is not None:
            target.reference[kept.z] |= source.reference[gone.z]
        removed.append({"dropped": f"{gone.image_id}[{gone.z}]", "kept": f"{kept.image_id}[{kept.z}]",
                        "correlation": round(r, 4), "masks_merged": same_pipeline})
    return removed


def plan_span(plan: list[tuple[int, bool, int | None]]) -> slice:
    """The slices from a plan's first to its last: those between are predicted too, since a volume's
    components are counted through adjacent slices (`lungnlb.inference.remove_small_components`),
    as the app counts them."""
    zs = [z for z, _, _ in plan]
    return slice(min(zs), max(zs) + 1)


def _predict_image(loaded: LoadedImage, predictor, crop_rule: str) -> Iterator[SliceResult]:
    record = loaded.record
    span = plan_span(loaded.plan)
    volume = predictor.model_input(loaded.raw[span], record["intensity"])
    crop = bool(record.get("crop"))
    if crop:
        probabilities, scores = predict_crops(predictor, volume, crop_rule)
    else:
        probabilities, scores = predictor.predict_normalized(volume, record["intensity"])
    for z, has_mask, label in loaded.plan:
        index = z - span.start
        yield SliceResult(
            record["image_id"], record["case"], record["source"], z, crop, label, float(scores[index]),
            volume[index].astype(np.float16),
            loaded.reference[z] if has_mask else None,
            None if probabilities is None else probabilities[index].astype(np.float16),
            {tag: mask[z] for tag, mask in loaded.readers.items()},
        )


def predict_folder(
    studies: str | Path, predictor, image_ids: list[str] | None = None, progress: bool = False,
    exclude_cases: set[str] | frozenset[str] = frozenset(), crop_rule: str = "pad",
) -> tuple[list[SliceResult], dict[str, Any]]:
    """Predict the labelled slices of a studies folder: (results, {"duplicates", "excluded_cases"})."""
    studies = Path(studies)
    records = read_records(studies)
    if image_ids is not None:
        wanted = set(image_ids)
        records = [record for record in records if record["image_id"] in wanted]
    excluded = sorted({r["case"] for r in records if r["case"] in exclude_cases})
    by_case: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if record["case"] not in exclude_cases:
            by_case.setdefault(record["case"], []).append(record)
    cases = by_case.items()
    if progress:
        from tqdm.auto import tqdm

        cases = tqdm(cases, desc="evaluating", unit="patient")
    results, duplicates = [], []
    for _, case_records in cases:
        images = [load_image(studies, record) for record in case_records]
        duplicates += drop_duplicates(images)
        for loaded in images:
            if loaded.plan:
                results.extend(_predict_image(loaded, predictor, crop_rule))
    return results, {"duplicates": duplicates, "excluded_cases": excluded}
