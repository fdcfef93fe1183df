"""One training process of `lung_nlb_seg`: the library's fine-tuning run, its stats and its tracking.

The training itself — data loader, augmentation, loss, optimiser, validation, selection, the publish
gate and the atomic publish — is the library's one engine (`lungnlb.training.fine_tune`, a
configuration of `lungnlb.training.trainer.fit`); this module adapts it to the app: the request's
parameters, the stats `/info` shows after every epoch, MLflow, and one process per device.

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

import torch
import torch.distributed as dist
from torch import nn

from lib.conf import AppConfig
from lib.model_store import file_version
from lungnlb.io.atomic import atomic_write_text
from lungnlb.training.dataset import SliceSample
from lungnlb.training.fine_tune import FineTuneRequest, fine_tune
from lungnlb.training.trainer import TrainingSet, Validation


@dataclass
class TrainJob:
    """What one run trains: the starting model and its config, the slices, the request, the run record."""

    model: nn.Module
    model_config: dict[str, Any]
    train_slices: list[SliceSample]
    val_slices: list[SliceSample]
    req: dict[str, Any]
    run: dict[str, Any]


@dataclass(frozen=True)
class SegmentationFit:
    """Runs a `TrainJob` in this process (rank `rank` of `world`); rank 0 validates and publishes."""

    config: AppConfig

    def fit(self, rank: int, world: int, device: torch.device, job: TrainJob) -> None:
        req, run = job.req, job.run
        torch.manual_seed(int(req["seed"]) + rank)
        planned = int(req["max_epochs"])
        history: list[dict[str, Any]] = []
        tracker = _Tracker(req, self.config, run) if rank == 0 else None

        def on_validation(validation: Validation, epoch: int) -> None:
            history.append({"epoch": epoch, "train_loss": validation.loss, "val_dice": validation.metrics.get("dice")})
            if validation.improved:
                run["best_epoch"] = epoch
            tracker.log(history[-1], epoch)
            self._write_stats(run, history, planned, validation.best_metrics.get("dice"))

        request = FineTuneRequest(planned, float(req["learning_rate"]), int(req["train_batch_size"]),
                                  int(req["seed"]), bool(req.get("force", False)))
        data = TrainingSet(job.train_slices, job.val_slices if rank == 0 else [],
                           {"app_run": run["run_id"], "train_slices": run["train_slices"]})
        result = fine_tune(job.model, job.model_config, data, request, self.config.published_checkpoint, device,
                           has_incumbent=bool(run.get("base_model_version")), rank=rank, world_size=world,
                           on_validation=on_validation if rank == 0 else None)
        if rank != 0:
            return
        run["incumbent_val_dice"] = result["incumbent_dice"]
        run["publish"] = result["publish"]
        if result["published"]:
            run["published_epoch"] = run.get("best_epoch")
            run["model_version"] = file_version(self.config.published_checkpoint)
        self._write_stats(run, history, planned, result["metrics"].get("dice"), finished=True)
        tracker.close()

    def _write_stats(self, run: dict, history: list[dict], planned_epochs: int, best_val_dice: float | None,
                     finished: bool = False) -> None:
        """The stats `/info` shows. `epoch` (epochs done), `total_epochs` (planned) and `best_metric`
        are the names Slicer's official MONAI Label module reads for its progress and accuracy bars;
        it multiplies `best_metric` as a number, so without a validation Dice it is left out, and it
        shows ``0 if total_time else epoch`` epochs done, so the time so far is `elapsed_time` and
        `total_time` is written once, with the run's publish decision."""
        seconds = round(time.time() - run["start_ts"], 2)
        stats = {**run, "epochs": history, "epoch": len(history), "total_epochs": planned_epochs,
                 "best_val_dice": best_val_dice, ("total_time" if finished else "elapsed_time"): seconds,
                 "published": str(self.config.published_checkpoint) if run.get("model_version") else None}
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
