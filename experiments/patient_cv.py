"""Leave-one-patient-out segmentation: the held-out Dice of every patient with tumour masks.

The seed-0 patient split (experiments/paper_tables.py, the shipped weights' held-out figures) tests
segmentation on one patient, so its Dice describes one nodule. This script trains the recipe of the
shipped weights once per patient with masks, holding that patient out:

    fold p:  test  = patient p
             val   = the seed-0 split's classification-only validation cases + the next patient with
                     masks (checkpoint choice and calibration see a segmentation case)
             train = every other case

and evaluates each fold's best checkpoint on its patient at native resolution (Dice / IoU over the
tumour slices, `lungnlb.evaluation.evaluate`). Prints one row per patient and the mean, and writes
them as JSON.

    .venv/bin/python -m experiments.patient_cv [--steps 800] [--json experiments/results/patient_cv.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent

from experiments.paper_tables import DATA, prepared  # noqa: E402  (enables huge pages before torch)

from lungnlb.evaluation.evaluate import evaluate  # noqa: E402
from lungnlb.io.atomic import atomic_write_text  # noqa: E402
from lungnlb.stamp import run_stamp  # noqa: E402
from lungnlb.inference import Predictor  # noqa: E402
from lungnlb.training import TrainConfig, make_split, read_records, save_split, train  # noqa: E402
from lungnlb.training.split import with_images  # noqa: E402


def segmentation_patients(records: list[dict]) -> list[str]:
    """Cases with at least one labelled (masked) slice."""
    return sorted({r["case"] for r in records if r.get("labelled_slices")})


def fold_split(records: list[dict], patient: str, patients: list[str]) -> tuple[dict, str]:
    """The split of the fold that holds `patient` out (see the module docstring) and its validation patient."""
    base = make_split(records, seed=0)["cases"]
    validation_patient = patients[(patients.index(patient) + 1) % len(patients)]
    val = [c for c in base["val"] if c not in patients] + [validation_patient]
    every = sorted({r["case"] for r in records})
    train_cases = [c for c in every if c not in val and c != patient]
    split = with_images({"seed": 0, "fractions": {"val": None, "test": None},
                         "cases": {"train": train_cases, "val": val, "test": [patient]}}, records)
    return split, validation_patient


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/lungnlb-paper-studies"),
                        help="where the data folder is prepared once")
    parser.add_argument("--out", type=Path, default=ROOT.parent / "runs" / "patient_cv")
    parser.add_argument("--model", default="unet_sl_nlb")
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=6)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)

    studies = prepared(args.data, args.cache)
    records = read_records(studies)
    patients = segmentation_patients(records)
    rows = []
    print(f"{args.model} {args.input_size} px, {args.steps} steps x {args.batch_size}, lr {args.lr}; "
          f"{len(patients)} patients with masks: {', '.join(patients)}")
    for patient in patients:
        split, validation_patient = fold_split(records, patient, patients)
        out = args.out / patient
        split_path = save_split(split, out / "fold_split.json")
        config = TrainConfig(data=str(studies), out=str(out), model=args.model, input_size=args.input_size,
                             steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=0,
                             split=str(split_path), val_every=100, progress=False, tensorboard=False, device=None)
        started = time.perf_counter()
        result = train(config)
        report, _ = evaluate(studies, Predictor.from_checkpoint(result["best"]), split["images"]["test"], n_bootstrap=0)
        row = {"patient": patient, "validation_patient": validation_patient,
               "tumour_slices": report.get("n_tumour_slices"), "dice": report.get("dice"), "iou": report.get("iou"),
               "seconds": round(time.perf_counter() - started)}
        rows.append(row)
        print(f"  {patient:18s} Dice {row['dice']:.3f}  IoU {row['iou']:.3f}  ({row['tumour_slices']} tumour slices, "
              f"validation patient {row['validation_patient']}, {row['seconds']} s)", flush=True)
    dice = [r["dice"] for r in rows]
    print(f"mean Dice over {len(rows)} held-out patients: {np.mean(dice):.3f} (median {np.median(dice):.3f})")
    if args.json:
        settings = {k: getattr(args, k) for k in ("model", "input_size", "steps", "batch_size", "lr")}
        atomic_write_text(args.json, json.dumps({**run_stamp(), "settings": settings, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
