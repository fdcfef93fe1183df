"""Which segmentation weights are current, their version, and the loaded model (cached).

The current checkpoint is the first that exists of:

1. the weights training published into `model_dir` (`lung_nlb_seg.pt` + `.json`),
2. `--conf checkpoint`,
3. the weights shipped with lungnlb (`lungnlb.checkpoint.default_checkpoint_path()`).

With none of them the store is *untrained*: `/info` says so and seg/cls infer answer 503 instead
of returning the output of random weights. The version of a checkpoint is the first 12 hex digits
of the SHA-256 of its weights file, so a model published by the training subprocess is picked up
by the next request (the file's mtime/size change) and score caches are keyed by content.

Every model is loaded, and every forward pass runs, on the store's `ModelThread` (`store.run`):
see `lib.model_thread` for why.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lib.conf import AppConfig
from lib.errors import unavailable
from lib.model_thread import ModelThread
from lungnlb.checkpoint import default_checkpoint_path, load_model
from lungnlb.inference import Predictor

NO_WEIGHTS_MESSAGE = (
    "no trained weights are present for lung_nlb_seg: train the model (POST /train/lung_nlb_seg), "
    "or start the server with --conf checkpoint <weights.pt>"
)


@dataclass
class LoadedModel:
    """A checkpoint loaded for inference."""

    path: Path
    version: str
    model: nn.Module
    config: dict[str, Any]
    predictor: Predictor
    device: torch.device


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when present, else cpu; anything else as given (cuda falls back to cpu if absent)."""
    if name == "auto" or (name.startswith("cuda") and not torch.cuda.is_available()):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def file_version(path: Path) -> str:
    """First 12 hex digits of the SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


class ModelStore:
    """Resolves, versions and caches the current segmentation checkpoint (thread safe)."""

    def __init__(self, config: AppConfig):
        self.config = config
        self._lock = threading.Lock()
        self._loaded: LoadedModel | None = None
        self._stamp: tuple | None = None
        self._versions: dict[tuple, str] = {}
        self.thread = ModelThread()

    def run(self, fn, /, *args: Any, **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)` on the model thread (every forward pass goes through here)."""
        return self.thread.run(fn, *args, **kwargs)

    def checkpoint_path(self) -> Path | None:
        """The current checkpoint's weights file, or None when no trained weights exist."""
        default = default_checkpoint_path() if self.config.use_default_weights else None
        candidates = [self.config.published_checkpoint, self.config.checkpoint, default]
        for path in candidates:
            if path is not None and Path(path).is_file() and Path(path).with_suffix(".json").is_file():
                return Path(path)
        return None

    def status(self) -> dict[str, Any]:
        """What `/info` reports: whether trained weights exist, which, and their version."""
        path = self.checkpoint_path()
        if path is None:
            return {"trained": False, "message": NO_WEIGHTS_MESSAGE}
        source = "published by training" if path == self.config.published_checkpoint else "initial checkpoint"
        return {"trained": True, "checkpoint": str(path), "source": source, "version": self.version(path)}

    def version(self, path: Path) -> str:
        """The version of the weights file `path` as it is now, without loading the model: `/info`
        runs on the event loop, and a load waits for the model thread (behind a volume's inference)."""
        stat = path.stat()
        stamp = (str(path), stat.st_mtime_ns, stat.st_size)
        if stamp not in self._versions:
            self._versions = {stamp: file_version(path)}  # only the current file's is kept
        return self._versions[stamp]

    def get(self) -> LoadedModel:
        """The loaded current model; reloads when the checkpoint file changed; 503 when none exists."""
        path = self.checkpoint_path()
        if path is None:
            raise unavailable(NO_WEIGHTS_MESSAGE)
        stat = path.stat()
        stamp = (str(path), stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if self._loaded is None or self._stamp != stamp:
                self._loaded = self.run(self._load, path)
                self._stamp = stamp
            return self._loaded

    def _load(self, path: Path) -> LoadedModel:
        device = resolve_device(self.config.device)
        model, config = load_model(path, device=device)
        predictor = Predictor(model, config, device, batch_size=self.config.batch_size)
        return LoadedModel(path, file_version(path), model, config, predictor, device)
