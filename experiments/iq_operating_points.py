"""What an operating point of its own would do for the IQ-OTH/NCCD JPEGs, on validation cases only.

    .venv/bin/python -m experiments.iq_operating_points --data STUDIES [--checkpoint CK] [--subset val]

The shipped weights call a slice tumour when its mask is non-empty at one threshold, fitted on all
validation slices, which are mostly HU and crop slices. On the JPEGs (mediastinal window,
histogram-equalised) the model's probabilities run lower: held-out IQ-OTH/NCCD recall is 0.42 with no
normal called tumour. For each candidate threshold this prints and writes, over the split's
IQ-OTH/NCCD slices of ``--subset`` (validation by default: the held-out blocks must not choose it),
the tumour recall, the normals called tumour, the F1 and the median mask area of the slices called
tumour, which grows as the threshold falls (a slice is called tumour exactly when its mask is
non-empty, `lungnlb.inference.Predictor.finish_windows`). Writes
``experiments/results/iq_operating_points_<subset>.json`` (date, commit).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from lungnlb.data.studies import image_path, read_records, read_study_image
from lungnlb.evaluation.metrics import classification_metrics
from lungnlb.inference import Predictor
from lungnlb.io.atomic import atomic_write_text
from lungnlb.stamp import run_stamp
from lungnlb.training.split import load_split

ROOT = Path(__file__).resolve().parents[1]
THRESHOLDS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3)


def slice_outputs(predictor: Predictor, studies: Path, records: list[dict]) -> list[tuple[int, list[np.ndarray]]]:
    """(class label, [mask at each of `THRESHOLDS`]) of each JPEG slice: one sliding window, every threshold."""
    outputs = []
    for record in records:
        image = read_study_image(image_path(studies, record["image_id"]))
        plane = np.asarray(image.array, dtype=np.float32).reshape(image.array.shape[-2:])
        probability, field = predictor.window_probability(predictor.model_input(plane, image.intensity)[None])
        masks = [predictor.finish_windows(probability, field, t)[0][0] > t for t in THRESHOLDS]
        outputs.append((int(record["class_label"]), masks))
    return outputs


def operating_point(outputs: list[tuple[int, list[np.ndarray]]], index: int) -> dict:
    """The slice calls at `THRESHOLDS[index]`: a slice is called tumour when its mask is non-empty."""
    labels = np.array([label for label, _ in outputs], dtype=bool)
    called = np.array([masks[index].any() for _, masks in outputs], dtype=float)
    metrics = classification_metrics(called, labels)
    areas = [int(masks[index].sum()) for _, masks in outputs if masks[index].any()]
    return {"threshold": THRESHOLDS[index], "tumour_slices": metrics["n_positive"], "recall": round(metrics["recall"], 3),
            "normal_slices": metrics["n_negative"], "normals_called_tumour": int(called[~labels].sum()),
            "f1": round(metrics["f1"], 3), "median_mask_pixels_when_called": statistics.median(areas) if areas else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the prepared studies folder")
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: the shipped weights")
    parser.add_argument("--split", type=Path, default=ROOT / "experiments" / "results" / "native_split.json")
    parser.add_argument("--subset", choices=("val", "test"), default="val")
    args = parser.parse_args(argv)
    predictor = Predictor.from_checkpoint(args.checkpoint)
    cases = set(load_split(args.split)["cases"][args.subset])
    records = [r for r in read_records(args.data) if r["source"] == "iq-othnccd" and r["case"] in cases]
    if not records:
        parser.error(f"no IQ-OTH/NCCD slice of the {args.subset} cases in {args.data}")
    outputs = slice_outputs(predictor, args.data, records)
    rows = [operating_point(outputs, i) for i in range(len(THRESHOLDS))]
    report = {"checkpoint": str(args.checkpoint or "shipped"), "model_threshold": predictor.threshold,
              "subset": args.subset, "cases": sorted({r["case"] for r in records}), "rows": rows, **run_stamp()}
    out = ROOT / "experiments" / "results" / f"iq_operating_points_{args.subset}.json"
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    for row in rows:
        print(f"threshold {row['threshold']:<5} recall {row['recall']:.3f}  normals called "
              f"{row['normals_called_tumour']}/{row['normal_slices']}  F1 {row['f1']:.3f}  "
              f"median mask {row['median_mask_pixels_when_called']} px")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
