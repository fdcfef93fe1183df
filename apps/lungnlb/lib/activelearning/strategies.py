"""Active-learning strategies over the images without a `final` label.

    disagreement  highest 1 - Dice(model, original label): the watershed labels most in need of correction
    uncertainty   highest mean binary entropy of the mask probability inside the lungs
    random        a random image; those `random` handed out least recently weigh most

Every strategy skips the images lately handed to another annotator (`lib/activelearning/handout.py`).
The answer is the best image (`id`, `score`) plus `top_k`: the request's `top_k` best (default 1)
as [{"id", "score"}], and the `model_version` the scores belong to; `held_by` when every candidate
was held by another annotator.
"""

from __future__ import annotations

import random
import time
from typing import Any

from monailabel.interfaces.tasks.strategy import Strategy

from lib.activelearning.handout import free_candidates
from lib.activelearning.scores import ScoreCache
from lib.errors import bad_request


class ScoreRankStrategy(Strategy):
    """Ranks unlabelled images by one cached score, highest first."""

    def __init__(self, key: str, description: str, cache: ScoreCache):
        super().__init__(description)
        self.key = key
        self.cache = cache

    def __call__(self, request: dict[str, Any], datastore) -> dict[str, Any] | None:
        top_k = _top_k(request.get("top_k", 1))
        candidates = datastore.get_unlabeled_images()
        if self.key == "disagreement":
            candidates = [i for i in candidates if datastore.get_label_uri(i, "original")]
        if not candidates:
            return None
        candidates, held = free_candidates(datastore, candidates, request)
        version, scores = self.cache.scores(datastore, candidates)
        ranked = sorted(
            ((i, s[self.key]) for i, s in scores.items() if s[self.key] is not None), key=lambda item: (-item[1], item[0])
        )
        if not ranked:
            return None
        best = [{"id": i, "score": round(float(score), 6)} for i, score in ranked[:top_k]]
        answer = {"id": best[0]["id"], "score": best[0]["score"], "top_k": best, "model_version": version}
        if best[0]["id"] in held:
            answer["held_by"] = held[best[0]["id"]]
        return answer


class FreeRandom(Strategy):
    """A random image among those not lately handed to another annotator, weighted by the seconds since
    `random` last handed it out (never: the current time), at least 1 each: MONAI Label's `Random`
    weighs them the same way but fails (500) once every candidate went out within the same second."""

    def __init__(self):
        super().__init__("Random image not handed to another annotator lately; least recently handed out first")

    def __call__(self, request: dict[str, Any], datastore) -> dict[str, Any] | None:
        candidates = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not candidates:
            return None
        candidates, held = free_candidates(datastore, sorted(candidates), request)
        now = time.time()
        weights = []
        for image_id in candidates:
            record = (datastore.get_image_info(image_id).get("strategy") or {}).get(request.get("strategy", "random"))
            last = record.get("ts", 0) if isinstance(record, dict) else 0
            weights.append(max(1.0, now - float(last or 0)))
        image_id = random.choices(candidates, weights=weights)[0]
        answer = {"id": image_id, "weight": weights[candidates.index(image_id)]}
        if image_id in held:
            answer["held_by"] = held[image_id]
        return answer


def _top_k(value: Any) -> int:
    try:
        k = int(value)
    except (TypeError, ValueError) as error:
        raise bad_request(f"top_k must be a positive integer, got {value!r}") from error
    if k < 1:
        raise bad_request(f"top_k must be a positive integer, got {k}")
    return k
