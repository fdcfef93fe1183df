"""The app on a real PACS: Orthanc (Debian's orthanc + orthanc-dicomweb, loopback only, basic auth)
holding two real CT series from ../shared/data; `monailabel start_server --studies <DICOMweb URL>`.

Infer on a PACS series, labels back to Orthanc as DICOM SEG (geometry checked against the source
series), original and final versions told apart, active learning, training from the PACS's labels
in a server with an empty cache, and a PACS that is down or answers garbage."""

from __future__ import annotations

import http.server
import json
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
from pacs_support import (
    qido,
    retrieve_instances,
    series_uid,
    small_ct_series,
    start_orthanc,
)

from benchmarks.app_server import APP_DIR, free_port, start_server, stop_server
from benchmarks.app_studies import tiny_checkpoint
from lungnlb.io.dicom_seg import read_seg

USER = ("annotator-pacs", "pacs-s3cret-pw")
ENV = {"MONAI_LABEL_DICOMWEB_USERNAME": USER[0], "MONAI_LABEL_DICOMWEB_PASSWORD": USER[1],
       "MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pacs")
    folders = small_ct_series(2)
    orthanc, url = start_orthanc(root / "orthanc", USER, folders)
    checkpoint = tiny_checkpoint(root / "ckpt" / "tiny")
    conf = {"checkpoint": str(checkpoint), "model_dir": str(root / "model"), "device": "cpu",
            "pacs_cache": str(root / "cache"), "tracking": "none"}
    try:
        server, server_url = start_server(url, conf, root / "server.log", extra_env=ENV)
    except BaseException:
        stop_server(orthanc)
        raise
    try:
        yield {"url": server_url, "pacs": url, "root": root, "conf": conf, "series": [series_uid(f) for f in folders],
               "folders": folders}
    finally:
        stop_server(server)
        stop_server(orthanc)


def _cached_image(pacs, image_id: str) -> Path:
    """The series as the app serves it (`GET /datastore/image`, what the Slicer module loads): it is
    fetched from the PACS on first use and kept in the cache folder."""
    response = requests.get(f"{pacs['url']}/datastore/image", params={"image": image_id}, timeout=300)
    assert response.status_code == 200, response.text
    found = list((Path(pacs["conf"]["pacs_cache"])).glob(f"*/{image_id}.nii.gz"))
    assert len(found) == 1 and found[0].read_bytes() == response.content, found
    return found[0]


def _submit(pacs, image_id: str, tag: str, mask: np.ndarray, params: dict, tmp: Path) -> requests.Response:
    image = nib.load(_cached_image(pacs, image_id))
    path = tmp / f"{image_id}_{tag}.nii.gz"
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), image.affine), path)
    with path.open("rb") as stream:
        return requests.put(f"{pacs['url']}/datastore/label", params={"image": image_id, "tag": tag},
                            data={"params": json.dumps(params)}, files={"label": (path.name, stream)}, timeout=120)


def test_pacs_series_listed_fetched_and_inferred(pacs):
    url = pacs["url"]
    info = requests.get(f"{url}/info/", timeout=30).json()
    assert info["datastore"]["pacs"]["reachable"] is True and info["datastore"]["total"] == 2
    listing = requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=60).json()
    assert sorted(listing["objects"]) == sorted(pacs["series"])
    image_id = pacs["series"][0]
    slices = len(list(pacs["folders"][0].iterdir()))
    response = requests.post(f"{url}/infer/lung_nlb_seg", params={"image": image_id, "output": "json"}, timeout=300)
    assert response.status_code == 200, response.text
    assert len(response.json()["slice_probabilities"]) == slices
    # one slice of the same series, now from the cache
    response = requests.post(f"{url}/infer/lung_watershed", params={"image": image_id, "output": "json"},
                             data={"params": json.dumps({"box": [200, 200, 260, 260], "slice": 1})}, timeout=120)
    assert response.status_code == 200, response.text
    # the image-path checks accept the cache folder (the studies folder of a PACS)
    cached = _cached_image(pacs, image_id)
    assert nib.load(cached).shape == (512, 512, slices)
    response = requests.post(f"{url}/infer/lung_nlb_cls", params={"image": str(cached), "output": "json"}, timeout=300)
    assert response.status_code == 200, response.text
    log = (pacs["root"] / "server.log").read_text(errors="replace")
    assert "dcmqi" not in log and not (APP_DIR / "bin" / "itkimage2segimage").exists()
    assert USER[1] not in log


