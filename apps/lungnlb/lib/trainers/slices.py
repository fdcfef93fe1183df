"""Training slices from the datastore: `final` labels (weight 1) and `original` labels (lower weight).

For every image, the `final` label wins over the `original` one. The slices used are the label's
`labelled_slices` plus every slice where the label has foreground (a 2D image is its one slice).
A `final` label's `labelled_slices` come from its label info (the slices the annotator reviewed,
sent with the submission, e.g. by the Slicer client); an `original` label's, or a `final` label
submitted without them, from the study sidecar. Each slice is mapped with the checkpoint's
`IntensityMapping` and resized to the model's input size, or, for a native-resolution model
(config ``patch_size``), cut as one patch of that size at the slice's own pixel size, centred on the
label's foreground (the slice's centre when it has none) and padded with air; its class target
(neoplasm on this slice) is whether its mask is non-empty, so a reviewed slice left empty is a
"no tumour" example.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lib.images import load_image, load_mask, read_sidecar, study_intensity
from lib.conf import AppConfig
from lungnlb.inference import resize_batch
from lungnlb.io.intensity import IntensityMapping


@dataclass
class TrainSlice:
    """One slice: image (H, W) float32 in [0, 1], mask (H, W) float32 0/1, loss weight, source tag."""

    image_id: str
    z: int
    image: np.ndarray
    mask: np.ndarray
    weight: float
    tag: str


def labelled_slices(mask: np.ndarray, listed: list[int]) -> list[int]:
    """The slices `listed` as labelled plus every slice of `mask` with foreground, within range, sorted."""
    volume = mask if mask.ndim == 3 else mask[None]
    with_foreground = {int(z) for z in np.flatnonzero(volume.reshape(volume.shape[0], -1).any(axis=1))}
    return sorted(z for z in {int(z) for z in listed} | with_foreground if 0 <= z < volume.shape[0])


def listed_slices(config: AppConfig, datastore, image_id: str, tag: str) -> list[int]:
    """`labelled_slices` of a `final` label's info, else of the study sidecar (see the module docstring)."""
    info = datastore.get_label_info(image_id, tag) if tag == "final" else {}
    if "labelled_slices" in (info or {}):
        return list(info["labelled_slices"])
    return list(read_sidecar(config, image_id).get("labelled_slices", []))


def _resized(plane: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(plane, dtype=np.float32))[None, None]
    return resize_batch(tensor, size)[0, 0].numpy()


def native_patch(plane: np.ndarray, mask: np.ndarray, size: int, air: float) -> tuple[np.ndarray, np.ndarray]:
    """The ``size`` x ``size`` patch of ``plane`` and ``mask`` centred on the mask's foreground, air-padded."""
    rows, columns = np.nonzero(mask) if mask.any() else (np.array([plane.shape[0] // 2]), np.array([plane.shape[1] // 2]))
    centre = (int(round(rows.mean())), int(round(columns.mean())))
    half = size // 2
    padded_plane = np.pad(plane, half, constant_values=air)
    padded_mask = np.pad(mask, half)
    window = (slice(centre[0], centre[0] + size), slice(centre[1], centre[1] + size))
    return padded_plane[window].astype(np.float32), padded_mask[window].astype(np.float32)


def datastore_slices(
    datastore, config: AppConfig, model_config: dict, original_weight: float
) -> list[TrainSlice]:
    """All training slices of the datastore for the model of ``model_config`` (see the module docstring)."""
    mapping = IntensityMapping.from_config(model_config.get("intensity"))
    input_size = tuple(int(v) for v in model_config["input_size"])
    patch = int(model_config["patch_size"][0]) if "patch_size" in model_config else None
    air = mapping.air()
    slices: list[TrainSlice] = []
    for image_id in datastore.list_images():
        tags = datastore.get_labels_by_image_id(image_id)
        tag = "final" if "final" in tags else "original" if "original" in tags and original_weight > 0 else None
        if tag is None:
            continue
        image = load_image(Path(datastore.get_image_uri(image_id)), study_intensity(config, image_id))
        mask = load_mask(Path(datastore.get_label_uri(image_id, tag)), image)
        volume = mapping(image.array, image.intensity)
        volume, mask = (volume, mask) if volume.ndim == 3 else (volume[None], mask[None])
        weight = 1.0 if tag == "final" else original_weight
        for z in labelled_slices(mask, listed_slices(config, datastore, image_id, tag)):
            if patch is not None:
                plane, plane_mask = native_patch(volume[z], mask[z] > 0.5, patch, air)
            else:
                plane = _resized(volume[z], input_size)
                plane_mask = (_resized(mask[z].astype(np.float32), input_size) > 0.5).astype(np.float32)
            slices.append(TrainSlice(image_id, z, plane, plane_mask, weight, tag))
    return slices
