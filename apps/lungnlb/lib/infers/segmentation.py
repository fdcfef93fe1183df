"""`lung_nlb_seg`: tumour mask of a slice or a volume (slice by slice) with slice tumour probabilities.

Result image: uint8 mask (1 = tumour) in the input's own geometry (same array shape and affine; a
2D slice stays 2D). Result JSON:

    model_version        version of the weights used (see lib.model_store)
    threshold            probability above which a pixel / slice counts as tumour
    slice_probabilities  [Z] tumour probability of every slice from the classification head
    image_probability    max over the slices: probability that the image shows a tumour
    tumour_present       image_probability > threshold
    tumour_voxels        number of mask voxels
    latencies            seconds spent reading the image, in the model, writing the result, in total

With `"attention": true` (and optionally `"slice": z`, default the most probable slice) the result
image is instead the mean non-local-block attention heat map of that slice (float32, other slices
0), for an overlay in 3D Slicer; the JSON then lists the block names under `attention_blocks` and
the slice under `attention_slice`.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from lib.conf import AppConfig
from lib.errors import bad_request, unprocessable
from lib.image_cache import ImageCache
from lib.infers.base import LungInferTask, requested_slice, requested_threshold
from lib.model_store import ModelStore
from lungnlb.inference import resize_batch
from lungnlb.io import ImageData
from monailabel.interfaces.tasks.infer_v2 import InferType


class NLBSegmentationInfer(LungInferTask):
    """NLB U-Net tumour segmentation (listed in /info only while trained weights exist)."""

    def __init__(self, config: AppConfig, store: ModelStore, images: ImageCache | None = None):
        super().__init__(
            config,
            images,
            type=InferType.SEGMENTATION,
            labels={"tumour": 1},
            dimension=3,
            description="NLB U-Net lung tumour segmentation (2D slices or 3D CT, slice by slice)",
            config={"threshold": "", "attention": False, "slice": ""},
        )
        self.store = store

    def is_valid(self) -> bool:
        return self.store.checkpoint_path() is not None

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        start = time.perf_counter()
        loaded = self.store.get()
        image = self.read(request)
        read = time.perf_counter()
        prediction = self.store.run(loaded.predictor.predict, image.array, image.intensity)
        predicted = time.perf_counter()
        threshold = requested_threshold(request, loaded.predictor.threshold)
        slice_probabilities = np.atleast_1d(np.asarray(prediction.slice_probability, dtype=float))
        mask = prediction.probability > threshold
        result = {
            "model_version": loaded.version,
            "threshold": threshold,
            "slice_probabilities": [round(float(p), 6) for p in slice_probabilities],
            "image_probability": float(slice_probabilities.max()),
            "tumour_present": bool(slice_probabilities.max() > threshold),
            "tumour_voxels": int(mask.sum()),
        }
        if str(request.get("attention", "false")).lower() == "true":
            z = requested_slice(request)
            z = int(slice_probabilities.argmax()) if z is None else z
            heat, names = self.store.run(attention_slice, loaded, image, z)
            path = self.write_result(heat, image.affine, np.float32)
            result.update({"attention_blocks": names, "attention_slice": z})
        else:
            path = self.write_result(mask, image.affine)
        end = time.perf_counter()
        result["latencies"] = {"read": round(read - start, 4), "model": round(predicted - read, 4),
                               "write": round(end - predicted, 4), "total": round(end - start, 4)}
        return str(path), result


def attention_slice(loaded, image: ImageData, z: int) -> tuple[np.ndarray, list[str]]:
    """Mean attention heat map of slice `z`, in an array of the image's shape (zeros elsewhere)."""
    from lungnlb.explain import attention_maps  # only needed for this optional output

    volume = image.array if image.array.ndim == 3 else image.array[None]
    if not 0 <= z < volume.shape[0]:
        raise bad_request(f"slice {z} is outside the image's {volume.shape[0]} slice(s)")
    x = loaded.predictor.model_input(volume[z], image.intensity)
    batch = resize_batch(torch.from_numpy(x)[None, None].to(loaded.device), loaded.predictor.input_size)
    maps = attention_maps(loaded.model, batch)
    if not maps:
        raise unprocessable(f"model {loaded.config['model']['name']} has no non-local blocks to explain")
    mean = torch.from_numpy(np.mean(list(maps.values()), axis=0).astype(np.float32))[None, None]
    heat = np.zeros(volume.shape, dtype=np.float32)
    heat[z] = resize_batch(mean, volume.shape[-2:])[0, 0].numpy()
    return heat.reshape(image.array.shape), sorted(maps)
