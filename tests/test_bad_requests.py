"""Every bad request gets a 4xx with a message, the server stays healthy, the studies folder is
unchanged and no temporary file is left behind (issue 15, items 4-8), as a table of request ->
expected status against the app served in-process (MONAI Label's FastAPI app, start-up included)."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from app_support import in_process_client, studies_snapshot
from benchmarks.app_server import APP_DIR
from benchmarks.app_studies import build_studies, lidc_dir, tiny_checkpoint

UPLOAD_LIMIT_MB = 1  # small, so that the size limit is exercised without a gigabyte upload
CORRUPT = b"\x1f\x8b\x08\x00 this is not a NIfTI file at all"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_requests")
    ids = build_studies(root / "studies")
    conf = {"checkpoint": str(tiny_checkpoint(root / "ckpt" / "tiny")), "model_dir": str(root / "model"),
            "tracking": "none", "device": "cpu", "max_upload_mb": str(UPLOAD_LIMIT_MB)}
    with in_process_client(root / "studies", conf) as client:
        yield {"client": client, "root": root, "studies": root / "studies", **ids}


def _temp_files() -> list[Path]:
    from lib.uploads import server_temp_dir

    folder = server_temp_dir()
    assert folder is not None and folder.is_dir(), "the server did not set up its private temporary folder"
    return sorted(folder.rglob("*"))


def _nifti_bytes(array: np.ndarray, dtype=None) -> bytes:
    image = nib.Nifti1Image(array if dtype is None else array.astype(dtype), np.diag([0.7, 0.7, 2.5, 1.0]))
    return gzip.compress(image.to_bytes())


def _bomb() -> bytes:
    """A small gzip whose header promises 16384 x 16384 int16 voxels (512 MiB) it does not hold."""
    header = nib.Nifti1Header()
    header.set_data_shape((16384, 16384))
    header.set_data_dtype(np.int16)
    header["vox_offset"] = 352
    return gzip.compress(header.binaryblock + b"\x00" * 4 + bytes(1 << 16))


def _non_ct_dicom(folder: Path) -> bytes:
    dataset = pydicom.dcmread(next((lidc_dir() / "dicom").rglob("*.dcm")))
    dataset.Modality = "MR"
    dataset.save_as(folder / "mr.dcm")
    return (folder / "mr.dcm").read_bytes()


def _cases(served, folder: Path) -> list[tuple[str, str, str, dict, int]]:
    studies = served["studies"]
    slice_id, volume_id = served["slices"][0], served["volumes"][0]
    slice_bytes = (studies / f"{slice_id}.nii.gz").read_bytes()
    mask_bytes = (studies / "labels" / "original" / f"{slice_id}.nii.gz").read_bytes()  # a valid label
    slice_image = nib.load(studies / f"{slice_id}.nii.gz")
    rows, columns = slice_image.shape[:2]
    other_shape = np.zeros((rows * 2, columns // 2), dtype=np.uint8)  # as many voxels, another grid
    outside_upload_folder = _temp_files_parent() / "planted_by_someone.nii.gz"
    outside_upload_folder.write_bytes(slice_bytes)
    long_id = "a" * 300

    def upload(name: str, content: bytes) -> dict:
        return {"files": {"file": (name, io.BytesIO(content))}}

    def label(content: bytes, params: str | None = None) -> dict:
        return {"files": {"label": ("l.nii.gz", io.BytesIO(content))}, **({"data": {"params": params}} if params else {})}

    def params(value) -> dict:
        return {"data": {"params": value if isinstance(value, str) else json.dumps(value)}}

    def train(**values) -> tuple[str, str, str, dict, int]:
        return (f"train {values}", "post", "/train/lung_nlb_seg?run_sync=true", {"json": values}, 400)

    return [
        # uploads and images (items 5-7)
        ("corrupt upload", "post", "/infer/lung_nlb_seg", upload("x.nii.gz", CORRUPT), 422),
        ("empty upload", "post", "/infer/lung_nlb_seg", upload("x.nii.gz", b""), 400),
        ("upload over the size limit", "put", "/datastore/image?image=big",
         upload("big.nii.gz", bytes(UPLOAD_LIMIT_MB * (1 << 20) + 1)), 413),
        ("gzip bomb (header 16384 x 16384)", "post", "/infer/lung_nlb_seg", upload("bomb.nii.gz", _bomb()), 413),
        ("gzip bomb stored", "put", "/datastore/image?image=bomb", upload("bomb.nii.gz", _bomb()), 413),
        ("image wider than 512", "put", "/datastore/image?image=wide",
         upload("wide.nii.gz", _nifti_bytes(np.zeros((600, 64), np.int16))), 413),
        ("all-NaN image stored", "put", "/datastore/image?image=nan",
         upload("nan.nii.gz", _nifti_bytes(np.full((64, 64), np.nan, np.float32))), 422),
        ("all-NaN image inferred", "post", "/infer/lung_nlb_seg",
         upload("nan.nii.gz", _nifti_bytes(np.full((64, 64), np.nan, np.float32))), 422),
        ("upload with intensity bogus", "put", "/datastore/image?image=bogus_intensity",
         {**upload("b.nii.gz", slice_bytes), **params({"intensity": "bogus"})}, 400),
        ("4D upload", "put", "/datastore/image?image=four_d",
         upload("four_d.nii.gz", _nifti_bytes(np.zeros((32, 32, 4, 2), np.int16))), 422),
        ("non-CT DICOM", "put", "/datastore/image?image=mr_scan", upload("mr.dcm", _non_ct_dicom(folder)), 422),
        ("empty image upload", "put", "/datastore/image?image=empty", upload("e.nii.gz", b""), 400),
        # image ids, paths and tags (items 5, 8)
        ("unknown id", "post", "/infer/lung_nlb_seg?image=no_such_image", {}, 404),
        ("300-character id inferred", "post", f"/infer/lung_nlb_seg?image={long_id}", {}, 404),
        ("300-character id stored", "put", f"/datastore/image?image={long_id}", upload("x.nii.gz", slice_bytes), 400),
        ("../ id", "post", "/infer/lung_nlb_seg?image=../../etc/passwd", {}, 400),
        ("outside path", "post", "/infer/lung_nlb_seg?image=/etc/passwd", {}, 400),
        ("another file in the temporary folder", "post", f"/infer/lung_nlb_seg?image={outside_upload_folder}", {}, 400),
        ("../ image upload", "put", "/datastore/image?image=../evil", upload("e.nii.gz", slice_bytes), 400),
        *[(f"image id {odd!r}", "put", "/datastore/image", {**upload("x.nii.gz", slice_bytes), "params": {"image": odd}}, 400)
          for odd in (".", ".lungnlb", "a\nb", "original ", "with space")],
        ("../ label id", "put", "/datastore/label?image=../evil&tag=final", label(slice_bytes), 400),
        ("label for unknown image", "put", "/datastore/label?image=no_such_image&tag=final", label(slice_bytes), 404),
        ("label for a 300-character id", "put", f"/datastore/label?image={long_id}&tag=final", label(slice_bytes), 404),
        *[(f"label tag {odd!r}", "put", "/datastore/label", {**label(mask_bytes), "params": {"image": slice_id, "tag": odd}}, 400)
          for odd in (".", ".lungnlb", "fi\x00nal", "final\n", "original ", "../final")],
        ("corrupt label", "put", f"/datastore/label?image={slice_id}&tag=final", label(CORRUPT), 422),
        ("label of a volume's shape", "put", f"/datastore/label?image={slice_id}&tag=final",
         label(_nifti_bytes(np.zeros((rows, columns, 8), np.uint8))), 422),
        ("label of another shape, as many voxels", "put", f"/datastore/label?image={slice_id}&tag=final",
         label(_nifti_bytes(other_shape)), 422),
        ("label with labelled_slices ['x', -7]", "put", f"/datastore/label?image={slice_id}&tag=final",
         label(mask_bytes, json.dumps({"labelled_slices": ["x", -7]})), 400),
        ("label info labelled_slices ['x', -7]", "put", f"/datastore/label/info?label={slice_id}&tag=original",
         {"data": {"info": json.dumps({"labelled_slices": ["x", -7]})}}, 400),
        ("label info labelled_slices out of range", "put", f"/datastore/label/info?label={slice_id}&tag=original",
         {"data": {"info": json.dumps({"labelled_slices": [1]})}}, 400),  # a 2D slice has slice 0 only
        ("label info of a label that does not exist", "put", f"/datastore/label/info?label={volume_id}&tag=original",
         {"data": {"info": json.dumps({"labelled_slices": [0]})}}, 404),
        ("overwriting an original label", "put", f"/datastore/label?image={slice_id}&tag=original", label(mask_bytes), 409),
        # malformed JSON (item 8)
        ("malformed params on infer upload", "post", "/infer/lung_nlb_seg",
         {**upload("x.nii.gz", slice_bytes), **params("{not json")}, 400),
        ("malformed params on image upload", "put", "/datastore/image?image=malformed",
         {**upload("x.nii.gz", slice_bytes), **params("{not json")}, 400),
        ("malformed params on label", "put", f"/datastore/label?image={slice_id}&tag=final",
         label(mask_bytes, "{not json"), 400),
        ("params not an object", "post", f"/infer/lung_nlb_seg?image={slice_id}", params("[1, 2]"), 400),
        ("malformed image info", "put", f"/datastore/image/info?image={slice_id}", {"data": {"info": "{not json"}}, 400),
        ("malformed label info", "put", f"/datastore/label/info?label={slice_id}&tag=original",
         {"data": {"info": "{not json"}}, 400),
        # model parameters (item 8)
        ("unknown model", "post", f"/infer/no_such_model?image={slice_id}", {}, 404),
        ("unknown strategy", "post", "/activelearning/no_such_strategy", {"json": {}}, 404),
        ("lung_nlb_cls with output=image", "post", f"/infer/lung_nlb_cls?image={slice_id}&output=image", {}, 400),
        ("no image at all", "post", "/infer/lung_nlb_seg", {}, 400),
        ("unknown session", "post", "/infer/lung_nlb_seg?session_id=no-such-session", {}, 404),
        ("session id with a path", "post", "/infer/lung_nlb_seg?session_id=../../etc", {}, 404),
        ("bad watershed box", "post", f"/infer/lung_watershed?image={slice_id}", params({"box": [500, 500, 10, 10]}), 422),
        ("Infinity in a watershed box", "post", f"/infer/lung_watershed?image={slice_id}",
         params('{"box": [10, 10, Infinity, 20]}'), 400),
        ("Infinity in a watershed point", "post", f"/infer/lung_watershed?image={slice_id}",
         params('{"foreground": [[Infinity, 3]]}'), 400),
        ("NaN in a watershed point", "post", f"/infer/lung_watershed?image={slice_id}",
         params('{"foreground": [[NaN, 3]]}'), 400),
        ("non-integer slice", "post", f"/infer/lung_watershed?image={slice_id}", params({"box": [10, 10, 20, 20], "slice": "abc"}), 400),
        ("fractional attention slice", "post", f"/infer/lung_nlb_seg?image={slice_id}", params({"attention": True, "slice": 0.5}), 400),
        ("unknown intensity", "post", f"/infer/lung_nlb_seg?image={slice_id}", params({"intensity": "kelvin"}), 400),
        ("threshold Infinity", "post", f"/infer/lung_nlb_seg?image={slice_id}", params('{"threshold": Infinity}'), 400),
        # unknown images and labels (item 8)
        ("delete unknown image", "delete", "/datastore/image?id=no_such_image", {}, 404),
        ("delete an image with an original label", "delete", f"/datastore/image?id={slice_id}", {}, 409),
        ("delete unknown label", "delete", f"/datastore/label?id={slice_id}&tag=final_unknown", {}, 404),
        ("delete label of unknown image", "delete", "/datastore/label?id=no_such_image&tag=final", {}, 404),
        ("delete an original label", "delete", f"/datastore/label?id={slice_id}&tag=original", {}, 409),
        ("info of unknown image", "get", "/datastore/image/info?image=no_such_image", {}, 404),
        ("update info of unknown image", "put", "/datastore/image/info?image=no_such_image", {"data": {"info": "{}"}}, 404),
        ("update info of unknown label", "put", f"/datastore/label/info?label={slice_id}&tag=final_unknown",
         {"data": {"info": "{}"}}, 404),
        # training parameters (step 3 of the work; checked before any run starts)
        train(learning_rate="abc"), train(learning_rate=-1e-3), train(learning_rate=0), train(learning_rate="inf"),
        train(learning_rate="nan"), train(max_epochs="abc"), train(max_epochs=0), train(max_epochs=1.5),
        train(train_batch_size=0), train(device="bogus"), train(device="cuda:x"), train(val_split=0.0),
        train(val_split=1.0), train(val_split=-0.5), train(original_weight=2), train(tracking="elsewhere"),
        train(force="maybe"),
        ("train an unknown model", "post", "/train/no_such_model", {"json": {}}, 404),
    ]


def _temp_files_parent() -> Path:
    from lib.uploads import server_temp_dir

    return server_temp_dir().parent  # the system's temporary folder, where anyone may write


def test_bad_requests_get_4xx_and_leave_studies_and_temp_folder_alone(served, tmp_path):
    from monailabel.interfaces.utils.app import app_instance

    client = served["client"]
    app_instance().datastore().flush_proposals()
    before = studies_snapshot(served["studies"])
    cases = _cases(served, tmp_path)
    failures = []
    for name, method, url, kwargs, status in cases:
        response = getattr(client, method)(url, **kwargs)  # kwargs["params"]: query values with odd characters
        detail = response.json().get("detail") if response.headers.get("content-type", "").startswith("application/json") else None
        if response.status_code != status or not detail:
            failures.append(f"{name}: expected {status}, got {response.status_code} {response.text[:300]}")
        if client.get("/info/").status_code != 200:
            failures.append(f"{name}: server unhealthy after it")
        app_instance().datastore().flush_proposals()
        if studies_snapshot(served["studies"]) != before:
            failures.append(f"{name}: the studies folder changed")
            before = studies_snapshot(served["studies"])
        if _temp_files():
            failures.append(f"{name}: left {[p.name for p in _temp_files()]} in the temporary folder")
            for leftover in _temp_files():
                leftover.unlink()
    assert not failures, "\n".join(failures)
    assert len(cases) >= 80


def test_attention_view_is_not_stored_as_the_proposal(served):
    """An attention heat map (float) is a view, not a mask: it must not become the image's proposal,
    which a later `final` label is compared with."""
    client, studies = served["client"], served["studies"]
    image_id = served["slices"][1]
    proposal = client.post(f"/infer/lung_nlb_seg?image={image_id}&output=json")
    assert proposal.status_code == 200, proposal.text
    from monailabel.interfaces.utils.app import app_instance

    app_instance().datastore().flush_proposals()
    record = studies / ".lungnlb" / "labels" / image_id / "proposal.json"
    recorded = record.read_text()
    view = client.post(f"/infer/lung_nlb_seg?image={image_id}&output=image", data={"params": json.dumps({"attention": True})})
    assert view.status_code == 200, view.text
    app_instance().datastore().flush_proposals()
    assert record.read_text() == recorded
    original = (studies / "labels" / "original" / f"{image_id}.nii.gz").read_bytes()
    saved = client.put(f"/datastore/label?image={image_id}&tag=final", files={"label": ("l.nii.gz", io.BytesIO(original))})
    assert saved.status_code == 200, saved.text
    provenance = client.get(f"/datastore/label/info?label={image_id}&tag=final").json()["provenance"]
    assert 0.0 <= provenance["dice_proposal_vs_final"] <= 1.0 and not _temp_files()


def test_dataset_archive_is_removed_after_download(served):
    response = served["client"].get("/datastore/dataset")
    assert response.status_code == 200 and response.content[:2] == b"PK"
    assert not _temp_files()


def test_batch_infer_runs_without_a_gpu_and_stores_no_label(served):
    """MONAI Label spreads batch inference over the CUDA devices it finds (none here: a division by
    zero); the app runs it on the CPU then. Model output is a proposal, never a stored label."""
    client, studies = served["client"], served["studies"]
    labels = sorted(p.relative_to(studies) for p in (studies / "labels").rglob("*"))
    response = client.post("/batch/infer/lung_nlb_seg?run_sync=true", json={"max_batch_size": 2})
    assert response.status_code == 200, response.text
    results = response.json()
    assert len(results) == 2 and all(result.get("params", {}).get("model_version") for result in results.values())
    assert sorted(p.relative_to(studies) for p in (studies / "labels").rglob("*")) == labels


def test_limits_have_the_documented_defaults(tmp_path):
    from lib.conf import parse_conf

    config = parse_conf(APP_DIR, tmp_path, {})
    assert config.max_upload_mb == 1024 and config.max_image_size == (512, 512, 2000)
    assert parse_conf(APP_DIR, tmp_path, {"max_image_size": "768x768x300"}).max_image_size == (768, 768, 300)
    for bad in ({"max_image_size": "512x512"}, {"max_image_size": "0x1x1"}, {"max_upload_mb": "nan"}, {"max_upload_mb": "-1"}):
        with pytest.raises(ValueError, match="--conf max_"):
            parse_conf(APP_DIR, tmp_path, bad)
