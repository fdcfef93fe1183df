"""Fine-tuning a served model on newly labelled slices, published only if it validates better.

This is a configuration of the one training engine (`lungnlb.training.trainer.fit`), the one
MONAI Label's incremental training runs; it differs from a training from scratch only in where
the model and the slices come from and in what happens to the result:

1. the starting model (the one in use) is validated on the held-out slices: the incumbent's Dice;
2. `fit` runs ``epochs x ceil(n_train / (batch_size x processes))`` steps with the starting model's
   geometry (whole-slice input size, or native-resolution patches) and intensity mapping, validating
   once per epoch (``epoch = step / steps_per_epoch``) and keeping the best checkpoint;
3. the publish gate (`lungnlb.training.publish.decide_publication`) compares the best checkpoint's
   validation Dice with the incumbent's on the same slices;
4. a model that passes is written atomically to ``publish_to`` (`save_checkpoint`); its
   ``training_data.train_cases`` are the starting model's plus the fine-tuning slices' cases, so an
   evaluation still leaves out every patient the weights have seen.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lungnlb.checkpoint import save_checkpoint
from lungnlb.io.intensity import IntensityMapping
from lungnlb.training.publish import decide_publication
from lungnlb.training.trainer import TrainConfig, TrainingSet, Validation, fit
from lungnlb.training.validation import validation_metrics


@dataclass(frozen=True)
class FineTuneRequest:
    """What a fine-tuning run is asked for (the app checks the values before building one)."""

    epochs: int
    learning_rate: float
    batch_size: int
    seed: int = 0
    force: bool = False  # publish without the gate


def steps_per_epoch(n_train: int, batch_size: int, world_size: int = 1) -> int:
    """Batches per process for one pass over ``n_train`` slices."""
    return max(1, math.ceil(n_train / (batch_size * world_size)))


def fine_tune_config(base: dict[str, Any], request: FineTuneRequest, n_train: int, out: str | Path,
                     data: str = "datastore", world_size: int = 1) -> TrainConfig:
    """The `TrainConfig` of a fine-tuning run of the checkpoint whose config is ``base``."""
    per_epoch = steps_per_epoch(n_train, request.batch_size, world_size)
    patch = base.get("patch_size")
    return TrainConfig(
        data=str(data), out=str(out), model=base["model"]["name"], model_kwargs=dict(base["model"].get("kwargs") or {}),
        input_size=int(base["input_size"][0]), patch_size=int(patch[0]) if patch else None,
        steps=request.epochs * per_epoch, val_every=per_epoch, batch_size=request.batch_size,
        lr=request.learning_rate, seed=request.seed, seg_fraction=None, balance_classes=False,
        progress=False, tensorboard=False, num_workers=0,
    )


def fine_tune_summary(base: dict[str, Any], data: TrainingSet) -> dict[str, Any]:
    """The published checkpoint's `training_data`: the fine-tuning slices, and every case seen so far."""
    before = base.get("training_data") or {}
    cases = set(before.get("train_cases") or []) | {sample.case for sample in data.train}
    held_out = dict(before.get("held_out_cases") or {})
    held_out["val"] = sorted(set(held_out.get("val") or []) | {sample.case for sample in data.val})
    return {**data.summary, "train_cases": sorted(cases), "held_out_cases": held_out,
            "base": {key: value for key, value in before.items() if key not in ("train_cases", "held_out_cases")}}


def fine_tune(
    model: nn.Module,
    base: dict[str, Any],
    data: TrainingSet,
    request: FineTuneRequest,
    publish_to: Path,
    device: torch.device,
    *,
    has_incumbent: bool,
    rank: int = 0,
    world_size: int = 1,
    on_validation: Callable[[Validation, int], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune ``model`` (config ``base``) on ``data``; rank 0 publishes through the gate.

    ``has_incumbent``: the starting model is the one in use (its validation Dice is what a new model
    must beat); False when starting from fresh weights. ``on_validation(validation, epoch)`` is told
    of every validation. Returns (rank 0) {"metrics", "incumbent_dice", "publish": the decision's record,
    "published": bool}."""
    mapping = IntensityMapping.from_config(base.get("intensity"))
    Path(publish_to).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fine-tune-", dir=Path(publish_to).parent) as work:
        config = fine_tune_config(base, request, len(data.train), work, world_size=world_size)
        windows = base if config.patch_size else None  # validated as served: by sliding window
        model = model.to(device)
        incumbent = None
        if rank == 0 and has_incumbent and data.val:
            incumbent = validation_metrics(model, data.val, device, windows).get("dice")

        def report(validation: Validation) -> None:
            if on_validation is not None:
                on_validation(validation, validation.step // config.val_every)

        summary = TrainingSet(data.train, data.val, fine_tune_summary(base, data))
        result = fit(config, model, summary, mapping, device, rank, world_size, report)
        if rank != 0:
            return {}
        best = torch.load(result["best"], map_location="cpu", weights_only=True)
        metrics = result["metrics"]
        decision = decide_publication(
            metrics.get("dice"), incumbent, int(metrics.get("n_tumour_slices") or 0),
            weights_finite=all(bool(torch.isfinite(v).all()) for v in best.values() if v.is_floating_point()),
            force=request.force,
        )
        if decision.publish:
            model.load_state_dict(best)
            save_checkpoint(publish_to, model, published_config(base, _best_config(result["best"])))
    return {"metrics": metrics, "incumbent_dice": incumbent, "publish": decision.as_record(),
            "published": decision.publish}


def published_config(base: dict[str, Any], best: dict[str, Any]) -> dict[str, Any]:
    """The fine-tuned checkpoint's config: the base's, updated by the run's ``best``; without the base's
    slice probe (fitted on an encoder that has changed) and format stamps (`save_checkpoint` writes them)."""
    return {key: value for key, value in {**base, **best}.items()
            if key not in ("format", "lungnlb_version", "slice_probe")}


def _best_config(best_weights: Path) -> dict[str, Any]:
    """The engine's config written beside the best checkpoint (metrics, training data, the run's config)."""
    return json.loads(Path(best_weights).with_suffix(".json").read_text(encoding="utf-8"))
