"""Fault suite (issue 15): the server killed with SIGKILL while it saves a final label, while it
trains and right after training published a model, and a studies folder on a full disk (a small
tmpfs). Each leaves the stored data intact and the restarted server healthy.

The kill tests run the real `monailabel start_server`; the full-disk test mounts a tmpfs, which
needs root (the test fails, it does not skip, without it)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from app_support import studies_snapshot
from benchmarks.app_server import start_server, stop_server
from benchmarks.app_studies import build_studies, tiny_checkpoint
from test_security_training import _alive, _running_trainer, _volume_studies, _wait


def _kill9(process: subprocess.Popen) -> None:
    process.kill()
    process.wait(timeout=60)


def _final_voxels(studies: Path, image_id: str) -> np.ndarray | None:
    path = studies / "labels" / "final" / f"{image_id}.nii.gz"
    return np.asarray(nib.load(path).dataobj) if path.is_file() else None


def _stored_state_is_consistent(studies: Path) -> dict:
    """What every restart must find: the datastore JSON and every history parse, every version a
    history names exists and loads, and no temporary file is listed as an image or a label."""
    datastore = json.loads((studies / "datastore_v2.json").read_text())
    for history_file in (studies / ".lungnlb" / "labels").glob("*/history.json"):
        for record in json.loads(history_file.read_text()):
            np.asarray(nib.load(history_file.parent / record["file"]).dataobj)
    listed = json.dumps(datastore["objects"])
    assert ".tmp" not in listed, "a temporary file is listed in the datastore"
    return datastore


# ---- kill -9 during a final label save ---------------------------------------------------------
def _long_volume_studies(root: Path, repeats: int = 8) -> tuple[str, tuple, np.ndarray]:
    """One CT volume (the LIDC series repeated along z) whose labels take a while to save."""
    build_studies(root, slices_per_file=1, files=1)
    source = nib.load(root / "volume_0.nii.gz")
    data = np.concatenate([np.asarray(source.dataobj)] * repeats, axis=2)
    nib.save(nib.Nifti1Image(data.astype(np.float32), source.affine), root / "volume_long.nii.gz")
    (root / "meta" / "volume_long.json").write_text(json.dumps({"source": "test", "case": "long", "intensity": "hu"}))
    return "volume_long", data.shape, source.affine


def _label_upload(shape: tuple, affine: np.ndarray, seed: int, path: Path) -> np.ndarray:
    """A noisy label (it compresses slowly, so the save lasts) written to `path`; its voxels returned."""
    mask = (np.random.default_rng(seed).random(shape) > 0.5).astype(np.uint8)
    nib.save(nib.Nifti1Image(mask, affine), path)
    return mask


def _save(url: str, image_id: str, label: Path, user: str) -> requests.Response:
    with label.open("rb") as stream:
        return requests.put(f"{url}/datastore/label?image={image_id}&tag=final", files={"label": ("label.nii.gz", stream)},
                            data={"params": json.dumps({"user": user})}, timeout=600)


def _temporary_file_in(folder: Path, prefix: str):
    """A predicate: an atomic write's temporary file (`.<name>.<random>.tmp`) starting with `prefix` exists in `folder`."""
    def present() -> bool:
        try:
            return any(name.startswith(prefix) and name.endswith(".tmp") for name in os.listdir(folder))
        except FileNotFoundError:
            return False
    return present


