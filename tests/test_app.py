"""The LungNLB MONAI Label app served in-process by FastAPI's TestClient (as MONAI Label's own
endpoint tests do): real datastore, real checkpoint, real LIDC slices and a real CT series."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from requests_toolbelt.multipart.decoder import MultipartDecoder

from app_support import build_training_patient_studies, in_process_client
from benchmarks.app_server import APP_DIR
from benchmarks.app_studies import build_studies, tiny_checkpoint

from lungnlb.checkpoint import default_checkpoint_path
from monailabel.config import settings


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("lungnlb_app")
    ids = build_studies(root / "studies")
    checkpoint = tiny_checkpoint(root / "ckpt" / "tiny")
    return {"root": root, "studies": root / "studies", "checkpoint": checkpoint, **ids}


@pytest.fixture(scope="module")
def client(workspace):
    conf = {"checkpoint": str(workspace["checkpoint"]), "model_dir": str(workspace["root"] / "model"),
            "tracking": "mlflow", "device": "cpu"}
    with in_process_client(workspace["studies"], conf) as test_client:
        yield test_client


def _multipart(response):
    parts = MultipartDecoder(response.content, response.headers["content-type"]).parts
    params, image = None, None
    for part in parts:
        disposition = part.headers[b"Content-Disposition"].decode()
        if 'name="params"' in disposition:
            params = json.loads(part.text)
        else:
            image = nib.Nifti1Image.from_bytes(_gunzip(part.content))
    return params, image


def _gunzip(data: bytes) -> bytes:
    import gzip

    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def test_info_reports_models_weights_and_strategies(client, workspace):
    info = client.get("/info/").json()
    assert {"lung_nlb_seg", "lung_nlb_cls", "lung_watershed"} <= set(info["models"])
    assert {"disagreement", "uncertainty", "random"} <= set(info["strategies"])
    assert "lung_nlb_seg" in info["trainers"]
    weights = info["lungnlb"]["weights"]
    assert weights["trained"] and weights["checkpoint"] == str(workspace["checkpoint"])
    assert info["datastore"]["total"] == len(workspace["slices"]) + len(workspace["volumes"])


def test_untrained_app_starts_and_refuses_model_infer(workspace, tmp_path):
    from fastapi import HTTPException

    from main import LungNLBApp

    studies = tmp_path / "studies"
    build_studies(studies, slices_per_file=1, files=1)
    app = LungNLBApp(str(APP_DIR), str(studies), {"checkpoint": "none", "model_dir": str(tmp_path / "model")})
    info = app.info()
    assert info["lungnlb"]["weights"]["trained"] is False
    assert "no trained weights" in info["warnings"][0]
    assert "lung_nlb_seg" not in info["models"] and "lung_watershed" in info["models"]
    image_id = app.datastore().list_images()[0]
    for model in ("lung_nlb_seg", "lung_nlb_cls"):
        with pytest.raises(HTTPException) as error:
            app.infer({"model": model, "image": image_id})
        assert error.value.status_code == 503 and "no trained weights" in error.value.detail
    with pytest.raises(HTTPException) as error:
        app.next_sample({"strategy": "uncertainty"})
    assert error.value.status_code == 503


def test_infer_2d_slice_keeps_geometry(client, workspace):
    image_id = workspace["slices"][0]
    response = client.post(f"/infer/lung_nlb_seg?image={image_id}&output=all")
    assert response.status_code == 200, response.text
    params, mask = _multipart(response)
    source = nib.load(workspace["studies"] / f"{image_id}.nii.gz")
    assert mask.shape == source.shape and mask.ndim == 2
    np.testing.assert_array_equal(mask.affine, source.affine)  # exactly: same float32 sform as the study
    assert int(mask.header["sform_code"]) == int(mask.header["qform_code"]) == 1
    assert len(params["slice_probabilities"]) == 1
    assert 0.0 <= params["image_probability"] <= 1.0
    assert params["tumour_voxels"] == int(np.asarray(mask.dataobj).sum())


def test_changed_image_file_is_not_served_from_the_cache(client, workspace):
    from monailabel.interfaces.utils.app import app_instance

    cache = app_instance().images
    first, second = workspace["slices"][0], workspace["slices"][1]
    path = workspace["studies"] / f"{first}.nii.gz"
    original = path.read_bytes()

    def probabilities(image_id):
        response = client.post(f"/infer/lung_nlb_seg?image={image_id}&output=json")
        assert response.status_code == 200, response.text
        return response.json()["slice_probabilities"], response.json()["tumour_voxels"]

    of_first, of_second = probabilities(first), probabilities(second)
    assert of_first != of_second  # the check below could not tell the images apart otherwise
    hits = cache.hits
    assert probabilities(first) == of_first and cache.hits == hits + 1  # unchanged file: from the cache
    try:
        replacement = path.with_name(".replacement.nii.gz")
        replacement.write_bytes((workspace["studies"] / f"{second}.nii.gz").read_bytes())
        os.replace(replacement, path)  # replaced (new inode): read again
        assert probabilities(first) == of_second
        stat = path.stat()
        path.write_bytes(original)  # rewritten in place (same inode), mtime set back: still read again
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert probabilities(first) == of_first
    finally:
        path.write_bytes(original)


def test_image_cache_bound_and_in_place_rewrite(tmp_path):
    from lib.image_cache import ImageCache
    from lib.images import load_image
    from lungnlb.io import write_nifti

    affine = np.diag([0.7, 0.7, 2.5, 1.0])
    paths = [tmp_path / f"{name}.nii" for name in "abc"]
    for value, path in enumerate(paths):
        write_nifti(np.full((32, 32), float(value), np.float32), affine, path)
    cache = ImageCache(max_bytes=2 * 32 * 32 * 4)  # room for two of the three images
    for path in paths:
        assert cache.get(path, "normalized", load_image).array[0, 0] == float(paths.index(path))
    assert len(cache) == 2 and cache.misses == 3
    image = cache.get(paths[2], "normalized", load_image)
    assert cache.hits == 1 and not image.array.flags.writeable  # shared arrays cannot be altered
    stat = paths[2].stat()
    time.sleep(0.05)  # past the file system's timestamp granularity, as any later edit would be
    with paths[2].open("r+b") as stream:  # same size, same inode, mtime restored below
        data = stream.read()
        stream.seek(0)
        stream.write(data[:-4] + np.float32(7.0).tobytes())
    os.utime(paths[2], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert cache.get(paths[2], "normalized", load_image).array[-1, -1] == 7.0
    assert len(cache) == 2  # the old state of the file was dropped
    assert ImageCache(max_bytes=0).get(paths[0], "normalized", load_image).array.flags.writeable


def test_infer_3d_volume_slice_by_slice(client, workspace):
    image_id = workspace["volumes"][0]
    response = client.post(f"/infer/lung_nlb_seg?image={image_id}&output=all")
    assert response.status_code == 200, response.text
    params, mask = _multipart(response)
    source = nib.load(workspace["studies"] / f"{image_id}.nii.gz")
    assert mask.shape == source.shape and mask.ndim == 3
    np.testing.assert_allclose(mask.affine, source.affine, atol=1e-5)
    assert len(params["slice_probabilities"]) == source.shape[2]
    assert params["image_probability"] == pytest.approx(max(params["slice_probabilities"]), abs=1e-5)


def test_infer_uploaded_file_and_classification(client, workspace):
    path = workspace["studies"] / f"{workspace['slices'][1]}.nii.gz"
    with open(path, "rb") as stream:
        response = client.post("/infer/lung_nlb_seg?output=json", files={"file": ("slice.nii.gz", stream)})
    assert response.status_code == 200, response.text
    assert len(response.json()["slice_probabilities"]) == 1
    result = client.post(f"/infer/lung_nlb_cls?image={workspace['slices'][1]}&output=json").json()
    assert result["label"] in ("neoplasm", "no neoplasm") and 0.0 <= result["score"] <= 1.0
    assert (result["score"] > result["threshold"]) == (result["label"] == "neoplasm")


def _tumour_box(studies: Path, image_id: str) -> list[int]:
    mask = np.asarray(nib.load(studies / "labels" / "original" / f"{image_id}.nii.gz").dataobj).T  # (Y, X)
    ys, xs = np.nonzero(mask)
    return [int(xs.min()) - 3, int(ys.min()) - 3, int(xs.max()) + 3, int(ys.max()) + 3]


def test_watershed_box_and_points(client, workspace):
    image_id = workspace["slices"][0]
    box = _tumour_box(workspace["studies"], image_id)
    original = np.asarray(nib.load(workspace["studies"] / "labels" / "original" / f"{image_id}.nii.gz").dataobj) > 0
    params = json.dumps({"box": box})
    response = client.post(f"/infer/lung_watershed?image={image_id}&output=all", data={"params": params})
    assert response.status_code == 200, response.text
    result, mask = _multipart(response)
    watershed = np.asarray(mask.dataobj) > 0
    assert result["method"] == "box" and watershed.shape == original.shape
    overlap = 2 * (watershed & original).sum() / (watershed.sum() + original.sum())
    assert overlap > 0.5, f"watershed from the radiologist's box overlaps the radiologist mask by Dice {overlap:.2f}"
    centre = [(box[0] + box[2]) // 2, (box[1] + box[3]) // 2]
    points = json.dumps({"foreground": [centre], "background": [[box[0] - 10, box[1] - 10]]})
    response = client.post(f"/infer/lung_watershed?image={image_id}&output=json", data={"params": points})
    assert response.status_code == 200 and response.json()["method"] == "points"
    assert response.json()["mask_pixels"] > 0


def test_watershed_on_a_volume_slice(client, workspace):
    image_id = workspace["volumes"][0]
    params = json.dumps({"foreground": [[256, 256, 2]]})
    response = client.post(f"/infer/lung_watershed?image={image_id}&output=image", data={"params": params})
    assert response.status_code == 200, response.text
    mask = np.asarray(nib.Nifti1Image.from_bytes(_gunzip(response.content)).dataobj) > 0
    per_slice = mask.reshape(-1, mask.shape[2]).sum(axis=0)
    assert per_slice[2] > 0 and per_slice.sum() == per_slice[2]


def test_final_label_is_versioned_and_original_kept(client, workspace):
    studies = workspace["studies"]
    image_id = workspace["slices"][2]
    original_path = studies / "labels" / "original" / f"{image_id}.nii.gz"
    original_digest = hashlib.sha256(original_path.read_bytes()).hexdigest()
    assert client.post(f"/infer/lung_nlb_seg?image={image_id}&output=json").status_code == 200  # the proposal
    for version in (1, 2):
        with open(original_path, "rb") as stream:
            response = client.put(
                f"/datastore/label?image={image_id}&tag=final",
                files={"label": ("label.nii.gz", stream)},
                data={"params": json.dumps({"user": "radiologist-a"})},
            )
        assert response.status_code == 200, response.text
        info = client.get(f"/datastore/label/info?label={image_id}&tag=final").json()
        record = info["provenance"]
        assert record["version"] == version and record["user"] == "radiologist-a"
        assert record["proposed_by"] == "lung_nlb_seg" and record["proposal_model_version"]
        assert record["dice_original_vs_final"] == pytest.approx(1.0)
        assert 0.0 <= record["dice_proposal_vs_final"] <= 1.0
    assert hashlib.sha256(original_path.read_bytes()).hexdigest() == original_digest
    history = studies / ".lungnlb" / "labels" / image_id
    assert (history / "final_v1.nii.gz").is_file() and (history / "final_v2.nii.gz").is_file()
    with open(original_path, "rb") as stream:
        response = client.put(f"/datastore/label?image={image_id}&tag=original", files={"label": ("x.nii.gz", stream)})
    assert response.status_code == 409 and "never overwritten" in response.json()["detail"]
    assert hashlib.sha256(original_path.read_bytes()).hexdigest() == original_digest
    assert client.get("/info/").json()["lungnlb"]["provenance"]["submissions"] >= 2


def test_image_info_carries_the_sidecar(client, workspace):
    """`GET /datastore/image/info` and the active-learning answer carry the sidecar's `intensity`
    (and source, case, labelled_slices ...), so a client can pass `intensity` back with infer."""
    for image_id in (workspace["slices"][0], workspace["volumes"][0]):
        sidecar = json.loads((workspace["studies"] / "meta" / f"{image_id}.json").read_text())
        info = client.get(f"/datastore/image/info?image={image_id}").json()
        for key in ("intensity", "source", "case", "labelled_slices", "attribution"):
            assert info[key] == sidecar[key], key
    intensities = {client.get(f"/datastore/image/info?image={i}").json()["intensity"] for i in (workspace["slices"][0], workspace["volumes"][0])}
    assert intensities == {"normalized", "hu"}
    picked = client.post("/activelearning/random", json={}).json()
    sidecar = json.loads((workspace["studies"] / "meta" / f"{picked['id']}.json").read_text())
    assert picked["intensity"] == sidecar["intensity"] and picked["case"] == sidecar["case"]
    stored = json.loads((workspace["studies"] / "datastore_v2.json").read_text())["objects"][picked["id"]]["image"]["info"]
    assert "intensity" not in stored, "sidecar fields are served, never copied into the datastore JSON"


def test_trainer_reads_labelled_slices_of_the_final_label(tmp_path):
    """A final label's `labelled_slices` (the reviewed slices the Slicer client sends) decide the
    training slices, empty reviewed slices included; without them the sidecar's list is used."""
    from fastapi import HTTPException

    from lib.trainers.slices import datastore_slices
    from main import LungNLBApp

    studies = tmp_path / "studies"
    ids = build_studies(studies, slices_per_file=1, files=1)
    app = LungNLBApp(str(APP_DIR), str(studies), {"checkpoint": "none", "model_dir": str(tmp_path / "model")})
    datastore, volume_id = app.datastore(), ids["volumes"][0]
    source = nib.load(studies / f"{volume_id}.nii.gz")
    mask = np.zeros(source.shape, dtype=np.uint8)
    mask[200:230, 200:230, 5] = 1  # NIfTI (i, j, k): tumour on slice k = 5 only
    label = tmp_path / "final.nii.gz"
    nib.save(nib.Nifti1Image(mask, source.affine), label)

    def volume_slices() -> dict[int, float]:
        found = datastore_slices(datastore, app.app_config, {"input_size": [64, 64]}, original_weight=0.3)
        return {s.z: float(s.mask.max()) for s in found if s.image_id == volume_id and s.source == "final label"}

    datastore.save_label(volume_id, str(label), "final", {"user": "a"})
    assert volume_slices() == {5: 1.0}  # sidecar lists no slices: only the one with foreground
    datastore.save_label(volume_id, str(label), "final", {"user": "a", "labelled_slices": [9, 2, 5, 2]})
    assert datastore.get_label_info(volume_id, "final")["labelled_slices"] == [2, 5, 9]
    assert volume_slices() == {2: 0.0, 5: 1.0, 9: 0.0}
    for bad in ([16], [-1], ["3"], 3):
        with pytest.raises(HTTPException) as error:
            datastore.save_label(volume_id, str(label), "final", {"labelled_slices": bad})
        assert error.value.status_code == 400 and "labelled_slices" in error.value.detail
    assert len(datastore.history(volume_id)) == 2
    # a native-resolution model trains on whole slices at their own pixel size (the engine draws the
    # patches); the original label is drawn original_weight times as often as a final one
    native = datastore_slices(datastore, app.app_config, {"input_size": [48, 48], "patch_size": [48, 48]}, 0.3)
    planes = {s.z: s for s in native if s.image_id == volume_id and s.source == "final label"}
    assert set(planes) == {2, 5, 9} and planes[5].image.shape == source.shape[1::-1]
    assert planes[5].mask.sum() == 30 * 30 and planes[2].mask.sum() == 0
    assert (planes[5].class_label, planes[2].class_label, planes[5].weight) == (1, 0, 1.0)
    assert {s.weight for s in native if s.source == "original label"} <= {0.3}


