"""Studies from a PACS over DICOMweb: `monailabel start_server --studies http://<pacs>/dicom-web`.

`PacsDatastore` is the app's `ProvenanceDatastore` (checked labels, write-once `original`, versioned
`final` with provenance, proposals) on a local cache folder, with the PACS as the source of images
and the destination of labels:

* Images: the CT series the PACS lists (QIDO-RS, MONAI Label's `MONAI_LABEL_DICOMWEB_SEARCH_FILTER`,
  default `{"Modality": "CT"}`; the image id is the SeriesInstanceUID). A series is fetched (WADO-RS,
  MONAI Label's `dicom_web_download_series`) on first use into `<cache>/.lungnlb/pacs/dicom/<id>/`,
  checked like an upload (`max_image_size` from its header, CT, finite) and stored as
  `<cache>/<id>.nii.gz` with lungnlb's own DICOM reader (HU, the series' own geometry) plus a
  sidecar naming its study and the SOP instance of every slice. Later requests read the cache.
* Labels: `original` and every `final` submission go to the PACS (STOW-RS) as a DICOM SEG on the
  source series, a new series each time (`lungnlb.io.dicom_seg`: how `original` and each `final`
  version are told apart, with the annotator and the model version), and are kept locally as
  the datastore does for a folder. SEGs on the PACS (from this app or another tool) are found with
  QIDO (`Modality` SEG, indexed once per SEG in `<cache>/.lungnlb/pacs/segs.json`) and fetched
  when a label is read: the newest `final`, and the `original`.
* Credentials come from MONAI Label's settings (environment): `MONAI_LABEL_DICOMWEB_USERNAME` /
  `_PASSWORD` (or `MONAI_LABEL_DATASTORE_USERNAME` / `_PASSWORD`) for basic auth, or
  `MONAI_LABEL_DATASTORE_API_KEY` for a bearer token. A URL with credentials in it is refused (the
  URL is logged by MONAI Label); requests' and dicomweb-client's logs carry no headers.
* A PACS that cannot be reached, times out (`--conf pacs_timeout_s`) or answers something that is
  not DICOMweb gives 502 naming the PACS and the problem; `/info` still answers (its datastore
  status says the PACS is unreachable), and the server keeps running.

No dcmqi download: MONAI Label's own DICOMweb datastore set-up (which downloads dcmqi's
`itkimage2segimage` at start-up) is never called; SEGs are written with highdicom.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pydicom
import requests
from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX
from monailabel.datastore.local import LocalDatastore
from monailabel.datastore.utils.dicom import dicom_web_download_series
from monailabel.utils.others.generic import md5_digest

from lib.conf import AppConfig
from lib.errors import conflict
from lib.images import load_image, load_mask, read_sidecar, write_image, write_mask
from lib.provenance import FINAL, ORIGINAL, ProvenanceDatastore
from lungnlb.data.studies import sidecar_path
from lungnlb.io.atomic import atomic_write_text
from lungnlb.io.dicom_seg import (
    SegLabel,
    read_seg,
    referenced_series_uid,
    seg_label_of,
    write_seg,
)

logger = logging.getLogger(__name__)

CONF_KEYS = ("pacs_cache", "pacs_timeout_s", "pacs_refresh_s")
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_REFRESH_S = 30.0


def is_pacs(studies: str) -> bool:
    return str(studies).startswith(("http://", "https://"))


def check_url(url: str) -> str:
    """The DICOMweb root without a trailing slash; ValueError for a URL with credentials or no host."""
    parts = urlsplit(url.strip())
    if parts.username or parts.password:
        raise ValueError("--studies: put PACS credentials in MONAI_LABEL_DICOMWEB_USERNAME / MONAI_LABEL_DICOMWEB_PASSWORD "
                         "or MONAI_LABEL_DATASTORE_API_KEY, not in the URL (MONAI Label logs the URL)")
    if not parts.hostname:
        raise ValueError(f"--studies: {url!r} names no PACS host")
    return url.strip().rstrip("/")


def cache_dir(url: str, conf: dict[str, str]) -> Path:
    """The local cache of a PACS: `--conf pacs_cache`, else MONAI Label's DICOMweb cache path
    setting, else `~/.cache/lungnlb/pacs`; one folder per PACS URL below it."""
    root = conf.get("pacs_cache") or settings.MONAI_LABEL_DATASTORE_CACHE_PATH or settings.MONAI_LABEL_DICOMWEB_CACHE_PATH
    root = Path(root.strip()) if root and root.strip() else Path.home() / ".cache" / "lungnlb" / "pacs"
    path = (root / md5_digest(check_url(url))).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _seconds(conf: dict[str, str], key: str, default: float) -> float:
    try:
        value = float(conf.get(key, default))
    except ValueError as error:
        raise ValueError(f"--conf {key}: {conf.get(key)!r} is not a number") from error
    if not 0 < value < float("inf"):
        raise ValueError(f"--conf {key}: must be a finite number > 0, got {conf.get(key)!r}")
    return value


class _TimeoutSession(requests.Session):
    """A requests session that never waits forever on a PACS (connect and read timeouts)."""

    def __init__(self, timeout_s: float):
        super().__init__()
        self.timeout_s = timeout_s

    def request(self, method, url, **kwargs):
        kwargs.setdefault("timeout", (min(10.0, self.timeout_s), self.timeout_s))
        return super().request(method, url, **kwargs)


def make_client(url: str, timeout_s: float) -> DICOMwebClientX:
    """MONAI Label's DICOMweb client (tolerates Orthanc's content types) with credentials from settings."""
    session = _TimeoutSession(timeout_s)
    user = settings.MONAI_LABEL_DICOMWEB_USERNAME or settings.MONAI_LABEL_DATASTORE_USERNAME
    password = settings.MONAI_LABEL_DICOMWEB_PASSWORD or settings.MONAI_LABEL_DATASTORE_PASSWORD
    token = settings.MONAI_LABEL_DATASTORE_API_KEY
    if user and password:
        session.auth = (user, password)
    elif token:
        session.headers["Authorization"] = f"Bearer {token}"
    client = DICOMwebClientX(url=url, session=session, qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
                             wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
                             stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX)
    # dicomweb-client's own retries (several, with exponential back-off) would keep a request to a
    # down PACS waiting long before it is reported; one quick retry covers a dropped connection
    client.set_http_retry_params(retry=True, max_attempts=2, wait_exponential_multiplier=200)
    return client


def bad_gateway(message: str) -> HTTPException:
    """502: the PACS behind the server failed (unreachable, timed out, error, not DICOMweb)."""
    return HTTPException(status_code=502, detail=message)


def _reason(error: BaseException) -> str:
    if isinstance(error, requests.HTTPError) and error.response is not None:
        return f"it answered HTTP {error.response.status_code} {error.response.reason}"
    if isinstance(error, requests.Timeout):
        return "it did not answer in time (--conf pacs_timeout_s)"
    if isinstance(error, requests.ConnectionError):
        return "it cannot be reached (connection failed)"
    if isinstance(error, (ValueError, KeyError, IndexError, TypeError, AttributeError)):
        return f"its answer is not valid DICOMweb ({type(error).__name__}: {str(error)[:200]})"
    return f"{type(error).__name__}: {str(error)[:200]}"


class PacsDatastore(ProvenanceDatastore):
    """The app's datastore on a PACS (see the module docstring)."""

    def __init__(self, config: AppConfig, url: str, conf: dict[str, str]):
        self.url = check_url(url)
        self.client = make_client(self.url, _seconds(conf, "pacs_timeout_s", DEFAULT_TIMEOUT_S))
        self.refresh_s = _seconds(conf, "pacs_refresh_s", DEFAULT_REFRESH_S)
        self.search_filter = dict(settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER or {"Modality": "CT"})
        self._series: tuple[float, dict[str, str]] | None = None  # (time, {series uid: study uid})
        self._segs_checked = 0.0
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._index_lock = threading.Lock()
        self._storing = threading.local()  # set while this thread stores a label: label reads stay local
        super().__init__(config, extensions=("*.nii.gz", "*.nii"), auto_reload=False, read_only=False)
        logger.info("LungNLB PACS datastore: %s, cache %s", self.url, config.studies)

    # ---- PACS calls ---------------------------------------------------------------------------
    @contextmanager
    def _pacs(self, action: str) -> Iterator[None]:
        """Turn any failure of a PACS call into 502 naming the PACS and the problem."""
        try:
            yield
        except HTTPException:
            raise
        except (requests.RequestException, ValueError, KeyError, IndexError, TypeError, AttributeError,
                pydicom.errors.InvalidDicomError) as error:
            logger.warning("PACS %s: could not %s: %s", self.url, action, _reason(error))
            raise bad_gateway(f"the PACS at {self.url} failed to {action}: {_reason(error)}") from error

    def _lock(self, key: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    @property
    def _pacs_dir(self) -> Path:
        return self.config.state_dir / "pacs"

    def series(self, refresh: bool = False) -> dict[str, str]:
        """{SeriesInstanceUID: StudyInstanceUID} of the CT series the PACS lists (kept `pacs_refresh_s`)."""
        if refresh or self._series is None or time.monotonic() - self._series[0] > self.refresh_s:
            with self._pacs("list its series"):
                found = self.client.search_for_series(search_filters=self.search_filter, get_remaining=True)
                series = {}
                for item in found:
                    dataset = pydicom.Dataset.from_json(item)
                    series[str(dataset.SeriesInstanceUID)] = str(dataset.StudyInstanceUID)
            self._series = (time.monotonic(), series)
        return self._series[1]

    def name(self) -> str:
        return self.url

    def list_images(self) -> list[str]:
        return sorted(self.series())

    # ---- images -------------------------------------------------------------------------------
    def get_image_uri(self, image_id: str) -> str:
        """The cached NIfTI of a PACS series, fetched and converted on first use ("" for an unknown id)."""
        local = LocalDatastore.get_image_uri(self, image_id)
        if local and os.path.isfile(local):
            return local
        study = self.series().get(image_id)
        if study is None:
            return ""
        with self._lock(image_id):
            local = LocalDatastore.get_image_uri(self, image_id)
            if local and os.path.isfile(local):
                return local
            return self._fetch_series(image_id, study)

    def _fetch_series(self, image_id: str, study: str) -> str:
        folder = self._pacs_dir / "dicom" / image_id
        shutil.rmtree(folder, ignore_errors=True)
        partial = folder.with_name(folder.name + ".part")
        shutil.rmtree(partial, ignore_errors=True)
        with self._pacs(f"send series {image_id}"):
            dicom_web_download_series(study, image_id, str(partial), self.client)
        os.replace(partial, folder)
        image = load_image(folder, "hu", self.config.max_image_size)
        meta = {"intensity": image.intensity, "source": "pacs", "pacs": self.url, "study_instance_uid": study,
                "series_instance_uid": image_id, "sop_instance_uids": image.meta["sop_instance_uids"]}
        with tempfile.TemporaryDirectory() as tmp:
            stored = write_image(Path(tmp) / f"{image_id}.nii.gz", image)
            atomic_write_text(sidecar_path(self.config.studies, image_id), json.dumps(meta, indent=2))
            LocalDatastore.add_image(self, image_id, str(stored), {"source": "pacs", "StudyInstanceUID": study,
                                                                  "SeriesInstanceUID": image_id})
        logger.info("PACS series %s cached (%d slices)", image_id, image.array.shape[0] if image.array.ndim == 3 else 1)
        return LocalDatastore.get_image_uri(self, image_id)

    def _source_datasets(self, image_id: str) -> list[pydicom.Dataset]:
        """The series' instances in the order of the cached image's slices."""
        self.get_image_uri(image_id)
        order = read_sidecar(self.config, image_id).get("sop_instance_uids") or []
        folder = self._pacs_dir / "dicom" / image_id
        by_uid = {}
        for path in folder.iterdir():
            dataset = pydicom.dcmread(path, stop_before_pixels=True)
            by_uid[str(dataset.SOPInstanceUID)] = dataset
        missing = [uid for uid in order if uid not in by_uid]
        if missing or not order:
            raise bad_gateway(f"the cached series {image_id} lacks {len(missing) or 'its'} instance(s); "
                              "remove its cache folder to fetch it again")
        return [by_uid[uid] for uid in order]

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        raise HTTPException(status_code=405, detail="images come from the PACS: send them to the PACS, not to this server")

    def remove_image(self, image_id: str) -> None:
        raise HTTPException(status_code=405, detail="images on the PACS are not removed by this server")

    def remove_label(self, label_id: str, label_tag: str) -> None:
        if label_tag in (ORIGINAL, FINAL):
            raise conflict(f"{label_tag} labels are kept on the PACS; submit a new final version instead")
        super().remove_label(label_id, label_tag)

    # ---- labels on the PACS -------------------------------------------------------------------
    def _index_path(self) -> Path:
        return self._pacs_dir / "segs.json"

    def seg_index(self) -> dict[str, dict[str, Any]]:
        """{SEG SeriesInstanceUID: {image, study, kind, version, time, ...}} of the SEGs on the PACS,
        refreshed at most every `pacs_refresh_s`; a new SEG's metadata is read once."""
        path = self._index_path()
        with self._index_lock:
            index = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
            if time.monotonic() - self._segs_checked < self.refresh_s and self._segs_checked:
                return index
            with self._pacs("list its DICOM SEG series"):
                found = [pydicom.Dataset.from_json(item) for item in
                         self.client.search_for_series(search_filters={"Modality": "SEG"}, get_remaining=True)]
            changed = False
            for item in found:
                uid = str(item.SeriesInstanceUID)
                if uid in index:
                    continue
                with self._pacs(f"describe SEG {uid}"):
                    meta = pydicom.Dataset.from_json(self.client.retrieve_series_metadata(str(item.StudyInstanceUID), uid)[0])
                index[uid] = self._seg_record(meta)
                changed = True
            if changed:
                atomic_write_text(path, json.dumps(index, indent=2))
            self._segs_checked = time.monotonic()
            return index

    @staticmethod
    def _seg_record(meta: pydicom.Dataset) -> dict[str, Any]:
        label = seg_label_of(meta)
        stamp = f"{getattr(meta, 'ContentDate', '') or getattr(meta, 'SeriesDate', '')}" \
                f"{getattr(meta, 'ContentTime', '') or getattr(meta, 'SeriesTime', '')}"
        return {
            "image": referenced_series_uid(meta), "study": str(meta.StudyInstanceUID),
            "kind": label.kind if label else FINAL,  # another tool's SEG counts as a final label
            "version": label.version if label else 0, "time": stamp,
            "annotator": label.annotator if label else str(getattr(meta, "ContentCreatorName", "") or ""),
            "model": label.model if label else "", "model_version": label.model_version if label else "",
            "method": label.method if label else "", "writer": "lungnlb" if label else str(getattr(meta, "Manufacturer", "")),
        }

    def _remember_seg(self, uid: str, record: dict[str, Any]) -> None:
        with self._index_lock:
            path = self._index_path()
            index = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
            index[uid] = record
            atomic_write_text(path, json.dumps(index, indent=2))

    def remote_labels(self, image_id: str) -> dict[str, tuple[str, dict[str, Any]]]:
        """The SEGs of a series on the PACS by tag: its `original`, and its newest `final`."""
        segs = [(uid, r) for uid, r in self.seg_index().items() if r.get("image") == image_id and not r.get("error")]
        labels = {}
        originals = sorted((r["time"], uid, r) for uid, r in segs if r["kind"] == ORIGINAL)
        finals = sorted((r["time"], r["version"], uid, r) for uid, r in segs if r["kind"] == FINAL)
        if originals:
            labels[ORIGINAL] = originals[0][1:]
        if finals:
            labels[FINAL] = finals[-1][2:]
        return labels

    def _sync_label(self, image_id: str, tag: str) -> None:
        """Fetch the PACS's SEG for `tag` into the cache when the cache does not hold that SEG yet."""
        if tag not in (ORIGINAL, FINAL) or getattr(self._storing, "active", False) or image_id not in self.series():
            return
        remote = self.remote_labels(image_id).get(tag)
        if remote is None:
            return
        uid, record = remote
        if LocalDatastore.get_label_info(self, image_id, tag).get("seg_series_uid") == uid:
            return
        with self._lock(f"{image_id}/{tag}"):
            if LocalDatastore.get_label_info(self, image_id, tag).get("seg_series_uid") == uid:
                return
            order = read_sidecar(self.config, image_id).get("sop_instance_uids") if self.get_image_uri(image_id) else None
            with self._pacs(f"send SEG {uid}"):
                instances = self.client.retrieve_series(record["study"], uid)
            try:
                mask = read_seg(instances[0], order or [])
            except ValueError as error:
                logger.warning("PACS SEG %s of series %s is ignored: %s", uid, image_id, error)
                self._remember_seg(uid, {**record, "error": str(error)})
                return
            image = load_image(Path(LocalDatastore.get_image_uri(self, image_id)), "hu")
            info = {"seg_series_uid": uid, "from_pacs": True, "user": record.get("annotator") or "unknown"}
            if tag == FINAL:
                info["provenance"] = {"version": record.get("version"), "user": info["user"],
                                      "proposed_by": record.get("model") or None,
                                      "proposal_model_version": record.get("model_version") or None,
                                      "seg_series_uid": uid, "writer": record.get("writer")}
            with tempfile.TemporaryDirectory() as tmp:
                label_file = write_mask(Path(tmp) / f"{image_id}.nii.gz", mask.reshape(image.array.shape), image)
                self._store_locally(image_id, label_file, tag, info)

    def get_labels_by_image_id(self, image_id: str) -> dict[str, str]:
        local = LocalDatastore.get_labels_by_image_id(self, image_id)
        if image_id in self.series():
            local.update({tag: image_id for tag in self.remote_labels(image_id)})
        return local

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        self._sync_label(label_id, label_tag)
        return LocalDatastore.get_label_uri(self, label_id, label_tag)

    def get_label_info(self, label_id: str, label_tag: str) -> dict[str, Any]:
        self._sync_label(label_id, label_tag)
        return LocalDatastore.get_label_info(self, label_id, label_tag)

    def get_labeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        """Series with a `final` label on the PACS or in the cache."""
        images = set(self.series())
        remote = {r.get("image") for r in self.seg_index().values() if r.get("kind") == FINAL and not r.get("error")}
        return sorted(images & (remote | set(LocalDatastore.get_labeled_images(self))))

    def get_unlabeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        return sorted(set(self.series()) - set(self.get_labeled_images()))

    def datalist(self, full_path: bool = True) -> list[dict[str, Any]]:
        for image_id in self.get_labeled_images():
            self.get_label_uri(image_id, FINAL)
        return super().datalist(full_path)

    # ---- labels to the PACS -------------------------------------------------------------------
    def _store_label(self, image_id: str, label_file: Path, tag: str, info: dict) -> str:
        """Send `original` / `final` to the PACS as a new DICOM SEG, then keep it in the cache;
        a SEG the PACS refuses leaves the cache (and the final's version history) as it was."""
        if tag not in (ORIGINAL, FINAL):
            return super()._store_label(image_id, label_file, tag, info)
        provenance = info.get("provenance") or {}
        try:
            source = self._source_datasets(image_id)
            image = load_image(Path(self.get_image_uri(image_id)), "hu")
            mask = load_mask(label_file, image)
            if tag == FINAL:
                label = SegLabel(FINAL, version=int(provenance.get("version") or 1), annotator=str(provenance.get("user") or ""),
                                 model=str(provenance.get("proposed_by") or ""),
                                 model_version=str(provenance.get("proposal_model_version") or ""))
            else:
                label = SegLabel(ORIGINAL, method=str(info.get("label_method") or
                                                      read_sidecar(self.config, image_id).get("label_method") or ""))
            seg = write_seg(source, mask.reshape(len(source), *mask.shape[-2:]), label)
            with self._pacs(f"store the {tag} label of series {image_id}"):
                self.client.store_instances([seg])
        except BaseException:
            if tag == FINAL and provenance.get("version"):
                self._drop_version(image_id, int(provenance["version"]))
            raise
        uid = str(seg.SeriesInstanceUID)
        self._remember_seg(uid, self._seg_record(seg))
        info = {**info, "seg_series_uid": uid, "seg_series_description": str(seg.SeriesDescription)}
        if tag == FINAL:
            info["provenance"] = {**provenance, "seg_series_uid": uid}
        logger.info("%s label of series %s stored on the PACS as SEG series %s", tag, image_id, uid)
        return self._store_locally(image_id, label_file, tag, info)

    def _store_locally(self, image_id: str, label_file: Path, tag: str, info: dict) -> str:
        """The folder datastore's atomic label store, its label reads kept to the cache."""
        self._storing.active = True
        try:
            return ProvenanceDatastore._store_label(self, image_id, label_file, tag, info)
        finally:
            self._storing.active = False

    def _drop_version(self, image_id: str, version: int) -> None:
        """Take back a final version whose SEG did not reach the PACS."""
        directory = self._label_dir(image_id)
        history = [r for r in self.history(image_id) if r.get("version") != version]
        atomic_write_text(directory / "history.json", json.dumps(history, indent=2))
        (directory / f"final_v{version}.nii.gz").unlink(missing_ok=True)

    def json(self) -> dict[str, Any]:
        """`GET /datastore/?output=all`: every series on the PACS with its labels (those on the PACS
        and those in the cache), in LocalDatastore's layout; a series not fetched yet has
        `image.info.cached` false."""
        listing = LocalDatastore.json(self)
        objects = listing.setdefault("objects", {})
        for image_id, study in self.series().items():
            entry = objects.setdefault(image_id, {"image": {"ext": ".nii.gz", "info": {
                "source": "pacs", "StudyInstanceUID": study, "SeriesInstanceUID": image_id, "cached": False}},
                "labels": {}})
            for tag, (uid, _) in self.remote_labels(image_id).items():
                entry["labels"].setdefault(tag, {"ext": ".nii.gz", "info": {"seg_series_uid": uid}})
        listing["objects"] = {k: v for k, v in objects.items() if k in self.series()}
        return listing

    # ---- summaries (never fail /info) ----------------------------------------------------------
    def status(self) -> dict[str, Any]:
        pacs = {"url": self.url, "cache": str(self.config.studies)}
        try:
            status = {"total": len(self.list_images()), "completed": len(self.get_labeled_images())}
            pacs["reachable"] = True
        except HTTPException as error:
            status = {"total": 0, "completed": 0}
            pacs.update(reachable=False, error=error.detail)
        tags: dict[str, int] = {}
        for image_id in LocalDatastore.list_images(self):
            for tag in LocalDatastore.get_labels_by_image_id(self, image_id):
                tags[tag] = tags.get(tag, 0) + 1
        return {**status, "label_tags": tags, "pacs": pacs}

    def provenance_summary(self) -> dict[str, Any]:
        """As for a folder, over the `final` labels in the cache (reading /info fetches nothing)."""
        records = [LocalDatastore.get_label_info(self, i, FINAL).get("provenance") for i in LocalDatastore.get_labeled_images(self)]
        records = [r for r in records if r]
        dices = [r["dice_proposal_vs_final"] for r in records if r.get("dice_proposal_vs_final") is not None]
        return {
            "final_labels_with_provenance": len(records),
            "submissions": sum(r.get("versions", 1) or 1 for r in records),
            "mean_dice_proposal_vs_final": sum(dices) / len(dices) if dices else None,
        }

