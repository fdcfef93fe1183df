"""The slice probe of a checkpoint on IQ-OTH/NCCD: fitted on the training and validation blocks, measured
once on the held-out blocks; with ``--write``, stored in the checkpoint's config.

    .venv/bin/python -m experiments.jpeg_encoder_probe --data STUDIES [--checkpoint CK] [--write]

The shipped model calls a JPEG tumour only when its mask is non-empty, and on the held-out blocks its
masks find 0.42 of the tumours. The slice probe (`lungnlb.slice_probe`, fitted by the training
engine's step `lungnlb.training.slice_probe`) reads the model's frozen encoder instead. This runs
that step on a checkpoint trained before the engine had it (the rule it follows was written before
its first run: ``experiments/results/jpeg_encoder_probe/rule.md``) and measures the probe alone on the
held-out blocks of the split. ``lungnlb evaluate`` then measures the checkpoint with it (mask or
probe). Writes ``experiments/results/jpeg_encoder_probe/probe.json`` (date, commit).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lungnlb.checkpoint import default_checkpoint_path, load_model, save_checkpoint
from lungnlb.data.studies import read_records
from lungnlb.inference import Predictor
from lungnlb.io.atomic import atomic_write_text
from lungnlb.stamp import run_stamp
from lungnlb.training.slice_probe import (
    PROBE_INTENSITY, both_classes, fit_slice_probe, operating_point, probe_records, probe_subsets, subset_features,
)
from lungnlb.training.split import load_split

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results" / "jpeg_encoder_probe" / "probe.json"


def progress(done: int, total: int) -> None:
    if done % 100 == 0 or done == total:
        print(f"  {done}/{total} slices", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the prepared studies folder")
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: the shipped weights")
    parser.add_argument("--split", type=Path, default=ROOT / "experiments" / "results" / "native_split.json")
    parser.add_argument("--write", action="store_true", help="store the fitted probe in the checkpoint's config")
    parser.add_argument("--out", type=Path, default=OUT, help="the report (a candidate's: elsewhere than the default)")
    args = parser.parse_args(argv)
    checkpoint = args.checkpoint or default_checkpoint_path()
    model, config = load_model(checkpoint)
    predictor = Predictor(model, config)
    split = load_split(args.split)
    records = read_records(args.data)
    chosen = probe_subsets(records, split)
    held_out = probe_records(records, split["cases"]["test"])
    if chosen is None or not both_classes(held_out):
        parser.error(f"{args.data} lacks the JPEGs a probe fits on (lungnlb.training.slice_probe) or held-out "
                     "JPEGs of both classes")
    chosen["test"] = held_out
    features = {}
    for subset, subset_records in chosen.items():
        print(f"{subset}: {len(subset_records)} JPEGs", flush=True)
        features[subset] = subset_features(predictor, args.data, subset_records, progress)
    probe = fit_slice_probe(features["train"], features["val"])
    test = operating_point(probe.probability(features["test"][0]), features["test"][1], probe.threshold)
    stamp = run_stamp()
    shown = checkpoint.resolve().relative_to(ROOT) if checkpoint.resolve().is_relative_to(ROOT) else checkpoint
    report = {"checkpoint": str(shown), "intensity": PROBE_INTENSITY, "features": int(features["train"][0].shape[1]),
              **probe.fit, "test": test, **stamp}
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(f"C {probe.fit['C']}, threshold {probe.threshold:.4f}: validation {probe.fit['validation']}")
    print(f"held-out blocks, probe alone: {test}")
    if args.write:
        fit = {**probe.fit, "command": " ".join(["python -m experiments.jpeg_encoder_probe", *sys.argv[1:]]), **stamp}
        save_checkpoint(checkpoint, model, {**config, "slice_probe": {**probe.as_config(), "fit": fit}})
        print(f"wrote the probe into {checkpoint}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
