"""Train task `lung_nlb_seg`: incremental fine-tuning on the datastore, validated, published atomically.

One run:

1. start from the currently published weights (see `lib.model_store`), or a fresh
   `--conf network` model when there are none;
2. fine-tune it with the library's one training engine (`lungnlb.training.fine_tune`, the same
   data loader, augmentation, loss and selection as `lungnlb train`) on the `final` labels and the
   `original` watershed labels — slices from `lib.trainers.slices` — drawing an `original` slice
   `original_weight` times as often as a `final` one (the expected loss is the weighted mean
   `sum_g w_g n_g L_g / sum_g w_g n_g` over the groups g in {final, original});
3. validate every epoch on a held-out share of the images (`val_split`, split by image), as the
   model is served (sliding window for a native-resolution model): Dice over the slices with a
   label, F1 of the slice calls; the best epoch by their harmonic mean is kept;
4. publish the best epoch — only if it passes the publish gate (`lungnlb.training.publish`): finite
   weights, at least 10 validation slices with a label, validation Dice above the model in use's on
   the same slices (a tie keeps it), or `force` — with `save_checkpoint`, which replaces
   `<model_dir>/lung_nlb_seg.pt/.json` atomically (a killed run leaves the previous model intact);
   the next infer request loads it. The stats record the decision and why (`publish`);
5. write the stats `/info` shows (atomically, after every epoch) and, unless `tracking` is "none",
   log them to MLflow with a SQLite store (MONAI Label's default `file://` store is rejected by mlflow 3).

The request's values are checked first (400 naming the bad one). A run holds the studies folder's
training lock (`lib.trainers.guard`): a second run meanwhile gets 409, and a run in MONAI Label's
training subprocess ends when its server does.

Steps 2-5 run in `lib.trainers.fit`. Several GPUs: with `multi_gpu` true and more than one CUDA
device, one DDP process per device (`torch.multiprocessing.spawn`, NCCL), each on its shard of the
slices; rank 0 validates and publishes.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import time
from datetime import datetime
from typing import Any

import torch
from monailabel.interfaces.tasks.train import TrainTask

from lib.conf import AppConfig
from lib.errors import bad_request, unprocessable
from lib.model_store import ModelStore, file_version, resolve_device
from lib.trainers.fit import SegmentationFit, TrainJob, fit_distributed
from lib.trainers.guard import TrainerLock, is_task_subprocess, watch_server
from lib.trainers.slices import datastore_slices
from lungnlb.checkpoint import build_from_config, load_model
from lungnlb.io.intensity import IntensityMapping
from lungnlb.training.dataset import SliceSample
from lungnlb.training.trainer import TrainConfig

def fresh_network() -> dict[str, Any]:
    """The config of a fresh model, for a run with no weights to start from: the library's default
    network and input size (`TrainConfig`) and intensity mapping."""
    defaults = TrainConfig(data="", out="")
    return {"model": {"name": defaults.model, "kwargs": dict(defaults.model_kwargs), "in_channels": 1},
            "input_size": [defaults.input_size] * 2, "intensity": IntensityMapping().as_config(), "threshold": 0.5}


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
            "force": False,
        }

    def config(self) -> dict[str, Any]:
        return self._config

    def stats(self) -> dict[str, Any]:
        path = self.app_config.train_stats_path
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def check_request(self, request: dict[str, Any]) -> dict[str, Any]:
        """The run's parameters (defaults + request), checked; 400 naming the first bad one."""
        req = {**self._config, **{k: v for k, v in (request or {}).items() if k in self._config or k == "force"}}
        return checked_request(req)

    def __call__(self, request: dict[str, Any], datastore) -> dict[str, Any]:
        req = self.check_request(request)
        record = {"pid": os.getpid(), "server_pid": os.getppid() if is_task_subprocess() else os.getpid(),
                  "started": datetime.now().isoformat(timespec="seconds"), "run_id": None}
        with TrainerLock(self.app_config.state_dir).hold(record):
            if is_task_subprocess():
                watch_server()
            job = self.prepare(req, datastore)
            TrainerLock(self.app_config.state_dir).update(run_id=job.run["run_id"])
            fitter = SegmentationFit(self.app_config)
            world = torch.cuda.device_count() if str(req["multi_gpu"]).lower() == "true" else 1
            if world > 1:
                fit_distributed(fitter, world, "cuda", job)
            else:
                fitter.fit(0, 1, resolve_device(str(req["device"])), job)
        return self.stats()

    def prepare(self, req: dict[str, Any], datastore) -> TrainJob:
        """The run's starting model (published > configured > shipped > fresh), its slices and record."""
        start_path = self.store.checkpoint_path()
        model, model_config = load_model(start_path) if start_path else (None, fresh_network())
        model = model if model is not None else build_from_config(model_config)
        slices = datastore_slices(datastore, self.app_config, model_config, float(req["original_weight"]))
        if not slices:
            raise unprocessable("nothing to train on: no image has a final (or original) label")
        train_slices, val_slices = _split_by_image(slices, float(req["val_split"]), int(req["seed"]))
        run = {
            "run_id": datetime.now().strftime("%Y%m%d_%H%M%S"),
            "start_ts": time.time(),
            "base_model_version": file_version(start_path) if start_path else None,
            "train_slices": {tag: sum(s.source == f"{tag} label" for s in train_slices) for tag in ("final", "original")},
            "val_slices": len(val_slices),
        }
        return TrainJob(model, model_config, train_slices, val_slices, req, run)