def test_strategies_return_unlabelled_images_top_k(client, workspace):
    labelled = set(client.get("/datastore/?output=all").json()["objects"])
    finals = {k for k, v in client.get("/datastore/?output=all").json()["objects"].items() if "final" in v["labels"]}
    for strategy in ("disagreement", "uncertainty", "random"):
        response = client.post(f"/activelearning/{strategy}", json={"top_k": 3})
        assert response.status_code == 200, response.text
        result = response.json()
        assert result["id"] in labelled and result["id"] not in finals
        if strategy != "random":
            assert len(result["top_k"]) == 3 and result["top_k"][0]["id"] == result["id"]
            scores = [item["score"] for item in result["top_k"]]
            assert scores == sorted(scores, reverse=True)


def test_disagreement_picks_the_corrupted_original_label(tmp_path, monkeypatch):
    """Shipped trained weights on tumour slices of one LIDC patient: the model overlaps every
    radiologist label (disagreement < 0.9). Shift the label the model agrees with *most* onto a wrong
    region: `disagreement` must now rank that image first (>= 0.9), the others keep their scores."""
    from main import LungNLBApp

    monkeypatch.setattr(settings, "MONAI_LABEL_AUTO_UPDATE_SCORING", False)  # no scoring call to a server
    studies = tmp_path / "studies"
    ids = build_training_patient_studies(studies, count=4)
    app = LungNLBApp(str(APP_DIR), str(studies), {"model_dir": str(tmp_path / "model"), "device": "cpu"})
    assert app.info()["lungnlb"]["weights"]["checkpoint"] == str(default_checkpoint_path())
    before = {item["id"]: item["score"] for item in app.next_sample({"strategy": "disagreement", "top_k": 4})["top_k"]}
    assert set(before) == set(ids) and max(before.values()) < 0.9, f"precondition, model overlaps: {before}"
    victim = min(before, key=before.get)
    path = studies / "labels" / "original" / f"{victim}.nii.gz"
    label = nib.load(path)
    mask = np.asarray(label.dataobj)
    shifted = np.roll(mask, shift=(mask.shape[0] // 3, mask.shape[1] // 3), axis=(0, 1))  # another place in the chest
    assert not (shifted & mask).any()
    nib.save(nib.Nifti1Image(shifted.astype(np.uint8), label.affine), path)
    after = app.next_sample({"strategy": "disagreement", "top_k": 4})
    scores = {item["id"]: item["score"] for item in after["top_k"]}
    assert after["id"] == victim and scores[victim] >= 0.9, scores
    assert all(scores[i] == pytest.approx(before[i]) for i in ids if i != victim)


def test_latest_proposal_is_kept_after_the_result_file_is_deleted(tmp_path):
    """Proposal records are written off the request path; MONAI Label deletes the result file right
    after the response, and a reader (a `final` submission) must see the latest proposal whole."""
    from main import LungNLBApp

    studies = tmp_path / "studies"
    image_id = build_studies(studies, slices_per_file=1, files=1)["slices"][0]
    app = LungNLBApp(str(APP_DIR), str(studies), {"checkpoint": "none", "model_dir": str(tmp_path / "model")})
    datastore = app.datastore()
    for version in ("v1", "v2", "v3"):
        result = tmp_path / f"result_{version}.nii.gz"
        result.write_bytes(f"mask of {version}".encode())
        datastore.record_proposal(image_id, result, "lung_nlb_seg", version)
        result.unlink()
    record, path = datastore._proposal(image_id)
    assert record["model_version"] == "v3" and path.read_bytes() == b"mask of v3"
    assert not list(path.parent.glob(".*"))  # no staged or temporary files left behind
    (path.parent / ".proposal.nii.gz.0123abcd.staged").write_bytes(b"a server killed between staging and commit")
    LungNLBApp(str(APP_DIR), str(studies), {"checkpoint": "none", "model_dir": str(tmp_path / "model")})
    assert not list(path.parent.glob(".*")) and path.read_bytes() == b"mask of v3"  # restart: stale staging removed


def test_multi_process_training_pickles_trains_shards_and_publishes_from_rank_0(tmp_path):
    """The several-GPU path (one DDP process per device), run as 2 gloo processes on the CPU: the
    job and the fitter pickle into the spawned processes, both ranks train, rank 0 publishes."""
    import torch

    from lib.monailabel_private import train_tasks
    from lib.trainers.fit import SegmentationFit, fit_distributed
    from main import LungNLBApp

    studies = tmp_path / "studies"
    build_studies(studies, slices_per_file=2, files=2)
    conf = {"checkpoint": str(tiny_checkpoint(tmp_path / "ckpt" / "tiny")), "model_dir": str(tmp_path / "model"),
            "tracking": "none", "device": "cpu"}
    app = LungNLBApp(str(APP_DIR), str(studies), conf)
    task = train_tasks(app)["lung_nlb_seg"]
    # force: 2 validation slices are below the publish gate's floor; this test is about the processes
    job = task.prepare({**task.config(), "max_epochs": 1, "train_batch_size": 2, "learning_rate": 1e-3, "force": True},
                       app.datastore())
    start = {key: value.clone() for key, value in job.model.state_dict().items()}
    fit_distributed(SegmentationFit(app.app_config), 2, "cpu", job)
    stats = task.stats()
    assert stats["epoch"] == stats["total_epochs"] == 1 and stats["published_epoch"] == 1
    assert stats["run_id"] == job.run["run_id"]
    published = torch.load(app.app_config.published_checkpoint, map_location="cpu", weights_only=True)
    assert published.keys() == start.keys()  # the unwrapped model, not DDP's "module." names
    assert any(not torch.equal(published[k], start[k]) for k in start if start[k].is_floating_point())


def test_train_one_epoch_publishes_new_weights(client, workspace):
    image_id = workspace["slices"][0]
    before = client.post(f"/infer/lung_nlb_seg?image={image_id}&output=json").json()
    params = {"max_epochs": 1, "train_batch_size": 4, "learning_rate": 1e-3, "val_split": 0.2, "force": True}
    response = client.post("/train/lung_nlb_seg?run_sync=true", json=params)
    assert response.status_code == 200, response.text
    stats = client.get("/info/").json()["train_stats"]["lung_nlb_seg"]
    assert stats["total_epochs"] == 1 and stats["train_slices"]["final"] >= 1
    assert stats["base_model_version"] == before["model_version"]
    published = Path(stats["published"])
    assert published.is_file() and published.with_suffix(".json").is_file()
    assert not list(published.parent.glob(".*.tmp"))
    after = client.post(f"/infer/lung_nlb_seg?image={image_id}&output=json").json()
    assert after["model_version"] == stats["model_version"] != before["model_version"]
    assert after["slice_probabilities"] != before["slice_probabilities"]
    assert (workspace["root"] / "model" / "mlflow.db").is_file()


def test_conf_checkpoint_must_be_a_segmentation_model(tmp_path):
    from torch import nn

    from lib.conf import parse_conf
    from lungnlb.checkpoint import save_checkpoint

    classifier = save_checkpoint(tmp_path / "classifier", nn.Linear(2, 1), {"model": {"name": "resnet50"}})
    with pytest.raises(ValueError, match="classification-only"):
        parse_conf(APP_DIR, tmp_path, {"checkpoint": str(classifier)})
    with pytest.raises(ValueError, match="is not a file"):
        parse_conf(APP_DIR, tmp_path, {"checkpoint": str(tmp_path / "missing.pt")})
    segmenter = save_checkpoint(tmp_path / "segmenter", nn.Linear(2, 1), {"model": {"name": "unet_sl_nlb"}})
    assert parse_conf(APP_DIR, tmp_path, {"checkpoint": str(segmenter)}).checkpoint == segmenter.resolve()


def test_score_cache_scores_without_the_lock_and_keeps_scores_before_a_failure(tmp_path):
    from types import SimpleNamespace

    from filelock import FileLock

    from lib.activelearning.scores import ScoreCache

    images = {name: tmp_path / f"{name}.nii" for name in ("a", "b", "c")}
    for path in images.values():
        path.write_bytes(b"image")
    datastore = SimpleNamespace(get_image_uri=lambda i: str(images[i]), get_label_uri=lambda i, tag: None)
    config = SimpleNamespace(state_dir=tmp_path / "state", studies=tmp_path)
    store = SimpleNamespace(get=lambda: SimpleNamespace(version="v1"), run=lambda fn, *args: fn(*args))
    lock_path = config.state_dir / "scores" / "v1.json.lock"
    scored = []

    def score(loaded, config, datastore, image_id):
        with FileLock(str(lock_path), timeout=0):  # raises Timeout if the cache held its lock while scoring
            pass
        if image_id == "b":
            raise RuntimeError("unreadable image b")
        scored.append(image_id)
        return {"uncertainty": 0.5, "disagreement": None}

    cache = ScoreCache(config, store, score)
    with pytest.raises(RuntimeError, match="unreadable image b"):
        cache.scores(datastore, ["a", "b", "c"])
    saved = json.loads((config.state_dir / "scores" / "v1.json").read_text())
    assert set(saved) == {"a"}  # a's score survived b's failure
    images["b"].write_bytes(b"fixed")
    cache.score = lambda loaded, config, datastore, image_id: scored.append(image_id) or {"uncertainty": 0.1}
    version, scores = cache.scores(datastore, ["a", "b", "c"])
    assert version == "v1" and scored == ["a", "b", "c"]  # a was not scored again
    assert scores["a"]["uncertainty"] == 0.5 and scores["b"]["uncertainty"] == 0.1


def test_model_thread_runs_every_call_on_one_thread_reentrantly_and_reraises():
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from lib.model_thread import ModelThread

    model_thread = ModelThread()
    with ThreadPoolExecutor(4) as callers:  # requests arrive on several server threads
        idents = set(callers.map(lambda _: model_thread.run(threading.get_ident), range(16)))
    assert idents == {model_thread.ident} and model_thread.ident != threading.get_ident()
    nested = model_thread.run(lambda: model_thread.run(threading.get_ident))  # inline, no deadlock
    assert nested == model_thread.ident
    with pytest.raises(ValueError, match="bad slice"):
        model_thread.run(lambda: (_ for _ in ()).throw(ValueError("bad slice")))


def test_infer_runs_the_model_on_the_model_thread(client, workspace, monkeypatch):
    import threading

    from monailabel.interfaces.utils.app import app_instance

    store = app_instance().store
    loaded = store.get()
    threads = []
    original = loaded.predictor.predict
    monkeypatch.setattr(loaded.predictor, "predict", lambda *a, **k: threads.append(threading.get_ident()) or original(*a, **k))
    for _ in range(2):
        response = client.post("/infer/lung_nlb_seg", params={"image": workspace["slices"][0], "output": "json"})
        assert response.status_code == 200, response.text
    assert threads == [store.thread.ident] * 2
