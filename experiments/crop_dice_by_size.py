"""Where a checkpoint loses nodule-crop Dice: by the size of the reference on the slice and by its
density, and whether post-processing could win it back. On validation patients (the split's
``val`` cases), never on the test patients, since what it finds may change the recipe.

    .venv/bin/python -m experiments.crop_dice_by_size --data STUDIES \\
        [--checkpoint lungnlb/weights/default.pt] [--split experiments/results/native_split.json]

Each crop image of a validation patient (its slices from the first labelled to the last, a volume)
is predicted as `lungnlb evaluate` predicts it (the pad rule, `lungnlb.evaluation.crops`), once as
it is and once mirrored left-right. On every slice whose reference (the 2-of-4 consensus) is
non-empty, Dice is taken for:

- ``shipped``: the checkpoint's own post-processing (`Predictor.finish_windows` at its threshold;
  components counted through the crop's slices);
- ``in-plane components``: the same with each slice finished alone (components counted in their
  slice, the rule before `experiments/results/volume_components/rule.md`);
- ``extent E``: hysteresis; a component of the pixels above E is kept when its peak passes the
  threshold (the same slices are called tumour, the outlines are drawn lower);
- ``mirror``: the mean of the slice's and its mirror image's probabilities, then as ``shipped``.

Prints and writes (with date and commit) the mean Dice of each, the slices each misses, and, for
``shipped``, Dice and the predicted / reference area by the reference's area in pixels, and Dice
by the mean density inside the reference (HU through the checkpoint's own window: ground glass
below -500 HU).
"""

from __future__ import annotations

import argparse
import json
from itertools import pairwise
from pathlib import Path

import numpy as np
from scipy import ndimage

from lungnlb.data.studies import read_records
from lungnlb.evaluation.crops import crop_canvas
from lungnlb.evaluation.predict import load_image, plan_span
from lungnlb.inference import MIN_COMPONENT_PIXELS, Predictor
from lungnlb.io.atomic import atomic_write_text
from lungnlb.io.intensity import window_bounds
from lungnlb.overlap import dice_iou
from lungnlb.stamp import run_stamp

ROOT = Path(__file__).resolve().parents[1]
EXTENTS = (0.3, 0.4)
AREA_BINS = (0, 20, 50, 100, 200, 500, 10**6)
DENSITY_BINS = (-10**4, -500, -200, 10**4)  # HU: ground glass, part-solid, solid (a slice's mean inside the reference)


