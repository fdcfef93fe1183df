"""Training that cannot make things worse: the publish gate, one run at a time, and no trainer
that outlives its server (issue 15)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from benchmarks.app_server import APP_DIR, start_server, stop_server
from benchmarks.app_studies import build_studies, tiny_checkpoint

from lungnlb.training.publish import MIN_VALIDATION_SLICES, decide_publication


# ---- the gate itself --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "candidate, incumbent, slices, kwargs, publish, says",
    [
        (0.71, 0.70, 12, {}, True, "> 0.7000"),
        (0.70, 0.70, 12, {}, False, "equals"),  # a tie keeps the model in use
        (0.20, 0.70, 12, {}, False, "is below"),
        (0.90, 0.10, MIN_VALIDATION_SLICES - 1, {}, False, "only 9 validation slice(s)"),
        (0.90, None, 12, {}, True, "no model was in use"),
        (0.90, None, 3, {}, False, "trained but not published"),
        (0.90, 0.10, 12, {"weights_finite": False}, False, "not finite"),
        (float("nan"), 0.10, 12, {}, False, "not a number"),
        (0.10, 0.90, 2, {"force": True}, True, "force"),
    ],
)
def test_publish_gate_decisions(candidate, incumbent, slices, kwargs, publish, says):
    decision = decide_publication(candidate, incumbent, slices, **kwargs)
    assert decision.publish is publish and says in decision.reason
    record = decision.as_record()
    assert record["val_slices"] == slices and record["incumbent_dice"] == incumbent


# ---- the gate in the app's trainer ------------------------------------------------------------
def _volume_studies(root: Path) -> list[str]:
    """Two CT volumes (copies of the LIDC series) with an `original` label on 12 slices each, so that
    the held-out volume gives the gate enough validation slices."""
    build_studies(root, slices_per_file=1, files=1)
    source = nib.load(root / "volume_0.nii.gz")
    ids = []
    for name in ("volume_a", "volume_b"):
        (root / f"{name}.nii.gz").write_bytes((root / "volume_0.nii.gz").read_bytes())
        mask = np.zeros(source.shape, dtype=np.uint8)
        mask[200:260, 220:280, 2:14] = 1  # NIfTI (i, j, k): a blob on slices 2..13
        nib.save(nib.Nifti1Image(mask, source.affine), root / "labels" / "original" / f"{name}.nii.gz")
        meta = {"source": "test", "case": name, "intensity": "hu", "labelled_slices": list(range(2, 14))}
        (root / "meta" / f"{name}.json").write_text(json.dumps(meta))
        ids.append(name)
    (root / "volume_0.nii.gz").unlink()
    (root / "meta" / "volume_0.json").unlink()
    return ids


@pytest.fixture(autouse=True)
def no_scoring_calls(monkeypatch):
    """Training in-process, MONAI Label would ask a server on port 8000 to rescore the images."""
    from monailabel.config import settings

    monkeypatch.setattr(settings, "MONAI_LABEL_AUTO_UPDATE_SCORING", False)


@pytest.fixture()
def volume_app(tmp_path):
    from main import LungNLBApp

    _volume_studies(tmp_path / "studies")
    conf = {"checkpoint": str(tiny_checkpoint(tmp_path / "ckpt" / "tiny")), "model_dir": str(tmp_path / "model"),
            "tracking": "none", "device": "cpu", "original_weight": "1.0"}
    return LungNLBApp(str(APP_DIR), str(tmp_path / "studies"), conf)


def test_a_diverging_run_leaves_the_served_model_unchanged(volume_app):
    app = volume_app
    image_id = "volume_a"
    before = app.info()["lungnlb"]["weights"]
    served = app.infer({"model": "lung_nlb_seg", "image": image_id})["params"]
    stats = app.train({"model": "lung_nlb_seg", "learning_rate": 1e30, "max_epochs": 1, "train_batch_size": 8,
                       "val_split": 0.5})
    decision = stats["publish"]
    assert stats["total_epochs"] == 1 and decision["val_slices"] >= MIN_VALIDATION_SLICES
    assert decision["publish"] is False and "not published" in decision["reason"], decision
    assert stats["published"] is None and not app.app_config.published_checkpoint.exists()
    after = app.info()["lungnlb"]["weights"]
    assert after["version"] == before["version"] and after["source"] == "initial checkpoint"
    again = app.infer({"model": "lung_nlb_seg", "image": image_id})["params"]
    assert again["slice_probabilities"] == served["slice_probabilities"]


def test_too_few_validation_slices_train_but_do_not_publish(tmp_path):
    from main import LungNLBApp

    build_studies(tmp_path / "studies", slices_per_file=2, files=2)  # 2D slices: one slice per held-out image
    conf = {"checkpoint": str(tiny_checkpoint(tmp_path / "ckpt" / "tiny")), "model_dir": str(tmp_path / "model"),
            "tracking": "none", "device": "cpu"}
    app = LungNLBApp(str(APP_DIR), str(tmp_path / "studies"), conf)
    stats = app.train({"model": "lung_nlb_seg", "learning_rate": 1e-3, "max_epochs": 1, "train_batch_size": 4,
                       "val_split": 0.5})
    assert stats["total_epochs"] == 1 and stats["publish"]["publish"] is False
    assert "trained but not published" in stats["publish"]["reason"] and not app.app_config.published_checkpoint.exists()


def test_one_training_run_at_a_time(volume_app):
    from fastapi import HTTPException

    from lib.trainers.guard import TrainerLock

    lock = TrainerLock(volume_app.app_config.state_dir)
    with lock.hold({"pid": 12345, "run_id": "running"}):
        assert lock.is_held()
        with pytest.raises(HTTPException) as error:
            volume_app.train({"model": "lung_nlb_seg", "max_epochs": 1, "val_split": 0.5})
        assert error.value.status_code == 409 and "already running" in error.value.detail
    assert not lock.is_held() and lock.record() is None  # a finished run leaves no record


def test_training_parameters_are_checked_before_the_run(volume_app):
    from fastapi import HTTPException

    for bad, key in (({"learning_rate": float("inf")}, "learning_rate"), ({"max_epochs": "abc"}, "max_epochs"),
                     ({"train_batch_size": 0}, "train_batch_size"), ({"device": "bogus"}, "device"),
                     ({"val_split": 1.0}, "val_split")):
        with pytest.raises(HTTPException) as error:
            volume_app.train({"model": "lung_nlb_seg", **bad})
        assert error.value.status_code == 400 and key in error.value.detail
    assert not volume_app.app_config.train_stats_path.exists()  # nothing ran


# ---- a trainer dies with its server ----------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def _wait(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _running_trainer(lock_path: Path) -> int:
    def record():
        text = lock_path.read_text() if lock_path.is_file() else ""
        return json.loads(text) if text.strip() else None

    return _wait(lambda: (record() or {}).get("pid"), 240, "the training subprocess to take the lock")


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_trainer_dies_with_its_server_and_the_next_server_reports_it(tmp_path, how):
    _volume_studies(tmp_path / "studies")
    conf = {"checkpoint": str(tiny_checkpoint(tmp_path / "ckpt" / "tiny")), "model_dir": str(tmp_path / "model"),
            "tracking": "none", "device": "cpu"}
    process, url = start_server(tmp_path / "studies", conf, tmp_path / "server.log")
    try:
        params = {"max_epochs": 100000, "val_split": 0.5, "learning_rate": 1e-4, "train_batch_size": 2}
        response = requests.post(f"{url}/train/lung_nlb_seg", json=params, timeout=30)
        assert response.status_code == 200, response.text
        trainer = _running_trainer(tmp_path / "studies" / ".lungnlb" / "trainer.lock")
        assert _alive(trainer) and trainer != process.pid
        second = requests.post(f"{url}/train/lung_nlb_seg", json=params, timeout=30)
        assert second.status_code in (409, 429), second.text  # one run at a time
        process.send_signal(getattr(signal, how))
        process.wait(timeout=60)
        _wait(lambda: not _alive(trainer), 30, f"the trainer (pid {trainer}) to end after the server's {how}")
    finally:
        if process.poll() is None:
            process.kill()
    process, url = start_server(tmp_path / "studies", conf, tmp_path / "server2.log")
    try:
        info = requests.get(f"{url}/info/", timeout=30).json()
        warnings = " ".join(info.get("warnings", []))
        if how == "SIGKILL":  # killed mid-run: the next server says which run did not finish
            assert "ended without finishing" in warnings, info.get("warnings")
        assert "still running" not in warnings
        assert requests.post(f"{url}/train/lung_nlb_seg", json={"max_epochs": 1, "val_split": 0.5,
                                                                 "tracking": "none"}, timeout=30).status_code == 200
    finally:
        stop_server(process)


def test_a_trainer_left_running_is_stopped_and_reported_at_start_up(tmp_path):
    """A trainer whose server died but which kept running (its watch failed) holds the lock: the next
    server stops it and says so (its command line names MONAI Label's task module, as a real one's does)."""
    from lib.trainers.guard import TASK_MODULE

    build_studies(tmp_path / "studies", slices_per_file=1, files=1)
    lock = tmp_path / "studies" / ".lungnlb" / "trainer.lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, json, os, sys, time\n"
        f"f = open({str(lock)!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
        "f.write(json.dumps({'pid': os.getpid(), 'run_id': 'orphan', 'started': 'earlier'})); f.flush()\n"
        "print('held', flush=True); time.sleep(600)\n"), TASK_MODULE], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        conf = {"checkpoint": "none", "model_dir": str(tmp_path / "model")}
        process, url = start_server(tmp_path / "studies", conf, tmp_path / "server.log")
        try:
            holder.wait(timeout=30)
            warnings = " ".join(requests.get(f"{url}/info/", timeout=30).json().get("warnings", []))
            assert "orphan" in warnings and "still running" in warnings and "it was stopped" in warnings, warnings
        finally:
            stop_server(process)
    finally:
        if holder.poll() is None:
            holder.kill()


LOCK_HOLDER = """import fcntl, json, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a trainer that does not stop when asked
stream = open(sys.argv[1], "a+")
fcntl.flock(stream, fcntl.LOCK_EX)
stream.write(json.dumps({"pid": 1, "run_id": "left"}))  # a stale pid in the record
stream.flush()
print("locked", flush=True)
time.sleep(600)
"""


def _hold_lock(path: Path, *extra: str) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(path), *extra], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    return child


def test_a_leftover_trainer_is_found_by_its_lock_and_killed_when_it_ignores_sigterm(tmp_path):
    """The process holding the lock is signalled (not the record's pid), SIGKILL follows an ignored
    SIGTERM; a lock holder that is not a MONAI Label task is never signalled."""
    from lib.trainers.guard import TASK_MODULE, TrainerLock, lock_holders, reclaim_at_startup

    lock = TrainerLock(tmp_path / ".lungnlb")
    lock.path.parent.mkdir(parents=True)
    stranger = _hold_lock(lock.path)
    try:
        assert lock_holders(lock.path) == [stranger.pid]
        messages = reclaim_at_startup(lock, wait_s=0.5)
        assert "could not be stopped" in messages[0] and stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait(timeout=30)
    trainer = _hold_lock(lock.path, TASK_MODULE)  # its command line names MONAI Label's task module
    try:
        messages = reclaim_at_startup(lock, wait_s=0.5)
        assert trainer.wait(timeout=30) == -signal.SIGKILL
        assert "it was stopped" in messages[0] and str(trainer.pid) in messages[0]
        assert not lock.is_held()
    finally:
        if trainer.poll() is None:
            trainer.kill()
