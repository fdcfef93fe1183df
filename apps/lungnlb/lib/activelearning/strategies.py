"""Active-learning strategies over the images without a `final` label.

    disagreement  highest 1 - Dice(model, original label): the watershed labels most in need of correction
    uncertainty   highest mean binary entropy of the mask probability inside the lungs
    random        MONAI Label's `Random` (kept as is)

The answer is the best image (`id`, `score`) plus `top_k`: the request's `top_k` best (default 1)
as [{"id", "score"}], and the `model_version` the scores belong to.
"""

from __future__ import annotations

from typing import Any

from monailabel.interfaces.tasks.strategy import Strategy

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
        version, scores = self.cache.scores(datastore, candidates)
        ranked = sorted(
            ((i, s[self.key]) for i, s in scores.items() if s[self.key] is not None), key=lambda item: (-item[1], item[0])
        )
        if not ranked:
            return None
        best = [{"id": i, "score": round(float(score), 6)} for i, score in ranked[:top_k]]
        return {"id": best[0]["id"], "score": best[0]["score"], "top_k": best, "model_version": version}


def _top_k(value: Any) -> int:
    try:
        k = int(value)
    except (TypeError, ValueError) as error:
        raise bad_request(f"top_k must be a positive integer, got {value!r}") from error
    if k < 1:
        raise bad_request(f"top_k must be a positive integer, got {k}")
    return k
