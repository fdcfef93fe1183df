"""One training process of `lung_nlb_seg`: train, validate, publish atomically, write the stats.

`SegmentationFit` holds only the app's (frozen, picklable) config, so with several GPUs each DDP
process (`torch.multiprocessing.spawn` pickles its arguments) gets it together with the `TrainJob`;
the train task itself holds the model store, whose thread and locks cannot be pickled.
`fit_distributed` runs one process per device: NCCL on CUDA devices, gloo on the CPU (which the
tests use to run the multi-process path without GPUs).
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from lib.conf import AppConfig
from lib.model_store import file_version
from lib.trainers.slices import TrainSlice
from lungnlb.checkpoint import save_checkpoint
from lungnlb.io.atomic import atomic_write_text
from lungnlb.overlap import dice
from lungnlb.training.loss import MultiTaskLoss
from lungnlb.training.publish import decide_publication


@dataclass
class TrainJob:
    """What one run trains: the starting model and its config, the slices, the request, the run record."""

    model: nn.Module
    model_config: dict[str, Any]
    train_slices: list[TrainSlice]
    val_slices: list[TrainSlice]
    req: dict[str, Any]
    run: dict[str, Any]


@dataclass(frozen=True)
class SegmentationFit:
    """Trains a `TrainJob` in this process (rank `rank` of `world`); rank 0 validates and publishes."""

    config: AppConfig

    def fit(self, rank: int, world: int, device: torch.device, job: TrainJob) -> None:
        req, run = job.req, job.run
        torch.manual_seed(int(req["seed"]) + rank)
        model = job.model.to(device).train()
        device_ids = [device.index] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=device_ids) if world > 1 else model
        loader = _loader(job.train_slices, int(req["train_batch_size"]), rank, world, int(req["seed"]))
        optimizer = torch.optim.Adam(net.parameters(), lr=float(req["learning_rate"]))
        criterion = MultiTaskLoss()
        threshold = float(job.model_config.get("threshold", 0.5))
        history: list[dict[str, float]] = []
        best, best_state, best_epoch = -1.0, None, None
        tracker = _Tracker(req, self.config, run) if rank == 0 else None
        # the model in use, on the same validation slices, for the publish gate (none when starting fresh)
        incumbent = (_validate(model, job.val_slices, device, threshold)
                     if rank == 0 and job.val_slices and run.get("base_model_version") else None)
        run["incumbent_val_dice"] = incumbent
        for epoch in range(int(req["max_epochs"])):
            if isinstance(loader.sampler, DistributedSampler):
                loader.sampler.set_epoch(epoch)
            loss = _train_epoch(net, loader, optimizer, criterion, device)
            if rank != 0:
                continue
            val_dice = _validate(model, job.val_slices, device, threshold) if job.val_slices else None
            history.append({"epoch": epoch + 1, "train_loss": loss, "val_dice": val_dice})
            tracker.log(history[-1], epoch + 1)
            score = val_dice if val_dice is not None else float(epoch)
            if score >= best:
                best, best_epoch = score, history[-1]
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            self._write_stats(run, history, int(req["max_epochs"]), best if job.val_slices else None)
        if rank == 0:
            # PUBLISH GATE (lungnlb.training.publish): the best epoch replaces the model in use only if it validates better
            decision = decide_publication(
                best if job.val_slices else None, incumbent, len(job.val_slices),
                weights_finite=best_state is not None and all(bool(torch.isfinite(v).all()) for v in best_state.values()
                                                              if v.is_floating_point()),
                force=str(req.get("force", False)).lower() == "true",
            )
            run["publish"] = decision.as_record()
            if decision.publish:
                model.load_state_dict(best_state)
                self._publish(model, job.model_config, best_epoch, run)
            self._write_stats(run, history, int(req["max_epochs"]), best if job.val_slices else None)
        if tracker is not None:
            tracker.close()

    def _publish(self, model: nn.Module, model_config: dict[str, Any], epoch: dict, run: dict) -> None:
        config = {k: v for k, v in model_config.items() if k not in ("format", "lungnlb_version")}
        config["metrics"] = {"app_validation": epoch}
        config["training_data"] = {"app_run": run["run_id"], "train_slices": run["train_slices"]}
        save_checkpoint(self.config.published_checkpoint, model, config)
        run["published_epoch"] = epoch["epoch"]
        run["model_version"] = file_version(self.config.published_checkpoint)

    def _write_stats(self, run: dict, history: list[dict], planned_epochs: int, best_val_dice: float | None) -> None:
        """The stats `/info` shows. `epoch` (epochs done), `total_epochs` (planned) and `best_metric`
        are the names Slicer's official MONAI Label module reads for its progress and accuracy bars;
        it multiplies `best_metric` as a number, so without a validation Dice it is left out."""
        stats = {**run, "epochs": history, "epoch": len(history), "total_epochs": planned_epochs,
                 "best_val_dice": best_val_dice, "total_time": round(time.time() - run["start_ts"], 2),
                 "published": str(self.config.published_checkpoint) if run.get("published_epoch") else None}
        if best_val_dice is not None:
            stats["best_metric"] = best_val_dice
        atomic_write_text(self.config.train_stats_path, json.dumps(stats, indent=2))


def fit_distributed(fitter: SegmentationFit, world: int, device_type: str, job: TrainJob) -> None:
    """One process per device (`world` CUDA devices, or `world` CPU processes with gloo), each on its shard."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(_free_port())
    torch.multiprocessing.spawn(_ddp_worker, nprocs=world, args=(world, device_type, fitter, job))


def _ddp_worker(rank: int, world: int, device_type: str, fitter: SegmentationFit, job: TrainJob) -> None:
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=rank, world_size=world)
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        fitter.fit(rank, world, device, job)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
