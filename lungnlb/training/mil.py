"""Multiple-instance learning (MIL) on whole slices known by their class: the window a model ranks
highest on a tumour slice without a mask is trained as tumour, on a tumour-free slice as background.

The IQ-OTH/NCCD benign and malignant JPEGs say "neoplasm on this slice" and nothing about where (no
mask, no box), so no patch of them has a pixel truth. A native-resolution model sees one window at
a time and calls a slice tumour when some window marks a component; so such a slice is a bag of
windows of which at least one holds the tumour, and a tumour-free slice a bag whose every window
holds none. Patches drawn at random from tumour-free slices rarely fall on the few windows a model
ranks highest, where its false alarms are, so their top windows are trained too (online hard
negatives).

For each slice drawn, the model (without gradients) scores every window of a grid laid over the
slice's lung field (the lungs closed as inference closes them; the body where no lungs are sought),
the grid shifted at random on every draw so that what one grid cuts lies whole in another:

    s(w) = mean of the k highest seg logits of window w,   k = MIN_COMPONENT_PIXELS

(a slice is called tumour when a component of at least k pixels passes the threshold). The window
with the highest score, w*, trains with

    tumour slice (weak positive):  L_weak = BCE-with-logits(s(w*), 1)
    tumour-free slice:             the batch's own loss, w* with an empty mask and a "no tumour" label

the top-instance MIL of Campanella et al. (Nature Medicine 2019) with a top-k pooling: of a tumour
slice only the verdict is supervised, no pixel beyond the k the model already ranks highest.
Windows are (count, 1, size, size) in the model's [0, 1] range, taken as they are (no augmentation).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lungnlb.inference import BODY_MARGIN, MIN_COMPONENT_PIXELS, slice_lung_field
from lungnlb.io.intensity import IntensityMapping
from lungnlb.labels.lung_region import bounding_box
from lungnlb.training.dataset import SliceSample, is_weak_positive, is_whole_tumour_free


def top_k_logit(seg_logits: torch.Tensor, k: int = MIN_COMPONENT_PIXELS) -> torch.Tensor:
    """s(w): the mean of the ``k`` highest logits of each window; (B, 1, H, W) -> (B,)."""
    return seg_logits.float().flatten(1).topk(k, dim=1).values.mean(dim=1)


def mil_loss(seg_logits: torch.Tensor, k: int = MIN_COMPONENT_PIXELS) -> torch.Tensor:
    """L_weak over windows chosen from tumour slices: BCE-with-logits of s(w) against 1, their mean."""
    scores = top_k_logit(seg_logits, k)
    return F.binary_cross_entropy_with_logits(scores, torch.ones_like(scores))


def grid_windows(field: np.ndarray, size: int, offset: tuple[int, int]) -> np.ndarray:
    """Top-left corners (N, 2) of the ``size`` x ``size`` windows of a grid over the box of ``field``
    (Y, X) bool, shifted back by ``offset`` (each in [0, size)), moved inside the slice, that hold
    some of the field."""
    box = bounding_box(field)
    axes = []
    for part, length, shift in zip(box, field.shape, offset):
        starts = np.arange(part.start - shift, part.stop, size)
        axes.append(np.clip(starts, 0, max(0, length - size)))
    corners = np.unique(np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 2), axis=0)
    holds = [field[y : y + size, x : x + size].any() for y, x in corners]
    return corners[np.array(holds, dtype=bool)]


def with_tumour_free(batch: dict[str, torch.Tensor], windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """``batch`` (`lungnlb.training.dataset.SliceDataset` items, collated) with ``windows`` of
    tumour-free slices appended as samples: an empty mask and a "no tumour" label, both known."""
    count, known = len(windows), torch.ones(len(windows), dtype=torch.bool, device=windows.device)
    return {"image": torch.cat([batch["image"], windows]),
            "mask": torch.cat([batch["mask"], torch.zeros_like(windows)]),
            "has_mask": torch.cat([batch["has_mask"], known]),
            "label": torch.cat([batch["label"], torch.zeros(count, 1, device=windows.device)]),
            "has_label": torch.cat([batch["has_label"], known])}


class SliceBags:
    """Whole slices of one class and the window of each that MIL trains on (see the module docstring).

    Args:
        samples: weak positives (`is_weak_positive`) or whole tumour-free slices
            (`is_whole_tumour_free`), images in [0, 1].
        size: the training patch size.
        mapping: the run's intensity mapping (the lung field's grey levels, the value of air).
    """

    def __init__(self, samples: list[SliceSample], size: int, mapping: IntensityMapping) -> None:
        if not samples or not all(is_weak_positive(s) or is_whole_tumour_free(s) for s in samples):
            raise ValueError("MIL bags are whole tumour slices without a mask or whole tumour-free slices; "
                             "none given, or another kind")
        self.samples, self.size = samples, size
        self.fields = [self._field(sample.image, mapping) for sample in samples]

    @staticmethod
    def _field(image: np.ndarray, mapping: IntensityMapping) -> np.ndarray:
        field = slice_lung_field(image, {"intensity": mapping.as_config()})
        field = image > mapping.air() + BODY_MARGIN if field is None else field
        return field if field.any() else np.ones(image.shape, dtype=bool)

    def candidates(self, index: int, offset: tuple[int, int]) -> torch.Tensor:
        """Every grid window of slice ``index`` (N, 1, size, size)."""
        image, size = self.samples[index].image, self.size
        corners = grid_windows(self.fields[index], size, offset)
        return torch.from_numpy(np.stack([image[y : y + size, x : x + size] for y, x in corners]))[:, None]

    @torch.no_grad()
    def draw(self, model: nn.Module, rng: np.random.Generator, count: int, device: torch.device) -> torch.Tensor:
        """w* of ``count`` slices drawn at random (with replacement): (count, 1, size, size) on ``device``."""
        chosen = []
        for index in rng.integers(len(self.samples), size=count):
            windows = self.candidates(int(index), tuple(int(v) for v in rng.integers(self.size, size=2))).to(device)
            chosen.append(windows[int(top_k_logit(model(windows)["seg"]).argmax())])
        return torch.stack(chosen)
