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

Steps 2-5 run in `lib.trainers.fit`. Several GPUs: with `multi_gpu` true and more than one CUDA
device, one DDP process per device (`torch.multiprocessing.spawn`, NCCL), each on its shard of the
slices; rank 0 validates and publishes.
"""

from __future__ import annotations

import copy
import json
import random
import time
from datetime import datetime
from typing import Any

import torch
from monailabel.interfaces.tasks.train import TrainTask

from lib.conf import AppConfig
from lib.errors import unprocessable
from lib.model_store import ModelStore, file_version, resolve_device
from lib.trainers.fit import SegmentationFit, TrainJob, fit_distributed
from lib.trainers.slices import TrainSlice, datastore_slices
from lungnlb.checkpoint import build_from_config, load_model

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
        job = self.prepare(req, datastore)
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
        return TrainJob(model, model_config, train_slices, val_slices, req, run)


def _split_by_image(slices: list[TrainSlice], val_split: float, seed: int):
    """Hold out about `val_split` of the images (never a slice of a training image); none with < 2 images."""
    ids = sorted({s.image_id for s in slices})
    count = int(round(len(ids) * val_split)) if len(ids) > 1 else 0
    held = set(random.Random(seed).sample(ids, count))
    return [s for s in slices if s.image_id not in held], [s for s in slices if s.image_id in held]
