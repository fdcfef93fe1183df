"""Latency and load of the LungNLB MONAI Label app on a real server on loopback.

    .venv/bin/python benchmarks/server.py [--clients 8] [--requests 20] [--repeats 5] [--slice-repeats 21]

Starts `monailabel start_server` (tests/app_support.py: LIDC slices + one CT series from
../shared/data; lungnlb's shipped default weights unless `--checkpoint`), then measures in the
same run:

1. round-trip latency of `POST /infer/lung_nlb_seg` (JSON + mask) for a 512x512 slice and a
   64-slice volume, against the direct `Predictor.predict` call on the same arrays in this
   process, the two alternated call by call (median of `--slice-repeats` / `--repeats` pairs):
   overhead ratio = server median / direct median
   (target <= 1.25); the server's start-up scoring run is switched off so that nothing else runs;
2. `--clients` concurrent clients x `--requests` slice requests each: errors, p50/p90/p99
   latency, and the server process's peak resident memory (VmHWM from /proc).

The machine's load average is printed before and after: on a shared machine the ratios hold
(both sides run under the same load), the absolute times do not.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from lungnlb.runtime import HUGE_PAGES, enable_huge_pages  # noqa: E402

enable_huge_pages()  # here and, through the environment, in the server, as scripts/serve_sample.sh does

import numpy as np  # noqa: E402
import requests  # noqa: E402

sys.path.insert(0, str(REPO / "tests"))
from app_support import build_studies, tiny_checkpoint  # noqa: E402
from test_app_server import start_server, stop_server  # noqa: E402

from lungnlb.checkpoint import default_checkpoint_path, load_model  # noqa: E402
from lungnlb.inference import Predictor  # noqa: E402
from lungnlb.io import read_image, write_nifti  # noqa: E402


def interleaved_medians(first, second, repeats: int) -> tuple[float, float]:
    """Median seconds of two calls, alternated call by call after one warm-up each, so that both
    see the same load of a shared machine."""
    first(), second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for call, bucket in ((first, times[0]), (second, times[1])):
            start = time.perf_counter()
            call()
            bucket.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def make_volume(studies: Path, depth: int = 64) -> str:
    """A 64-slice volume: the CT series repeated along z (the shared series are shorter)."""
    image = read_image(studies / "volume_0.nii.gz", intensity="hu")
    reps = int(np.ceil(depth / image.array.shape[0]))
    write_nifti(np.concatenate([image.array] * reps)[:depth], image.affine, studies / "volume_64.nii.gz")
    (studies / "meta" / "volume_64.json").write_text('{"intensity": "hu", "source": "benchmark", "case": "b"}')
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5, help="alternated call pairs for the volume")
    parser.add_argument("--slice-repeats", type=int, default=21, help="alternated call pairs for the slice (cheap, noisy)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="weights to serve [lungnlb's shipped default; a small random NLB U-Net if none ships]")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="lungnlb_bench_"))
    ids = build_studies(root / "studies", slices_per_file=2, files=1)
    volume_id = make_volume(root / "studies")
    checkpoint = args.checkpoint or default_checkpoint_path() or tiny_checkpoint(root / "ckpt" / "model")
    print(f"load average {load_average()}; checkpoint {checkpoint}; {HUGE_PAGES}={os.environ.get(HUGE_PAGES)}")
    conf = {"checkpoint": str(checkpoint), "model_dir": str(root / "model"), "device": "auto"}
    # no start-up scoring run: it would infer every image in a subprocess while we measure
    process, url = start_server(root / "studies", conf, root / "server.log", {"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"})
    try:
        model, config = load_model(checkpoint)
        predictor = Predictor(model, config, "cpu", batch_size=16)
        print(f"model {config['model']['name']} {config['model'].get('kwargs') or ''} input {config['input_size']}; server {url}")
        for label, image_id, repeats in (("512x512 slice", ids["slices"][0], args.slice_repeats), ("64-slice volume", volume_id, args.repeats)):
            image = read_image(root / "studies" / f"{image_id}.nii.gz")

            def server_call(image_id=image_id):
                response = requests.post(f"{url}/infer/lung_nlb_seg", params={"image": image_id, "output": "all"}, timeout=600)
                response.raise_for_status()

            direct, served = interleaved_medians(lambda: predictor.predict(image.array, image.intensity), server_call, repeats)
            print(f"{label:16s} direct {direct * 1000:8.1f} ms  server {served * 1000:8.1f} ms  overhead x{served / direct:.2f}")

        def client(_: int) -> list[tuple[float, bool]]:
            results = []
            for _ in range(args.requests):
                start = time.perf_counter()
                response = requests.post(f"{url}/infer/lung_nlb_seg", params={"image": ids["slices"][0], "output": "all"}, timeout=600)
                results.append((time.perf_counter() - start, response.status_code == 200))
            return results

        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            outcomes = [item for batch in pool.map(client, range(args.clients)) for item in batch]
        wall = time.perf_counter() - start
        latencies = np.array([t for t, _ in outcomes]) * 1000
        errors = sum(not ok for _, ok in outcomes)
        p50, p90, p99 = np.percentile(latencies, [50, 90, 99])
        print(f"load {args.clients} clients x {args.requests} requests: {errors} errors, {len(outcomes) / wall:.1f} req/s, "
              f"latency p50 {p50:.0f} ms p90 {p90:.0f} ms p99 {p99:.0f} ms, server peak RSS {peak_rss_mb(process.pid):.0f} MiB")
        print(f"load average {load_average()}")
    finally:
        stop_server(process)
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
