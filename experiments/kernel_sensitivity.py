"""Does the model's call on a CT slice depend on how sharp the slice is? The same series, filtered
in-plane to look like a smoother or a sharper reconstruction kernel, predicted as `lungnlb
evaluate` predicts it.

    .venv/bin/python -m experiments.kernel_sensitivity --data STUDIES [--checkpoint CKPT] [--out JSON]

STUDIES: a prepared studies folder of the whole-slice sources (`lungnlb prepare` of links to
../shared/data/{lidc-idri,lung-pet-ct-dx,iq-othnccd}). Every image in Hounsfield units with
several slices and tumour-free slices among its labelled ones (a CT series with far slices) is
predicted four times, its HU filtered slice by slice first:

- ``as is``;
- ``smooth s``: a Gaussian of s pixels (s = 1.0, 1.5), what a softer kernel does to vessels' edges;
- ``sharpen``: an unsharp mask, HU + (HU - Gaussian(1 px)), what a sharper kernel does.

Prints and writes (with date and commit) per series and filter the tumour-free slices and the
tumour slices called tumour at the checkpoint's threshold. The patients may have been trained on:
this measures a sensitivity of the model, not its accuracy.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import ndimage

from lungnlb.data.studies import read_records
from lungnlb.evaluation.predict import load_image, plan_span
from lungnlb.inference import Predictor
from lungnlb.io.atomic import atomic_write_text
from lungnlb.stamp import run_stamp

ROOT = Path(__file__).resolve().parents[1]


def in_plane_gaussian(volume: np.ndarray, sigma: float) -> np.ndarray:
    """(Z, Y, X) smoothed within each slice, never across slices."""
    return ndimage.gaussian_filter(volume, (0.0, sigma, sigma))


FILTERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "as is": lambda hu: hu,
    "smooth 1.0": lambda hu: in_plane_gaussian(hu, 1.0),
    "smooth 1.5": lambda hu: in_plane_gaussian(hu, 1.5),
    "sharpen": lambda hu: 2.0 * hu - in_plane_gaussian(hu, 1.0),
}


def series_with_far_slices(studies: Path) -> list[dict]:
    """The HU images of several slices whose labelled slices include tumour-free ones."""
    return [r for r in read_records(studies) if r["intensity"] == "hu" and not r.get("crop")
            and 0 in (r.get("slice_class_labels") or {}).values()]


def calls(predictor: Predictor, studies: Path, record: dict) -> dict[str, dict]:
    """Per filter: tumour-free and tumour slices called tumour, of how many."""
    loaded = load_image(studies, record)
    span = plan_span(loaded.plan)
    far = [z - span.start for z, _, label in loaded.plan if label == 0]
    tumour = [z - span.start for z, _, label in loaded.plan if label == 1]
    rows = {}
    for name, apply in FILTERS.items():
        volume = predictor.model_input(apply(loaded.raw[span]).astype(np.float32), record["intensity"])
        _, scores = predictor.predict_normalized(volume, record["intensity"])
        called = scores > predictor.threshold
        rows[name] = {"tumour_free_called": int(called[far].sum()), "tumour_free_slices": len(far),
                      "tumour_called": int(called[tumour].sum()), "tumour_slices": len(tumour)}
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a prepared studies folder of the whole-slice sources")
    parser.add_argument("--checkpoint", type=Path, help="default: the shipped weights")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "kernel_sensitivity.json")
    args = parser.parse_args(argv)
    predictor = Predictor.from_checkpoint(args.checkpoint)
    series = series_with_far_slices(args.data)
    if not series:
        raise SystemExit(f"{args.data}: no HU series with tumour-free slices among its labelled ones")
    results = {record["image_id"]: calls(predictor, args.data, record) for record in series}
    report = {"checkpoint": str(args.checkpoint or "lungnlb/weights/default.pt"), "threshold": predictor.threshold,
              "filters": list(FILTERS), "series": results, **run_stamp()}
    atomic_write_text(args.out, json.dumps(report, indent=2))
    for image_id, rows in results.items():
        for name, row in rows.items():
            print(f"{image_id} {name:<11} tumour-free called {row['tumour_free_called']:2d} of {row['tumour_free_slices']}, "
                  f"tumour called {row['tumour_called']:2d} of {row['tumour_slices']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
