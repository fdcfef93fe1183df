"""Inference on 2D slices and 3D volumes with a trained model.

`Predictor.predict(array, intensity)` maps the array to the model's input range with
`lungnlb.io.intensity.to_model_input` (the same mapping training used), resizes every axial slice
to the checkpoint's `input_size`, runs the model in batches and resizes the mask probabilities
back to the slice's own size (bilinear):

    array (Z, Y, X) or (Y, X)  ->  probability (Z, Y, X) or (Y, X) float32 in [0, 1]
                                   slice_probability (Z,) or scalar: sigmoid(cls logit - cls_logit_offset)

Classification-only models return `probability=None`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class PredictionResult:
    """Output of `Predictor.predict`.

    probability: tumour probability per pixel, same shape as the input array, or None for
        classification-only models.
    slice_probability: probability that a slice shows a neoplasm — (Z,) for a volume, a float for a slice.
    """

    probability: np.ndarray | None
    slice_probability: np.ndarray | float


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
    """

    def __init__(
        self, model: nn.Module, config: dict[str, Any], device: str | torch.device = "cpu", batch_size: int = 8
    ) -> None:
        if "input_size" not in config:
            raise ValueError("checkpoint config has no 'input_size'; cannot prepare slices for the model")
        self.model = model.to(device).eval()
        self.config = config
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.input_size = tuple(int(v) for v in config["input_size"])
        from lungnlb.io.intensity import IntensityMapping

        self.intensity = IntensityMapping.from_config(config.get("intensity"))

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike | None = None, device: str | torch.device = "cpu", batch_size: int = 8
    ) -> "Predictor":
        """Load a checkpoint (the shipped default weights when `path` is None)."""
        from lungnlb.checkpoint import default_checkpoint_path, load_model

        if path is None:
            path = default_checkpoint_path()
            if path is None:
                raise FileNotFoundError("no checkpoint given and no default weights shipped in lungnlb/weights/")
        model, config = load_model(path, device=device)
        return cls(model, config, device=device, batch_size=batch_size)

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

    @torch.no_grad()
    def predict(self, array: np.ndarray, intensity: str) -> PredictionResult:
        """Predict mask probabilities and slice tumour probabilities for a (Y, X) slice or (Z, Y, X) volume."""
        array = np.asarray(array)
        if array.ndim not in (2, 3):
            raise ValueError(f"expected a (Y, X) slice or a (Z, Y, X) volume, got an array of shape {array.shape}")
        volume = self.model_input(array, intensity)
        volume = volume[None] if array.ndim == 2 else volume
        probabilities, slice_probabilities = self.predict_normalized(volume)
        if array.ndim == 2:
            mask = None if probabilities is None else probabilities[0]
            return PredictionResult(mask, float(slice_probabilities[0]))
        return PredictionResult(probabilities, slice_probabilities)

    @torch.no_grad()
    def predict_normalized(self, volume: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """Forward (Z, Y, X) slices already in the model's [0, 1] range; return (probability, slice_probability).

        Each batch's output is written straight into the preallocated result arrays (a 64-slice
        512 x 512 volume would otherwise hold its 64 MiB of probabilities two more times).
        """
        depth, size = volume.shape[0], tuple(volume.shape[-2:])
        slice_probability = np.empty(depth, dtype=np.float32)
        probability = None
        for start in range(0, depth, self.batch_size):
            stop = min(start + self.batch_size, depth)
            batch = torch.from_numpy(np.ascontiguousarray(volume[start:stop], dtype=np.float32))
            output = self.model(resize_batch(batch[:, None].to(self.device), self.input_size))
            cls_probability = torch.sigmoid(output["cls"].float() - self.cls_logit_offset)
            slice_probability[start:stop] = cls_probability.reshape(-1).cpu().numpy()
            if "seg" in output:
                if probability is None:
                    probability = np.empty((depth, *size), dtype=np.float32)
                probability[start:stop] = torch.sigmoid(resize_batch(output["seg"].float(), size))[:, 0].cpu().numpy()
        return probability, slice_probability
