"""Per-image active-learning scores of the current model, cached per model version.

    disagreement = 1 - Dice(model mask, original label)   on the image's labelled slices
                   (the watershed label the model disagrees with most needs correcting most)
    uncertainty  = mean over lung pixels of the binary entropy of the mask probability,
                   H(p) = -(p log2 p + (1 - p) log2 (1 - p)) in [0, 1]

Both come from one forward pass per image. The cache is `<studies>/.lungnlb/scores/<version>.json`
({image_id: {"disagreement": float | null, "uncertainty": float, "inputs": stamp}}), so a new
model version starts a new cache and old scores are never mixed in. Images are scored without
holding the cache's file lock (scoring a study set takes minutes); the new scores are then merged
into the file as it is at that moment, under the lock, atomically, and also when scoring stops
at a failing image, so the scores computed before it are kept. `stamp` records (mtime_ns, size)
of the image, its `original` label and its sidecar: an entry whose files changed since it was
scored is scored again. Each image is scored on the model thread (`ModelStore.run`).
`ModelScoring` is the MONAI Label scoring method (`POST /scoring/lung_nlb_scores`) that fills it.
"""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
from filelock import FileLock
from monailabel.interfaces.tasks.scoring import ScoringMethod

from lungnlb.labels.lung_region import lung_region
from lib.conf import AppConfig
from lib.images import load_image, load_mask, study_intensity
from lib.model_store import LoadedModel, ModelStore
from lib.trainers.slices import labelled_slices, listed_slices
from lungnlb.data.studies import sidecar_path
from lungnlb.io.atomic import atomic_write_text
from lungnlb.overlap import dice

SCORING_NAME = "lung_nlb_scores"


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """H(p) in bits, 0 at p in {0, 1}, 1 at p = 0.5."""
    p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))


def score_image(loaded: LoadedModel, config: AppConfig, datastore, image_id: str) -> dict[str, float | None]:
    """Disagreement with the original label (None without one) and lung uncertainty of one image."""
    image = load_image(Path(datastore.get_image_uri(image_id)), study_intensity(config, image_id))
    model_input = loaded.predictor.model_input(image.array, image.intensity)
    model_input = model_input if model_input.ndim == 3 else model_input[None]
    volume, _ = loaded.predictor.predict_normalized(model_input)  # one intensity mapping for both uses
    lungs = np.stack([lung_region(plane) for plane in model_input])
    scores: dict[str, float | None] = {"uncertainty": float(binary_entropy(volume[lungs]).mean()), "disagreement": None}
    original = datastore.get_label_uri(image_id, "original")
    if original:
        mask = load_mask(Path(original), image)
        mask = mask if mask.ndim == 3 else mask[None]
        zs = labelled_slices(mask, listed_slices(config, datastore, image_id, "original")) or list(range(mask.shape[0]))
        predicted = volume[zs] > loaded.predictor.threshold
        scores["disagreement"] = 1.0 - dice(predicted, mask[zs])
    return scores


def input_stamp(config: AppConfig, datastore, image_id: str) -> list:
    """(mtime_ns, size) of the files a score depends on: image, original label, sidecar (None if absent)."""
    paths = [datastore.get_image_uri(image_id), datastore.get_label_uri(image_id, "original"),
             sidecar_path(config.studies, image_id)]
    stamps = []
    for path in paths:
        stat = Path(path).stat() if path and Path(path).is_file() else None
        stamps.append([stat.st_mtime_ns, stat.st_size] if stat else None)
    return stamps


class ScoreCache:
    """Scores of the current model version for the images that need them (computed on a miss).

    `score` is the per-image scoring function (`score_image`; replaceable for tests)."""

    def __init__(self, config: AppConfig, store: ModelStore, score: Callable[..., dict] = score_image):
        self.config = config
        self.store = store
        self.score = score

    def scores(self, datastore, image_ids: list[str]) -> tuple[str, dict[str, dict[str, Any]]]:
        """(model version, {image_id: scores}) for `image_ids`, computing and caching missing ones."""
        loaded = self.store.get()
        path = self.config.state_dir / "scores" / f"{loaded.version}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path) + ".lock")
        with lock:
            cached = _read_scores(path)
        stamps = {i: input_stamp(self.config, datastore, i) for i in image_ids}
        fresh: dict[str, dict[str, Any]] = {}
        try:
            for image_id in image_ids:
                if cached.get(image_id, {}).get("inputs") != stamps[image_id]:
                    scores = self.store.run(self.score, loaded, self.config, datastore, image_id)
                    fresh[image_id] = {**scores, "inputs": stamps[image_id]}
        finally:
            if fresh:
                with lock:
                    cached = {**_read_scores(path), **fresh}
                    atomic_write_text(path, json.dumps(cached, indent=1))
        return loaded.version, {i: cached[i] for i in image_ids}


def _read_scores(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


class ModelScoring(ScoringMethod):
    """Scores every image without a final label with the current model (fills the cache)."""

    def __init__(self, cache: ScoreCache):
        super().__init__("Disagreement with the original label and lung uncertainty of the current model")
        self.cache = cache

    def __call__(self, request: dict[str, Any], datastore) -> dict[str, Any]:
        if self.cache.store.checkpoint_path() is None:
            return {"skipped": "no trained weights"}
        version, scores = self.cache.scores(datastore, datastore.get_unlabeled_images())
        return {"model_version": version, "scored": len(scores)}
