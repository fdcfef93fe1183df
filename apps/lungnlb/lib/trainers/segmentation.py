"""Train task `lung_nlb_seg`: incremental fine-tuning on the datastore, validated, published atomically.

One run:

1. start from the currently published weights (see `lib.model_store`), or a fresh
   `--conf network` model when there are none;
2. train on the `final` labels (loss weight 1) and the `original` watershed labels (weight
   `original_weight`) — slices from `lib.trainers.slices` — with the multi-task loss
   `L = sum_g w_g n_g L_g / sum_g w_g n_g` over the groups g in {final, original}, where L_g is
   lungnlb's DiceCE (seg head) + BCE (cls head) on that group's n_g samples of the batch;
3. validate every epoch on a held-out share of the images (`val_split`, split by image): mean
   per-slice Dice of the thresholded mask;
4. publish the best epoch (or the last, without validation images) with `save_checkpoint`, which
   replaces `<model_dir>/lung_nlb_seg.pt/.json` atomically — a killed run leaves the previous
   model intact — and the next infer request loads it;
5. write the stats `/info` shows (atomically) and, unless `tracking` is "none", log them to
   MLflow with a SQLite store (MONAI Label's default `file://` store is rejected by mlflow 3).

Several GPUs: with `multi_gpu` true and more than one CUDA device, one DDP process per device
(`torch.multiprocessing.spawn`, NCCL), each on its shard of the slices; rank 0 validates and publishes.
"""

from __future__ import annotations

import copy
import json
import os
import random
import socket
import time
from datetime import datetime
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from monailabel.interfaces.tasks.train import TrainTask
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from lib.conf import AppConfig
from lib.errors import unprocessable
from lib.images import dice
from lib.model_store import ModelStore, file_version, resolve_device
from lib.provenance import atomic_write_text
from lib.trainers.slices import TrainSlice, datastore_slices
from lungnlb.checkpoint import build_from_config, load_model, save_checkpoint
from lungnlb.training.loss import MultiTaskLoss


DEFAULT_NETWORK = {"model": {"name": "unet_sl_nlb", "kwargs": {}, "in_channels": 1}, "input_size": [256, 256],
                   "intensity": {"window": None}, "threshold": 0.5}


class NLBSegmentationTrain(TrainTask):
    """Fine-tunes the NLB U-Net on the datastore's labels and publishes it for infer."""

    def __init__(self, config: AppConfig, store: ModelStore):
        super().__init__("Incremental training of the NLB U-Net on final (and weighted original) labels")
        self.app_config = config
        self.store = store
        self._config = {
            "max_epochs": 5,
            "learning_rate": 1e-4,
            "train_batch_size": 8,
            "val_split": 0.2,
            "original_weight": config.original_weight,
            "tracking": config.tracking,
            "multi_gpu": True,
            "device": config.device,
            "seed": 0,
        }

    def config(self) -> dict[str, Any]:
        return self._config

    def stats(self) -> dict[str, Any]:
        path = self.app_config.train_stats_path
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def __call__(self, request: dict[str, Any], datastore) -> dict[str, Any]:
        req = {**self._config, **{k: v for k, v in request.items() if k in self._config}}
        start_path = self.store.checkpoint_path()
        model, model_config = load_model(start_path) if start_path else (None, copy.deepcopy(DEFAULT_NETWORK))
        model = model if model is not None else build_from_config(model_config)
        input_size = tuple(int(v) for v in model_config["input_size"])
        window = (model_config.get("intensity") or {}).get("window")
        slices = datastore_slices(datastore, self.app_config, input_size, window, float(req["original_weight"]))
        if not slices:
            raise unprocessable("nothing to train on: no image has a final (or original) label")
        train_slices, val_slices = _split_by_image(slices, float(req["val_split"]), int(req["seed"]))
        run = {
            "run_id": datetime.now().strftime("%Y%m%d_%H%M%S"),
            "start_ts": time.time(),
            "base_model_version": file_version(start_path) if start_path else None,
            "train_slices": {tag: sum(s.tag == tag for s in train_slices) for tag in ("final", "original")},
            "val_slices": len(val_slices),
        }
        world = torch.cuda.device_count() if str(req["multi_gpu"]).lower() == "true" else 1
        args = (model, model_config, train_slices, val_slices, req, run)
        if world > 1:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            torch.multiprocessing.spawn(_ddp_worker, nprocs=world, args=(world, self, *args))
            return self.stats()
        return self.fit(0, 1, resolve_device(str(req["device"])), *args)

    def fit(self, rank, world, device, model, model_config, train_slices, val_slices, req, run) -> dict[str, Any]:
        """Train on this rank's shard; rank 0 validates, publishes and records the stats."""
        torch.manual_seed(int(req["seed"]) + rank)
        model = model.to(device).train()
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index]) if world > 1 else model
        loader = _loader(train_slices, int(req["train_batch_size"]), rank, world, int(req["seed"]))
        optimizer = torch.optim.Adam(net.parameters(), lr=float(req["learning_rate"]))
        criterion = MultiTaskLoss()
        threshold = float(model_config.get("threshold", 0.5))
        history: list[dict[str, float]] = []
        best = -1.0
        tracker = _Tracker(req, self.app_config, run) if rank == 0 else None
        for epoch in range(int(req["max_epochs"])):
            if isinstance(loader.sampler, DistributedSampler):
                loader.sampler.set_epoch(epoch)
            loss = _train_epoch(net, loader, optimizer, criterion, device)
            if rank != 0:
                continue
            val_dice = _validate(model, val_slices, device, threshold) if val_slices else None
            history.append({"epoch": epoch + 1, "train_loss": loss, "val_dice": val_dice})
            tracker.log(history[-1], epoch + 1)
            score = val_dice if val_dice is not None else float(epoch)
            if score >= best:
                best = score
                self._publish(model, model_config, history[-1], run)
            self._write_stats(run, history, best if val_slices else None)
        if tracker is not None:
            tracker.close()
        return self.stats() if rank == 0 else {}

    def _publish(self, model: nn.Module, model_config: dict[str, Any], epoch: dict, run: dict) -> None:
        config = {k: v for k, v in model_config.items() if k not in ("format", "lungnlb_version")}
        config["metrics"] = {"app_validation": epoch}
        config["training_data"] = {"app_run": run["run_id"], "train_slices": run["train_slices"]}
        save_checkpoint(self.app_config.published_checkpoint, model, config)
        run["published_epoch"] = epoch["epoch"]
        run["model_version"] = file_version(self.app_config.published_checkpoint)

    def _write_stats(self, run: dict, history: list[dict], best_val_dice: float | None) -> None:
        stats = {**run, "epochs": history, "total_epochs": len(history), "best_val_dice": best_val_dice,
                 "total_time": round(time.time() - run["start_ts"], 2),
                 "published": str(self.app_config.published_checkpoint)}
        atomic_write_text(self.app_config.train_stats_path, json.dumps(stats, indent=2))


