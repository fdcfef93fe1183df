"""Quality of watershed labels from boxes, measured against LIDC radiologist masks.

For every LIDC slice with a radiologist mask in ``../shared/data`` (the npz slices, and the DICOM
series with their reader XML rasterised to >= 50 % consensus masks by `lungnlb.io`), each connected
mask component (>= ``--min-pixels``) becomes one case: its bounding box padded by ``--pad`` pixels,
and once more with every edge jittered by up to ``--jitter`` of the box side (seeded). The box goes
through `lungnlb.labels.box_to_mask` and two baselines computed in the same run (the filled box and
the inscribed ellipse); Dice and IoU against the radiologist component are summarised per group.

    .venv/bin/python -m benchmarks.watershed_quality [--data ../shared/data] [--out benchmarks/results]

Prints the table, writes ``watershed_quality.json`` and ``watershed_worst.png`` (the 8 worst padded-box
cases: image crop, radiologist contour in red, watershed contour in green, box in yellow).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


from lungnlb.io.atomic import atomic_write, atomic_write_text  # noqa: E402
from lungnlb.io import lidc_consensus, list_dicom_series, read_dicom_series, read_npz_slices  # noqa: E402
from lungnlb.labels import WatershedParams, box_to_mask  # noqa: E402
from lungnlb.overlap import dice_iou  # noqa: E402
from lungnlb.stamp import run_stamp  # noqa: E402
from lungnlb.labels.quality import (  # noqa: E402
    bounding_box,
    filled_box,
    inscribed_ellipse,
    jitter_box,
    mask_components,
)

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
METHODS = {
    "watershed": lambda image, box: box_to_mask(image, box),
    "filled box": lambda image, box: filled_box(image.shape, box),
    "inscribed ellipse": lambda image, box: inscribed_ellipse(image.shape, box),
}


@dataclass
class Case:
    """One radiologist mask component on one slice."""

    group: str
    name: str
    image: np.ndarray
    reference: np.ndarray


def npz_cases(lidc: Path, min_pixels: int) -> list[Case]:
    """Cases from every ``*.npz`` slice file under the LIDC folder."""
    cases = []
    for path in sorted(lidc.rglob("*.npz")):
        for item in read_npz_slices(path):
            for k, component in enumerate(mask_components(item.mask, min_pixels)):
                cases.append(Case("npz", f"{item.patient}/{item.name}#{k}", item.image.array, component))
    return cases


def dicom_cases(lidc: Path, min_pixels: int) -> list[Case]:
    """Cases from every DICOM series that has LIDC reader XML in a folder above it (HU images)."""
    cases = []
    for xml in sorted(lidc.rglob("*.xml")):
        for folder in list_dicom_series(xml.parent):
            volume = read_dicom_series(folder)
            uids, positions = volume.meta["sop_instance_uids"], volume.meta["slice_positions"]
            consensus = lidc_consensus(xml, uids, positions, volume.array.shape[1:])
            for z in consensus.labelled_slices:
                for k, component in enumerate(mask_components(consensus.mask[z], min_pixels)):
                    cases.append(Case("dicom+xml", f"{xml.parent.name}/z{z:03d}#{k}", volume.array[z], component))
    return cases


def evaluate(cases: list[Case], pad: int, jitter: float, seed: int) -> list[dict]:
    """Per case and box kind: Dice and IoU of every method, plus the watershed's time."""
    rng = np.random.default_rng(seed)
    rows = []
    for case in cases:
        padded = bounding_box(case.reference, pad)
        boxes = {"padded": padded, "jittered": jitter_box(padded, case.image.shape, rng, jitter)}
        for kind, box in boxes.items():
            row = {"group": case.group, "case": case.name, "boxes": kind, "box": list(box), "pixels": int(case.reference.sum())}
            for method, derive in METHODS.items():
                start = time.perf_counter()
                mask = derive(case.image, box)
                elapsed = time.perf_counter() - start
                row[method] = dict(zip(("dice", "iou"), dice_iou(mask, case.reference)))
                if method == "watershed":
                    row["watershed_ms"] = 1000 * elapsed
            rows.append(row)
    return rows


def summarise(rows: list[dict]) -> dict:
    """{group: {boxes: {method: {mean/median dice/iou}}}} with group "all" over every case."""
    summary: dict = {}
    for group in sorted({r["group"] for r in rows}) + ["all"]:
        for kind in ("padded", "jittered"):
            chosen = [r for r in rows if r["boxes"] == kind and group in ("all", r["group"])]
            entry = {"cases": len(chosen)}
            for method in METHODS:
                d = np.array([r[method]["dice"] for r in chosen])
                j = np.array([r[method]["iou"] for r in chosen])
                entry[method] = {
                    "mean_dice": float(d.mean()),
                    "median_dice": float(np.median(d)),
                    "mean_iou": float(j.mean()),
                    "median_iou": float(np.median(j)),
                }
            summary.setdefault(group, {})[kind] = entry
    return summary


