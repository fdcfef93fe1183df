"""Write a compact copy of a prepared studies folder: its labelled slices only, as 8-bit 2D images.

For carrying the training data to a remote GPU machine whose transfer is size-limited (the prepared
folder of ../shared/data is ~105 MB, mostly unlabelled slices of CT volumes). Each labelled slice
of a volume becomes the 2D image ``<image_id>_z<z>``; 2D images keep their id. Every image is stored
as the model input quantised to 8 bits, ``v = round(255 * to_model_input(image))``, with intensity
``"windowed8bit"``, so the model sees ``v / 255``: IQ-OTH/NCCD images are unchanged, CT slices lose
at most half a grey level (1500 HU / 510 ~ 2.9 HU in the lung window). Case, source, class label,
mask and attribution are kept, so `lungnlb.training.split` puts every case in the same subset as
in the full folder (splits are by case).

With ``--split SPLIT --subsets train val`` only the cases of those subsets are written (the test
patients of a GPU run need not, and should not, travel); ``--native-patches`` keeps only what
native-resolution training uses, cut to the body (scripts/gpu_train.sh: under the 64 MiB a device
call carries, with the wheels).

    python -m experiments.compact_studies /tmp/lungnlb-paper-studies .gpu/studies
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np

from lungnlb.data.studies import (
    image_path,
    label_path,
    read_records,
    read_study_image,
    slice_plan,
    write_sidecar,
)
from lungnlb.io import read_image
from lungnlb.io.image import axial_affine
from lungnlb.inference import BODY_MARGIN, body_box
from lungnlb.io.intensity import IntensityMapping, to_model_input
from lungnlb.io.volume import nifti_bytes
from lungnlb.training.split import load_split

KEPT_KEYS = ("case", "source", "attribution", "label_method", "class_name")
NATIVE_MARGIN = 32  # half of the shipped 64-pixel patch: every patch centred in the body keeps its context


def write_uint8(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """A uint8 NIfTI, gzip level 9 (a sixth smaller than the level `write_nifti` uses)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(nifti_bytes(array, affine, np.uint8), compresslevel=9))


def compact_image(studies: Path, record: dict, out: Path, native_patches: bool = False, slice_step: int = 1) -> int:
    """Write the labelled slices of one prepared image into `out`; returns how many.

    ``native_patches``: only the slices native-resolution training draws patches from (a lesion mask
    or tumour-free, as `lungnlb.training.trainer.load_training_set` keeps), each cut to the box of
    the body widened by half a patch (the air around a patient is what the trainer pads with).
    ``slice_step``: of a volume's kept slices every ``slice_step``-th (neighbouring slices of a
    nodule are nearly the same image)."""
    image = read_study_image(image_path(studies, record["image_id"]))
    mask_path = label_path(studies, record["image_id"])
    mask = read_image(mask_path).array > 0.5 if mask_path.is_file() else None
    model_input = to_model_input(image.array, record["intensity"])
    affine = axial_affine(image.spacing[-2:])
    plan = slice_plan(record, mask, model_input.ndim)
    if native_patches:
        plan = [(z, has_mask, label) for z, has_mask, label in plan
                if label == 0 or (has_mask and (mask if mask.ndim == 2 else mask[z]).any())]
    written = 0
    for z, has_mask, label in plan[::slice_step]:
        image_id = record["image_id"] if model_input.ndim == 2 else f"{record['image_id']}_z{z:03d}"
        plane = model_input if model_input.ndim == 2 else model_input[z]
        plane_mask = (mask if mask.ndim == 2 else mask[z]) if has_mask else None
        if native_patches:
            box = body_region(plane)
            plane, plane_mask = plane[box], None if plane_mask is None else plane_mask[box]
        write_uint8(np.round(plane * 255), affine, image_path(out, image_id))
        if plane_mask is not None:
            write_uint8(plane_mask, affine, label_path(out, image_id))
        sidecar = {key: record.get(key) for key in KEPT_KEYS}
        sidecar.update(intensity="windowed8bit", class_label=label, labelled_slices=[0] if has_mask else [],
                       compacted_from={"image_id": record["image_id"], "z": z, "intensity": record["intensity"]})
        write_sidecar(out, image_id, sidecar)
        written += 1
    return written


def body_region(plane: np.ndarray, margin: int = NATIVE_MARGIN) -> tuple[slice, slice]:
    """The body's box in a model-input plane widened by ``margin`` pixels (the whole plane for air only)."""
    box = body_box(plane, IntensityMapping().air() + BODY_MARGIN)
    if box is None:
        return slice(None), slice(None)
    return tuple(slice(max(0, part.start - margin), min(size, part.stop + margin))
                 for part, size in zip(box, plane.shape))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("studies", type=Path, help="prepared studies folder (what `lungnlb prepare` writes)")
    parser.add_argument("out", type=Path, help="new folder for the compact copy")
    parser.add_argument("--split", type=Path, help="a split.json: write only the cases of --subsets")
    parser.add_argument("--subsets", nargs="+", default=["train", "val"], choices=["train", "val", "test"])
    parser.add_argument("--native-patches", action="store_true",
                        help="only the slices native-resolution training uses, each cut to the body's box")
    parser.add_argument("--slice-step", type=int, default=1, help="every N-th kept slice of a volume")
    args = parser.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"{args.out} exists and is not empty")
    records = read_records(args.studies)
    if args.split:
        cases = {case for subset in args.subsets for case in load_split(args.split)["cases"][subset]}
        records = [record for record in records if record["case"] in cases]
    if args.slice_step < 1:
        raise SystemExit(f"--slice-step must be >= 1, got {args.slice_step}")
    slices = sum(compact_image(args.studies, record, args.out, args.native_patches, args.slice_step)
                 for record in records)
    size = sum(path.stat().st_size for path in args.out.rglob("*") if path.is_file())
    print(f"{slices} labelled slices -> {args.out} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
