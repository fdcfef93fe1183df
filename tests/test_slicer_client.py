"""The Slicer extension's client and workflow (LungNLBLib) against a REAL MONAI Label server running apps/lungnlb.

The server is started once for this file (`python -m monailabel.main start_server`, i.e. `monailabel
start_server`) on a free port, on a small studies folder built from the real LIDC data in ../shared/data
(2D slices with their radiologist masks as `original` labels, and one CT volume), with a small NLB U-Net
checkpoint (random weights) as the initial model. It is killed in the fixture's finaliser.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from LungNLBLib.client import MonaiLabelClient
from LungNLBLib.errors import RequestRejectedError, ServerTimeoutError, ServerUnavailableError
from LungNLBLib.nifti import read_nifti_bytes
from LungNLBLib.probability import probability_at
from LungNLBLib.session import AnnotationSession, SubmissionPending, describe_training, training_active

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "apps" / "lungnlb"
SHARED_DATA = REPO.parent / "shared" / "data"
SMALL_MODEL = {"name": "unet_sl_nlb", "kwargs": {"features": [8, 8, 16, 16, 32, 8]}, "in_channels": 1}
SMALL_INPUT = [128, 128]
STARTUP_TIMEOUT_S = 180
TRAIN_TIMEOUT_S = 300
pytestmark = pytest.mark.slow  # one real server start and a training run, each beyond the slow marker's bound

ATTRIBUTION = "Armato SG III et al., Data From LIDC-IDRI, TCIA 2015, doi:10.7937/K9/TCIA.2015.LO9QL9SX (CC BY 3.0)"


# -- fixtures: studies folder, initial weights, the server --------------------------------------------------


def build_studies(root: Path) -> dict:
    """Two LIDC slices (2D, radiologist `original` masks) and the first LIDC CT series as a volume."""
    from lungnlb.io import list_dicom_series, read_dicom_series, read_npz_slices, write_nifti

    lidc = SHARED_DATA / "lidc-idri"
    if not lidc.is_dir():
        raise FileNotFoundError(f"{lidc} is missing: these tests need the shared LIDC data (../shared/data/README.md)")
    (root / "labels" / "original").mkdir(parents=True)
    (root / "meta").mkdir()
    slices = []
    for npz in sorted((lidc / "slices").glob("*.npz"))[:2]:
        item = max(read_npz_slices(npz), key=lambda s: int(s.mask.sum()))  # the slice with the largest nodule
        image_id = f"{item.patient}_slice"
        write_nifti(item.image.array, item.image.affine, root / f"{image_id}.nii.gz")
        mask_path = root / "labels" / "original" / f"{image_id}.nii.gz"
        write_nifti(item.mask.astype(np.uint8), item.image.affine, mask_path, dtype=np.uint8)
        _sidecar(root, image_id, item.image.intensity, [0], item.patient)
        slices.append(image_id)
    volume = read_dicom_series(list_dicom_series(lidc / "dicom")[0])
    write_nifti(volume.array, volume.affine, root / "ct_volume.nii.gz")
    _sidecar(root, "ct_volume", "hu", [], "volume")
    return {"slices": slices, "volume": "ct_volume"}


def _sidecar(root: Path, image_id: str, intensity: str, labelled: list, case: str) -> None:
    meta = {"source": "lidc-idri", "case": case, "intensity": intensity, "labelled_slices": labelled,
            "label_method": "radiologist" if labelled else None, "attribution": ATTRIBUTION}
    (root / "meta" / f"{image_id}.json").write_text(json.dumps(meta), encoding="utf-8")


def initial_checkpoint(path: Path) -> Path:
    import torch

    from lungnlb.checkpoint import save_checkpoint
    from lungnlb.networks import build_model

    torch.manual_seed(0)
    model = build_model(SMALL_MODEL["name"], **SMALL_MODEL["kwargs"])
    config = {"model": SMALL_MODEL, "input_size": SMALL_INPUT, "intensity": {"window": None}, "threshold": 0.5}
    return save_checkpoint(path, model, config)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    def __init__(self, root: Path):
        self.root = root
        self.studies = root / "studies"
        self.ids = build_studies(self.studies)
        checkpoint = initial_checkpoint(root / "initial" / "lung_nlb_seg")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = root / "server.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), str(APP_DIR), env.get("PYTHONPATH", "")) if p)
        command = [
            sys.executable, "-m", "monailabel.main", "start_server",
            "--app", str(APP_DIR), "--studies", str(self.studies),
            "--host", "127.0.0.1", "--port", str(self.port),
            "--conf", "checkpoint", str(checkpoint), "--conf", "model_dir", str(root / "model"),
            "--conf", "device", "cpu", "--conf", "tracking", "none",
        ]  # fmt: skip
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"monailabel exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/info/", timeout=5) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                time.sleep(1)
        pytest.fail(f"monailabel did not answer within {STARTUP_TIMEOUT_S} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # the server and its train/infer children
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=20)
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = Server(tmp_path_factory.mktemp("slicer_server"))
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


@pytest.fixture
def session(server, tmp_path):
    return AnnotationSession(MonaiLabelClient(server.url, timeout=120), "test-annotator", str(tmp_path / "pending"))


def read_study(path: Path):
    image = nib.load(str(path))
    return np.asarray(image.dataobj).T, image.affine


# -- the full loop -------------------------------------------------------------------------------------------


def test_full_annotation_loop_against_the_real_server(server, session):
    summary = session.connect()
    assert {"lung_nlb_seg", "lung_nlb_cls", "lung_watershed"} <= set(summary.models)
    assert {"disagreement", "uncertainty", "random"} <= set(summary.strategies)
    assert summary.trainers == ["lung_nlb_seg"]
    assert summary.train_status is None  # nothing trained yet

    # next sample: the image and its original label arrive exactly as stored, geometry included
    sample = session.next_sample("disagreement")
    assert sample is not None and sample.image_id in server.ids["slices"] + [server.ids["volume"]]
    array, affine = read_study(server.studies / f"{sample.image_id}.nii.gz")
    np.testing.assert_allclose(sample.image.array, array, rtol=1e-6)
    np.testing.assert_allclose(sample.image.affine, affine, atol=1e-3)
    original_path = server.studies / "labels" / "original" / f"{sample.image_id}.nii.gz"
    if original_path.is_file():
        np.testing.assert_array_equal(sample.original_label.array > 0, read_study(original_path)[0] > 0)
    else:
        assert sample.original_label is None

    # segment one slice (only that slice is sent) and the whole volume: they must agree on that slice
    volume = session.load_sample(server.ids["volume"])
    depth = volume.image.array.shape[0]
    z = depth // 2
    one = session.segment_slice(volume, z)
    whole = session.segment_volume(volume)
    assert one.mask.shape == volume.image.array.shape[1:] and whole.mask.shape == volume.image.array.shape
    assert [row.z for row in whole.rows] == list(range(depth)) and [row.z for row in one.rows] == [z]
    # the same slice alone or in a batch of slices: equal up to rounding, and oneDNN's blocking depends on
    # the batch size and thread count. On a CPU with bfloat16 in hardware the server computes in it
    # (8-bit mantissa), and this untrained model's probabilities sit near 0.5 over a third of the slice,
    # so rounding flips more of its pixels than it would of trained weights' (tests/test_native.py)
    assert probability_at(one.rows, z) == pytest.approx(probability_at(whole.rows, z), abs=5e-3)
    assert np.mean(one.mask != whole.mask[z]) <= 1e-2
    version_before = whole.params["model_version"]
    heat = session.attention_slice(volume, z)  # the optional overlay: only slice z is sent
    assert heat.shape == volume.image.array.shape[1:] and np.isfinite(heat).all() and heat.max() > 0

    # watershed from a box around a radiologist-drawn nodule on a 2D slice, and from a click at its centre
    nodule = session.load_sample(server.ids["slices"][0])
    truth = nodule.original_label.array > 0
    rows, cols = np.nonzero(truth)
    box = [int(cols.min()) - 3, int(rows.min()) - 3, int(cols.max()) + 3, int(rows.max()) + 3]
    from_box = session.watershed_box(nodule, box, 0)
    assert from_box.shape == truth.shape and from_box.any()
    inside = np.zeros_like(from_box)
    inside[box[1] : box[3] + 1, box[0] : box[2] + 1] = True
    assert not (from_box & ~inside).any(), "watershed mask leaks outside the box: x/y swapped?"
    dice = 2 * (from_box & truth).sum() / (from_box.sum() + truth.sum())
    assert dice > 0.3, f"watershed from the radiologist's box overlaps the radiologist's mask poorly (Dice {dice:.2f})"
    centre = [[int(np.median(cols)), int(np.median(rows))]]
    from_click = session.watershed_points(nodule, centre, [], 0)
    assert from_click[centre[0][1], centre[0][0]], "the clicked pixel is not in the watershed mask"

    # the annotator edits the mask and submits it; it is on the server under `final`, nothing stays pending
    edited = from_box.copy()
    edited[:4, :4] = True
    confirmation = session.submit(nodule, edited)
    assert confirmation["image"] == nodule.image_id
    assert session.pending.list() == []
    stored = read_nifti_bytes(session.client.download_label(nodule.image_id, "final"))
    np.testing.assert_array_equal(stored.array > 0, edited)
    final_info = session.client.datastore()["objects"][nodule.image_id]["labels"]["final"]["info"]
    assert final_info["user"] == "test-annotator" and final_info["labelled_slices"] == [0]

    # train one short epoch, wait for it, and segment again: the new weights are used without a restart
    # the app now holds out a validation share (0 < val_split < 1); force: publish even if a one-epoch run
    # does not validate better, since the test checks that new weights are used
    started = session.start_training({"max_epochs": 1, "val_split": 0.2, "force": True, "train_batch_size": 4,
                                      "multi_gpu": False, "tracking": "none"})
    assert started, "the server did not accept the training request"
    deadline = time.monotonic() + TRAIN_TIMEOUT_S
    status = session.training_status()
    while training_active(status) and time.monotonic() < deadline:
        time.sleep(2)
        status = session.training_status()
    assert status is not None and str(status.get("status")).upper() == "DONE", describe_training(status) + server.log_tail()
    again = session.segment_volume(volume)
    assert again.params["model_version"] != version_before
    assert again.mask.shape == volume.image.array.shape
    weights = session.client.info()["lungnlb"]["weights"]
    assert weights["version"] == again.params["model_version"] and weights["source"] == "published by training"


# -- failure paths: server down, timeout, 4xx ----------------------------------------------------------------


def test_server_down_is_reported_and_the_label_is_kept_until_sent(server, tmp_path):
    dead = AnnotationSession(MonaiLabelClient(f"http://127.0.0.1:{free_port()}", timeout=5), "ann", str(tmp_path / "p"))
    with pytest.raises(ServerUnavailableError, match="cannot reach"):
        dead.connect()

    live = AnnotationSession(MonaiLabelClient(server.url, timeout=120), "ann", str(tmp_path / "p"))
    sample = live.load_sample(server.ids["slices"][1])
    mask = sample.original_label.array > 0
    mask[-3:, -3:] = True
    with pytest.raises(SubmissionPending, match="kept locally") as caught:
        dead.submit(sample, mask)
    assert isinstance(caught.value.cause, ServerUnavailableError)
    kept = dead.pending.list()
    assert [entry.image_id for entry in kept] == [sample.image_id]
    np.testing.assert_array_equal(read_nifti_bytes(dead.pending.read_label(kept[0])).array > 0, mask)

    assert kept[0].server_url == dead.server_url
    # another server never gets it: the image id names another image (or none) there
    assert live.submit_pending() == ([], []) and [e.key for e in live.pending_elsewhere()] == [kept[0].key]

    # a label kept for the live server (as when it was down at its own URL) goes through once it answers
    live.pending.discard(kept[0])
    live.pending.save(sample.image_id, _label_bytes(sample, mask),
                      kept[0].params, server_url=server.url)
    done, errors = live.submit_pending()
    assert errors == [] and [d["image"] for d in done] == [sample.image_id]
    assert live.pending.list() == []
    np.testing.assert_array_equal(read_nifti_bytes(live.client.download_label(sample.image_id, "final")).array > 0, mask)


def _label_bytes(sample, mask):
    from LungNLBLib.nifti import write_nifti_bytes

    return write_nifti_bytes(mask.astype(np.uint8), sample.image.affine)


def test_a_server_that_never_answers_times_out():
    with socket.socket() as stalled:  # accepts connections (kernel backlog) but never replies
        stalled.bind(("127.0.0.1", 0))
        stalled.listen(1)
        client = MonaiLabelClient(f"http://127.0.0.1:{stalled.getsockname()[1]}", timeout=0.5)
        start = time.monotonic()
        with pytest.raises(ServerTimeoutError, match="within 0.5 s"):
            client.info()
        assert time.monotonic() - start < 5


def test_4xx_answers_carry_the_servers_message(server, session):
    client = session.client
    with pytest.raises(RequestRejectedError) as missing:
        client.download_image("no_such_image")
    assert missing.value.status == 404 and "not found" in missing.value.detail.lower()
    with pytest.raises(RequestRejectedError, match="no model 'no_such_model'") as model:
        client.infer("no_such_model", image_id=server.ids["volume"])
    assert model.value.status == 404
    with pytest.raises(RequestRejectedError, match="strategy") as strategy:
        client.next_sample("no_such_strategy")
    assert strategy.value.status == 404
    sample = session.load_sample(server.ids["slices"][0])
    with pytest.raises(RequestRejectedError) as outside:
        session.watershed_box(sample, [0, 0, 10, 10], 5)  # slice 5 of a 2D image
    assert 400 <= outside.value.status < 500 and "slice 5" in outside.value.detail
    with pytest.raises(RequestRejectedError) as unknown:
        client.save_label("no_such_image", b"\x1f\x8bnot really a label")
    assert unknown.value.status == 404 and "no_such_image" in unknown.value.detail
    with pytest.raises(RequestRejectedError) as conflict:  # original labels are write-once
        client.save_label(sample.image_id, client.download_label(sample.image_id, "original"), tag="original")
    assert conflict.value.status == 409

