"""Inference on 2D slices and 3D volumes with a trained model.

`Predictor.predict(array, intensity)` maps the array to the model's input range with
`lungnlb.io.intensity.to_model_input` (the same mapping training used), then runs the model in one
of two forms, chosen by the checkpoint:

* whole-slice models (config ``input_size``): every axial slice is resized to ``input_size``, the
  mask probabilities back to the slice's own size (bilinear); the slice probability is
  sigmoid(cls logit - cls_logit_offset).
* native-resolution models (config ``patch_size``, trained on patches at the scanner's pixel size):
  MONAI's sliding window over each slice at its own size, within the box of the patient's body
  (air around it is never a tumour), windows of ``patch_size`` overlapping by a quarter, blended
  with a Gaussian, padded with air where the box is smaller than a window. On a whole slice (both
  sides at least ``LUNG_FIELD_MIN_SIZE``) where lungs are found, only the lungs can hold a lung
  tumour: a predicted component is kept only when it touches the lung field
  (`lungnlb.labels.lung_region.lung_field`: the lungs closed by ``lung_closing_px``, so tumours
  against the chest wall and the mediastinum stay in), and windows that miss the field are not
  run. The mediastinum and the chest wall, where a model that sees one window at a time finds
  most of its false positives, are left out. Lungs are sought only on a slice with the grey levels
  of air and lung (``LUNG_GREY_HU``) under the checkpoint's mapping: the IQ-OTH/NCCD JPEGs,
  histogram-equalised under a mediastinal window, have none, their lungs as black as the air round
  the patient, and what Otsu's threshold finds in them is the mediastinum or the spine. The
  windows stay where the body box puts them: the model's output depends on where a window falls,
  and windows laid over the lungs' box alone lowered whole-slice Dice. In a volume, slices without lungs (above or below them) are skipped.
  Crops, and slices where no lungs are found, keep the whole body box. Predicted components
  smaller than ``min_component_pixels``, counted through a volume's adjacent slices (a nodule's
  last slices are small), are removed, and the slice probability is the highest
  remaining mask probability, so a slice is called tumour exactly when its mask is non-empty at
  the threshold (``threshold``: fitted on validation slices, `lungnlb.training.validation`).
  A checkpoint may carry a slice probe for one intensity kind (`lungnlb.slice_probe`; the shipped
  weights: the windowed 8-bit JPEGs): a slice of that kind is also called tumour when the probe
  says so, with or without an outline.

    array (Z, Y, X) or (Y, X)  ->  probability (Z, Y, X) or (Y, X) float32 in [0, 1]
                                   slice_probability (Z,) or scalar

Classification-only models return `probability=None`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lungnlb.slice_probe import SliceProbe, pooled_window_features


@dataclass
class PredictionResult:
    """Output of `Predictor.predict`.

    probability: tumour probability per pixel, same shape as the input array, or None for
        classification-only models.
    slice_probability: probability that a slice shows a neoplasm — (Z,) for a volume, a float for a slice.
    """

    probability: np.ndarray | None
    slice_probability: np.ndarray | float


MIN_COMPONENT_PIXELS = 10  # a 3 mm nodule at 0.7-0.8 mm pixels covers ~12 pixels
WINDOW_OVERLAP = 0.25
WINDOW_BATCH = 32  # windows per forward pass: small windows leave the CPU's matrix kernels idle in small batches
BODY_MARGIN = 0.05  # model-input units above air: windows are laid over the patient, not the air around
LUNG_FIELD_MIN_SIZE = 192  # smaller images are crops around a nodule: too little of the chest to find lungs in
LUNG_CLOSING_PX = 10  # ~7 mm at the 0.7-0.8 mm pixels of chest CT: bites of juxtapleural nodules up to ~14 mm
MIN_LUNG_PIXELS = 300  # less "lung" than this on a whole slice is gas in the bowel or the trachea, not lungs
SKIPPED_WINDOW_LOGIT = -20.0  # a window outside the lung field: background, sigmoid ~2e-9
LUNG_GREY_HU = (-1000.0, -750.0)  # air to aerated lung: what every chest CT slice with HU shows


def resize_batch(batch: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize a (B, C, H, W) tensor to `size`; identity when it already has that size."""
    if tuple(batch.shape[-2:]) == tuple(size):
        return batch
    if mode == "nearest":
        return F.interpolate(batch, size=size, mode="nearest")
    return F.interpolate(batch, size=size, mode=mode, align_corners=False)


