"""The bundled sample's CT volumes as DICOM, for a local PACS (scripts/serve_pacs_sample.sh).

    python scripts/pacs_sample_dicom.py sample_data/studies runs/pacs_sample/dicom

Every 3D image of the studies folder whose sidecar says `intensity: hu` becomes a CT series (one
file per slice, HU as signed 16-bit, the NIfTI's geometry as ImagePositionPatient /
ImageOrientationPatient / PixelSpacing in LPS), and its `original` label a DICOM SEG on that series
(`lungnlb.io.dicom_seg`, `ContentLabel` ORIGINAL). Patient, study and series identifiers are made
from the study's `case` and id; the sidecar's attribution goes into the series description's
neighbour, `ImageComments`. 2D images (LIDC npz slices, IQ-OTH/NCCD JPEGs) have no HU or no
geometry of their own and are left out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from lungnlb.io.dicom_seg import SegLabel, write_seg


def _uid(*parts: str) -> str:
    return generate_uid(prefix=None, entropy_srcs=["lungnlb-sample", *parts])


def ct_series(volume: np.ndarray, affine: np.ndarray, case: str, image_id: str, comment: str) -> list[pydicom.Dataset]:
    """(columns, rows, slices) HU voxels with a RAS affine -> one CT dataset per slice."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row_dir, col_dir = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
    study, series, frame = _uid(case, "study"), _uid(image_id, "series"), _uid(image_id, "frame")
    datasets = []
    for k in range(volume.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = _uid(image_id, "slice", str(k))
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = f"{case}^", case, "", ""
        ds.StudyInstanceUID, ds.StudyID, ds.StudyDate, ds.StudyTime = study, "1", "20000101", "000000"
        ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.Modality = series, 1, "CT"
        ds.SeriesDescription = f"LungNLB sample {image_id}"[:64]
        ds.ImageComments = comment[:10240]
        ds.Manufacturer = "LungNLB sample (from the publisher's CT)"
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame, ""
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [float(v) for v in (lps @ [0, 0, k, 1])[:3]]
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # between rows, between columns
        ds.SliceThickness = float(spacing[2])
        pixels = np.round(volume[:, :, k].T).astype(np.int16)  # rows x columns
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.KVP = ""
        ds.PixelData = pixels.tobytes()
        datasets.append(ds)
    return datasets


def convert(studies: Path, out: Path) -> int:
    count = 0
    for sidecar in sorted((studies / "meta").glob("*.json")):
        image_id = sidecar.stem
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
        image_file = studies / f"{image_id}.nii.gz"
        if meta.get("intensity") != "hu" or not image_file.is_file():
            continue
        image = nib.load(image_file)
        if len(image.shape) != 3:
            continue
        volume = np.asarray(image.dataobj, dtype=np.float32)
        datasets = ct_series(volume, image.affine, str(meta.get("case") or image_id), image_id,
                             str(meta.get("attribution", "")))
        folder = out / image_id
        folder.mkdir(parents=True, exist_ok=True)
        for ds in datasets:
            ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", write_like_original=False)
        label_file = studies / "labels" / "original" / f"{image_id}.nii.gz"
        if label_file.is_file():
            mask = np.asarray(nib.load(label_file).dataobj) > 0  # (columns, rows, slices)
            seg = write_seg(datasets, np.transpose(mask, (2, 1, 0)),
                            SegLabel("original", method=str(meta.get("label_method") or "")))
            seg.save_as(folder / "original_seg.dcm")
        count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("studies", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    count = convert(args.studies, args.out)
    if not count:
        print(f"pacs_sample_dicom: no 3D HU image in {args.studies}", file=sys.stderr)
        return 1
    print(f"{count} series written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
