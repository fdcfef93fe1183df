"""CPU speed, size and memory of every registry model at 1x1x512x512, as ratios against `unet`.

Measures, in one run: parameters; forward latency (median, and minimum, of --runs timed runs after
warm-up, inference mode, all cores; targets use the median, the minimum shows the figure least
disturbed by other processes on a shared machine; models interleaved round by round so that load from other processes
hits all of them alike); peak resident memory of one forward pass (in a fresh subprocess per
model: peak RSS during the forward minus RSS before it); and the achieved GFLOP/s of
`unet_sl_nlb` (FLOPs counted by torch.utils.flop_counter.FlopCounterMode, divided by its median
latency) against the GFLOP/s of a float32 torch.matmul timed in the same rounds.

Targets (ratios in this run): unet_sl_nlb latency <= 1.10x unet, parameters <= 1.10x unet,
latency below unet_sa, GFLOP/s >= 50% of matmul.

    python benchmarks/speed.py [--runs 10] [--models unet unet_sl_nlb ...] [--output speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lungnlb.networks import build_model, list_models  # noqa: E402

SIZE = 512
MATMUL_N = 2048
REFERENCE, SUBJECT, ATTENTION_BASELINE = "unet", "unet_sl_nlb", "unet_sa"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="timed runs per model (>= 10 for the report)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per model before timing")
    parser.add_argument("--models", nargs="+", default=list_models(), help="models to measure (unet always included)")
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("results") / "speed.json")
    parser.add_argument("--peak-memory-of", help=argparse.SUPPRESS)  # internal: child process mode
    return parser.parse_args()


def model_input() -> torch.Tensor:
    return torch.randn(1, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_latencies(models: dict[str, torch.nn.Module], runs: int, warmup: int) -> tuple[dict[str, list[float]], list[float]]:
    """Interleaved rounds: each round times every model once and one matmul."""
    x = model_input()
    a, b = torch.randn(MATMUL_N, MATMUL_N), torch.randn(MATMUL_N, MATMUL_N)
    times: dict[str, list[float]] = {name: [] for name in models}
    matmul_times: list[float] = []
    with torch.inference_mode():
        for _ in range(warmup):
            for model in models.values():
                model(x)
            torch.matmul(a, b)
        for round_index in range(runs):
            for name, model in models.items():
                times[name].append(timed(lambda: model(x)))
            matmul_times.append(timed(lambda: torch.matmul(a, b)))
            print(f"round {round_index + 1}/{runs} done", file=sys.stderr, flush=True)
    return times, matmul_times


def count_flops(model: torch.nn.Module) -> int:
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(model_input())
    return counter.get_total_flops()


def peak_memory_mib(name: str) -> float:
    """Peak RSS increase of one forward pass, measured in a fresh interpreter."""
    result = subprocess.run(
        [sys.executable, __file__, "--peak-memory-of", name], capture_output=True, text=True, check=True
    )
    return float(result.stdout.strip().splitlines()[-1])


def child_peak_memory(name: str) -> None:
    model, x = build_model(name).eval(), model_input()
    before_kib = current_rss_kib()
    with torch.inference_mode():
        model(x)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    print((peak_kib - before_kib) / 1024)


def current_rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("VmRSS not found in /proc/self/status")


def summarise(models, times, matmul_times, memory, subject_flops) -> dict:
    latency = {name: statistics.median(values) for name, values in times.items()}
    params = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    matmul_gflops = 2 * MATMUL_N**3 / statistics.median(matmul_times) / 1e9
    rows = {
        name: {
            "parameters": params[name],
            "latency_s": latency[name],
            "latency_min_s": min(times[name]),
            "latency_runs_s": times[name],
            "peak_memory_mib": memory[name],
            "latency_ratio_vs_unet": latency[name] / latency[REFERENCE],
            "latency_min_ratio_vs_unet": min(times[name]) / min(times[REFERENCE]),
            "parameter_ratio_vs_unet": params[name] / params[REFERENCE],
            "memory_ratio_vs_unet": memory[name] / memory[REFERENCE],
        }
        for name in models
    }
    report = {"input": [1, 1, SIZE, SIZE], "threads": torch.get_num_threads(), "models": rows,
              "matmul": {"n": MATMUL_N, "gflops": matmul_gflops, "runs_s": matmul_times}}
    if SUBJECT in models:
        subject_gflops = subject_flops / latency[SUBJECT] / 1e9
        report["subject"] = {"name": SUBJECT, "flops": subject_flops, "gflops": subject_gflops,
                             "fraction_of_matmul": subject_gflops / matmul_gflops}
        report["targets"] = targets(rows, report["subject"]["fraction_of_matmul"])
    return report


def targets(rows: dict, fraction: float) -> dict[str, bool]:
    subject = rows[SUBJECT]
    checks = {
        f"{SUBJECT} latency <= 1.10x {REFERENCE}": subject["latency_ratio_vs_unet"] <= 1.10,
        f"{SUBJECT} parameters <= 1.10x {REFERENCE}": subject["parameter_ratio_vs_unet"] <= 1.10,
        f"{SUBJECT} >= 50% of matmul GFLOP/s": fraction >= 0.5,
    }
    if ATTENTION_BASELINE in rows:
        checks[f"{SUBJECT} faster than {ATTENTION_BASELINE}"] = subject["latency_s"] < rows[ATTENTION_BASELINE]["latency_s"]
    return checks


def print_table(report: dict) -> None:
    print(f"input 1x1x{SIZE}x{SIZE}, CPU, {report['threads']} threads, median of {len(report['matmul']['runs_s'])} runs")
    header = (f"{'model':<20}{'params':>12}{'x unet':>8}{'median ms':>11}{'x unet':>8}{'min ms':>9}{'x unet':>8}"
              f"{'peak MiB':>10}{'x unet':>8}")
    print(header)
    print("-" * len(header))
    for name, row in report["models"].items():
        print(f"{name:<20}{row['parameters']:>12,}{row['parameter_ratio_vs_unet']:>8.3f}{row['latency_s'] * 1e3:>11.1f}"
              f"{row['latency_ratio_vs_unet']:>8.3f}{row['latency_min_s'] * 1e3:>9.1f}{row['latency_min_ratio_vs_unet']:>8.3f}"
              f"{row['peak_memory_mib']:>10.1f}{row['memory_ratio_vs_unet']:>8.3f}")
    print(f"torch.matmul {MATMUL_N}x{MATMUL_N} float32: {report['matmul']['gflops']:.1f} GFLOP/s")
    if "subject" in report:
        subject = report["subject"]
        print(f"{SUBJECT}: {subject['flops'] / 1e9:.2f} GFLOP per forward, {subject['gflops']:.1f} GFLOP/s "
              f"= {100 * subject['fraction_of_matmul']:.0f}% of matmul")
        for check, passed in report["targets"].items():
            print(f"  [{'PASS' if passed else 'FAIL'}] {check}")


def write_json_atomic(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as handle:
        json.dump(report, handle, indent=2)
    os.replace(handle.name, path)


def main() -> int:
    args = parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.peak_memory_of:
        child_peak_memory(args.peak_memory_of)
        return 0
    if args.runs < 1:
        raise SystemExit("--runs must be >= 1")
    names = list(dict.fromkeys([REFERENCE, *args.models]))
    unknown = sorted(set(names) - set(list_models()))
    if unknown:
        raise SystemExit(f"unknown models {unknown}; known: {list_models()}")
    torch.manual_seed(0)
    models = {name: build_model(name).eval() for name in names}
    memory = {name: peak_memory_mib(name) for name in names}
    subject_flops = count_flops(models[SUBJECT]) if SUBJECT in models else 0
    times, matmul_times = measure_latencies(models, args.runs, args.warmup)
    report = summarise(models, times, matmul_times, memory, subject_flops)
    print_table(report)
    write_json_atomic(report, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