def _split_by_image(slices: list[TrainSlice], val_split: float, seed: int):
    """Hold out about `val_split` of the images (never a slice of a training image); none with < 2 images."""
    ids = sorted({s.image_id for s in slices})
    count = int(round(len(ids) * val_split)) if len(ids) > 1 else 0
    held = set(random.Random(seed).sample(ids, count))
    return [s for s in slices if s.image_id not in held], [s for s in slices if s.image_id in held]


def _loader(slices: list[TrainSlice], batch_size: int, rank: int, world: int, seed: int) -> DataLoader:
    dataset = TensorDataset(
        torch.from_numpy(np.stack([s.image for s in slices])[:, None]),
        torch.from_numpy(np.stack([s.mask for s in slices])[:, None]),
        torch.tensor([s.weight for s in slices], dtype=torch.float32),
        torch.tensor([s.tag == "final" for s in slices]),
    )
    sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=seed) if world > 1 else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=sampler is None, sampler=sampler)


def _train_epoch(net, loader, optimizer, criterion: MultiTaskLoss, device) -> float:
    """One pass; returns the mean weighted loss."""
    net.train()
    total, batches = 0.0, 0
    for image, mask, weight, is_final in loader:
        image, mask, weight, is_final = image.to(device), mask.to(device), weight.to(device), is_final.to(device)
        output = net(image)
        label = mask.flatten(1).amax(dim=1, keepdim=True)
        loss = _group_weighted_loss(criterion, output, mask, label, weight, is_final)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += float(loss.detach())
        batches += 1
    return total / max(batches, 1)


def _group_weighted_loss(criterion, output, mask, label, weight, is_final) -> torch.Tensor:
    """sum_g w_g n_g L_g / sum_g w_g n_g over the final / original samples of the batch."""
    numerator, denominator = 0.0, 0.0
    for group in (is_final, ~is_final):
        count = int(group.sum())
        if count == 0:
            continue
        keep = group.float()
        batch = {"mask": mask, "has_mask": keep, "label": label, "has_label": keep}
        group_loss, _ = criterion(output, batch)
        w = float(weight[group][0])
        numerator = numerator + w * count * group_loss
        denominator += w * count
    return numerator / max(denominator, 1e-8)


@torch.no_grad()
def _validate(model: nn.Module, slices: list[TrainSlice], device, threshold: float) -> float:
    """Mean per-slice Dice of the thresholded mask on the held-out slices."""
    model.eval()
    scores = []
    for start in range(0, len(slices), 16):
        chunk = slices[start : start + 16]
        batch = torch.from_numpy(np.stack([s.image for s in chunk])[:, None]).to(device)
        probability = torch.sigmoid(model(batch)["seg"].float())[:, 0].cpu().numpy()
        scores += [dice(p > threshold, s.mask > 0.5) for p, s in zip(probability, chunk)]
    model.train()
    return float(np.mean(scores))


class _Tracker:
    """MLflow logging into a SQLite store, or nothing when tracking is "none"."""

    def __init__(self, req: dict[str, Any], config: AppConfig, run: dict[str, Any]):
        self.mlflow = None
        if str(req["tracking"]).lower() != "mlflow":
            return
        import mlflow

        config.model_dir.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(config.tracking_uri)
        mlflow.set_experiment("lung_nlb_seg")
        mlflow.start_run(run_name=f"run_{run['run_id']}")
        mlflow.log_params({k: req[k] for k in ("max_epochs", "learning_rate", "train_batch_size", "original_weight")})
        self.mlflow = mlflow

    def log(self, epoch: dict[str, Any], step: int) -> None:
        if self.mlflow is not None:
            self.mlflow.log_metrics({k: v for k, v in epoch.items() if k != "epoch" and v is not None}, step=step)

    def close(self) -> None:
        if self.mlflow is not None:
            self.mlflow.end_run()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world: int, task: NLBSegmentationTrain, *args) -> None:
    dist.init_process_group("nccl", rank=rank, world_size=world)
    torch.cuda.set_device(rank)
    try:
        task.fit(rank, world, torch.device("cuda", rank), *args)
    finally:
        dist.destroy_process_group()