def test_pacs_labels_go_back_as_dicom_seg(pacs, tmp_path):
    image_id, other_id = pacs["series"]
    shape = nib.load(_cached_image(pacs, image_id)).shape  # (columns, rows, slices)
    mask = np.zeros(shape, dtype=np.uint8)
    mask[220:260, 180:230, 2:5] = 1
    response = requests.post(f"{pacs['url']}/infer/lung_watershed", params={"image": image_id, "output": "json"},
                             data={"params": json.dumps({"box": [220, 180, 260, 230], "slice": 3})}, timeout=120)
    assert response.status_code == 200, response.text  # the proposal the finals below correct
    response = _submit(pacs, image_id, "final", mask, {"user": "alice", "labelled_slices": [1, 2, 3, 4, 5]}, tmp_path)
    assert response.status_code == 200, response.text
    second = mask.copy()
    second[220:240, 180:200, 5] = 1
    response = _submit(pacs, image_id, "final", second, {"user": "bob"}, tmp_path)
    assert response.status_code == 200, response.text
    original = np.zeros(nib.load(_cached_image(pacs, other_id)).shape, dtype=np.uint8)
    original[300:330, 300:320, 1] = 1
    assert _submit(pacs, other_id, "original", original, {"label_method": "watershed"}, tmp_path).status_code == 200
    again = _submit(pacs, other_id, "original", original, {}, tmp_path)
    assert again.status_code == 409, again.text

    segs = qido(pacs["pacs"], USER, Modality="SEG")
    assert len(segs) == 3 and len({str(s.SeriesInstanceUID) for s in segs}) == 3  # nothing overwritten
    study = str(qido(pacs["pacs"], USER, SeriesInstanceUID=image_id)[0].StudyInstanceUID)
    source = retrieve_instances(pacs["pacs"], USER, study, image_id)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in source}
    finals = {}
    for meta in segs:
        seg = retrieve_instances(pacs["pacs"], USER, str(meta.StudyInstanceUID), str(meta.SeriesInstanceUID))[0]
        if seg.ContentLabel == "FINAL":
            finals[int(seg.SeriesNumber)] = seg
        else:
            assert seg.ContentLabel == "ORIGINAL" and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == other_id
            assert seg.SeriesDescription == "LungNLB original (watershed)"
    assert sorted(finals) == [9001, 9002]
    first, latest = finals[9001], finals[9002]
    assert str(first.ContentCreatorName).strip("^") == "alice" and str(latest.ContentCreatorName).strip("^") == "bob"
    assert first.SeriesDescription == "LungNLB final v1 (alice)" and latest.SeriesDescription == "LungNLB final v2 (bob)"
    for seg, expected in ((first, mask), (latest, second)):
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == image_id
        assert (int(seg.Rows), int(seg.Columns)) == (512, 512)
        shared = seg.SharedFunctionalGroupsSequence[0]
        reference = next(iter(by_uid.values()))
        assert np.allclose([float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing],
                           [float(v) for v in reference.PixelSpacing])
        assert np.allclose([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
                           [float(v) for v in reference.ImageOrientationPatient])
        for frame in seg.PerFrameFunctionalGroupsSequence:  # every frame lies on its source slice
            source_uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            assert np.allclose([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
                               [float(v) for v in by_uid[source_uid].ImagePositionPatient])
        # the voxels: slice order by position along the normal, as the cache's NIfTI has them
        order = sorted(by_uid, key=lambda uid: float(np.dot(
            np.cross(*np.reshape([float(v) for v in by_uid[uid].ImageOrientationPatient], (2, 3))),
            [float(v) for v in by_uid[uid].ImagePositionPatient])))
        decoded = read_seg(seg, order)  # (slices, rows, columns)
        assert np.array_equal(decoded, np.transpose(expected, (2, 1, 0)) > 0)
    info = requests.get(f"{pacs['url']}/datastore/label/info", params={"label": image_id, "tag": "final"}, timeout=30).json()
    assert info["provenance"]["version"] == 2 and info["seg_series_uid"] == str(latest.SeriesInstanceUID)
    # the final corrects the proposal inferred before it: that model and its version are in the SEG
    segment = latest.SegmentSequence[0]
    assert segment.SegmentAlgorithmType == "SEMIAUTOMATIC"
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == info["provenance"]["proposed_by"] == "lung_watershed"
    assert algorithm.AlgorithmVersion == str(info["provenance"]["proposal_model_version"] or "unknown")[:64]


def test_pacs_active_learning(pacs):
    """The series with a final label is done; disagreement ranks the other (it has an original SEG)."""
    response = requests.post(f"{pacs['url']}/activelearning/disagreement", json={"top_k": 2}, timeout=300)
    assert response.status_code == 200, response.text
    assert response.json()["id"] == pacs["series"][1]


def test_pacs_slicer_module_workflow(pacs, tmp_path):
    """The Slicer module's logic (LungNLBLib) as with a folder: next sample with its original label
    (from the PACS's SEG), segment, submit; the submission is a new FINAL SEG with the annotator."""
    from LungNLBLib.client import MonaiLabelClient
    from LungNLBLib.nifti import read_nifti_bytes
    from LungNLBLib.session import AnnotationSession

    session = AnnotationSession(MonaiLabelClient(pacs["url"], timeout=300), "slicer-annotator", str(tmp_path / "pending"))
    session.connect()
    sample = session.next_sample("disagreement")
    assert sample is not None and sample.image_id == pacs["series"][1]
    assert sample.original_label is not None and int((sample.original_label.array > 0).sum()) == 30 * 20
    whole = session.segment_volume(sample)
    assert whole.mask.shape == sample.image.array.shape
    edited = sample.original_label.array > 0
    edited[1, 100:110, 100:110] = True
    session.submit(sample, edited)
    assert session.pending.list() == []
    stored = read_nifti_bytes(session.client.download_label(sample.image_id, "final"))
    np.testing.assert_array_equal(stored.array > 0, edited)
    finals = [s for s in qido(pacs["pacs"], USER, Modality="SEG")
              if str(getattr(s, "SeriesDescription", "")) == "LungNLB final v1 (slicer-annotator)"]
    assert len(finals) == 1


def test_pacs_training_from_seg_in_a_fresh_cache(pacs):
    """A second server with an empty cache finds the labels on the PACS and trains from them."""
    root = pacs["root"]
    conf = {**pacs["conf"], "pacs_cache": str(root / "cache2"), "model_dir": str(root / "model2")}
    server, url = start_server(pacs["pacs"], conf, root / "server2.log", extra_env=ENV)
    try:
        listing = requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=60).json()
        assert set(listing["objects"][pacs["series"][0]]["labels"]) == {"final"}
        params = {"max_epochs": 1, "train_batch_size": 4, "val_split": 0.5, "original_weight": 1.0,
                  "tracking": "none", "force": True}
        response = requests.post(f"{url}/train/lung_nlb_seg", json=params, timeout=30)
        assert response.status_code == 200, response.text
        deadline, status = time.monotonic() + 300, {}
        while time.monotonic() < deadline:
            status = requests.get(f"{url}/train/", timeout=30).json()
            if status.get("status") in ("DONE", "ERROR"):
                break
            time.sleep(2)
        log = (root / "server2.log").read_text(errors="replace")
        assert status.get("status") == "DONE", f"train task: {status}; log:\n{log[-3000:]}"
        stats = requests.get(f"{url}/info/", timeout=30).json()["train_stats"]["lung_nlb_seg"]
        # the final SEG's slices with tumour (4) train or validate; original labels may add theirs
        assert stats["train_slices"]["final"] + stats["val_slices"] >= 4, stats
        label = list((root / "cache2").glob(f"*/labels/final/{pacs['series'][0]}.nii.gz"))
        assert label and nib.load(label[0]).get_fdata().sum() > 0
        assert USER[1] not in log
    finally:
        stop_server(server)


class _Garbage(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"<html>this is not DICOMweb</html>"
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_pacs_down_or_garbage_gives_clear_errors(tmp_path):
    port = free_port()
    garbage = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Garbage)
    threading.Thread(target=garbage.serve_forever, daemon=True).start()
    pacs_url = f"http://127.0.0.1:{port}/dicom-web"
    conf = {"checkpoint": "none", "model_dir": str(tmp_path / "model"), "device": "cpu",
            "pacs_cache": str(tmp_path / "cache"), "tracking": "none"}
    server, url = start_server(pacs_url, conf, tmp_path / "server.log", extra_env=ENV)
    try:
        response = requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=60)
        assert response.status_code == 502 and "not valid DICOMweb" in response.json()["detail"], response.text
        info = requests.get(f"{url}/info/", timeout=30)
        assert info.status_code == 200 and info.json()["datastore"]["pacs"]["reachable"] is False
        garbage.shutdown()
        garbage.server_close()
        # a failed listing is not kept: the next request asks the PACS again
        response = requests.post(f"{url}/infer/lung_watershed", params={"image": "1.2.3", "output": "json"}, timeout=60)
        assert response.status_code == 502 and "cannot be reached" in response.json()["detail"], response.text
        assert requests.get(f"{url}/info/", timeout=30).status_code == 200  # still serving
    finally:
        stop_server(server)
        garbage.server_close()


