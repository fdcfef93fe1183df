"""Labelled 2D slices from a prepared studies folder (what `lungnlb prepare` writes).

    the studies folder of `lungnlb.data.studies`: image, reference label and sidecar per image id

One `SliceSample` per labelled slice:
- 2D image with a mask: segmentation sample; its class is the sidecar `class_label`, or whether the
  mask is non-empty when that is unknown.
- 2D image with only a class label: classification-only sample (no mask: the seg head is not trained on it).
- volume: each z in `labelled_slices` (mask meaningful there) is a segmentation sample with class
  `slice_class_labels[z]` (or mask non-empty); each further z in `slice_class_labels` is classification-only.

Every slice goes through `lungnlb.io.intensity.to_model_input` (the one intensity mapping) and is
resized to the training input size (bilinear; masks bilinear then > 0.5), so samples are
(1, H, W) float32 in [0, 1].

Reader targets (``reader_targets``, LIDC crops with each reader's outline): the mask of a slice is
soft, ``t = min(n / (2k), 1)`` where ``n`` readers outlined the pixel and ``k`` is the consensus the
reference was made with, so ``t >= 0.5`` is exactly the reference (``n >= k``) and a pixel fewer
readers agree on is a softer target: with k = 2, one reader 0.25, two 0.5, three 0.75, four 1.
Slices only one reader outlined then train too, with targets below the threshold.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from monai.data import get_track_meta, set_track_meta
from torch.utils.data import Dataset

from lungnlb.data.studies import image_path, label_path, read_records, slice_plan
from lungnlb.inference import LUNG_FIELD_MIN_SIZE, resize_batch

if TYPE_CHECKING:
    from lungnlb.io.intensity import IntensityMapping


@dataclass
class SliceSample:
    """One labelled slice, already mapped to [0, 1] and resized: image (H, W), mask (H, W) bool or None."""

    image_id: str
    case: str
    source: str
    z: int
    image: np.ndarray
    mask: np.ndarray | None  # bool, or float32 in [0, 1] for reader targets
    class_label: int | None
    weight: float = 1.0  # relative chance of being drawn for a batch (the app draws original labels less often)
    hard_negative: bool = False  # a crop around a trained model's false alarm (`lungnlb.training.hard_negatives`)


def is_weak_positive(sample: SliceSample) -> bool:
    """A whole tumour slice with no mask: its class is its only truth."""
    return sample.mask is None and sample.class_label == 1 and _whole(sample)


def is_whole_tumour_free(sample: SliceSample) -> bool:
    """A whole slice with no tumour anywhere: every window of it is background."""
    return sample.class_label == 0 and (sample.mask is None or not sample.mask.any()) and _whole(sample)


def _whole(sample: SliceSample) -> bool:
    return not sample.hard_negative and min(sample.image.shape) >= LUNG_FIELD_MIN_SIZE


def _resize(array: np.ndarray, size: tuple[int, int], is_mask: bool = False) -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    resized = resize_batch(tensor, size)[0, 0].numpy()
    return resized > 0.5 if is_mask else resized.astype(np.float32)


def sized_plane(plane: np.ndarray, mask: np.ndarray | None, input_size: tuple[int, int] | None
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """A model-input plane and its mask at the training size: resized to `input_size` (whole-slice
    models), or as they are (None: native resolution, the training transform draws the patch)."""
    if input_size is None:
        return plane.astype(np.float32), mask
    return _resize(plane, input_size), None if mask is None else _resize(mask, input_size, is_mask=True)


def reader_target(studies: str | Path, record: dict[str, Any]) -> np.ndarray | None:
    """The soft reader target of one prepared image (see the module docstring), float32 like its
    reference; None when its sidecar lists no reader outlines or no consensus."""
    from lungnlb.io import read_image

    tags, consensus = record.get("reader_tags"), (record.get("params") or {}).get("consensus")
    if not tags or not consensus:
        return None
    image_id = record["image_id"]
    outlined = sum(read_image(label_path(studies, image_id, tag)).array > 0.5 for tag in tags)
    return np.minimum(outlined / (2.0 * consensus), 1.0).astype(np.float32)


def load_image_slices(
    studies: str | Path,
    record: dict[str, Any],
    input_size: tuple[int, int] | None,
    mapping: IntensityMapping | None = None,
    reader_targets: bool = False,
) -> list[SliceSample]:
    """All labelled slices of one prepared image (resized to `input_size` unless None), through `mapping`
    (the library's `IntensityMapping` when None); with ``reader_targets``, soft masks where the
    image has reader outlines (native resolution only)."""
    from lungnlb.io import read_image
    from lungnlb.io.intensity import to_model_input

    studies = Path(studies)
    image_id = record["image_id"]
    image = read_image(image_path(studies, image_id))
    mask_path = label_path(studies, image_id)
    mask = read_image(mask_path).array > 0.5 if mask_path.is_file() else None
    if mask is not None and mask.shape != image.array.shape:
        raise ValueError(f"mask {mask_path} has shape {mask.shape}, image has {image.array.shape}")
    soft = reader_target(studies, record) if reader_targets and mask is not None else None
    if soft is not None and input_size is not None:
        raise ValueError("reader targets are for native-resolution training: give a patch size")
    mask = mask if soft is None else soft
    array = to_model_input(image.array, record.get("intensity", image.intensity), mapping)
    samples = []
    for z, has_mask, label in slice_plan(record, mask, array.ndim):
        plane = array if array.ndim == 2 else array[z]
        plane_mask = (mask if mask.ndim == 2 else mask[z]) if has_mask else None
        plane, plane_mask = sized_plane(plane, plane_mask, input_size)
        samples.append(SliceSample(image_id, record["case"], record["source"], z, plane, plane_mask, label))
    return samples


def load_slices(
    studies: str | Path,
    input_size: tuple[int, int] | None,
    image_ids: list[str] | None = None,
    records: list[dict[str, Any]] | None = None,
    progress: bool = False,
    mapping: IntensityMapping | None = None,
    reader_targets: bool = False,
) -> list[SliceSample]:
    """Labelled slices of the images `image_ids` (all when None) of a prepared studies folder, through
    `mapping`; soft reader targets with ``reader_targets``."""
    records = records if records is not None else read_records(studies)
    if image_ids is not None:
        wanted = set(image_ids)
        records = [record for record in records if record["image_id"] in wanted]
    if progress:
        from tqdm.auto import tqdm

        records = tqdm(records, desc="loading slices", unit="image")
    return [sample for record in records
            for sample in load_image_slices(studies, record, input_size, mapping, reader_targets)]


class SliceDataset(Dataset):
    """Torch dataset over `SliceSample`s; items are dicts for MONAI dictionary transforms:

    image (1, H, W) float32, mask (1, H, W) float32 (zeros when absent), has_mask (bool tensor),
    label (1,) float32 (0 when absent), has_label (bool tensor).

    With ``patches`` (native-resolution training, the transform draws one patch of the slice): a
    tumour-free slice (class 0) counts as a known empty mask, and each patch's label is whether its
    mask reaches 0.5 anywhere (a soft reader target below it is no lesion); a tumour slice without a
    mask has no patch-level truth and must not be given.
    """

    def __init__(self, samples: list[SliceSample], transform: Callable | None = None, patches: bool = False) -> None:
        if patches and any(s.mask is None and s.class_label != 0 for s in samples):
            raise ValueError("patch training needs a mask or a tumour-free label on every slice")
        self.samples = samples
        self.transform = transform
        self.patches = patches

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.samples[index]
        image = torch.from_numpy(sample.image)[None]
        mask = torch.zeros_like(image) if sample.mask is None else torch.from_numpy(sample.mask.astype(np.float32))[None]
        item = {"image": image, "mask": mask}
        if self.transform is not None:
            previous = get_track_meta()
            set_track_meta(False)  # plain tensors: the transforms' metadata is never read, and costs time
            try:
                with warnings.catch_warnings():  # a tumour-free slice has no lesion to centre a patch on, by design
                    warnings.filterwarnings("ignore", message="Num foregrounds 0")
                    item = self.transform(item)
            finally:
                set_track_meta(previous)
            item = item[0] if isinstance(item, list) else item  # a patch sampler returns a list of one
        mask = torch.as_tensor(item["mask"]).float().clamp(0.0, 1.0)
        label = float((mask >= 0.5).any()) if self.patches else float(sample.class_label or 0)
        return {
            "image": torch.as_tensor(item["image"]).float(),
            "mask": mask,
            "has_mask": torch.tensor(sample.mask is not None or self.patches),
            "label": torch.tensor([label]),
            "has_label": torch.tensor(sample.class_label is not None or self.patches),
        }


FAINT_LESION_HU = -500.0  # a lesion's mean below this is ground glass (solid nodules: above -200)


def weigh_faint_lesions(samples: list[SliceSample], weight: float, mapping: IntensityMapping) -> int:
    """Multiply, in place, the draw weight of the samples whose lesion is faint (its mean below
    `FAINT_LESION_HU` through ``mapping``) by ``weight``; return how many."""
    if weight <= 0:
        raise ValueError(f"--faint-lesion-weight must be positive, got {weight}")
    level = mapping.input_of_hu(FAINT_LESION_HU)

    def is_faint(sample: SliceSample) -> bool:
        if sample.mask is None:
            return False
        lesion = sample.mask > 0.5
        return lesion.any() and sample.image[lesion].mean() < level

    faint = [sample for sample in samples if is_faint(sample)]
    for sample in faint:
        sample.weight *= weight
    return len(faint)
