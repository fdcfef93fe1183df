"""Latency and load of the LungNLB MONAI Label app on a real server on loopback.

    .venv/bin/python -m benchmarks.server [--rounds 3] [--clients 8] [--requests 20] [--repeats 5] [--slice-repeats 21]

Starts `monailabel start_server` (`benchmarks.app_server`) on a studies folder of LIDC slices + one
CT series from ../shared/data (`benchmarks.app_studies`), with lungnlb's shipped default weights
unless `--checkpoint`, then measures:

1. round-trip latency of `POST /infer/lung_nlb_seg` (JSON + mask) for a 512x512 slice and a
   64-slice volume, against the direct `Predictor.predict` call on the same arrays in a separate
   "direct" process, the two alternated call by call (median of `--slice-repeats` / `--repeats`
   pairs): overhead ratio = server median / direct median (target <= 1.25). The server's start-up
   scoring run is switched off so that nothing else runs. Each round starts a fresh server and a
   fresh direct process (`--rounds`): the speed of the same forward differs by tens of percent
   from one process to the next, so one pair of processes cannot decide a ratio; the summary is
   the median over rounds. Between two calls the benchmark pauses `--settle-ms`: both processes
   run PyTorch on OpenMP, whose idle workers spin for a while after a call, and on a small machine
   one process's spinning workers would slow the other's next call.
   Each round also prints where a slice round trip goes: the task's own `latencies` (result
   JSON) and a 404 infer round trip (the HTTP and framework cost with no model).
2. `--clients` concurrent clients x `--requests` slice requests each (last round): errors,
   p50/p90/p99 latency, and the server process's peak resident memory (VmHWM from /proc).

The machine's load average is printed before and after: on a shared machine the ratios hold
(both sides run under the same load), the absolute times do not.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lungnlb.runtime import HUGE_PAGES, enable_huge_pages

enable_huge_pages()  # here and, through the environment, in the server, as scripts/serve_sample.sh does

import numpy as np  # noqa: E402
import requests  # noqa: E402

from benchmarks.app_server import start_server, stop_server  # noqa: E402
from benchmarks.app_studies import build_studies, tiny_checkpoint  # noqa: E402
from lungnlb.checkpoint import default_checkpoint_path  # noqa: E402
from lungnlb.data.studies import image_path, read_study_image, write_sidecar  # noqa: E402
from lungnlb.inference import Predictor  # noqa: E402
from lungnlb.io import write_nifti  # noqa: E402


def alternated_medians(first, second, repeats: int, settle_s: float) -> tuple[float, float]:
    """Median seconds of two timed calls (each returns its own duration), alternated call by call
    after one warm-up each, with a pause of `settle_s` before every call."""
    first(), second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for call, bucket in ((first, times[0]), (second, times[1])):
            time.sleep(settle_s)
            bucket.append(call())
    return statistics.median(times[0]), statistics.median(times[1])


def direct_worker(connection, checkpoint: str, paths: dict[str, str]) -> None:
    """The direct process: load the model and the images, then answer each image key sent with
    the seconds one `Predictor.predict` call on it took (None ends the process)."""
    predictor = Predictor.from_checkpoint(checkpoint, batch_size=16)
    images = {key: read_study_image(path) for key, path in paths.items()}  # as the server reads them
    connection.send(f"{predictor.config['model']['name']} input {predictor.config['input_size']}")
    while (key := connection.recv()) is not None:
        start = time.perf_counter()
        predictor.predict(images[key].array, images[key].intensity)
        connection.send(time.perf_counter() - start)


class DirectProcess:
    """A fresh process running `direct_worker`; `time(key)` is one direct call's duration."""

    def __init__(self, checkpoint: Path, paths: dict[str, Path]):
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(target=direct_worker, args=(child, str(checkpoint), {k: str(v) for k, v in paths.items()}))
        self.process.start()
        self.description = self.connection.recv()

    def time(self, key: str) -> float:
        self.connection.send(key)
        return self.connection.recv()

    def close(self) -> None:
        self.connection.send(None)
        self.process.join(timeout=30)


def make_volume(studies: Path, depth: int = 64) -> str:
    """A 64-slice volume: the CT series repeated along z (the shared series are shorter)."""
    image = read_study_image(image_path(studies, "volume_0"), intensity="hu")
    reps = int(np.ceil(depth / image.array.shape[0]))
    write_nifti(np.concatenate([image.array] * reps)[:depth], image.affine, image_path(studies, "volume_64"))
    write_sidecar(studies, "volume_64", {"intensity": "hu", "source": "benchmark", "case": "b"})
    return "volume_64"


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory of the server and its children (largest VmHWM), MiB."""
    import psutil

    processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    peaks = []
    for process in processes:
        for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peaks.append(int(line.split()[1]) / 1024)
    return max(peaks)


def load_average() -> str:
    """1, 5 and 15 minute load averages of the machine and its CPU count."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg()) + f" ({os.cpu_count()} CPUs)"


def post_infer(url: str, image_id: str, model: str = "lung_nlb_seg") -> tuple[float, requests.Response]:
    """One `POST /infer/<model>` round trip (JSON + mask) on `image_id`: (seconds, response)."""
    start = time.perf_counter()
    response = requests.post(f"{url}/infer/{model}", params={"image": image_id, "output": "all"}, timeout=600)
    return time.perf_counter() - start, response


