"""Readers and writers for lung CT: DICOM, NIfTI, NRRD, PNG/JPEG, the LIDC npz slices, LIDC nodule
crops and volumes of interest, LIDC reader XML, PASCAL VOC boxes; and the one intensity mapping to
the model's input range.

See docs/data.md for the geometry and intensity conventions.
"""

from lungnlb.io.dicom import list_dicom_series, read_dicom_file, read_dicom_series
from lungnlb.io.image import ImageData, ImageReadError, axial_affine
from lungnlb.io.intensity import LUNG_WINDOW, to_model_input
from lungnlb.io.lidc_crops import NoduleCrop, read_crop_file
from lungnlb.io.lidc_vois import NoduleVoi, read_ratings, read_voi_file
from lungnlb.io.lidc_xml import LidcMasks, check_consensus, lidc_consensus, parse_lidc_xml
from lungnlb.io.npz_slices import NpzSlice, read_npz_slices
from lungnlb.io.raster import read_raster
from lungnlb.io.reader import read_image
from lungnlb.io.voc import VocAnnotation, read_voc, read_voc_folder
from lungnlb.io.volume import read_nifti, read_nrrd, write_nifti

__all__ = [
    "ImageData",
    "ImageReadError",
    "LUNG_WINDOW",
    "LidcMasks",
    "NoduleCrop",
    "NoduleVoi",
    "NpzSlice",
    "VocAnnotation",
    "axial_affine",
    "check_consensus",
    "lidc_consensus",
    "list_dicom_series",
    "parse_lidc_xml",
    "read_dicom_file",
    "read_dicom_series",
    "read_crop_file",
    "read_image",
    "read_nifti",
    "read_npz_slices",
    "read_nrrd",
    "read_ratings",
    "read_raster",
    "read_voc",
    "read_voc_folder",
    "read_voi_file",
    "to_model_input",
    "write_nifti",
]
