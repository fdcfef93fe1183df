"""Load of annotators on a real server: concurrent clients each getting the next sample, inferring
it and submitting a final label, in a loop (issue 15's load benchmark).

    .venv/bin/python -m benchmarks.load [--clients 8 16] [--iterations 4] [--checkpoint shipped|tiny|PATH] \
        [--strategy random] [--out benchmarks/results/load.json]

For each client count a fresh `monailabel start_server` (`benchmarks.app_server`) on loopback serves
a fresh studies folder of 2D LIDC slices with radiologist `original` labels
(`benchmarks.app_studies`). Each client (own HTTP session) repeats `--iterations` times:

1. `POST /activelearning/<strategy>` -> an image id (when the strategy has none left, the client
   takes an image of the folder in turn; the request still counts);
2. `POST /infer/lung_nlb_seg?output=image` on it -> the mask;
3. `PUT /datastore/label?tag=final` with that mask, one voxel flipped at a place unique to this
   client and iteration (so that every submission differs), and a unique user name in `params`.

Meanwhile a prober (`benchmarks.light_requests.Prober`) asks `/info/` and `/datastore/` every
`--probe-ms`. Reported per client count: requests tried, errors (non-2xx or no answer), p50 / p99
latency overall and per kind, `/info` and `/datastore` p99 during the load, the server's peak
resident memory (largest VmHWM of the server and its children), and **labels lost**: submissions
answered 200 whose version is missing from the image's history (`.lungnlb/labels/<id>/history.json`),
whose stored version file differs from the submitted voxels, or an image whose `final` label is not
its last version (must be 0). The result file carries date, commit, command and the machine's load
average before and after: on a shared machine the latencies are inflated by whatever else runs.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import requests

from benchmarks.app_server import start_server, stop_server
from benchmarks.app_studies import build_studies
from benchmarks.light_requests import Prober, resolve_checkpoint
from benchmarks.server import peak_rss_mb
from lungnlb.io.atomic import atomic_write_text
from lungnlb.stamp import load_average, run_stamp


def decode_nifti(data: bytes) -> nib.Nifti1Image:
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return nib.Nifti1Image.from_bytes(data)


def unique_label(mask_bytes: bytes, client: int, iteration: int) -> tuple[bytes, np.ndarray]:
    """The inferred mask with one voxel flipped at a place unique to (client, iteration): gzipped
    NIfTI bytes to upload and the voxels they hold."""
    image = decode_nifti(mask_bytes)
    voxels = (np.asarray(image.dataobj) > 0).astype(np.uint8)
    where = np.unravel_index(1 + client * 1000 + iteration, voxels.shape)
    voxels[where] = 1 - voxels[where]
    out = nib.Nifti1Image(voxels, image.affine)
    return gzip.compress(out.to_bytes(), compresslevel=1), voxels


class Client:
    """One annotator: its own HTTP session, the requests it made (kind, ms, ok) and its submissions."""

    def __init__(self, index: int, url: str, strategy: str, fallback: list[str]):
        self.index, self.url, self.strategy, self.fallback = index, url, strategy, fallback
        self.session = requests.Session()
        self.calls: list[tuple[str, float, bool, str]] = []
        self.submitted: list[dict] = []

    def _call(self, kind: str, method: str, path: str, **kwargs) -> requests.Response | None:
        start = time.perf_counter()
        try:
            response = self.session.request(method, self.url + path, timeout=900, **kwargs)
        except requests.RequestException as error:
            self.calls.append((kind, (time.perf_counter() - start) * 1000, False, f"{type(error).__name__}: {error}"))
            return None
        ok = 200 <= response.status_code < 300
        self.calls.append((kind, (time.perf_counter() - start) * 1000, ok,
                           "" if ok else f"{response.status_code} {response.text[:200]}"))
        return response if ok else None

    def run(self, iterations: int) -> "Client":
        for iteration in range(iterations):
            sample = self._call("next-sample", "POST", f"/activelearning/{self.strategy}", json={"client_id": f"c{self.index}"})
            image_id = (sample.json() or {}).get("id") if sample is not None else None
            if not image_id:
                image_id = self.fallback[(self.index + iteration * 7) % len(self.fallback)]
            mask = self._call("infer", "POST", f"/infer/lung_nlb_seg?image={image_id}&output=image")
            if mask is None:
                continue
            upload, voxels = unique_label(mask.content, self.index, iteration)
            user = f"load-c{self.index}-i{iteration}"
            saved = self._call("submit", "PUT", f"/datastore/label?image={image_id}&tag=final",
                               files={"label": ("label.nii.gz", upload)}, data={"params": json.dumps({"user": user})})
            if saved is not None:
                self.submitted.append({"image": image_id, "user": user, "voxels": voxels})
        return self


def labels_lost(studies: Path, submitted: list[dict]) -> tuple[int, list[str]]:
    """Submissions answered 200 that the studies folder does not hold as sent (see the module docstring)."""
    problems = []
    histories: dict[str, list[dict]] = {}
    for item in submitted:
        image_id = item["image"]
        if image_id not in histories:
            path = studies / ".lungnlb" / "labels" / image_id / "history.json"
            histories[image_id] = json.loads(path.read_text()) if path.is_file() else []
        record = next((r for r in histories[image_id] if r.get("user") == item["user"]), None)
        if record is None:
            problems.append(f"{item['user']} on {image_id}: no version in the history")
            continue
        stored = studies / ".lungnlb" / "labels" / image_id / record["file"]
        if not stored.is_file():
            problems.append(f"{item['user']} on {image_id}: version file {record['file']} missing")
            continue
        voxels = (np.asarray(nib.load(stored).dataobj) > 0).astype(np.uint8)
        if not np.array_equal(voxels.reshape(-1), item["voxels"].reshape(-1)):
            problems.append(f"{item['user']} on {image_id}: {record['file']} differs from the submitted label")
    for image_id, history in histories.items():
        final = studies / "labels" / "final" / f"{image_id}.nii.gz"
        last = studies / ".lungnlb" / "labels" / image_id / history[-1]["file"] if history else None
        if last is None or not final.is_file() or \
                not np.array_equal(np.asarray(nib.load(final).dataobj), np.asarray(nib.load(last).dataobj)):
            problems.append(f"{image_id}: the final label is not its last version")
    return len(problems), problems


def percentiles(ms: list[float]) -> dict[str, float]:
    if not ms:
        return {"p50_ms": float("nan"), "p99_ms": float("nan")}
    p50, p99 = np.percentile(ms, [50, 99])
    return {"p50_ms": round(float(p50), 1), "p99_ms": round(float(p99), 1)}


def run_level(clients: int, args, checkpoint: Path, root: Path) -> dict:
    studies = root / f"studies_{clients}"
    ids = build_studies(studies, slices_per_file=args.slices_per_file, files=args.files)["slices"]
    conf = {"checkpoint": str(checkpoint), "model_dir": str(root / f"model_{clients}"), "device": "cpu", "tracking": "none"}
    process, url = start_server(studies, conf, root / f"server_{clients}.log", {"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"})
    try:
        requests.post(f"{url}/infer/lung_nlb_seg?image={ids[0]}&output=json", timeout=600).raise_for_status()  # warm-up
        prober = Prober(url, args.probe_ms / 1000)
        prober.mark("load")
        prober.start()
        workers = [Client(index, url, args.strategy, ids) for index in range(clients)]
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(lambda client: client.run(args.iterations), workers))
        wall = time.perf_counter() - start
        prober.stop()
        rss = peak_rss_mb(process.pid)
    finally:
        stop_server(process)
    calls = [call for client in workers for call in client.calls]
    submitted = [item for client in workers for item in client.submitted]
    lost, problems = labels_lost(studies, submitted)
    light = prober.summary("load")
    return {
        "clients": clients, "iterations": args.iterations, "images": len(ids), "wall_s": round(wall, 1),
        "requests": len(calls), "errors": sum(not ok for _, _, ok, _ in calls),
        "error_examples": sorted({why for _, _, ok, why in calls if not ok})[:5],
        **percentiles([ms for _, ms, _, _ in calls]),
        "by_kind": {kind: {"requests": sum(k == kind for k, _, _, _ in calls),
                           "errors": sum(k == kind and not ok for k, _, ok, _ in calls),
                           **percentiles([ms for k, ms, _, _ in calls if k == kind])}
                    for kind in ("next-sample", "infer", "submit")},
        "light_during_load": light, "server_peak_rss_mib": round(rss),
        "labels_submitted": len(submitted), "labels_lost": lost, "lost_examples": problems[:5],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--iterations", type=int, default=4, help="next-sample + infer + submit rounds per client")
    parser.add_argument("--checkpoint", default="shipped", help="shipped | tiny | a checkpoint path")
    parser.add_argument("--strategy", default="random")
    parser.add_argument("--files", type=int, default=2, help="LIDC npz files to take slices from")
    parser.add_argument("--slices-per-file", type=int, default=8)
    parser.add_argument("--probe-ms", type=float, default=250.0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/load.json"))
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="lungnlb_load_"))
    result = {**run_stamp(), "command": "python -m benchmarks.load " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if k != "out"), "cpus": os.cpu_count(),
        "load_average_before": load_average(), "levels": []}
    try:
        checkpoint = resolve_checkpoint(args.checkpoint, root)
        result["checkpoint"] = str(checkpoint) if args.checkpoint != "tiny" else "tiny (random NLB U-Net, 128 px)"
        for clients in args.clients:
            level = run_level(clients, args, checkpoint, root)
            result["levels"].append(level)
            kinds = ", ".join(f"{kind} p50 {row['p50_ms']:.0f} / p99 {row['p99_ms']:.0f} ms"
                              for kind, row in level["by_kind"].items())
            light = ", ".join(f"{path} p99 {row['p99_ms']:.0f} ms (max {row['max_ms']:.0f}, {row['errors']} errors)"
                              for path, row in level["light_during_load"].items())
            print(f"{clients} clients x {args.iterations} rounds: {level['requests']} requests in {level['wall_s']} s, "
                  f"{level['errors']} errors, p50 {level['p50_ms']:.0f} ms, p99 {level['p99_ms']:.0f} ms ({kinds}); "
                  f"during the load {light}; server peak RSS {level['server_peak_rss_mib']} MiB; "
                  f"labels submitted {level['labels_submitted']}, lost {level['labels_lost']}")
            for example in level["error_examples"] + level["lost_examples"]:
                print(f"    {example}")
        result["load_average_after"] = load_average()
        print(f"load average before {result['load_average_before']}, after {result['load_average_after']} "
              f"({os.cpu_count()} CPUs); checkpoint {result['checkpoint']}")
        atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    lost = sum(level["labels_lost"] for level in result["levels"])
    return 1 if lost else 0


if __name__ == "__main__":
    raise SystemExit(main())
