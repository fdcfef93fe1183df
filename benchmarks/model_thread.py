"""Why the app runs every forward pass on one model thread: the same forward on different threads.

    .venv/bin/python -m benchmarks.model_thread [--calls 40] [--rounds 3]

PyTorch's CPU kernels run on OpenMP (libgomp), which keeps a team of worker threads per thread
that starts parallel regions and stops spin-waiting between regions once it manages more threads
than there are CPUs. Each round runs two fresh processes on the shipped weights (a 512 x 512
slice, `Predictor.predict`, median of `--calls` calls after 5 warm-ups):

- `request threads`: the model is loaded and called on the main thread, then called on a second
  thread, as happens when a server answers requests on a pool of threads;
- `model thread`: the model is loaded and called only on one dedicated thread
  (`apps/lungnlb/lib/model_thread.py`'s pattern).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from lungnlb.runtime import enable_huge_pages  # noqa: E402

enable_huge_pages()  # before torch is imported, as the server does

import numpy as np  # noqa: E402


def median_ms(predictor, array: np.ndarray, calls: int) -> float:
    """Median milliseconds of `calls` predict calls on the calling thread, after 5 warm-ups."""
    times = []
    for index in range(calls + 5):
        start = time.perf_counter()
        predictor.predict(array, "hu")
        if index >= 5:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def child(mode: str, calls: int) -> None:
    """One measurement process; prints `label ms` lines."""
    from lungnlb.inference import Predictor

    array = (np.random.default_rng(0).random((512, 512)) * 1400 - 1000).astype(np.float32)
    if mode == "request-threads":
        predictor = Predictor.from_checkpoint(None)
        print(f"main thread (loaded the model) {median_ms(predictor, array, calls):.1f}")
        result = []
        second = threading.Thread(target=lambda: result.append(median_ms(predictor, array, calls)))
        second.start()
        second.join()
        print(f"second thread {result[0]:.1f}")
    else:
        with ThreadPoolExecutor(max_workers=1) as model_thread:
            predictor = model_thread.submit(Predictor.from_checkpoint, None).result()
            print(f"model thread (loaded the model, only caller) {model_thread.submit(median_ms, predictor, array, calls).result():.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", choices=["request-threads", "model-thread"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.calls)
        return 0
    results: dict[str, list[float]] = {}
    for round_index in range(args.rounds):
        for mode in ("request-threads", "model-thread"):
            output = subprocess.run([sys.executable, __file__, "--child", mode, "--calls", str(args.calls)],
                                    check=True, capture_output=True, text=True).stdout
            for line in output.strip().splitlines():
                label, value = line.rsplit(" ", 1)
                results.setdefault(label, []).append(float(value))
                print(f"round {round_index + 1}: {label:45s} {float(value):6.1f} ms", flush=True)
    print("median over rounds (ms per 512 x 512 slice):")
    for label, values in results.items():
        print(f"  {label:45s} {statistics.median(values):6.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
