"""Validation crop Dice of a checkpoint with its mask probabilities averaged over mirrored inputs.

    .venv/bin/python -m experiments.flip_averaging --data STUDIES [--checkpoint CK] [--subset val]

A diagnostic (rule: ``experiments/results/flip_averaging/rule.md``, written before this script): the
LIDC nodule crops of a subset of the split are scored by the evaluation's own code
(`lungnlb.evaluation.evaluate`, crop rule "pad", the checkpoint's threshold) with the probability
of each window pass averaged over mirrored copies of the input, mirrored back:

    p(x) = mean over flips f of f^-1(P(f(x))),   f in {identity, left-right[, up-down, both]}

then thresholded and its small components removed as served (`Predictor.finish_windows`). The
identity alone is the served form, so its row must equal ``lungnlb evaluate``'s. Writes
``experiments/results/flip_averaging/crops_<subset>.json`` (date, commit).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lungnlb.data.studies import read_records
from lungnlb.evaluation.evaluate import evaluate, seen_cases
from lungnlb.inference import Predictor
from lungnlb.io.atomic import atomic_write_text
from lungnlb.stamp import run_stamp
from lungnlb.training.split import load_split

ROOT = Path(__file__).resolve().parents[1]
FORMS = {"as served": ((),), "left-right": ((), (-1,)), "four mirrors": ((), (-1,), (-2,), (-2, -1))}


class FlipAveraged:
    """A native-resolution `Predictor` whose window probabilities are averaged over ``flips`` (axes of
    a (Z, Y, X) volume mirrored); the rest is the predictor's own, except that a slice's probability
    is its mask's alone: no slice probe is applied (the crops measured here are of no probe's kind)."""

    def __init__(self, predictor: Predictor, flips: tuple[tuple[int, ...], ...]):
        if not predictor.native:
            raise ValueError("flip averaging is measured for native-resolution checkpoints (sliding windows)")
        self.predictor, self.flips = predictor, flips

    def __getattr__(self, name: str):
        return getattr(self.predictor, name)

    def predict_normalized(self, volume: np.ndarray, intensity: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        probability, field = self.predictor.window_probability(volume)
        for axes in self.flips[1:]:
            mirrored, _ = self.predictor.window_probability(np.ascontiguousarray(np.flip(volume, axes)))
            probability += np.flip(mirrored, axes)
        return self.predictor.finish_windows(probability / len(self.flips), field, self.predictor.threshold)


def crop_image_ids(studies: Path, split: Path, subset: str) -> list[str]:
    records = {r["image_id"]: r for r in read_records(studies)}
    return [i for i in load_split(split, list(records.values()))["images"][subset] if records[i].get("crop")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the prepared studies folder")
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: the shipped weights")
    parser.add_argument("--split", type=Path, default=ROOT / "experiments" / "results" / "native_split.json")
    parser.add_argument("--subset", default="val", choices=("val", "test"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    predictor = Predictor.from_checkpoint(args.checkpoint)
    image_ids = crop_image_ids(args.data, args.split, args.subset)
    exclude = frozenset(seen_cases(predictor.config, "trained"))
    rows = {}
    for name, flips in FORMS.items():
        report, _ = evaluate(args.data, FlipAveraged(predictor, flips), image_ids, n_bootstrap=200,
                             exclude_cases=exclude)
        rows[name] = {"crop_dice": round(report["dice"], 4), "ci": [round(v, 4) for v in report["ci"]["dice"]],
                      "n_tumour_slices": report["n_tumour_slices"], "n_patients": report["n_patients"]}
        print(f"{name}: crop Dice {rows[name]['crop_dice']} over {rows[name]['n_tumour_slices']} slices", flush=True)
    out = args.out or ROOT / "experiments" / "results" / "flip_averaging" / f"crops_{args.subset}.json"
    shown = args.checkpoint or "lungnlb/weights/default.pt"
    atomic_write_text(out, json.dumps({"checkpoint": str(shown), "subset": args.subset, "forms": rows,
                                       **run_stamp()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