def test_credentials_in_the_url_are_refused():
    from lib.pacs import check_url

    with pytest.raises(ValueError, match="not in the URL"):
        check_url("http://alice:secret@127.0.0.1:8042/dicom-web")
    assert check_url("http://127.0.0.1:8042/dicom-web/") == "http://127.0.0.1:8042/dicom-web"


class _RefusingPacs:
    """A DICOMweb client stand-in: one real CT series, no SEGs, and a PACS that refuses to store."""

    def __init__(self, folder: Path):
        import pydicom

        self.instances = [pydicom.dcmread(p) for p in sorted(folder.iterdir()) if p.is_file()]
        self.stored = []
        self.refuse = True

    def search_for_series(self, search_filters=None, **_):
        if (search_filters or {}).get("Modality") == "SEG":
            return []
        first = self.instances[0]
        return [{"0020000D": {"vr": "UI", "Value": [str(first.StudyInstanceUID)]},
                 "0020000E": {"vr": "UI", "Value": [str(first.SeriesInstanceUID)]}}]

    def retrieve_series(self, study, series, **_):
        return list(self.instances)

    def store_instances(self, datasets, **_):
        if self.refuse:
            response = requests.Response()
            response.status_code, response.reason = 500, "Internal Server Error"
            raise requests.HTTPError("refused", response=response)
        self.stored.extend(datasets)