class Predictor:
    """Run a model described by a checkpoint config on numpy slices / volumes.

    Args:
        model: a registry model (returns {"seg", "cls"} or {"cls"} logits).
        config: its checkpoint config (needs `input_size`; `intensity`, the recorded `IntensityMapping`, optional).
        device: torch device for the forward pass.
        batch_size: slices per forward pass.
        precision: "auto" (bfloat16 on a CPU that has it in hardware, else float32), "float32" or
            "bfloat16" (`lungnlb.networks.inference_form.inference_precision`).
    """

    def __init__(
        self, model: nn.Module, config: dict[str, Any], device: str | torch.device = "cpu", batch_size: int = 8,
        precision: str = "auto",
    ) -> None:
        if "input_size" not in config and "patch_size" not in config:
            raise ValueError("checkpoint config has neither 'input_size' nor 'patch_size'; cannot prepare slices for the model")
        from lungnlb.networks.inference_form import inference_form, inference_precision

        self.model = inference_form(model).to(device)  # a copy: a model being trained stays as it is
        self.config = config
        self.device = torch.device(device)
        self.precision = inference_precision(self.device, precision)
        self.batch_size = batch_size
        self.input_size = tuple(int(v) for v in config.get("input_size") or config["patch_size"])
        self.patch_size = tuple(int(v) for v in config["patch_size"]) if "patch_size" in config else None
        from lungnlb.io.intensity import IntensityMapping

        self.intensity = IntensityMapping.from_config(config.get("intensity"))
        self.slice_probe = SliceProbe.from_config(config.get("slice_probe")) if self.patch_size else None

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike | None = None, device: str | torch.device = "cpu", batch_size: int = 8,
        precision: str = "auto",
    ) -> Predictor:
        """Load a checkpoint (the shipped default weights when `path` is None)."""
        from lungnlb.checkpoint import default_checkpoint_path, load_model

        if path is None:
            path = default_checkpoint_path()
            if path is None:
                raise FileNotFoundError("no checkpoint given and no default weights shipped in lungnlb/weights/")
        model, config = load_model(path, device=device)
        return cls(model, config, device=device, batch_size=batch_size, precision=precision)

    @property
    def cls_logit_offset(self) -> float:
        """Subtracted from the cls logit: the validation-calibrated operating point (see lungnlb.training.trainer)."""
        return float(self.config.get("cls_logit_offset", 0.0))

    @property
    def threshold(self) -> float:
        return float(self.config.get("threshold", 0.5))

    def model_input(self, array: np.ndarray, intensity: str) -> np.ndarray:
        """Map `array` (any source intensity) to the model's input range [0, 1] (float32)."""
        # a writable copy: callers may hand in read-only (cached) arrays, on which torch.as_tensor
        # (inside MONAI's ScaleIntensityRange) warns that the array is not writable
        return self.intensity(np.array(array, dtype=np.float32), intensity)

    @property
    def native(self) -> bool:
        """True for a native-resolution model (sliding window at the slice's own size, no resizing)."""
        return self.patch_size is not None

    def air(self) -> float:
        """The model input value of air (-1000 HU) under this checkpoint's intensity mapping."""
        return self.intensity.air()

    @torch.no_grad()
    def predict(self, array: np.ndarray, intensity: str) -> PredictionResult:
        """Predict mask probabilities and slice tumour probabilities for a (Y, X) slice or (Z, Y, X) volume."""
        array = np.asarray(array)
        if array.ndim not in (2, 3):
            raise ValueError(f"expected a (Y, X) slice or a (Z, Y, X) volume, got an array of shape {array.shape}")
        volume = self.model_input(array, intensity)
        volume = volume[None] if array.ndim == 2 else volume
        probabilities, slice_probabilities = self.predict_normalized(volume, intensity)
        if array.ndim == 2:
            mask = None if probabilities is None else probabilities[0]
            return PredictionResult(mask, float(slice_probabilities[0]))
        return PredictionResult(probabilities, slice_probabilities)

    @torch.no_grad()
    def predict_normalized(self, volume: np.ndarray, intensity: str | None = None
                           ) -> tuple[np.ndarray | None, np.ndarray]:
        """Forward (Z, Y, X) slices already in the model's [0, 1] range; return (probability, slice_probability).

        ``intensity``, the slices' source kind, matters only to a checkpoint with a slice probe for
        that kind (`lungnlb.slice_probe`): their slice probability is then max(mask score, probe).
        Each batch's output is written straight into the preallocated result arrays (a 64-slice
        512 x 512 volume would otherwise hold its 64 MiB of probabilities two more times).
        """
        if self.native:
            probability, slice_probability = self.finish_windows(*self.window_probability(volume), self.threshold)
            if self.slice_probe is not None and intensity == self.slice_probe.intensity:
                slice_probability = np.maximum(slice_probability, self.probe_probability(volume))
            return probability, slice_probability
        depth, size = volume.shape[0], tuple(volume.shape[-2:])
        slice_probability = np.empty(depth, dtype=np.float32)
        probability = None
        for start in range(0, depth, self.batch_size):
            stop = min(start + self.batch_size, depth)
            batch = torch.from_numpy(np.ascontiguousarray(volume[start:stop], dtype=np.float32))
            output = self.forward(resize_batch(batch[:, None].to(self.device), self.input_size))
            cls_probability = torch.sigmoid(output["cls"] - self.cls_logit_offset)
            slice_probability[start:stop] = cls_probability.reshape(-1).cpu().numpy()
            if "seg" in output:
                if probability is None:
                    probability = np.empty((depth, *size), dtype=np.float32)
                probability[start:stop] = torch.sigmoid(resize_batch(output["seg"], size))[:, 0].cpu().numpy()
        return probability, slice_probability

    def window_probability(self, volume: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The native form's first step: (raw mask probability, field) of (Z, Y, X) slices in [0, 1],
        by sliding window per slice over the body, the windows that miss the lung field skipped;
        ``field`` is where a kept component must have a pixel (all True where no lungs were sought).

        On the CPU the slices of a volume are shared among as many threads as torch has, each running
        its slices' lung field and windows with one torch thread: two torch threads share one forward
        pass of small 64 px windows poorly, and the lung field runs on one core
        (`benchmarks/inference_speed.py` measures the series both ways)."""
        probability = np.zeros(volume.shape, dtype=np.float32)
        field = np.ones(volume.shape, dtype=bool)
        with slice_threads(len(volume), self.device) as workers, ThreadPoolExecutor(workers) as pool:
            lungs = list(pool.map(self.lung_field, volume))
            skip_lungless = len(volume) > 1 and any(found is not None for found in lungs)

            def predict_slice(z: int) -> None:
                if lungs[z] is not None:
                    field[z] = lungs[z]
                elif skip_lungless:
                    return  # a slice of a chest CT above or below the lungs
                with torch.inference_mode():  # autograd's mode is per thread: the caller's no_grad stays behind
                    self._window_slice(volume[z], lungs[z], probability[z])

            list(pool.map(predict_slice, range(len(volume))))
        return probability, field

    def _window_slice(self, plane: np.ndarray, lungs: np.ndarray | None, out: np.ndarray) -> None:
        """Write the mask probability of one (Y, X) slice into ``out`` within the body's box (the
        windows that miss ``lungs`` skipped, when given)."""
        from monai.inferers import SlidingWindowInferer

        air = self.air()
        box = body_box(plane, air + BODY_MARGIN)
        if box is None:
            return  # no patient on this slice
        inferer = SlidingWindowInferer(roi_size=self.patch_size, sw_batch_size=WINDOW_BATCH, overlap=WINDOW_OVERLAP,
                                       mode="gaussian", padding_mode="constant", cval=air)
        region = torch.from_numpy(np.ascontiguousarray(plane[box], dtype=np.float32))[None, None].to(self.device)
        if lungs is None:
            logits = inferer(region, self._seg_logits)
        else:
            where = torch.from_numpy(lungs[box].astype(np.float32))[None, None].to(self.device)
            logits = inferer(region, self._seg_logits, condition=where)
        out[box] = torch.sigmoid(logits.float())[0, 0].cpu().numpy()

    def finish_windows(self, probability: np.ndarray, field: np.ndarray, threshold: float
                       ) -> tuple[np.ndarray, np.ndarray]:
        """The native form's second step, at ``threshold``: components that miss ``field`` and small
        ones zeroed; (probability, slice probability = the highest one left, so a slice is called
        tumour exactly when its mask is non-empty at the threshold). Validation calls it once per
        candidate threshold on one `window_probability`."""
        minimum = int(self.config.get("min_component_pixels", MIN_COMPONENT_PIXELS))
        probability = probability * remove_small_components(probability > threshold, minimum, field)
        return probability, probability.reshape(len(probability), -1).max(axis=1, initial=0.0)

    def _seg_logits(self, windows: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """Seg logits of a batch of windows; with ``condition`` (the lung field cut like the windows),
        only windows that hold some of it run the model, the rest read as certain background. A
        pixel of the field is covered only by windows that hold it, so its blend is unchanged."""
        if condition is None:
            return self.forward(windows)["seg"]
        wanted = (condition > 0.5).flatten(1).any(dim=1)
        logits = torch.full((windows.shape[0], 1, *windows.shape[2:]), SKIPPED_WINDOW_LOGIT, device=windows.device)
        if wanted.any():
            logits[wanted] = self.forward(windows[wanted])["seg"]
        return logits

    def probe_probability(self, volume: np.ndarray) -> np.ndarray:
        """The slice probe's score of each (Y, X) slice of ``volume``, on this checkpoint's threshold scale."""
        probe = self.slice_probe
        features = np.stack([self.slice_probe_features(plane) for plane in volume])
        return probe.on_model_scale(probe.probability(features), self.threshold).astype(np.float32)

    @torch.no_grad()
    def slice_probe_features(self, plane: np.ndarray) -> np.ndarray:
        """The slice probe's features ``f`` (2C,) of one (Y, X) slice in model input units: its windows
        over the body's box (`lungnlb.slice_probe.pooled_window_features`)."""
        box = body_box(plane, self.air() + BODY_MARGIN) or (slice(0, plane.shape[0]), slice(0, plane.shape[1]))

        def features(windows: np.ndarray) -> np.ndarray:
            batch = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32)).to(self.device)
            return self.forward(batch, return_features=True)["features"].cpu().numpy()

        return pooled_window_features(features, plane, box, self.patch_size[0])

    def forward(self, batch: torch.Tensor, return_features: bool = False) -> dict[str, torch.Tensor]:
        """The model's float32 outputs of a (B, 1, H, W) batch, computed in ``self.precision``; with
        ``return_features`` also the classification head's input (`SegClsUNet` only)."""
        from lungnlb.networks.inference_form import autocast_to

        with autocast_to(self.device, self.precision):
            output = self.model(batch, return_features=True) if return_features else self.model(batch)
        return {name: logits.float() for name, logits in output.items()}

    def lung_field(self, plane: np.ndarray) -> np.ndarray | None:
        """Where a lung tumour can be on this slice under this checkpoint, or None (see `slice_lung_field`)."""
        return slice_lung_field(plane, self.config)


