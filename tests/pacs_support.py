"""A real Orthanc for the PACS tests (scripts/pacs_orthanc.py: loopback only) and a few DICOMweb reads."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
import requests

from benchmarks.app_server import REPO

SCRIPT = REPO / "scripts" / "pacs_orthanc.py"
DATA = REPO.parent / "shared" / "data"


def start_orthanc(storage: Path, user: tuple[str, str], uploads: list[Path], timeout_s: float = 120):
    """Start Orthanc with `uploads` in it; (process, DICOMweb URL). Fails (never skips) without Orthanc."""
    log = storage.with_suffix(".log")
    storage.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(SCRIPT), "--storage", str(storage), "--port", "0", "--user", ":".join(user)]
    for folder in uploads:
        command += ["--upload", str(folder)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log.open("wb"), text=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line.startswith("ORTHANC READY "):
            return process, line.split()[2]
        if not line and process.poll() is not None:
            break
    process.kill()
    pytest.fail(f"Orthanc did not start (needs Debian's orthanc and orthanc-dicomweb, installed by "
                f"scripts/setup.sh as root, and `unshare --net`):\n{log.read_text()[-3000:]}")


def small_ct_series(count: int) -> list[Path]:
    """The `count` real CT series of ../shared/data with the fewest slices (found, not named)."""
    from lungnlb.io.dicom import list_dicom_series

    series = list_dicom_series(DATA)
    if len(series) < count:
        pytest.fail(f"{DATA} holds {len(series)} DICOM series, the PACS tests need {count}")
    return sorted(series, key=lambda folder: (len(list(folder.iterdir())), str(folder)))[:count]


def series_uid(folder: Path) -> str:
    first = next(p for p in sorted(folder.iterdir()) if p.is_file())
    return str(pydicom.dcmread(first, stop_before_pixels=True).SeriesInstanceUID)


def qido(url: str, auth, **filters) -> list[pydicom.Dataset]:
    response = requests.get(f"{url}/series", params=filters, auth=auth, timeout=30)
    response.raise_for_status()
    return [pydicom.Dataset.from_json(item) for item in response.json()]


def retrieve_instances(url: str, auth, study: str, series: str) -> list[pydicom.Dataset]:
    """Every instance of a series, through MONAI Label's DICOMweb client (WADO-RS)."""
    from monailabel.datastore.dicom import DICOMwebClientX

    session = requests.Session()
    session.auth = auth
    return list(DICOMwebClientX(url=url, session=session).retrieve_series(study, series))