def test_a_label_the_pacs_refuses_changes_nothing(tmp_path):
    """502 naming the PACS; no final label, no version in the history; the next submission is v1."""
    from fastapi import HTTPException
    from lib.conf import parse_conf
    from lib.pacs import PacsDatastore, cache_dir

    url = "http://127.0.0.1:9/dicom-web"
    conf = {"pacs_cache": str(tmp_path / "cache"), "checkpoint": "none"}
    datastore = PacsDatastore(parse_conf(APP_DIR, cache_dir(url, conf), conf), url, conf)
    datastore.client = fake = _RefusingPacs(small_ct_series(1)[0])
    image_id = datastore.list_images()[0]
    image = nib.load(datastore.get_image_uri(image_id))
    mask = np.zeros(image.shape, dtype=np.uint8)
    mask[200:240, 200:240, 1] = 1
    label = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(mask, image.affine), label)
    with pytest.raises(HTTPException) as refused:
        datastore.save_label(image_id, str(label), "final", {"user": "alice"})
    assert refused.value.status_code == 502 and url in refused.value.detail and "HTTP 500" in refused.value.detail
    assert datastore.history(image_id) == [] and "final" not in datastore.get_labels_by_image_id(image_id)
    fake.refuse = False
    datastore.save_label(image_id, str(label), "final", {"user": "alice"})
    assert [r["version"] for r in datastore.history(image_id)] == [1] and len(fake.stored) == 1
    assert fake.stored[0].ContentLabel == "FINAL" and fake.stored[0].SeriesNumber == 9001
