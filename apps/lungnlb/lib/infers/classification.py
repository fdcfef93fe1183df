"""`lung_nlb_cls`: neoplasm present / absent for a slice or a volume, from the classification head.

JSON only (no result image): `label` ("neoplasm" | "no neoplasm"), `score` (probability of
neoplasm: the maximum slice probability), `slice_probabilities`, `threshold`, `model_version`,
`latencies` (`total` seconds).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from lib.conf import AppConfig
from lib.image_cache import ImageCache
from lib.infers.base import LungInferTask, requested_threshold
from lib.model_store import ModelStore
from monailabel.interfaces.tasks.infer_v2 import InferType


class NLBClassificationInfer(LungInferTask):
    """Slice / image classification with the NLB U-Net's classification head."""

    json_only = True  # no result image: `output=image` is refused with 400 (lib.server)

    def __init__(self, config: AppConfig, store: ModelStore, images: ImageCache | None = None):
        super().__init__(
            config,
            images,
            type=InferType.CLASSIFICATION,
            labels={"neoplasm": 1},
            dimension=3,
            description="NLB U-Net: neoplasm present / absent with its probability",
            config={"threshold": ""},
        )
        self.store = store

    def is_valid(self) -> bool:
        return self.store.checkpoint_path() is not None

    def __call__(self, request: dict[str, Any]) -> tuple[None, dict[str, Any]]:
        start = time.perf_counter()
        loaded = self.store.get()
        image = self.read(request)
        prediction = self.store.run(loaded.predictor.predict, image.array, image.intensity)
        slice_probabilities = np.atleast_1d(np.asarray(prediction.slice_probability, dtype=float))
        threshold = requested_threshold(request, loaded.predictor.threshold)
        score = float(slice_probabilities.max())
        return None, {
            "label": "neoplasm" if score > threshold else "no neoplasm",
            "score": score,
            "threshold": threshold,
            "slice_probabilities": [round(float(p), 6) for p in slice_probabilities],
            "model_version": loaded.version,
            "latencies": {"total": round(time.perf_counter() - start, 4)},
        }
