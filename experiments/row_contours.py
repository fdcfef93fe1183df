"""Picture of several checkpoints on the same held-out tumour slices: reference and predicted contours.

A Dice near zero can mean "no mask at all" or "a mask in the wrong place"; this shows which. Rows
are tumour slices of the split's subset (evenly spaced over them), columns are checkpoints; each
panel is a crop around the reference mask with the reference (green) and the checkpoint's mask at
its threshold (red), titled with that slice's Dice.

    python -m experiments.row_contours --data STUDIES --split SPLIT.json \
        --checkpoints unet=OUT/unet_best.pt unet_sl_nlb=OUT/unet_sl_nlb_best.pt --out contours.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from lungnlb.data.studies import label_path, read_records
from lungnlb.evaluation.metrics import per_slice_segmentation
from lungnlb.evaluation.predict import predict_folder
from lungnlb.inference import Predictor
from lungnlb.training.split import load_split
from lungnlb.visualize import PREDICTION_COLOUR, REFERENCE_COLOUR, draw_slice, plt


def masked_image_ids(studies: Path, split: Path, subset: str) -> list[str]:
    """Images of the subset that have a reference mask."""
    records = read_records(studies)
    wanted = load_split(split, records)["images"][subset]
    return [i for i in wanted if label_path(studies, i).is_file()]


def crop_box(mask: np.ndarray, half: int) -> tuple[slice, slice]:
    """A square window of side 2 * half centred on the mask (clipped to the image)."""
    rows, cols = np.nonzero(mask)
    centre = [int(rows.mean()), int(cols.mean())]
    box = []
    for axis, c in enumerate(centre):
        start = min(max(0, c - half), max(0, mask.shape[axis] - 2 * half))
        box.append(slice(start, start + 2 * half))
    return box[0], box[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path, help="prepared studies folder")
    parser.add_argument("--split", required=True, type=Path)
    parser.add_argument("--subset", default="test", choices=("train", "val", "test"))
    parser.add_argument("--checkpoints", nargs="+", required=True, help="NAME=PATH, one column each")
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--half", type=int, default=64, help="half the crop side, pixels")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    image_ids = masked_image_ids(args.data, args.split, args.subset)
    if not image_ids:
        raise SystemExit(f"no image with a reference mask in the {args.subset} subset of {args.split}")
    columns = {}
    for item in args.checkpoints:
        name, _, path = item.partition("=")
        predictor = Predictor.from_checkpoint(path)
        results = [r for r in predict_folder(args.data, predictor, image_ids)[0] if r.mask is not None and r.mask.any()]
        columns[name] = (results, predictor.threshold)
    tumour_slices = next(iter(columns.values()))[0]
    chosen = np.linspace(0, len(tumour_slices) - 1, min(args.slices, len(tumour_slices))).round().astype(int)
    figure, axes = plt.subplots(len(chosen), len(columns), figsize=(2.4 * len(columns), 2.5 * len(chosen)),
                                dpi=110, squeeze=False)
    for row, index in enumerate(chosen):
        for column, (name, (results, threshold)) in enumerate(columns.items()):
            result = results[index]
            dice = per_slice_segmentation([result.probability], [result.mask], threshold)["dice"][0]
            box = crop_box(result.mask, args.half)
            draw_slice(axes[row, column], result.image[box], result.probability[box] > threshold, result.mask[box],
                       f"{name}\n{result.image_id[:18]} z{result.z}: Dice {dice:.2f}")
    handles = [plt.Line2D([], [], color=REFERENCE_COLOUR, label="reference"),
               plt.Line2D([], [], color=PREDICTION_COLOUR, label="model")]
    figure.legend(handles=handles, loc="lower center", ncol=2, fontsize=8)
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out)
    print(f"{len(chosen)} slices x {len(columns)} checkpoints -> {args.out}")


if __name__ == "__main__":
    main()