def slice_lung_field(plane: np.ndarray, config: dict[str, Any]) -> np.ndarray | None:
    """Where a lung tumour can be on a (Y, X) slice in [0, 1], under a checkpoint ``config``: the
    lung field of a whole slice, or None (a crop, no lungs found, ``lung_filter`` off in the config)."""
    from lungnlb.labels.lung_region import lung_field

    if not config.get("lung_filter", True) or min(plane.shape) < LUNG_FIELD_MIN_SIZE:
        return None
    if not has_lung_grey_levels(plane, config):
        return None
    return lung_field(plane, int(config.get("lung_closing_px", LUNG_CLOSING_PX)), MIN_LUNG_PIXELS)


def has_lung_grey_levels(plane: np.ndarray, config: dict[str, Any]) -> bool:
    """Whether at least ``MIN_LUNG_PIXELS`` pixels of a (Y, X) slice in [0, 1] have the values of
    ``LUNG_GREY_HU`` under the checkpoint ``config``'s intensity mapping."""
    from lungnlb.io.intensity import IntensityMapping

    mapping = IntensityMapping.from_config(config.get("intensity"))
    low, high = (mapping.input_of_hu(hu) for hu in LUNG_GREY_HU)
    return int(np.count_nonzero((plane >= low) & (plane <= high))) >= MIN_LUNG_PIXELS