def _integer(req: dict[str, Any], key: str, low: int) -> int:
    value = req[key]
    try:
        number = float(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        number = None
    if number is None or not number.is_integer() or number < low:
        raise bad_request(f"{key} must be a whole number >= {low}, got {value!r}")
    return int(number)


def _number(req: dict[str, Any], key: str) -> float:
    value = req[key]
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise bad_request(f"{key} must be a finite number, got {value!r}")
    return number


def _flag(req: dict[str, Any], key: str) -> bool:
    value = str(req.get(key, False)).lower()
    if value not in ("true", "false"):
        raise bad_request(f"{key} must be true or false, got {req.get(key)!r}")
    return value == "true"


def checked_request(req: dict[str, Any]) -> dict[str, Any]:
    """Check a training request's values (see `NLBSegmentationTrain.config`); 400 with a message."""
    checked = dict(req)
    checked["max_epochs"] = _integer(req, "max_epochs", 1)
    checked["train_batch_size"] = _integer(req, "train_batch_size", 1)
    checked["seed"] = _integer(req, "seed", 0)
    learning_rate = _number(req, "learning_rate")
    if learning_rate <= 0:
        raise bad_request(f"learning_rate must be > 0, got {req['learning_rate']!r}")
    checked["learning_rate"] = learning_rate
    val_split = _number(req, "val_split")
    if not 0 < val_split < 1:
        raise bad_request(f"val_split must lie strictly between 0 and 1 (the share of images held out for "
                          f"validation), got {req['val_split']!r}")
    checked["val_split"] = val_split
    original_weight = _number(req, "original_weight")
    if not 0 <= original_weight <= 1:
        raise bad_request(f"original_weight must lie in [0, 1], got {req['original_weight']!r}")
    checked["original_weight"] = original_weight
    if str(req["tracking"]).lower() not in ("mlflow", "none"):
        raise bad_request(f"tracking must be 'mlflow' or 'none', got {req['tracking']!r}")
    device = str(req["device"])
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise bad_request(f"device must be auto, cpu, cuda or cuda:N, got {req['device']!r}")
    if device.startswith("cuda:") and torch.cuda.is_available() and int(device[5:]) >= torch.cuda.device_count():
        raise bad_request(f"device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    checked["multi_gpu"] = _flag(req, "multi_gpu")
    checked["force"] = _flag(req, "force")
    return checked


def _split_by_image(slices: list[SliceSample], val_split: float, seed: int):
    """Hold out about `val_split` of the images (never a slice of a training image); none with < 2 images."""
    ids = sorted({s.image_id for s in slices})
    count = int(round(len(ids) * val_split)) if len(ids) > 1 else 0
    held = set(random.Random(seed).sample(ids, count))
    return [s for s in slices if s.image_id not in held], [s for s in slices if s.image_id in held]
