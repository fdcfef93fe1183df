"""Multi-task loss: segmentation on samples with a mask, classification on samples with a class label.

    L = w_seg * DiceCE(seg[m], mask[m]) + w_cls * BCE(cls[c], label[c])

m = samples with a mask, c = samples with a class label (masked per sample; a term with no samples
in the batch contributes 0 * logits so every parameter stays in the graph, as DDP requires).
DiceCE is MONAI's `DiceCELoss(sigmoid=True)`: soft Dice plus binary cross-entropy; per sample, or
over the whole batch at once (``batch_dice``: native-resolution patches, many of them lesion-free, on
which a per-sample Dice is undefined or all-or-nothing).
With deep supervision (the model's "seg_deep" outputs, training mode), the segmentation term is
MONAI's `DeepSupervisionLoss` over [seg, *seg_deep]: DiceCE at each size against the mask resized
by nearest neighbour, weighted 1, 0.5, 0.25.
BCE takes an optional `pos_weight` (the weight of a positive label's term): the trainer sets it to
(share of negatives) / (share of positives) among the labelled slices it draws, so that both
classes weigh the same and "everything is a neoplasm" is not a minimum of the loss.
"""

from __future__ import annotations

import torch
from monai.losses import DeepSupervisionLoss, DiceCELoss
from torch import nn


class MultiTaskLoss(nn.Module):
    """Weighted sum of masked DiceCE (seg head) and BCE-with-logits (cls head).

    forward(output {"seg": (B,1,H,W), "cls": (B,1)[, "seg_deep": [(B,1,h,w), ...]]},
            batch {"mask", "has_mask", "label", "has_label"})
    -> (total scalar, {"seg": float, "cls": float})
    """

    def __init__(self, seg_weight: float = 1.0, cls_weight: float = 1.0, pos_weight: float | None = None,
                 batch_dice: bool = False) -> None:
        super().__init__()
        if seg_weight < 0 or cls_weight < 0:
            raise ValueError(f"loss weights must be >= 0, got seg {seg_weight}, cls {cls_weight}")
        self.seg_weight = seg_weight
        self.cls_weight = cls_weight
        self.seg_loss = DeepSupervisionLoss(DiceCELoss(sigmoid=True, batch=batch_dice), weight_mode="exp")
        if pos_weight is not None and not pos_weight > 0:
            raise ValueError(f"pos_weight must be > 0, got {pos_weight}")
        weight = None if pos_weight is None else torch.tensor([float(pos_weight)])
        self.cls_loss = nn.BCEWithLogitsLoss(pos_weight=weight)

    def forward(
        self, output: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        parts: dict[str, torch.Tensor] = {}
        if "seg" in output:
            seg = [output["seg"], *output.get("seg_deep", [])]
            parts["seg"] = self._masked(self.seg_loss, [logits.float() for logits in seg], batch["mask"], batch["has_mask"])
        parts["cls"] = self._masked(self.cls_loss, output["cls"].float(), batch["label"], batch["has_label"])
        weights = {"seg": self.seg_weight, "cls": self.cls_weight}
        total = sum(weights[name] * value for name, value in parts.items())
        return total, {name: float(value.detach()) for name, value in parts.items()}

    @staticmethod
    def _masked(loss: nn.Module, logits: torch.Tensor | list[torch.Tensor], target: torch.Tensor, keep: torch.Tensor
                ) -> torch.Tensor:
        """``loss`` over the samples in ``keep``; ``logits`` one tensor or a list (deep supervision)."""
        keep = keep.bool().reshape(-1)
        outputs = logits if isinstance(logits, list) else [logits]
        if not keep.any():
            return 0.0 * sum(output.sum() for output in outputs)
        kept = [output[keep] for output in outputs]
        return loss(kept if isinstance(logits, list) else kept[0], target[keep].to(outputs[0].dtype))