def test_kill_9_during_a_final_label_save_leaves_the_old_or_the_new_label(tmp_path):
    studies = tmp_path / "studies"
    image_id, shape, affine = _long_volume_studies(studies)
    conf = {"checkpoint": "none", "model_dir": str(tmp_path / "model"), "device": "cpu", "tracking": "none"}
    old = _label_upload(shape, affine, 0, tmp_path / "old.nii.gz")
    versions = studies / ".lungnlb" / "labels" / image_id
    kill_points = {  # where the save is when the server is killed
        "receiving the upload": lambda: True,
        "writing the version file": _temporary_file_in(versions, ".final_v"),
        "writing the final label": _temporary_file_in(studies / "labels" / "final", f".{image_id}.nii.gz"),
    }
    process, url = start_server(studies, conf, tmp_path / "server0.log")
    assert _save(url, image_id, tmp_path / "old.nii.gz", "first").status_code == 200
    outcomes = {}
    for attempt, (point, reached) in enumerate(kill_points.items()):
        new = _label_upload(shape, affine, attempt + 1, tmp_path / "new.nii.gz")
        answered: list = []
        request = threading.Thread(target=lambda: answered.append(_try(_save, url, image_id, tmp_path / "new.nii.gz", f"k{attempt}")))
        request.start()
        while not reached() and request.is_alive():
            time.sleep(0.001)
        _kill9(process)
        request.join(timeout=120)
        assert answered and answered[0] is None, f"the save finished before the kill point '{point}' was seen: {answered}"
        _stored_state_is_consistent(studies)
        stored = _final_voxels(studies, image_id)
        assert stored is not None and (np.array_equal(stored, old) or np.array_equal(stored, new)), \
            f"killed while {point}: the final label is neither the old nor the new one"
        outcomes[point] = "new" if np.array_equal(stored, new) else "old"
        old = new if outcomes[point] == "new" else old
        process, url = start_server(studies, conf, tmp_path / f"server{attempt + 1}.log")
        assert requests.get(f"{url}/info/", timeout=60).status_code == 200
        assert requests.get(f"{url}/datastore/label?label={image_id}&tag=final", timeout=60).status_code == 200
    try:  # the restarted server takes the next submission
        again = _label_upload(shape, affine, 99, tmp_path / "again.nii.gz")
        assert _save(url, image_id, tmp_path / "again.nii.gz", "after").status_code == 200
        assert np.array_equal(_final_voxels(studies, image_id), again)
        history = json.loads((versions / "history.json").read_text())
        assert history[-1]["user"] == "after"
    finally:
        stop_server(process)
    print(f"kill -9 during a final label save: the final label afterwards was {outcomes}")


def _try(call, *args):
    try:
        response = call(*args)
        return response.status_code
    except requests.RequestException:
        return None


# ---- kill -9 during training and right after a publish -----------------------------------------
def _train_conf(tmp_path: Path) -> dict[str, str]:
    return {"checkpoint": str(tiny_checkpoint(tmp_path / "ckpt" / "tiny")), "model_dir": str(tmp_path / "model"),
            "tracking": "none", "device": "cpu"}


def _healthy_after_restart(tmp_path: Path, studies: Path, conf: dict, log: str) -> dict:
    process, url = start_server(studies, conf, tmp_path / log)
    try:
        info = requests.get(f"{url}/info/", timeout=60)
        assert info.status_code == 200
        infer = requests.post(f"{url}/infer/lung_nlb_seg?image=volume_a&output=json", timeout=600)
        assert infer.status_code == 200, infer.text
        return info.json()
    finally:
        stop_server(process)


def _data_files(studies: Path) -> dict[str, str]:
    """The studies folder's images, labels and datastore JSON (not the app's run state)."""
    return {name: digest for name, digest in studies_snapshot(studies).items() if not name.startswith(".lungnlb")}


def test_kill_9_during_training_leaves_studies_and_served_model_unchanged(tmp_path):
    studies = tmp_path / "studies"
    _volume_studies(studies)
    conf = _train_conf(tmp_path)
    process, url = start_server(studies, conf, tmp_path / "server.log")
    try:
        before_weights = requests.get(f"{url}/info/", timeout=60).json()["lungnlb"]["weights"]
        before = _data_files(studies)
        params = {"max_epochs": 100000, "val_split": 0.5, "learning_rate": 1e-3, "train_batch_size": 2}
        assert requests.post(f"{url}/train/lung_nlb_seg", json=params, timeout=60).status_code == 200
        trainer = _running_trainer(studies / ".lungnlb" / "trainer.lock")
        time.sleep(3)
    finally:
        _kill9(process)
    _wait(lambda: not _alive(trainer), 60, "the trainer to end with its server")
    assert _data_files(studies) == before
    info = _healthy_after_restart(tmp_path, studies, conf, "server2.log")
    assert info["lungnlb"]["weights"]["version"] == before_weights["version"]
    assert "ended without finishing" in " ".join(info.get("warnings", []))