def raw_probabilities(predictor: Predictor, volume: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unfinished mask probabilities of crop slices (n, h, w) in [0, 1]: as they are, and mirrored
    left-right (mirrored back)."""
    canvas, cut = crop_canvas(predictor, volume)
    plain, _ = predictor.window_probability(canvas)
    mirrored, _ = predictor.window_probability(np.ascontiguousarray(canvas[:, :, ::-1]))
    return plain[cut], mirrored[:, :, ::-1][cut]


def hysteresis(probability: np.ndarray, threshold: float, extent: float, min_pixels: int) -> np.ndarray:
    """(Y, X) bool: the 8-connected components of ``probability > extent`` that reach ``threshold``
    and cover at least ``min_pixels``."""
    labels, count = ndimage.label(probability > extent, np.ones((3, 3), bool))
    if not count:
        return np.zeros(probability.shape, bool)
    index = np.arange(1, count + 1)
    keep = np.zeros(count + 1, bool)
    keep[1:] = (ndimage.maximum(probability, labels, index) > threshold) & (np.bincount(labels.ravel())[1:] >= min_pixels)
    return keep[labels]


def slice_masks(predictor: Predictor, plain: np.ndarray, mirrored: np.ndarray) -> dict[str, np.ndarray]:
    """Each variant's masks (n, h, w) of one crop image."""
    threshold = predictor.threshold
    field = np.ones(plain.shape, bool)
    masks = {"shipped": predictor.finish_windows(plain, field, threshold)[0] > threshold,
             "in-plane components": np.concatenate([predictor.finish_windows(p[None], f[None], threshold)[0]
                                                    for p, f in zip(plain, field)]) > threshold,
             "mirror": predictor.finish_windows((plain + mirrored) / 2, field, threshold)[0] > threshold}
    minimum = int(predictor.config.get("min_component_pixels", MIN_COMPONENT_PIXELS))
    for extent in EXTENTS:
        masks[f"extent {extent}"] = np.stack([hysteresis(p, threshold, extent, minimum) for p in plain])
    return masks


def by_area(rows: list[tuple[int, float, int, float]]) -> list[dict]:
    """Dice and the median predicted / reference area per bin of the reference's area (rows:
    reference pixels, Dice, predicted pixels, reference mean HU)."""
    area, dice, predicted = (np.array(column, float) for column in list(zip(*rows))[:3])
    table = []
    for low, high in pairwise(AREA_BINS):
        inside = (area >= low) & (area < high)
        if inside.any():
            table.append({"reference_pixels": f"{low}-{high}" if high < 10**6 else f">={low}", "slices": int(inside.sum()),
                          "dice": float(dice[inside].mean()),
                          "predicted_over_reference": float(np.median(predicted[inside] / area[inside]))})
    return table


def by_density(rows: list[tuple[int, float, int, float]]) -> list[dict]:
    """Dice per bin of the mean HU inside the reference (rows as `by_area`)."""
    dice, density = np.array([row[1] for row in rows], float), np.array([row[3] for row in rows], float)
    table = []
    for low, high in pairwise(DENSITY_BINS):
        inside = (density >= low) & (density < high)
        if inside.any():
            name = f"<{high}" if low == DENSITY_BINS[0] else f">={low}" if high == DENSITY_BINS[-1] else f"{low} to {high}"
            table.append({"reference_mean_hu": name, "slices": int(inside.sum()), "dice": float(dice[inside].mean())})
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the prepared studies folder of ../shared/data")
    parser.add_argument("--checkpoint", type=Path, help="default: the shipped weights")
    parser.add_argument("--split", type=Path, default=ROOT / "experiments" / "results" / "native_split.json")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "crop_dice_by_size.json")
    args = parser.parse_args(argv)
    predictor = Predictor.from_checkpoint(args.checkpoint)
    validation = set(json.loads(args.split.read_text())["cases"]["val"])
    dice: dict[str, list[float]] = {}
    missed: dict[str, int] = {}
    shipped_rows, patients = [], set()
    low, high = window_bounds(tuple(predictor.config["intensity"]["window"]))
    for record in (r for r in read_records(args.data) if r["case"] in validation and r.get("crop")):
        loaded = load_image(args.data, record)
        zs = [z for z, has_mask, _ in loaded.plan if has_mask and loaded.reference[z].any()]
        if not zs:
            continue
        span = plan_span(loaded.plan)
        volume = predictor.model_input(loaded.raw[span], record["intensity"])
        plain, mirrored = raw_probabilities(predictor, volume)
        index = [z - span.start for z in zs]
        reference = loaded.reference[zs]
        hu = low + volume[index] * (high - low)
        patients.add(record["case"])
        for name, masks in slice_masks(predictor, plain, mirrored).items():
            for mask, truth, density in zip(masks[index], reference, hu):
                dice.setdefault(name, []).append(dice_iou(mask, truth)[0])
                missed[name] = missed.get(name, 0) + int(not mask.any())
                if name == "shipped":
                    shipped_rows.append((int(truth.sum()), dice[name][-1], int(mask.sum()), float(density[truth].mean())))
    report = {"checkpoint": str(args.checkpoint or "lungnlb/weights/default.pt"), "split": args.split.name,
              "validation_cases": len(validation), "crop_patients": len(patients), "slices": len(shipped_rows),
              "variants": {name: {"dice": float(np.mean(values)), "missed_slices": missed[name]} for name, values in dice.items()},
              "shipped_by_reference_area": by_area(shipped_rows),
              "shipped_by_reference_density": by_density(shipped_rows), **run_stamp()}
    atomic_write_text(args.out, json.dumps(report, indent=2))
    for name, row in report["variants"].items():
        print(f"{name:<12} Dice {row['dice']:.4f}  slices with nothing marked {row['missed_slices']} of {len(shipped_rows)}")
    for row in report["shipped_by_reference_area"]:
        print(f"reference {row['reference_pixels']:>8} px: {row['slices']:4d} slices, Dice {row['dice']:.3f}, "
              f"predicted / reference area {row['predicted_over_reference']:.2f}")
    for row in report["shipped_by_reference_density"]:
        print(f"reference mean {row['reference_mean_hu']:>10} HU: {row['slices']:4d} slices, Dice {row['dice']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
