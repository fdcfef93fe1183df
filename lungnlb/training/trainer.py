"""The training loop: step-based, multi-task, resumable, single process or DDP under `torchrun`.

One step = one batch per process. Batches are drawn with replacement from the training slices;
`seg_fraction` (when set) is the expected share of slices with a mask in a batch, so the few
segmentation slices are not drowned by the many classification-only ones. Validation (rank 0)
runs every `val_every` steps and at the end; it also calibrates the classification head: the
threshold with the best validation F1 is stored as `cls_logit_offset` (its logit) in the
checkpoint config, and `Predictor` subtracts it from the cls logit, so that the operating point
chosen on validation data is probability 0.5 everywhere. `best` keeps the highest validation score
(mean of Dice over tumour slices and F1, whichever exist), `last` the latest weights plus the
optimiser state for `--resume`. Learning rate: linear warm-up over 5% of the steps, then cosine to 0.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from monai.data import DataLoader
from torch import nn
from torch.utils.data import Sampler

from lungnlb.checkpoint import load_training_state, save_checkpoint, save_training_state
from lungnlb.data.sources import ATTRIBUTION
from lungnlb.evaluation.metrics import (
    classification_metrics,
    f1_best_threshold,
    per_slice_segmentation,
    summarize_segmentation,
)
from lungnlb.io.intensity import IntensityMapping
from lungnlb.training.augment import patch_transforms, train_transforms
from lungnlb.training.dataset import (
    SliceDataset,
    SliceSample,
    load_slices,
    read_records,
)
from lungnlb.training.loss import MultiTaskLoss
from lungnlb.training.split import all_train_split, load_split, make_split, save_split


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
    val_slices: int | None = None  # validate on at most this many slices (a seeded draw keeping the mix)
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


def sample_weights(samples: list[SliceSample], seg_fraction: float | None) -> np.ndarray:
    """Uniform weights, or weights giving slices with a mask a total probability of `seg_fraction`."""
    has_mask = np.array([sample.mask is not None for sample in samples])
    if seg_fraction is None or has_mask.all() or not has_mask.any():
        return np.ones(len(samples))
    return np.where(has_mask, seg_fraction / has_mask.sum(), (1 - seg_fraction) / (~has_mask).sum())


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


@torch.no_grad()
def predict_samples(
    model: nn.Module, samples: list[SliceSample], device: torch.device, batch_size: int = 16
) -> tuple[list[np.ndarray] | None, np.ndarray]:
    """Mask probabilities (at the samples' size) and slice scores for already-resized samples."""
    model.eval()
    masks, scores = [], []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        batch = torch.from_numpy(np.stack([s.image for s in chunk])[:, None]).to(device)
        output = model(batch)
        scores.append(torch.sigmoid(output["cls"].float()).reshape(-1).cpu().numpy())
        if "seg" in output:
            masks += list(torch.sigmoid(output["seg"].float())[:, 0].cpu().numpy())
    return (masks or None), (np.concatenate(scores) if scores else np.zeros(0))


def predict_windows(
    model: nn.Module, samples: list[SliceSample], device: torch.device, config: dict[str, Any]
) -> tuple[list[np.ndarray], np.ndarray]:
    """Native-resolution validation: each slice through the deployed sliding-window `Predictor`."""
    from lungnlb.inference import Predictor

    predictor = Predictor(model, config, device=device, batch_size=16)
    results = [predictor.predict_normalized(s.image[None]) for s in samples]
    return [r[0][0] for r in results], np.array([float(r[1][0]) for r in results])


def validation_metrics(
    model: nn.Module, samples: list[SliceSample], device: torch.device, windows: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Dice/IoU/false-positive rate on slices with masks, P/R/F1 on slices with class labels.

    ``windows``: the checkpoint config of a native-resolution model, whose slices are predicted by
    sliding window and called tumour when their mask is non-empty (no threshold is fitted then).
    """
    model.eval()
    if windows is not None:
        probabilities, scores = predict_windows(model, samples, device, windows)
    else:
        probabilities, scores = predict_samples(model, samples, device)
    metrics: dict[str, Any] = {}
    seg_index = [i for i, s in enumerate(samples) if s.mask is not None]
    if probabilities is not None and seg_index:
        per_slice = per_slice_segmentation([probabilities[i] for i in seg_index], [samples[i].mask for i in seg_index])
        metrics.update(summarize_segmentation(per_slice))
    cls_index = [i for i, s in enumerate(samples) if s.class_label is not None]
    if cls_index:
        labels = np.array([samples[i].class_label for i in cls_index])
        threshold = 0.5 if windows is not None else f1_best_threshold(scores[cls_index], labels)
        metrics.update(classification_metrics(scores[cls_index], labels, threshold))
        metrics["cls_logit_offset"] = logit_offset(threshold) if windows is None else 0.0
    return metrics


def validation_subset(samples: list[SliceSample], limit: int | None, seed: int) -> list[SliceSample]:
    """At most `limit` samples, drawn per kind (with a mask / tumour-free / class only) in proportion
    to the kind's share, seeded, in their original order: validation by sliding window costs a
    second a whole slice on a CPU, so a long list is sampled rather than cut."""
    if limit is None or len(samples) <= limit:
        return samples
    if limit < 1:
        raise ValueError(f"val_slices must be at least 1, got {limit}")
    kinds: dict[tuple[bool, Any], list[int]] = {}
    for index, sample in enumerate(samples):
        kinds.setdefault((sample.mask is not None, sample.class_label), []).append(index)
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for indices in kinds.values():
        share = max(1, round(limit * len(indices) / len(samples)))
        keep += rng.choice(indices, size=min(share, len(indices)), replace=False).tolist()
    return [samples[i] for i in sorted(keep)]


def logit_offset(threshold: float, limit: float = 8.0) -> float:
    """The logit of `threshold` (clipped to +-limit): subtracting it from the cls logit moves that
    threshold to probability 0.5, the decision point of every consumer of a checkpoint."""
    threshold = min(max(threshold, 1e-6), 1 - 1e-6)
    return float(np.clip(math.log(threshold / (1 - threshold)), -limit, limit))


def validation_score(metrics: dict[str, Any]) -> float:
    """Harmonic mean of the validation Dice and F1 (those measured): a model with Dice 0 scores 0
    however well it classifies, so it can never be kept as the best checkpoint."""
    values = [metrics[key] for key in ("dice", "f1") if metrics.get(key) is not None]
    if not values:
        return float("-inf")
    return 0.0 if min(values) <= 0 else float(len(values) / sum(1.0 / v for v in values))


def data_summary(studies: str, samples: list[SliceSample], split: dict[str, Any]) -> dict[str, Any]:
    """What a model was trained on: per source, images, cases, slices with masks, class counts; licences."""
    by_source: dict[str, dict[str, Any]] = {}
    for sample in samples:
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
    return {"studies": str(studies), "train_slices": len(samples), "sources": sources,
            "train_cases": sorted({sample.case for sample in samples}),
            "split_seed": split.get("seed"), "held_out_cases": {k: split["cases"][k] for k in ("val", "test")}}


def _lr_lambda(total_steps: int):
    warmup = max(1, int(0.05 * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _infinite_batches(loader: DataLoader, sampler: WeightedShardSampler, epoch: int):
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def train_step(network: nn.Module, batch: dict[str, torch.Tensor], criterion: MultiTaskLoss,
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, grad_clip: float,
               use_amp: bool) -> tuple[torch.Tensor, dict[str, float]]:
    """One optimiser step on a batch already on the device: forward (autocast when `use_amp`), the
    multi-task loss, scaled backward, gradient norm clipped to `grad_clip` (0: off); (loss, parts)."""
    with torch.autocast(device_type=batch["image"].device.type, enabled=use_amp):
        output = network(batch["image"])
    loss, parts = criterion(output, batch)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(network.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return loss, parts


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
        "threshold": 0.5,
        "cls_logit_offset": metrics.get("cls_logit_offset", 0.0),
        "training_data": summary,
        "metrics": metrics,
        "step": step,
        "train": asdict(config),
    }


def train(config: TrainConfig) -> dict[str, Any]:
    """Run training; returns {"best", "last", "split": paths, "metrics": best validation metrics, "model": trained module}."""
    rank, world_size = distributed_context()
    device = pick_device(config, rank)
    seed_everything(config.seed)
    out = Path(config.out)
    records = read_records(config.data)
    split = resolve_split(config, records)
    split_path = out / "split.json"
    if rank == 0:
        save_split(split, split_path)

    from lungnlb.networks import is_segmentation_model

    segmentation = is_segmentation_model(config.model)
    size = None if config.patch_size else (config.input_size, config.input_size)
    # the library's constants, recorded in every checkpoint of the run so its weights get this input later
    mapping = IntensityMapping()
    train_samples = load_slices(
        config.data, size, split["images"]["train"], records, progress=config.progress and rank == 0, mapping=mapping
    )
    val_samples = load_slices(config.data, size, split["images"]["val"], records, mapping=mapping) if rank == 0 else []
    val_samples = validation_subset(val_samples, config.val_slices, config.seed)
    if not segmentation:
        train_samples = [s for s in train_samples if s.class_label is not None]
    if config.patch_size:  # only slices whose every patch has a known truth: a lesion mask, or tumour-free
        train_samples = [s for s in train_samples if s.class_label == 0 or (s.mask is not None and s.mask.any())]
    if not train_samples:
        raise ValueError(f"no labelled training slices in {config.data} for split {split_path}")

    model = build_network(config).to(device)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # one input size: let cuDNN pick its fastest kernels
    weights = sample_weights(train_samples, config.seg_fraction)
    pos_weight = balanced_pos_weight(train_samples, weights) if config.balance_classes else None
    criterion = MultiTaskLoss(config.seg_weight if segmentation else 0.0, config.cls_weight, pos_weight,
                              batch_dice=config.patch_size is not None).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config.steps))
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

    transform_seed = config.seed * 1000 + rank + step
    if config.patch_size:
        transform = patch_transforms(transform_seed, config.patch_size, mapping.air(),
                                     config.pos_fraction, config.augment)
    else:
        transform = train_transforms(transform_seed) if config.augment else None
    windows = checkpoint_config(config, {}, {}, 0, mapping) if config.patch_size else None
    sampler = WeightedShardSampler(weights, config.seed, rank, world_size)
    loader = DataLoader(SliceDataset(train_samples, transform, patches=config.patch_size is not None),
                        batch_size=config.batch_size, sampler=sampler,
                        num_workers=config.num_workers, drop_last=False, persistent_workers=config.num_workers > 0,
                        pin_memory=device.type == "cuda")
    batches = _infinite_batches(loader, sampler, epoch=step // max(1, len(loader)))
    summary = data_summary(config.data, train_samples, split)
    writer = _writer(out, config) if rank == 0 else None
    bar = _progress(config, rank, step)
    running = None

    def save(name: str, metrics: dict[str, Any]) -> None:
        save_checkpoint(out / name, model, checkpoint_config(config, summary, metrics, step, mapping))

    while step < config.steps:
        network.train()
        batch = {key: value.to(device) for key, value in next(batches).items()}
        loss, parts = train_step(network, batch, criterion, optimizer, scaler, config.grad_clip, use_amp)
        scheduler.step()
        step += 1
        running = float(loss.detach()) if running is None else 0.95 * running + 0.05 * float(loss.detach())
        if rank == 0:
            if writer is not None:
                _log(writer, "train", {"loss": float(loss.detach()), **parts, "lr": scheduler.get_last_lr()[0]}, step)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{running:.3f}", **_short(best_metrics))
            if step % config.val_every == 0 or step == config.steps:
                metrics = validation_metrics(model, val_samples, device, windows) if val_samples else {}
                if writer is not None:
                    _log(writer, "val", {k: v for k, v in metrics.items() if isinstance(v, float)}, step)
                score = validation_score(metrics)
                if score > best_score or not val_samples:
                    best_score, best_metrics = score, metrics
                    save("best", metrics)
                save("last", metrics)
                save_training_state(out / "last", {
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "step": step, "best_score": best_score,
                    "best_metrics": json.dumps(best_metrics)})
        if world_size > 1 and step % config.val_every == 0:
            dist.barrier()
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()
    return {"best": out / "best.pt", "last": out / "last.pt", "metrics": best_metrics, "split": split_path,
            "model": model}


def _short(metrics: dict[str, Any]) -> dict[str, str]:
    return {key: f"{metrics[key]:.3f}" for key in ("dice", "f1") if metrics.get(key) is not None}


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