def served_call(url: str, image_id: str) -> float:
    """Seconds of one successful segmentation round trip."""
    elapsed, response = post_infer(url, image_id)
    response.raise_for_status()
    return elapsed


def slice_breakdown(url: str, image_id: str, calls: int, settle_s: float) -> str:
    """Where a slice round trip goes: medians of the round trip, of the task's own `latencies`
    (result JSON: model call, writing the result, task total) and of a 404 infer round trip (what
    uvicorn, FastAPI and MONAI Label's endpoint cost with no model and no result)."""
    from requests_toolbelt.multipart.decoder import MultipartDecoder

    rows, floor = [], []
    for _ in range(calls):
        time.sleep(settle_s)
        elapsed, response = post_infer(url, image_id)
        parts = MultipartDecoder(response.content, response.headers["content-type"]).parts
        latencies = next(json.loads(part.text) for part in parts if b'name="params"' in part.headers[b"Content-Disposition"])["latencies"]
        rows.append((elapsed, latencies["model"], latencies["write"], latencies["total"]))
        time.sleep(settle_s)
        floor.append(post_infer(url, image_id, model="no_such_model")[0])
    trip, model, write, total = (statistics.median(column) * 1000 for column in zip(*rows))
    return (f"slice round trip {trip:.1f} ms = task {total:.1f} (model {model:.1f}, result {write:.1f}) "
            f"+ {trip - total:.1f} outside the task; a 404 infer round trip {statistics.median(floor) * 1000:.1f} ms")


def load_test(url: str, image_id: str, clients: int, requests_each: int, pid: int) -> str:
    """`clients` concurrent clients x `requests_each` slice requests: errors, throughput, latencies, peak RSS."""

    def client(_: int) -> list[tuple[float, bool]]:
        results = []
        for _ in range(requests_each):
            elapsed, response = post_infer(url, image_id)
            results.append((elapsed, response.status_code == 200))
        return results

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        outcomes = [item for batch in pool.map(client, range(clients)) for item in batch]
    wall = time.perf_counter() - start
    latencies = np.array([t for t, _ in outcomes]) * 1000
    errors = sum(not ok for _, ok in outcomes)
    p50, p90, p99 = np.percentile(latencies, [50, 90, 99])
    return (f"load {clients} clients x {requests_each} requests: {errors} errors, {len(outcomes) / wall:.1f} req/s, "
            f"latency p50 {p50:.0f} ms p90 {p90:.0f} ms p99 {p99:.0f} ms, server peak RSS {peak_rss_mb(pid):.0f} MiB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="fresh server + direct process pairs")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5, help="alternated call pairs for the volume")
    parser.add_argument("--slice-repeats", type=int, default=21, help="alternated call pairs for the slice (cheap, noisy)")
    parser.add_argument("--settle-ms", type=float, default=50.0, help="pause before every timed call")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="weights to serve [lungnlb's shipped default; a small random NLB U-Net if none ships]")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="lungnlb_bench_"))
    studies = root / "studies"
    ids = build_studies(studies, slices_per_file=2, files=1)
    cases = {"512x512 slice": (ids["slices"][0], args.slice_repeats), "64-slice volume": (make_volume(studies), args.repeats)}
    checkpoint = args.checkpoint or default_checkpoint_path() or tiny_checkpoint(root / "ckpt" / "model")
    print(f"load average {load_average()}; checkpoint {checkpoint}; {HUGE_PAGES}={os.environ.get(HUGE_PAGES)}")
    conf = {"checkpoint": str(checkpoint), "model_dir": str(root / "model"), "device": "auto"}
    medians: dict[str, list[tuple[float, float]]] = {label: [] for label in cases}
    try:
        for round_index in range(args.rounds):
            # no start-up scoring run: it would infer every image in a subprocess while we measure
            process, url = start_server(studies, conf, root / "server.log", {"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"})
            direct = DirectProcess(checkpoint, {image_id: image_path(studies, image_id) for image_id, _ in cases.values()})
            try:
                print(f"round {round_index + 1}/{args.rounds}: model {direct.description}; server {url}")
                for label, (image_id, repeats) in cases.items():
                    pair = alternated_medians(lambda: direct.time(image_id), lambda: served_call(url, image_id),
                                              repeats, args.settle_ms / 1000)
                    medians[label].append(pair)
                    print(f"  {label:16s} direct {pair[0] * 1000:8.1f} ms  server {pair[1] * 1000:8.1f} ms  "
                          f"overhead x{pair[1] / pair[0]:.2f}")
                print("  " + slice_breakdown(url, ids["slices"][0], args.slice_repeats, args.settle_ms / 1000))
                if round_index == args.rounds - 1:
                    print(load_test(url, ids["slices"][0], args.clients, args.requests, process.pid))
            finally:
                direct.close()
                stop_server(process)
        for label, pairs in medians.items():
            ratios = [served / direct for direct, served in pairs]
            print(f"{label:16s} over {len(pairs)} rounds: direct {statistics.median(p[0] for p in pairs) * 1000:.1f} ms, "
                  f"server {statistics.median(p[1] for p in pairs) * 1000:.1f} ms, overhead x{statistics.median(ratios):.2f} "
                  f"(rounds x{min(ratios):.2f}-x{max(ratios):.2f}; target <= 1.25)")
        print(f"load average {load_average()}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
