"""The LungNLB app as a real `monailabel start_server` subprocess on a loopback port."""

from __future__ import annotations

import json
import time

import pytest
import requests

from benchmarks.app_server import start_server, stop_server
from benchmarks.app_studies import build_studies, tiny_checkpoint


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("lungnlb_server")
    ids = build_studies(root / "studies", slices_per_file=2, files=1)
    checkpoint = tiny_checkpoint(root / "ckpt" / "tiny")
    conf = {"checkpoint": str(checkpoint), "model_dir": str(root / "model"), "device": "cpu"}
    process, url = start_server(root / "studies", conf, root / "server.log")
    try:
        yield {"url": url, "root": root, **ids}
    finally:
        stop_server(process)


def test_real_server_info_infer_and_bad_input(server):
    url = server["url"]
    info = requests.get(f"{url}/info/", timeout=30).json()
    assert info["lungnlb"]["weights"]["trained"] and "lung_nlb_seg" in info["models"]
    image_id = server["slices"][0]
    response = requests.post(f"{url}/infer/lung_nlb_seg", params={"image": image_id, "output": "json"}, timeout=120)
    assert response.status_code == 200, response.text
    assert len(response.json()["slice_probabilities"]) == 1
    box = json.dumps({"box": [200, 200, 260, 260]})
    response = requests.post(f"{url}/infer/lung_watershed", params={"image": image_id, "output": "image"},
                             data={"params": box}, timeout=60)
    assert response.status_code == 200 and len(response.content) > 0
    response = requests.post(f"{url}/infer/lung_nlb_seg", params={"image": "../secret"}, timeout=30)
    assert response.status_code == 400 and "not valid" in response.json()["detail"]
    assert requests.get(f"{url}/info/", timeout=30).status_code == 200


def test_real_server_async_training_publishes(server):
    """Async training runs in a subprocess of the server; the server picks up the published weights."""
    url = server["url"]
    before = requests.get(f"{url}/info/", timeout=30).json()["lungnlb"]["weights"]["version"]
    # force: two slices give fewer validation slices than the publish gate needs; this test is about the subprocess
    params = {"max_epochs": 1, "train_batch_size": 4, "val_split": 0.5, "original_weight": 1.0, "tracking": "none",
              "force": True}
    response = requests.post(f"{url}/train/lung_nlb_seg", json=params, timeout=30)
    assert response.status_code == 200, response.text
    deadline = time.monotonic() + 240
    status = {}
    while time.monotonic() < deadline:
        status = requests.get(f"{url}/train/", timeout=30).json()
        if status.get("status") in ("DONE", "ERROR"):
            break
        time.sleep(2)
    assert status.get("status") == "DONE", f"train task: {status}; log tail:\n{(server['root'] / 'server.log').read_text()[-2000:]}"
    weights = requests.get(f"{url}/info/", timeout=30).json()["lungnlb"]["weights"]
    assert weights["source"] == "published by training" and weights["version"] != before