SLICE_SHARING = threading.Lock()
"""Held by the one volume whose slices share the CPU (`slice_threads`); while it is held, other
volumes run their slices one after another on torch's threads."""


@contextmanager
def slice_threads(depth: int, device: torch.device) -> Iterator[int]:
    """How many threads share a volume's ``depth`` slices, torch set to one thread for the block:
    as many as torch has on the CPU. One (torch left as it is) on a GPU, for a single slice, and
    while another volume shares its slices: torch's thread count is process-wide, and a second
    volume that changed it too would restore it wrongly under the first."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or depth < 2 or threads < 2 or not SLICE_SHARING.acquire(blocking=False):
        yield 1
        return
    try:
        torch.set_num_threads(1)
        yield min(depth, threads)
    finally:
        torch.set_num_threads(threads)
        SLICE_SHARING.release()


def body_box(plane: np.ndarray, level: float) -> tuple[slice, slice] | None:
    """The bounding box of the pixels above ``level`` (the patient, not the air around), or None."""
    from lungnlb.labels.lung_region import bounding_box

    body = plane > level
    return bounding_box(body) if body.any() else None


def remove_small_components(mask: np.ndarray, min_pixels: int, field: np.ndarray | None = None) -> np.ndarray:
    """``mask`` (Z, Y, X) bool, a volume's adjacent slices, without its 8-connected in-plane
    components that belong to a small nodule and, where ``field`` (Z, Y, X) bool is given, without
    those that have no pixel in it.

    A component is small when the volume component it belongs to (in-plane components joined to
    the slices above and below face to face) covers fewer than ``min_pixels`` pixels: the last
    slices of a nodule are smaller than that, and counted in their slice alone they were dropped
    (`experiments/results/volume_components/`). A single slice is its own volume."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    kept = np.zeros(mask.shape, dtype=bool)
    boxes = ndimage.find_objects(mask.view(np.uint8))  # labelling only the marked box keeps a volume's tail short
    if not boxes:
        return kept
    box = boxes[0]
    through_slices = np.zeros((3, 3, 3), bool)
    through_slices[1] = True
    through_slices[0, 1, 1] = through_slices[2, 1, 1] = True
    labels, count = ndimage.label(mask[box], through_slices)
    large = np.bincount(labels[mask[box]], minlength=count + 1) >= min_pixels  # counting marked pixels only: fast
    large[0] = False
    kept[box] = large[labels]
    if field is not None:
        for z in range(box[0].start, box[0].stop):
            keep_touching(kept[z][box[1:]], field[z][box[1:]])
    return kept


def keep_touching(plane: np.ndarray, field: np.ndarray) -> None:
    """Clear, in place, the 8-connected components of ``plane`` (Y, X) bool that have no pixel in ``field``."""
    from scipy import ndimage

    if plane.any():
        labels, count = ndimage.label(plane, np.ones((3, 3), bool))
        touches = np.zeros(count + 1, bool)
        touches[labels[plane & field]] = True
        touches[0] = False
        plane[...] = touches[labels]
