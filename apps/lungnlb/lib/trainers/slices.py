"""Training slices from the datastore: `final` labels (weight 1) and `original` labels (lower weight).

For every image, the `final` label wins over the `original` one. The slices used are the label's
`labelled_slices` plus every slice where the label has foreground (a 2D image is its one slice).
A `final` label's `labelled_slices` come from its label info (the slices the annotator reviewed,
sent with the submission, e.g. by the Slicer client); an `original` label's, or a `final` label
submitted without them, from the study sidecar. Each slice becomes the library's `SliceSample`:
mapped with the checkpoint's `IntensityMapping`, resized to the model's input size for a
whole-slice model or kept at its own pixel size for a native-resolution one (config ``patch_size``:
the training engine draws the patches, as in `lungnlb train`); its class (neoplasm on this slice) is
whether its mask is non-empty, so a reviewed slice left empty is a "no tumour" example; its source
names the label it came from ("final label" / "original label"), its weight is the label's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lib.images import load_image, load_mask, read_sidecar, study_intensity
from lib.conf import AppConfig
from lungnlb.io.intensity import IntensityMapping
from lungnlb.training.dataset import SliceSample, sized_plane


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


def datastore_slices(
    datastore, config: AppConfig, model_config: dict, original_weight: float
) -> list[SliceSample]:
    """All training slices of the datastore for the model of ``model_config`` (see the module docstring)."""
    mapping = IntensityMapping.from_config(model_config.get("intensity"))
    input_size = None if "patch_size" in model_config else tuple(int(v) for v in model_config["input_size"])
    slices: list[SliceSample] = []
    for image_id in datastore.list_images():
        tags = datastore.get_labels_by_image_id(image_id)
        tag = "final" if "final" in tags else "original" if "original" in tags and original_weight > 0 else None
        if tag is None:
            continue
        image = load_image(Path(datastore.get_image_uri(image_id)), study_intensity(config, image_id))
        mask = load_mask(Path(datastore.get_label_uri(image_id, tag)), image)
        volume = mapping(image.array, image.intensity)
        volume, mask = (volume, mask) if volume.ndim == 3 else (volume[None], mask[None])
        case = str(read_sidecar(config, image_id).get("case") or image_id)
        weight = 1.0 if tag == "final" else original_weight
        for z in labelled_slices(mask, listed_slices(config, datastore, image_id, tag)):
            plane, plane_mask = sized_plane(volume[z], mask[z] > 0.5, input_size)
            slices.append(SliceSample(image_id, case, f"{tag} label", z, plane, plane_mask,
                                      int(plane_mask.any()), weight))
    return slices
