"""Do light requests stay light? `/info` and `/datastore` latency on a real server while a
300-slice inference runs, and while a training run runs (issue 15: p99 within 1 s).

    .venv/bin/python -m benchmarks.light_requests [--slices 300] [--checkpoint tiny|shipped|PATH] \
        [--probe-ms 200] [--idle-s 10] [--train-s 60] [--out benchmarks/results/light_requests.json]

Starts `monailabel start_server` (`benchmarks.app_server`) on loopback with a studies folder of
LIDC slices (radiologist labels, for training) and one `--slices`-slice CT volume (the shared CT
series repeated along z), then a prober thread asks `GET /info/` and `GET /datastore/` in turn,
one request every `--probe-ms`, through three phases:

1. idle (`--idle-s`);
2. one `POST /infer/lung_nlb_seg` on the whole volume, from its start until its answer;
3. a training run (`POST /train/lung_nlb_seg`, many epochs) for `--train-s`, then stopped
   (`DELETE /train/`).

Per phase and endpoint: probes, errors, p50 / p99 / max ms; the infer's own duration. `--checkpoint
tiny` (the default) serves a small random NLB U-Net at 128 px, so that the volume's inference
takes seconds, not the minutes of the shipped native-resolution weights on a CPU (`shipped`): what
is measured is whether the server answers light requests while the long request runs, which does
not depend on how long it runs. The result file carries the date, commit and machine load
(`os.getloadavg()` before and after): on a shared machine the absolute times are inflated.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

from benchmarks.app_server import start_server, stop_server
from benchmarks.app_studies import build_studies, tiny_checkpoint, write_sidecar
from lungnlb.checkpoint import default_checkpoint_path
from lungnlb.io import read_image, write_nifti
from lungnlb.io.atomic import atomic_write_text
from lungnlb.stamp import load_average, run_stamp

LIGHT_PATHS = ("/info/", "/datastore/")
TARGET_P99_MS = 1000.0


class Prober:
    """A thread asking the light endpoints in turn, one request every `interval_s`; `mark(phase)`
    tags the following probes with `phase`."""

    def __init__(self, url: str, interval_s: float, timeout_s: float = 300.0):
        self.url, self.interval_s, self.timeout_s = url, interval_s, timeout_s
        self.phase = "idle"
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="prober", daemon=True)

    def start(self) -> "Prober":
        self._thread.start()
        return self

    def mark(self, phase: str) -> None:
        self.phase = phase

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.timeout_s + 10)

    def _loop(self) -> None:
        session = requests.Session()
        index = 0
        while not self._stop.is_set():
            path = LIGHT_PATHS[index % len(LIGHT_PATHS)]
            index += 1
            phase = self.phase
            start = time.perf_counter()
            try:
                ok = session.get(self.url + path, timeout=self.timeout_s).status_code == 200
            except requests.RequestException:
                ok = False
            self.samples.append({"phase": phase, "path": path, "ms": (time.perf_counter() - start) * 1000, "ok": ok})
            self._stop.wait(self.interval_s)

    def summary(self, phase: str) -> dict[str, dict]:
        """Per light path: probes, errors, p50 / p99 / max ms of the probes tagged `phase`."""
        out = {}
        for path in LIGHT_PATHS:
            rows = [s for s in self.samples if s["phase"] == phase and s["path"] == path]
            ms = np.array([s["ms"] for s in rows]) if rows else np.array([np.nan])
            out[path] = {"probes": len(rows), "errors": sum(not s["ok"] for s in rows),
                         "p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1),
                         "max_ms": round(float(np.max(ms)), 1)}
        return out


def make_long_volume(studies: Path, slices: int) -> str:
    """A `slices`-slice volume: the shared CT series repeated along z."""
    image = read_image(studies / "volume_0.nii.gz", intensity="hu")
    reps = int(np.ceil(slices / image.array.shape[0]))
    image_id = f"volume_{slices}"
    write_nifti(np.concatenate([image.array] * reps)[:slices], image.affine, studies / f"{image_id}.nii.gz")
    write_sidecar(studies, image_id, "hu", [], "benchmark")
    return image_id


def resolve_checkpoint(choice: str, root: Path) -> Path:
    if choice == "tiny":
        return tiny_checkpoint(root / "ckpt" / "tiny")
    if choice == "shipped":
        path = default_checkpoint_path()
        if path is None:
            raise SystemExit("no shipped weights in this checkout")
        return path
    return Path(choice)


def wait_training_ended(url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = requests.get(f"{url}/train/", params={"check_if_running": "true"}, timeout=30)
        if status.status_code != 200:
            return
        time.sleep(1)
    raise TimeoutError("the training run did not stop")


def print_phase(name: str, summary: dict[str, dict], extra: str = "") -> None:
    for path, row in summary.items():
        verdict = "meets" if row["p99_ms"] <= TARGET_P99_MS and not row["errors"] else "MISSES"
        print(f"  {name:10s} {path:12s} {row['probes']:4d} probes, {row['errors']} errors, p50 {row['p50_ms']:8.1f} ms, "
              f"p99 {row['p99_ms']:8.1f} ms, max {row['max_ms']:8.1f} ms ({verdict} p99 <= {TARGET_P99_MS:.0f} ms){extra}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--checkpoint", default="tiny", help="tiny | shipped | a checkpoint path")
    parser.add_argument("--probe-ms", type=float, default=200.0)
    parser.add_argument("--idle-s", type=float, default=10.0)
    parser.add_argument("--train-s", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/light_requests.json"))
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="lungnlb_light_"))
    studies = root / "studies"
    result = {**run_stamp(), "command": "python -m benchmarks.light_requests " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"), "cpus": os.cpu_count(),
        "load_average_before": load_average(), "target_p99_ms": TARGET_P99_MS}
    process = None
    try:
        build_studies(studies, slices_per_file=6, files=2)
        volume = make_long_volume(studies, args.slices)
        checkpoint = resolve_checkpoint(args.checkpoint, root)
        conf = {"checkpoint": str(checkpoint), "model_dir": str(root / "model"), "device": "cpu", "tracking": "none"}
        process, url = start_server(studies, conf, root / "server.log", {"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"})
        print(f"server {url}; checkpoint {checkpoint}; volume {volume}; load average {result['load_average_before']}")
        prober = Prober(url, args.probe_ms / 1000).start()
        time.sleep(args.idle_s)

        prober.mark("infer")
        start = time.perf_counter()
        response = requests.post(f"{url}/infer/lung_nlb_seg", params={"image": volume, "output": "json"}, timeout=3600)
        result["infer_s"] = round(time.perf_counter() - start, 2)
        result["infer_status"] = response.status_code
        if response.status_code != 200:
            raise SystemExit(f"volume infer failed: {response.status_code} {response.text[:500]}")

        prober.mark("between")
        params = {"max_epochs": 100000, "val_split": 0.5, "learning_rate": 1e-4, "train_batch_size": 2, "tracking": "none"}
        response = requests.post(f"{url}/train/lung_nlb_seg", json=params, timeout=60)
        if response.status_code != 200:
            raise SystemExit(f"training did not start: {response.status_code} {response.text[:500]}")
        prober.mark("training")
        time.sleep(args.train_s)
        prober.mark("between")
        requests.delete(f"{url}/train/", timeout=60)
        wait_training_ended(url)
        prober.stop()

        result["phases"] = {phase: prober.summary(phase) for phase in ("idle", "infer", "training")}
        result["load_average_after"] = load_average()
        print(f"{args.slices}-slice volume inference: {result['infer_s']} s")
        for phase, summary in result["phases"].items():
            print_phase(phase, summary)
        print(f"load average before {result['load_average_before']}, after {result['load_average_after']} "
              f"({os.cpu_count()} CPUs)")
        atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    finally:
        if process is not None:
            stop_server(process)
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
