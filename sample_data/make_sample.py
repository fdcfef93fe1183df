"""Rebuild sample_data/studies from ../shared/data with `lungnlb prepare`.

The subset (chosen by discovery, not by file name): the first Lung-PET-CT-Dx series with boxes,
5 consecutive slices centred on its largest box; 2 slices of the first LIDC npz file (the first
and the one with the largest mask); the first normal and the first malignant IQ-OTH/NCCD JPEG.
They are linked (or, for the npz subset, written) into a temporary folder that mirrors
../shared/data's layout, and `prepare` turns that folder into the studies folder.

    .venv/bin/python sample_data/make_sample.py [--data ../shared/data] [--out sample_data/studies]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

# lungnlb is installed (editable, by scripts/setup.sh): no path to add
from lungnlb.data.studies import iter_sidecars, write_sidecar
from lungnlb.io import read_dicom_series, read_voc_folder
from lungnlb.io.dicom import list_dicom_series
from lungnlb.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]

CT_SLICES = 5
NPZ_KEYS = ("images", "masks", "names", "malignancy", "is_cancer")


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target.resolve())


def _ct_subset(data: Path, dst: Path) -> None:
    annotations = sorted((data / "lung-pet-ct-dx").glob("*/annotations"))[0]
    boxes = read_voc_folder(annotations)
    for folder in list_dicom_series(annotations.parent):
        volume = read_dicom_series(folder)
        area = {z: max((o.box[2] - o.box[0] + 1) * (o.box[3] - o.box[1] + 1) for o in boxes[uid].objects)
                for z, uid in enumerate(volume.meta["sop_instance_uids"]) if uid in boxes}
        if not area:
            continue
        centre = max(area, key=area.get)
        first = min(max(centre - CT_SLICES // 2, 0), len(volume.array) - CT_SLICES)
        for z in range(first, first + CT_SLICES):
            file = Path(volume.meta["source_files"][z])
            _link(file, dst / file.relative_to(data))
            uid = volume.meta["sop_instance_uids"][z]
            if uid in boxes:
                _link(boxes[uid].path, dst / boxes[uid].path.relative_to(data))
        return
    raise FileNotFoundError(f"no Lung-PET-CT-Dx series with boxes under {data}")


def _npz_subset(data: Path, dst: Path) -> None:
    source = sorted((data / "lidc-idri" / "slices").glob("*.npz"))[0]
    with np.load(source) as arrays:
        areas = arrays["masks"].reshape(len(arrays["masks"]), -1).sum(axis=1)
        keep = sorted({0, int(np.argmax(areas))})
        subset = {key: arrays[key][keep] for key in NPZ_KEYS if key in arrays.files}
    target = dst / source.relative_to(data)
    target.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(target, **subset)


def _jpeg_subset(data: Path, dst: Path) -> None:
    for class_name in ("normal", "malignant"):
        jpeg = sorted((data / "iq-othnccd" / class_name).glob("*.jpg"))[0]
        _link(jpeg, dst / jpeg.relative_to(data))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "sample_data" / "studies")
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)  # rebuilt from scratch: fingerprints hold temporary paths
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp)
        _ct_subset(args.data, src)
        _npz_subset(args.data, src)
        _jpeg_subset(args.data, src)
        summary = prepare(src, args.out)
    for image_id, sidecar in iter_sidecars(args.out):  # drop the temporary-path fingerprint
        sidecar.pop("fingerprint", None)
        write_sidecar(args.out, image_id, sidecar)
    print("\n".join(summary.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
