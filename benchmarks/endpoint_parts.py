"""Where an infer request's time goes inside the server: MONAI Label's endpoint and the app's parts.

Serves the app in-process (FastAPI's TestClient, as tests/test_app.py does) on a copy of the bundled
sample studies with the shipped weights, wraps the functions an infer request passes through with
timers, sends `--requests` slice requests (50 ms apart) and prints the median ms of each part:

    run_inference (MONAI Label's endpoint body) > LungNLBApp.infer > task (model + result)
    and beside them: app.info (rebuilt per request by the endpoint), record_proposal, send_response

The round trip here goes through the TestClient's in-process transport, not HTTP: what it adds is
not what uvicorn adds (`benchmarks/server.py` measures the real server).

    .venv/bin/python -m benchmarks.endpoint_parts
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.app_server import APP_DIR, REPO

TIMES: dict[str, list[float]] = collections.defaultdict(list)


def timed(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[name].append((time.perf_counter() - start) * 1000)

    return wrapper


def _rerun_with_app_on_path() -> None:
    """The app's main.py imports its `lib` package from the app folder, which `monailabel start_server`
    puts on PYTHONPATH for the server process; this benchmark serves the app in-process, so it runs
    itself again with the same PYTHONPATH (the environment of a new process, not an edit of sys.path)."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(APP_DIR) not in paths:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(APP_DIR), *paths])}
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.endpoint_parts", *sys.argv[1:]], env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40)
    args = parser.parse_args()
    _rerun_with_app_on_path()
    work = Path(tempfile.mkdtemp(prefix="lungnlb-endpoint-"))
    shutil.copytree(REPO / "sample_data" / "studies", work / "studies")
    from monailabel.config import settings

    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), str(APP_DIR)])
    settings.MONAI_LABEL_APP_DIR, settings.MONAI_LABEL_STUDIES = str(APP_DIR), str(work / "studies")
    settings.MONAI_LABEL_APP_CONF = {"model_dir": str(work / "model"), "device": "cpu", "tracking": "none"}
    settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD = False
    settings.MONAI_LABEL_AUTO_UPDATE_SCORING = False
    import monailabel.endpoints.infer as endpoint
    from fastapi.testclient import TestClient
    from monailabel.app import app
    from monailabel.interfaces.utils.app import app_instance

    endpoint.run_inference = timed("run_inference", endpoint.run_inference)
    endpoint.send_response = timed("send_response", endpoint.send_response)
    try:
        with TestClient(app, base_url="http://127.0.0.1") as client:  # the server answers to loopback names only
            instance = app_instance()
            from lib.monailabel_private import infer_tasks

            app_class, store_class = type(instance), type(instance.datastore())
            task_class = type(infer_tasks(instance)["lung_nlb_seg"])
            app_class.info = timed("app.info", app_class.info)
            app_class.infer = timed("LungNLBApp.infer", app_class.infer)
            task_class.__call__ = timed("task (model + result)", task_class.__call__)
            store_class.record_proposal = timed("record_proposal", store_class.record_proposal)
            image_id = next(i for i in instance.datastore().list_images() if "slice" in i)
            round_trips = []
            for index in range(5 + args.requests):
                time.sleep(0.05)
                start = time.perf_counter()
                response = client.post(f"/infer/lung_nlb_seg?image={image_id}&output=all")
                if response.status_code != 200:
                    raise SystemExit(f"infer failed: {response.status_code} {response.text}")
                if index == 4:
                    TIMES.clear()
                elif index > 4:
                    round_trips.append((time.perf_counter() - start) * 1000)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.requests} slice requests on {image_id}, median ms:")
    print(f"  {'TestClient round trip':28s} {statistics.median(round_trips):7.2f}")
    for name, values in TIMES.items():
        print(f"  {name:28s} {statistics.median(values):7.2f}")


if __name__ == "__main__":
    main()
