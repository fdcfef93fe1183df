"""Which images were lately handed to another annotator, so that two annotators do not label one image.

MONAI Label's `/activelearning/<strategy>` endpoint records every image it hands out in the image's
info: ``info["strategy"][<strategy>] = {"ts": <unix seconds>, "client_id": <the request's client_id,
else the user name>}`` (monailabel 0.8.5, `endpoints/activelearning.py`). The request the strategy
sees carries the asking client's `client_id`. An image handed to a different, non-empty client id by
any strategy within `HOLD_SECONDS` is *held*: the app's strategies pick among the other images first.
When every candidate is held, they pick among all (two annotators on one image beat an idle one) and
say so (`held_by`).

A hold ends when its annotator submits a `final` label (the image leaves the candidates), when
`HOLD_SECONDS` pass, or when the image is handed to someone else.
"""

from __future__ import annotations

import time
from typing import Any

HOLD_SECONDS = 30 * 60


def holders(datastore, image_id: str, client_id: str | None, now: float | None = None,
            hold: float | None = None) -> set[str]:
    """The other client ids `image_id` was handed to within `hold` (`HOLD_SECONDS`) seconds (empty: free for `client_id`)."""
    now = time.time() if now is None else now
    hold = HOLD_SECONDS if hold is None else hold
    records = (datastore.get_image_info(image_id) or {}).get("strategy") or {}
    found = set()
    for record in records.values() if isinstance(records, dict) else ():
        if not isinstance(record, dict):
            continue
        other, ts = record.get("client_id"), record.get("ts")
        if other and other != client_id and isinstance(ts, (int, float)) and 0 <= now - ts < hold:
            found.add(str(other))
    return found


def free_candidates(datastore, candidates: list[str], request: dict[str, Any]) -> tuple[list[str], dict[str, list[str]]]:
    """(the candidates not held for another client, or all of them when every one is held; {held id: holders})."""
    client_id = request.get("client_id")
    held = {}
    for image_id in candidates:
        others = holders(datastore, image_id, client_id)
        if others:
            held[image_id] = sorted(others)
    free = [image_id for image_id in candidates if image_id not in held]
    return (free, held) if free else (list(candidates), held)