def print_table(summary: dict, timing: dict) -> None:
    header = f"{'group':<10} {'boxes':<9} {'n':>4}  {'method':<18} {'mean Dice':>9} {'med Dice':>9} {'mean IoU':>9} {'med IoU':>9}"
    print(header)
    print("-" * len(header))
    for group, kinds in summary.items():
        for kind, entry in kinds.items():
            for method in METHODS:
                s = entry[method]
                print(
                    f"{group:<10} {kind:<9} {entry['cases']:>4}  {method:<18} "
                    f"{s['mean_dice']:>9.3f} {s['median_dice']:>9.3f} {s['mean_iou']:>9.3f} {s['median_iou']:>9.3f}"
                )
    print(
        f"\nwatershed time per box: mean {timing['mean_ms']:.1f} ms, max {timing['max_ms']:.1f} ms "
        f"(on the 512x512 slices; {timing['boxes']} boxes)"
    )


def worst_cases_png(path: Path, cases: list[Case], rows: list[dict], count: int = 8) -> list[str]:
    """Grid of the `count` lowest-Dice padded-box cases; returns their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {c.name: c for c in cases}
    padded = sorted((r for r in rows if r["boxes"] == "padded"), key=lambda r: r["watershed"]["dice"])[:count]
    fig, axes = plt.subplots(2, (count + 1) // 2, figsize=(3 * ((count + 1) // 2), 7.2))
    for ax, row in zip(axes.flat, padded):
        case = by_name[row["case"]]
        x_min, y_min, x_max, y_max = row["box"]
        mask = box_to_mask(case.image, row["box"])
        half = max(x_max - x_min, y_max - y_min) // 2 + 12
        cy, cx = (y_min + y_max) // 2, (x_min + x_max) // 2
        r0, c0 = max(cy - half, 0), max(cx - half, 0)
        window = (slice(r0, cy + half + 1), slice(c0, cx + half + 1))
        ax.imshow(case.image[window], cmap="gray", interpolation="nearest")
        ax.contour(case.reference[window], [0.5], colors="red", linewidths=1.2)
        ax.contour(mask[window], [0.5], colors="lime", linewidths=1.2)
        ax.add_patch(plt.Rectangle((x_min - c0 - 0.5, y_min - r0 - 0.5), x_max - x_min + 1, y_max - y_min + 1, fill=False, ec="yellow", lw=1))
        ax.set_title(f"{row['case']}\nDice {row['watershed']['dice']:.2f}", fontsize=8)
        ax.axis("off")
    for ax in list(axes.flat)[len(padded) :]:
        ax.axis("off")
    fig.suptitle("worst watershed cases (red: radiologist, green: watershed, yellow: box)", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda stream: fig.savefig(stream, dpi=90, format="png"))
    plt.close(fig)
    return [r["case"] for r in padded]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder (holds lidc-idri/)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results", help="folder for JSON and PNG")
    parser.add_argument("--pad", type=int, default=3, help="pixels added around the mask's tight box")
    parser.add_argument("--jitter", type=float, default=0.1, help="max edge shift as a fraction of the box side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-pixels", type=int, default=10, help="skip mask components smaller than this")
    args = parser.parse_args(argv)
    lidc = args.data / "lidc-idri"
    if not lidc.is_dir():
        raise FileNotFoundError(f"{lidc}: no LIDC folder (see ../shared/data/README.md)")
    cases = npz_cases(lidc, args.min_pixels) + dicom_cases(lidc, args.min_pixels)
    if not cases:
        raise FileNotFoundError(f"{lidc}: no slice with a radiologist mask")
    rows = evaluate(cases, args.pad, args.jitter, args.seed)
    times = np.array([r["watershed_ms"] for r in rows])
    timing = {"mean_ms": float(times.mean()), "max_ms": float(times.max()), "boxes": int(times.size)}
    summary = summarise(rows)
    print_table(summary, timing)
    worst = worst_cases_png(args.out / "watershed_worst.png", cases, rows)
    report = {
        **run_stamp(),
        "settings": {"pad": args.pad, "jitter": args.jitter, "seed": args.seed, "min_pixels": args.min_pixels},
        "params": WatershedParams().as_dict(),
        "summary": summary,
        "timing": timing,
        "worst_cases": worst,
        "cases": rows,
    }
    atomic_write_text(args.out / "watershed_quality.json", json.dumps(report, indent=1))
    print(f"wrote {args.out / 'watershed_quality.json'} and {args.out / 'watershed_worst.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
