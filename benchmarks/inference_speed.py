"""Interactive speed of the shipped weights' inference path, against the plain U-Net in the same run.

    .venv/bin/python -m benchmarks.inference_speed [--rounds 3]

Times `Predictor.predict` (intensity mapping, the checkpoint's inference form, post-processing) on
one real 512 x 512 slice and on a real whole CT series (the first DICOM series found under
../shared/data/lung-pet-ct-dx), for the shipped checkpoint and for the same checkpoint with its
network replaced by the plain U-Net (random weights: the cost of a forward pass does not depend on
them), and for the shipped checkpoint computing in float32 (the default computes in bfloat16 on a
CPU that has it in hardware: `lungnlb.networks.inference_form`); they take turns within each round.
The series is also timed for the shipped checkpoint with its slices unshared (one after another on
torch's threads, as while another volume shares its slices), so the gain of sharing them among
threads is measured in the same rounds. Prints the medians, the ratios and the time a 300-slice
volume takes at the measured per-slice rate; writes
benchmarks/results/inference_speed.json (with date and commit).
Targets: a slice <= 0.5 s, a 300-slice volume <= 60 s, NLB <= 1.10x the plain U-Net.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from lungnlb.runtime import enable_huge_pages

enable_huge_pages()

import torch  # noqa: E402

from lungnlb.checkpoint import build_from_config  # noqa: E402
from lungnlb.inference import SLICE_SHARING, Predictor  # noqa: E402
from lungnlb.io import list_dicom_series, read_dicom_series  # noqa: E402
from lungnlb.io.atomic import atomic_write_text  # noqa: E402
from lungnlb.stamp import run_stamp  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOLUME_SLICES = 300


def plain_twin(predictor: Predictor) -> Predictor:
    """The same checkpoint config and inference form with the plain U-Net as the network."""
    config = copy.deepcopy(predictor.config)
    config["model"] = {**config["model"], "name": "unet", "kwargs": {}}
    return Predictor(build_from_config(config), config)


def interleaved_medians(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds of each call over ``rounds``, the calls taking turns within each round, so
    that a change of the shared machine's load during the run weighs on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def unshared(call: Callable[[], object]) -> object:
    """``call`` with a volume's slices not shared among threads (`lungnlb.inference.slice_threads`)."""
    with SLICE_SHARING:
        return call()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "lung-pet-ct-dx")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "inference_speed.json")
    args = parser.parse_args(argv)
    volume = read_dicom_series(list_dicom_series(args.data)[0])
    middle = volume.array[len(volume.array) // 2]
    shipped = Predictor.from_checkpoint()
    predictors = {"shipped": shipped, "plain unet": plain_twin(shipped),
                  "shipped float32": Predictor.from_checkpoint(precision="float32")}
    for predictor in predictors.values():
        predictor.predict(middle, "hu")  # warm-up: first-call allocations
    slice_s = interleaved_medians({name: (lambda p=p: p.predict(middle, "hu")) for name, p in predictors.items()},
                                  args.rounds)
    volume_calls = {name: (lambda p=p: p.predict(volume.array, "hu")) for name, p in predictors.items()}
    volume_s = interleaved_medians({**volume_calls, "shipped unshared": lambda: unshared(volume_calls["shipped"])},
                                   max(1, args.rounds // 2))
    rows = {name: {"slice_s": slice_s[name], "volume_s": volume_s[name], "volume_slices": len(volume.array),
                   f"volume_{VOLUME_SLICES}_s_at_this_rate": volume_s[name] / len(volume.array) * VOLUME_SLICES}
            for name in predictors}
    ratio = {key: rows["shipped"][key] / rows["plain unet"][key] for key in ("slice_s", "volume_s")}
    precision_gain = {key: rows["shipped float32"][key] / rows["shipped"][key] for key in ("slice_s", "volume_s")}
    sharing = volume_s["shipped unshared"] / volume_s["shipped"]
    report = {"model": shipped.config["model"], "native": shipped.native, "threads": torch.get_num_threads(),
              "precision": str(shipped.precision), "rows": rows, "nlb_over_plain": ratio,
              "float32_over_default_precision": precision_gain, "volume_s_unshared": volume_s["shipped unshared"],
              "unshared_over_shared": sharing, **run_stamp()}
    atomic_write_text(args.out, json.dumps(report, indent=2))
    for name, row in rows.items():
        print(f"{name:<15} slice {row['slice_s']:.3f} s   {row['volume_slices']}-slice volume {row['volume_s']:.1f} s   "
              f"{VOLUME_SLICES} slices at this rate {row[f'volume_{VOLUME_SLICES}_s_at_this_rate']:.1f} s")
    print(f"NLB / plain: slice {ratio['slice_s']:.3f}x, volume {ratio['volume_s']:.3f}x")
    print(f"shipped in {shipped.precision}: {precision_gain['slice_s']:.2f}x faster than float32 on a slice, "
          f"{precision_gain['volume_s']:.2f}x on the volume")
    print(f"shipped volume with its slices unshared {volume_s['shipped unshared']:.1f} s: sharing them is {sharing:.2f}x faster")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
