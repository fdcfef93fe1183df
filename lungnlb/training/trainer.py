"""The one training engine: step-based, multi-task, resumable, single process or DDP.

`fit` trains a given model on a `TrainingSet`; `train` builds both from a prepared studies folder
(`lungnlb train`, the experiments), `lungnlb.training.fine_tune` from the app's datastore (MONAI
Label's incremental training), so every recipe change reaches both.

One step = one batch per process. Batches are drawn with replacement from the training slices, with
probability proportional to each sample's weight; `seg_fraction` (when set) is the expected share
of slices with a mask in a batch, so the few segmentation slices are not drowned by the many
classification-only ones. Validation (rank 0) runs every `val_every` steps and at the end; for a
whole-slice model it also calibrates the classification head: the threshold with the best
validation F1 is stored as `cls_logit_offset` (its logit) in the checkpoint config, and `Predictor`
subtracts it from the cls logit, so that the operating point chosen on validation data is
probability 0.5 everywhere; for a native-resolution model it fits the mask threshold instead
(`lungnlb.training.validation.window_metrics`), stored as the config's ``threshold``. `best` keeps
the highest validation score (harmonic mean of Dice over tumour slices and F1, so a Dice-0 model is
never kept), `last` the latest weights plus the optimiser state for `--resume`; with ``keep_validated``
every validated checkpoint stays as `step_<N>` too. Learning rate: linear warm-up over 5% of the steps, then cosine to 0.
`train`'s last step (``slice_probe``, on by default) fits the best native checkpoint's slice probe
where the split has class-labelled JPEGs (`lungnlb.training.slice_probe`; some 10 minutes for the
IQ-OTH/NCCD JPEGs on 2 CPU cores); `fit` alone (the app's fine-tune) leaves checkpoints without one.

A run may start from a checkpoint's weights (`init`) and add hard-negative crops around another
checkpoint's false alarms on the training slices (`hard_negatives_from`, drawn with probability
`hard_negative_fraction`; `lungnlb.training.hard_negatives`), train on tumour slices known only by
their class (`weak_positives` windows per batch) and on the windows it ranks highest on tumour-free
whole slices (`top_negatives` per batch; multiple-instance learning: `lungnlb.training.mil`).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from monai.data import DataLoader
from torch import nn
from torch.utils.data import Sampler

from lungnlb.checkpoint import load_training_state, read_config, save_checkpoint, save_training_state
from lungnlb.data.sources import ATTRIBUTION
from lungnlb.io.intensity import IntensityMapping
from lungnlb.networks.unet_nlb import SegClsUNet
from lungnlb.training.augment import patch_transforms, train_transforms
from lungnlb.training.dataset import (
    SliceDataset,
    SliceSample,
    is_weak_positive,
    is_whole_tumour_free,
    load_slices,
    read_records,
    weigh_faint_lesions,
)
from lungnlb.training.loss import MultiTaskLoss
from lungnlb.training.split import all_train_split, load_split, make_split, save_split
from lungnlb.training.validation import (
    validation_metrics,
    validation_score,
    validation_subset,
)
from lungnlb.training.mil import SliceBags, mil_loss, with_tumour_free
from lungnlb.training.slice_probe import add_slice_probe


@dataclass
class TrainConfig:
    """Everything a run needs; saved into every checkpoint config under "train"."""

    data: str
    out: str
    model: str = "unet_sl_nlb"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    input_size: int = 256
    patch_size: int | None = None  # native-resolution patches of this size instead of resized whole slices
    pos_fraction: float = 0.5  # share of patches centred on a lesion (native-resolution training)
    reader_targets: bool = False  # soft masks from each reader's outline where there are some (native training)
    faint_lesion_weight: float = 1.0  # draw slices whose lesion is ground glass this much more often (training.dataset)
    kernel_augment: float = 0.0  # native training: probability of a softer and of a sharper kernel step (training.augment)
    steps: int = 2000
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seg_weight: float = 1.0
    cls_weight: float = 1.0
    seg_fraction: float | None = 0.5
    balance_classes: bool = True
    grad_clip: float = 1.0
    seed: int = 0
    val_every: int = 200
    keep_validated: bool = False  # also keep every validated checkpoint as step_<N>, for a selection made afterwards
    val_slices: int | None = None  # validate on at most this many slices (a seeded draw keeping the mix)
    time_budget_s: float | None = None  # wall-clock budget of the training steps: fewer steps when they would not fit
    split: str | None = None
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    all_data: bool = False
    amp: bool = True
    device: str | None = None
    num_workers: int = 0
    resume: bool = False
    progress: bool = True
    tensorboard: bool = True
    augment: bool = True
    init: str | None = None  # start from this checkpoint's weights (same model and geometry)
    hard_negatives_from: str | None = None  # mine hard-negative crops with this checkpoint (native training)
    hard_negative_fraction: float = 0.2  # expected share of hard-negative crops per batch
    weak_positives: int = 0  # windows per batch chosen by MIL from tumour slices without a mask (native training)
    top_negatives: int = 0  # windows per batch the model ranks highest on tumour-free whole slices (native training)
    slice_probe: bool = True  # fit the best checkpoint's slice probe where the split has JPEGs (lungnlb.slice_probe)


class WeightedShardSampler(Sampler[int]):
    """Draw `len(weights)` indices with replacement per epoch (seeded by seed + epoch), this rank's share.

    All ranks draw the same sequence and take every `world_size`-th element, so shards are disjoint.
    """

    def __init__(self, weights: np.ndarray, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.weights = torch.as_tensor(weights, dtype=torch.double)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        self.per_rank = math.ceil(len(weights) / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        drawn = torch.multinomial(self.weights, self.per_rank * self.world_size, replacement=True, generator=generator)
        return iter(drawn[self.rank :: self.world_size].tolist())


def sample_weights(samples: list[SliceSample], seg_fraction: float | None, hard_fraction: float = 0.0) -> np.ndarray:
    """Each sample's own `weight`, times (when `seg_fraction` is set) the share giving slices with a
    lesion (a mask reaching 0.5) a total probability of `seg_fraction`, and the rest (tumour-free
    slices, with an empty mask or none, and classification-only ones) the remainder; hard-negative
    crops, when there are any, get a total probability of `hard_fraction` and the rest keep their
    proportions in the remainder. Drawing a
    sample with probability proportional to w makes the expected batch loss the w-weighted mean
    loss, so weights need no term in the loss."""
    hard = np.array([sample.hard_negative for sample in samples], dtype=bool)
    weights = np.array([sample.weight for sample in samples], dtype=float)
    if hard.any() and not hard.all():
        rest = sample_weights([sample for sample, is_hard in zip(samples, hard) if not is_hard], seg_fraction)
        weights[~hard] = rest / rest.sum() * (1 - hard_fraction)
        weights[hard] *= hard_fraction / weights[hard].sum()
        return weights
    lesion = np.array([sample.mask is not None and bool((sample.mask >= 0.5).any()) for sample in samples])
    if seg_fraction is None or lesion.all() or not lesion.any():
        return weights
    return weights * np.where(lesion, seg_fraction / lesion.sum(), (1 - seg_fraction) / (~lesion).sum())


def balanced_pos_weight(samples: list[SliceSample], weights: np.ndarray) -> float | None:
    """(drawn share of negatives) / (drawn share of positives) among labelled samples; None if a class is absent."""
    labels = np.array([-1 if s.class_label is None else int(s.class_label) for s in samples])
    positive, negative = weights[labels == 1].sum(), weights[labels == 0].sum()
    return float(negative / positive) if positive > 0 and negative > 0 else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def distributed_context() -> tuple[int, int]:
    """(rank, world_size); initialises the process group under torchrun (nccl on GPU, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def pick_device(config: TrainConfig, rank: int) -> torch.device:
    if config.device:
        return torch.device(config.device)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def data_summary(studies: str, samples: list[SliceSample], split: dict[str, Any]) -> dict[str, Any]:
    """What a model was trained on: per source, images, cases, slices with masks, class counts; licences."""
    by_source: dict[str, dict[str, Any]] = {}
    hard = [sample for sample in samples if sample.hard_negative]
    for sample in (sample for sample in samples if not sample.hard_negative):
        entry = by_source.setdefault(sample.source, {"images": set(), "cases": set(), "mask_slices": 0,
                                                     "positive_slices": 0, "negative_slices": 0})
        entry["images"].add(sample.image_id)
        entry["cases"].add(sample.case)
        entry["mask_slices"] += sample.mask is not None
        entry["positive_slices"] += sample.class_label == 1
        entry["negative_slices"] += sample.class_label == 0
    sources = {
        name: {**{k: (len(v) if isinstance(v, set) else int(v)) for k, v in entry.items()},
               "licence": ATTRIBUTION.get(name) or "see the sidecar attribution"}
        for name, entry in sorted(by_source.items())
    }
    mined = {"hard_negative_crops": len(hard), "hard_negative_slices": len({s.image_id.split("#")[0] for s in hard})}
    return {"studies": str(studies), "train_slices": len(samples) - len(hard), "sources": sources, **mined,
            "train_cases": sorted({sample.case for sample in samples}),
            "split_seed": split.get("seed"), "held_out_cases": {k: split["cases"][k] for k in ("val", "test")}}


class WarmupCosine:
    """LR factor: linear warm-up over 5% of the steps, then cosine to 0 at `total_steps`, which a
    time budget may lower once the step time is known (the schedule then still ends at 0)."""

    def __init__(self, total_steps: int) -> None:
        self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        warmup = max(1, int(0.05 * self.total_steps))
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, self.total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


BUDGET_PROBE_STEPS = 20  # steps timed before a time budget fixes the run's length


def steps_within_budget(config: TrainConfig, step: int, done: int, seconds: float, device: torch.device,
                        world_size: int = 1) -> int:
    """The run's last step, once the `done` steps up to `step` took `seconds`: `config.steps`, or
    earlier when the rest would overrun `config.time_budget_s` at that pace (all ranks get rank 0's)."""
    remaining = config.time_budget_s - seconds
    last = min(config.steps, step + max(0, int(remaining * done / max(seconds, 1e-9))))
    if world_size > 1:
        shared = torch.tensor([last], dtype=torch.long, device=device)
        dist.broadcast(shared, src=0)
        last = int(shared.item())
    return max(last, step)


def _infinite_batches(loader: DataLoader, sampler: WeightedShardSampler, epoch: int):
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def train_step(network: nn.Module, batch: dict[str, torch.Tensor], criterion: MultiTaskLoss,
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, grad_clip: float,
               use_amp: bool, weak_windows: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """One optimiser step on a batch already on the device: forward (autocast when `use_amp`), the
    multi-task loss, plus the MIL loss of ``weak_windows`` (`lungnlb.training.mil`; in the
    same forward pass), scaled backward, gradient norm clipped to `grad_clip` (0: off); (loss, parts)."""
    images = batch["image"] if weak_windows is None else torch.cat([batch["image"], weak_windows])
    with torch.autocast(device_type=images.device.type, enabled=use_amp):
        output = network(images)
    count = batch["image"].shape[0]
    loss, parts = criterion(_first_rows(output, count), batch)
    if weak_windows is not None:
        weak = mil_loss(output["seg"][count:])
        loss, parts = loss + weak, {**parts, "weak": float(weak.detach())}
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(network.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return loss, parts


def _first_rows(output: dict[str, Any], count: int) -> dict[str, Any]:
    """The model's outputs (tensors, or lists of them) for the first ``count`` inputs."""
    return {key: [part[:count] for part in value] if isinstance(value, list) else value[:count]
            for key, value in output.items()}


def resolve_split(config: TrainConfig, records: list[dict[str, Any]]) -> dict[str, Any]:
    if config.split:
        return load_split(config.split, records)
    if config.all_data:
        return all_train_split(records)
    return make_split(records, seed=config.seed, val_fraction=config.val_fraction, test_fraction=config.test_fraction)


def build_network(config: TrainConfig) -> nn.Module:
    from lungnlb.networks import build_model, size_divisor

    divisor = size_divisor(config.model, **config.model_kwargs)
    size = config.patch_size or config.input_size
    if size % divisor:
        raise ValueError(f"input size {size} is not divisible by {divisor}, as {config.model} needs")
    return build_model(config.model, in_channels=1, **config.model_kwargs)


def initial_network(config: TrainConfig) -> nn.Module:
    """`build_network`, with the weights of `config.init` when given (a checkpoint of the same model)."""
    network = build_network(config)
    if config.init:
        model = read_config(config.init)["model"]
        if (model["name"], model.get("kwargs", {})) != (config.model, config.model_kwargs):
            raise ValueError(f"--init {config.init} holds {model['name']} {model.get('kwargs', {})}, "
                             f"not the {config.model} {config.model_kwargs} this run trains")
        network.load_state_dict(torch.load(config.init, map_location="cpu", weights_only=True))
    return network


def checkpoint_config(
    config: TrainConfig, summary: dict[str, Any], metrics: dict[str, Any], step: int, mapping: IntensityMapping
) -> dict:
    size = config.patch_size or config.input_size
    native = {"patch_size": [size, size], "slice_size": size} if config.patch_size else {}
    return {
        "model": {"name": config.model, "kwargs": config.model_kwargs, "in_channels": 1},
        "input_size": [size, size],
        **native,
        "intensity": mapping.as_config(),
        "threshold": metrics.get("threshold", 0.5),
        "cls_logit_offset": metrics.get("cls_logit_offset", 0.0),
        "training_data": summary,
        "metrics": metrics,
        "step": step,
        "train": asdict(config),
    }


@dataclass
class TrainingSet:
    """The slices one run trains on and validates on, and what its checkpoints record about them."""

    train: list[SliceSample]
    val: list[SliceSample]
    summary: dict[str, Any]
    weak: list[SliceSample] = field(default_factory=list)  # tumour slices known by class only (MIL)


@dataclass(frozen=True)
class Validation:
    """One validation during a run, as `fit` reports it to its ``on_validation`` callback."""

    step: int
    loss: float  # running mean of the training loss
    metrics: dict[str, Any]
    best_metrics: dict[str, Any]
    improved: bool  # this validation made a new best checkpoint


def train(config: TrainConfig) -> dict[str, Any]:
    """Train from a prepared studies folder: split by patient, load the slices, build the model, `fit`.

    Returns {"best", "last", "split": paths, "metrics": best validation metrics, "model": trained module}."""
    rank, world_size = distributed_context()
    device = pick_device(config, rank)
    seed_everything(config.seed)
    records = read_records(config.data)
    split = resolve_split(config, records)
    split_path = Path(config.out) / "split.json"
    if rank == 0:
        save_split(split, split_path)
    mapping = IntensityMapping()  # the library's constants, recorded in every checkpoint of the run
    data = load_training_set(config, records, split, mapping, rank)
    if not data.train:
        raise ValueError(f"no labelled training slices in {config.data} for split {split_path}")
    result = fit(config, initial_network(config), data, mapping, device, rank, world_size)
    if rank == 0 and config.slice_probe and config.patch_size and isinstance(result["model"], SegClsUNet) and data.val:
        probe = add_slice_probe(result["best"], Path(config.data), records, split, _probe_progress(config))
        if probe is not None:
            result["metrics"] = {**result["metrics"], "slice_probe": probe.fit["validation"]}
    return {**result, "split": split_path}


def load_training_set(config: TrainConfig, records: list[dict[str, Any]], split: dict[str, Any],
                      mapping: IntensityMapping, rank: int = 0) -> TrainingSet:
    """The split's training slices (every rank) and validation slices (rank 0), mapped and sized for `config`."""
    from lungnlb.networks import is_segmentation_model

    size = None if config.patch_size else (config.input_size, config.input_size)
    train_samples = load_slices(config.data, size, split["images"]["train"], records,
                                progress=config.progress and rank == 0, mapping=mapping,
                                reader_targets=config.reader_targets)
    if not is_segmentation_model(config.model):
        train_samples = [s for s in train_samples if s.class_label is not None]
    weak = [s for s in train_samples if is_weak_positive(s)] if config.patch_size and config.weak_positives else []
    if config.patch_size:  # only slices whose every patch has a known truth: a lesion mask, or tumour-free
        train_samples = [s for s in train_samples if s.class_label == 0 or (s.mask is not None and s.mask.any())]
    faint = None
    if config.faint_lesion_weight != 1.0:
        faint = weigh_faint_lesions(train_samples, config.faint_lesion_weight, mapping)
    if config.hard_negatives_from:
        train_samples += hard_negative_crops(config, train_samples)
    val_samples = load_validation_set(config, records, split, mapping) if rank == 0 else []
    summary = data_summary(config.data, train_samples + weak, split)
    if faint is not None:
        summary["faint_lesion_slices"] = faint
    if config.init:  # the patients behind the starting weights were trained on too
        summary["train_cases"] = sorted(set(summary["train_cases"]) | set(
            read_config(config.init).get("training_data", {}).get("train_cases") or []))
    return TrainingSet(train_samples, val_samples, summary, weak)


def hard_negative_crops(config: TrainConfig, samples: list[SliceSample]) -> list[SliceSample]:
    """Crops around the false alarms of `config.hard_negatives_from` on ``samples`` (`lungnlb.training.hard_negatives`)."""
    from lungnlb.inference import Predictor
    from lungnlb.training.hard_negatives import mine_hard_negatives

    if not config.patch_size:
        raise ValueError("hard negatives are crops for native-resolution training: give --patch-size")
    if not 0.0 < config.hard_negative_fraction < 1.0:
        raise ValueError(f"--hard-negative-fraction must be in (0, 1), got {config.hard_negative_fraction}")
    return mine_hard_negatives(Predictor.from_checkpoint(config.hard_negatives_from), samples)


def load_validation_set(config: TrainConfig, records: list[dict[str, Any]], split: dict[str, Any],
                        mapping: IntensityMapping) -> list[SliceSample]:
    """The split's validation slices a run with `config` validates on (the seeded draw of `config.val_slices`)."""
    size = None if config.patch_size else (config.input_size, config.input_size)
    samples = load_slices(config.data, size, split["images"]["val"], records, mapping=mapping)
    return validation_subset(samples, config.val_slices, config.seed)


def fit(
    config: TrainConfig,
    model: nn.Module,
    data: TrainingSet,
    mapping: IntensityMapping,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    on_validation: Callable[[Validation], None] | None = None,
) -> dict[str, Any]:
    """The training engine: `config.steps` optimiser steps of `model` on `data.train`, validated every
    `config.val_every` steps on `data.val` (rank 0), `best` / `last` checkpoints in `config.out`.

    Steps: loss and optimiser -> (resume) -> data loader -> loop {batch, `train_step`, schedule,
    every `val_every`: validate, select (`validation_score`), save, report to ``on_validation``}.
    Under DDP (an initialised process group, `world_size` > 1) each rank draws its own shard.
    Returns {"best", "last": paths, "metrics": the best validation metrics, "model": the trained module}."""
    from lungnlb.networks import is_segmentation_model

    out = Path(config.out)
    model = model.to(device)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # one input size: let cuDNN pick its fastest kernels
    weights = sample_weights(data.train, config.seg_fraction, config.hard_negative_fraction)
    pos_weight = balanced_pos_weight(data.train, weights) if config.balance_classes else None
    segmentation = is_segmentation_model(config.model)
    criterion = MultiTaskLoss(config.seg_weight if segmentation else 0.0, config.cls_weight, pos_weight,
                              batch_dice=config.patch_size is not None).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = WarmupCosine(config.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    use_amp = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    step, best_score, best_metrics = 0, float("-inf"), {}
    state = load_training_state(out / "last") if config.resume else None
    if state is not None:
        model.load_state_dict(torch.load(out / "last.pt", map_location="cpu", weights_only=True))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, best_score = int(state["step"]), float(state["best_score"])
        best_metrics = json.loads(state["best_metrics"])
    network = model
    if world_size > 1:
        network = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    loader, sampler = _loader(config, data.train, weights, mapping, rank, world_size, step, device)
    positives, negatives = _mil_bags(config, data, mapping)
    batches = _infinite_batches(loader, sampler, epoch=step // max(1, len(loader)))
    windows = checkpoint_config(config, {}, {}, 0, mapping) if config.patch_size else None
    writer = _writer(out, config) if rank == 0 else None
    bar = _progress(config, rank, step)
    running = None

    def save(name: str, metrics: dict[str, Any]) -> None:
        save_checkpoint(out / name, model, checkpoint_config(config, data.summary, metrics, step, mapping))

    started, first_step, total = time.monotonic(), step, config.steps
    while step < total:
        network.train()
        batch = {key: value.to(device) for key, value in next(batches).items()}
        rng = np.random.default_rng((config.seed, rank, step))
        weak_windows = None if positives is None else positives.draw(model, rng, config.weak_positives, device)
        if negatives is not None:
            batch = with_tumour_free(batch, negatives.draw(model, rng, config.top_negatives, device))
        loss, parts = train_step(network, batch, criterion, optimizer, scaler, config.grad_clip, use_amp, weak_windows)
        scheduler.step()
        step += 1
        if config.time_budget_s is not None and step - first_step == BUDGET_PROBE_STEPS:
            total = schedule.total_steps = steps_within_budget(
                config, step, step - first_step, time.monotonic() - started, device, world_size)
            if bar is not None:
                bar.total = total
        running = float(loss.detach()) if running is None else 0.95 * running + 0.05 * float(loss.detach())
        if rank == 0:
            if writer is not None:
                _log(writer, "train", {"loss": float(loss.detach()), **parts, "lr": scheduler.get_last_lr()[0]}, step)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{running:.3f}", **_short(best_metrics))
            if step % config.val_every == 0 or step == total:
                metrics = validation_metrics(model, data.val, device, windows) if data.val else {}
                if writer is not None:
                    _log(writer, "val", {k: v for k, v in metrics.items() if isinstance(v, float)}, step)
                score = validation_score(metrics)
                improved = score > best_score or not data.val
                if improved:
                    best_score, best_metrics = score, metrics
                    save("best", metrics)
                save("last", metrics)
                if config.keep_validated:
                    save(f"step_{step}", metrics)
                save_training_state(out / "last", {
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "step": step, "best_score": best_score,
                    "best_metrics": json.dumps(best_metrics)})
                if on_validation is not None:
                    on_validation(Validation(step, running, metrics, best_metrics, improved))
        if world_size > 1 and (step % config.val_every == 0 or step == total):
            dist.barrier()
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()
    return {"best": out / "best.pt", "last": out / "last.pt", "metrics": best_metrics, "model": model}


def _loader(config: TrainConfig, samples: list[SliceSample], weights: np.ndarray, mapping: IntensityMapping,
            rank: int, world_size: int, step: int, device: torch.device) -> tuple[DataLoader, WeightedShardSampler]:
    """MONAI's DataLoader over the augmented samples, drawn by a seeded weighted sampler (this rank's shard)."""
    transform_seed = config.seed * 1000 + rank + step
    if config.patch_size:
        transform = patch_transforms(transform_seed, config.patch_size, mapping.air(), config.pos_fraction, config.augment,
                                     config.kernel_augment)
    else:
        transform = train_transforms(transform_seed) if config.augment else None
    sampler = WeightedShardSampler(weights, config.seed, rank, world_size)
    loader = DataLoader(SliceDataset(samples, transform, patches=config.patch_size is not None),
                        batch_size=config.batch_size, sampler=sampler,
                        num_workers=config.num_workers, drop_last=False, persistent_workers=config.num_workers > 0,
                        pin_memory=device.type == "cuda")
    return loader, sampler


def _mil_bags(config: TrainConfig, data: TrainingSet, mapping: IntensityMapping
              ) -> tuple[SliceBags | None, SliceBags | None]:
    """The slices MIL draws its windows from (weak positives, tumour-free), each None when not asked for."""
    if not (config.weak_positives or config.top_negatives):
        return None, None
    if min(config.weak_positives, config.top_negatives) < 0 or not config.patch_size:
        raise ValueError("--weak-positives and --top-negatives are counts of windows per batch, for "
                         "native-resolution training (--patch-size)")
    if config.weak_positives and not data.weak:
        raise ValueError("--weak-positives: no tumour slice without a mask among the training slices")
    tumour_free = [sample for sample in data.train if is_whole_tumour_free(sample)]
    if config.top_negatives and not tumour_free:
        raise ValueError("--top-negatives: no tumour-free whole slice among the training slices")
    return (SliceBags(data.weak, config.patch_size, mapping) if config.weak_positives else None,
            SliceBags(tumour_free, config.patch_size, mapping) if config.top_negatives else None)


def _short(metrics: dict[str, Any]) -> dict[str, str]:
    return {key: f"{metrics[key]:.3f}" for key in ("dice", "f1") if metrics.get(key) is not None}


def _probe_progress(config: TrainConfig):
    if not config.progress:
        return None
    return lambda done, total: print(f"slice probe features: {done}/{total}", flush=True) if done % 100 == 0 else None


def _writer(out: Path, config: TrainConfig):
    if not config.tensorboard:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(out / "tensorboard"))


def _log(writer, prefix: str, values: dict[str, float], step: int) -> None:
    for key, value in values.items():
        if value is not None:
            writer.add_scalar(f"{prefix}/{key}", value, step)


def _progress(config: TrainConfig, rank: int, step: int):
    if not config.progress or rank != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=config.steps, initial=step, desc=f"train {config.model}", unit="step")
