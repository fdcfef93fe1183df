"""Two annotators asking for the next sample get different images: every strategy of the app skips the
images MONAI Label lately handed to another client (its `/activelearning` endpoint records the client id
and time in the image's info), served in-process through MONAI Label's own endpoint."""

from __future__ import annotations

import time

import pytest

from app_support import in_process_client
from benchmarks.app_studies import build_studies, tiny_checkpoint


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("handout")
    ids = build_studies(root / "studies", slices_per_file=2, files=2)
    conf = {"checkpoint": str(tiny_checkpoint(root / "tiny")), "model_dir": str(root / "model"),
            "tracking": "none", "device": "cpu"}
    with in_process_client(root / "studies", conf) as client:
        yield client, ids


def _next(client, strategy, client_id):
    response = client.post(f"/activelearning/{strategy}", json={"client_id": client_id})
    assert response.status_code == 200, response.text
    return response.json()


def _set_hand_outs(seconds_ago, only=None, client_id=None):
    """Move the recorded hand-outs (of image `only`, else all) `seconds_ago` into the past; with `client_id`,
    record that client as the one the image went to."""
    from monailabel.interfaces.utils.app import app_instance

    datastore = app_instance().datastore()
    for image_id in [only] if only else datastore.list_images():
        records = datastore.get_image_info(image_id).get("strategy") or {}
        if client_id and not records:
            records = {"disagreement": {"ts": 0, "client_id": client_id}}
        for record in records.values():
            record["ts"] = int(time.time()) - seconds_ago
            record["client_id"] = client_id or record["client_id"]
        if records:
            datastore.update_image_info(image_id, {"strategy": records})


def test_annotators_get_different_images_until_every_image_is_held(served):
    client, ids = served
    candidates = set(ids["slices"])  # disagreement ranks the images with an original label: the 4 slices
    assert len(candidates) == 4
    first = _next(client, "disagreement", "alice")
    assert first["id"] in candidates and "held_by" not in first
    assert _next(client, "disagreement", "alice")["id"] == first["id"]  # her own image is not held from her
    handed = {"alice": first["id"]}
    for name in ("bob", "carol", "dave"):
        picked = _next(client, "disagreement", name)
        assert picked["id"] not in handed.values() and "held_by" not in picked, (name, picked, handed)
        handed[name] = picked["id"]
    assert set(handed.values()) == candidates
    late = _next(client, "disagreement", "erin")  # every image held: she still gets one, and is told by whom
    assert late["id"] in candidates and late["held_by"] == [n for n, i in handed.items() if i == late["id"]]
    # the other strategies skip them too: uncertainty also ranks the unlabelled volume, the one free image
    assert _next(client, "uncertainty", "frank")["id"] == ids["volumes"][0]


def test_random_skips_held_images_and_holds_expire(served):
    from lib.activelearning.handout import HOLD_SECONDS

    client, ids = served
    _set_hand_outs(HOLD_SECONDS + 1)  # every hold has run out ...
    held = ids["slices"][0]
    _set_hand_outs(0, only=held, client_id="alice")  # ... but alice's, just handed out
    picks = [_next(client, "random", "zoe")["id"] for _ in range(10)]
    assert held not in picks and len(set(picks)) > 1, picks
    assert _next(client, "random", "alice")["id"] in set(ids["slices"]) | set(ids["volumes"])
    _set_hand_outs(HOLD_SECONDS + 1, only=held)
    # free again; MONAI Label's Random weighs an image by the time since `random` last handed it out: now first
    assert held in [_next(client, "random", "yuri")["id"] for _ in range(3)]
