"""Fit the mask threshold of a native-resolution checkpoint on its validation patients, as training
now does at every validation (`lungnlb.training.validation.window_metrics`), for a checkpoint
trained before it did.

    .venv/bin/python -m experiments.calibrate_threshold --data STUDIES [--checkpoint lungnlb/weights/default.pt]

The checkpoint's own training configuration says which split and which validation draw
(``val_slices``, ``seed``); STUDIES is the prepared studies folder it was trained from. Writes the
checkpoint's config again (the weights are unchanged) with the fitted ``threshold``, the
validation metrics at it, and ``threshold_fit`` (command, date, commit); prints the metrics at
every candidate threshold.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

import torch

from lungnlb.checkpoint import default_checkpoint_path, load_model, save_checkpoint
from lungnlb.data.studies import read_records
from lungnlb.io.intensity import IntensityMapping
from lungnlb.stamp import run_stamp
from lungnlb.training.split import load_split
from lungnlb.training.trainer import TrainConfig, load_validation_set
from lungnlb.training.validation import window_metrics


def _print(threshold: float, metrics: dict) -> None:
    shown = {key: round(metrics[key], 4) for key in ("dice", "recall", "precision", "specificity", "f1")
             if metrics.get(key) is not None}
    print(f"threshold {threshold}: {shown}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the prepared studies folder the checkpoint trained from")
    parser.add_argument("--checkpoint", type=Path, default=default_checkpoint_path())
    parser.add_argument("--split", type=Path, help="default: the split file named in the checkpoint's training config")
    args = parser.parse_args(argv)
    model, config = load_model(args.checkpoint)
    if "patch_size" not in config:
        raise SystemExit(f"{args.checkpoint} is a whole-slice model: its threshold is the cls logit offset, fitted in training")
    known = {f.name for f in fields(TrainConfig)}
    train = TrainConfig(**{**{k: v for k, v in config["train"].items() if k in known}, "data": str(args.data)})
    records = read_records(args.data)
    if not (args.split or train.split):
        raise SystemExit(f"{args.checkpoint} names no split file (its run made its own): pass --split RUN/split.json")
    split = load_split(args.split or train.split, records)
    samples = load_validation_set(train, records, split, IntensityMapping.from_config(config.get("intensity")))
    metrics = window_metrics(model, samples, torch.device("cpu"), config, report=_print)
    command = "python -m experiments.calibrate_threshold " + " ".join(argv if argv is not None else sys.argv[1:])
    fitted = {**config, "threshold": metrics["threshold"], "metrics": metrics,
              "threshold_fit": {"command": command, "validation_slices": len(samples), **run_stamp()}}
    save_checkpoint(args.checkpoint.with_suffix(""), model, fitted)
    print(f"threshold {config.get('threshold', 0.5)} -> {metrics['threshold']} written to {args.checkpoint}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
