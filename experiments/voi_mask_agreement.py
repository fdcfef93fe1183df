"""Which outline do the VOIs' masks draw, next to the crops' readers on the very same CT slice?

    .venv/bin/python -m experiments.voi_mask_agreement [--limit N]

Training on the VOIs raised the VOI Dice and cost the crops (`experiments/results/weights_selection_voi/`).
One suspected cause: the VOIs' masks (published as the readers' majority vote) and the crop targets
(the 2-of-4 consensus) draw different outlines. The middle slice of a VOI nodule is found pixel for pixel in one of the patient's crops
(`experiments.intensity_fit.vois_in_crops`, r >= 0.999); on that crop, the VOI mask is put in the crop's frame
and compared with the consensus of at least k of the crop's readers, k = 1..4 (Dice, and the VOI
mask's area over the consensus area), over the nodules whose crop has that many marking readers.
Writes ``experiments/results/voi_mask_agreement.json`` (date, commit) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from experiments.intensity_fit import DATA, vois_in_crops
from lungnlb.io.atomic import atomic_write_text
from lungnlb.overlap import dice
from lungnlb.stamp import run_stamp

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results" / "voi_mask_agreement.json"
READERS = (1, 2, 3, 4)


def matched_masks(data: Path, limit: int | None) -> list[dict]:
    """Per VOI nodule found in a crop: the VOI mask in the crop's frame and the crop's reader masks."""
    found = []
    for match in vois_in_crops(data, limit):
        placed = np.zeros(match.crop_image.shape, dtype=bool)
        placed[match.row: match.row + match.mask.shape[0], match.column: match.column + match.mask.shape[1]] = match.mask > 0
        found.append({"patient": match.patient, "voi": placed, "readers": match.crop_readers})
    return found


def agreement(found: list[dict]) -> dict:
    """Per k: nodules, median Dice of the VOI mask with the >= k consensus, median area ratio."""
    rows = {}
    for k in READERS:
        dices, ratios = [], []
        for nodule in found:
            marking = nodule["readers"].reshape(len(nodule["readers"]), -1).any(axis=1).sum()
            consensus = nodule["readers"].sum(axis=0) >= k
            if marking < k or not consensus.any():
                continue
            dices.append(dice(nodule["voi"], consensus))
            ratios.append(nodule["voi"].sum() / consensus.sum())
        rows[f"at_least_{k}"] = {"nodules": len(dices),
                                 "median_dice": round(statistics.median(dices), 3) if dices else None,
                                 "mean_dice": round(statistics.fmean(dices), 3) if dices else None,
                                 "median_voi_over_consensus_area": round(statistics.median(ratios), 3) if ratios else None}
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA / "lidc-nodules")
    parser.add_argument("--limit", type=int, default=None, help="first N VOI patients only (a quick check)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    found = matched_masks(args.data, args.limit)
    report = {"matched_nodules": len(found), "patients": len({n["patient"] for n in found}),
              "by_consensus": agreement(found), **run_stamp()}
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(f"{report['matched_nodules']} VOI nodules of {report['patients']} patients matched to a crop slice")
    print(f"{'crop consensus':<16}{'nodules':>8}{'median Dice':>13}{'mean Dice':>11}{'VOI / consensus area':>22}")
    for name, row in report["by_consensus"].items():
        print(f"{name:<16}{row['nodules']:>8}{row['median_dice']!s:>13}{row['mean_dice']!s:>11}"
              f"{row['median_voi_over_consensus_area']!s:>22}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
