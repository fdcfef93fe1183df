"""Turn a folder of lung CT (LIDC npz / nodule crops / nodule VOIs / DICOM+XML / Lung-PET-CT-Dx /
IQ-OTH/NCCD / images) into a MONAI Label studies folder.

Images become NIfTI (slices 2D, volumes 3D, geometry kept), boxes become watershed masks and LIDC
contours radiologist masks in labels/original/ (each reader of a nodule crop also in
labels/reader<k>/), and each image gets a sidecar JSON in meta/.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    from lungnlb.prepare import DEFAULT_CONSENSUS, FORMATS

    parser.add_argument("src", type=Path, help="source folder (a collection or a folder holding several); never written to")
    parser.add_argument("out", type=Path, help="studies folder to create or update")
    parser.add_argument("--format", default="auto", choices=FORMATS, help="layout to read (default: detect per item)")
    parser.add_argument("--consensus", type=int, default=DEFAULT_CONSENSUS,
                        help=f"LIDC reference: voxels at least N readers include (default {DEFAULT_CONSENSUS})")


def run(args: argparse.Namespace) -> int:
    from lungnlb.prepare import prepare

    summary = prepare(args.src, args.out, fmt=args.format, consensus=args.consensus)
    print("\n".join(summary.lines()))
    return 0