def test_kill_9_right_after_a_publish_serves_the_published_model(tmp_path):
    from lungnlb.inference import Predictor

    studies = tmp_path / "studies"
    _volume_studies(studies)
    conf = _train_conf(tmp_path)
    published = tmp_path / "model" / "lung_nlb_seg.pt"
    process, url = start_server(studies, conf, tmp_path / "server.log")
    try:
        params = {"max_epochs": 1, "val_split": 0.5, "learning_rate": 1e-3, "train_batch_size": 2, "force": True}
        assert requests.post(f"{url}/train/lung_nlb_seg", json=params, timeout=60).status_code == 200
        _wait(lambda: published.is_file(), 600, "training to publish")
    finally:
        _kill9(process)  # at once: the trainer may still be writing its stats
    Predictor.from_checkpoint(published)  # weights and config beside them load together
    info = _healthy_after_restart(tmp_path, studies, conf, "server2.log")
    weights = info["lungnlb"]["weights"]
    assert weights["source"] == "published by training", weights
    _stored_state_is_consistent(studies)


# ---- a full studies disk -----------------------------------------------------------------------
@pytest.fixture()
def small_disk(tmp_path):
    """A 48 MiB tmpfs mounted for the test (root only)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    assert os.geteuid() == 0, "the full-disk test mounts a tmpfs, which needs root"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], check=True, timeout=30)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], timeout=30)


def _fill(disk: Path) -> Path:
    filler = disk / "filler.bin"
    chunk = b"\0" * (1 << 16)
    with filler.open("wb") as stream:
        try:
            while True:
                stream.write(chunk)
                stream.flush()
        except OSError as error:
            assert error.errno == errno.ENOSPC
    return filler


def test_a_full_studies_disk_answers_507_and_changes_nothing(tmp_path, small_disk):
    studies = small_disk / "studies"
    ids = build_studies(studies, slices_per_file=2, files=1)["slices"]
    conf = {"checkpoint": str(tiny_checkpoint(tmp_path / "ckpt" / "tiny")), "model_dir": str(tmp_path / "model"),
            "device": "cpu", "tracking": "none"}
    label_bytes = (studies / "labels" / "original" / f"{ids[0]}.nii.gz").read_bytes()
    image_bytes = (studies / f"{ids[0]}.nii.gz").read_bytes()
    process, url = start_server(studies, conf, tmp_path / "server.log")
    try:
        filler = _fill(small_disk)
        before = {k: v for k, v in studies_snapshot(studies).items()}
        saved = requests.put(f"{url}/datastore/label?image={ids[0]}&tag=final", files={"label": ("l.nii.gz", label_bytes)},
                             data={"params": json.dumps({"user": "full"})}, timeout=120)
        assert saved.status_code == 507 and "disk is full" in saved.json()["detail"], saved.text
        added = requests.put(f"{url}/datastore/image?image=new_image", files={"file": ("i.nii.gz", image_bytes)}, timeout=120)
        assert added.status_code == 507 and "disk is full" in added.json()["detail"], added.text
        inferred = requests.post(f"{url}/infer/lung_nlb_seg?image={ids[1]}&output=json", timeout=300)
        assert inferred.status_code in (200, 507), inferred.text  # the answer needs no studies space
        assert studies_snapshot(studies) == before
        assert requests.get(f"{url}/info/", timeout=60).status_code == 200
    finally:
        _kill9(process)
    _stored_state_is_consistent(studies)
    process, url = start_server(studies, conf, tmp_path / "server_full.log")  # restarts on the full disk
    try:
        assert requests.get(f"{url}/datastore/?output=all", timeout=60).status_code == 200
        filler.unlink()
        saved = requests.put(f"{url}/datastore/label?image={ids[0]}&tag=final", files={"label": ("l.nii.gz", label_bytes)},
                             data={"params": json.dumps({"user": "room"})}, timeout=120)
        assert saved.status_code == 200, saved.text
        assert (studies / "labels" / "final" / f"{ids[0]}.nii.gz").is_file()
    finally:
        stop_server(process)
    assert shutil.disk_usage(small_disk).free > 0
