"""Tumour masks as DICOM Segmentation objects (SEG) on a CT series, written and read with highdicom.

    seg = write_seg(source_datasets, mask, SegLabel(kind="final", version=2, annotator="alice", ...))
    mask = read_seg(seg, sop_instance_uids)

`source_datasets` are the series' CT instances in the order of the mask's slices (the order
`read_dicom_series` stacks them: `ImageData.meta["sop_instance_uids"]`); frame k of the SEG is
derived from instance k (highdicom takes each frame's position, orientation and spacing from its
source instance, and records the instance in the frame's `DerivationImageSequence`), and the SEG's
`ReferencedSeriesSequence` names the source series. Every SEG gets new Series and SOP Instance UIDs:
a new version never replaces an earlier one.

How an `original` label and each `final` version are told apart (all standard attributes):

| attribute | original | final version N |
|---|---|---|
| `ContentLabel` | `ORIGINAL` | `FINAL` |
| `SeriesNumber` | `SERIES_BASE` (9000) | `SERIES_BASE + N` |
| `SeriesDescription` | `LungNLB original (<method>)` | `LungNLB final vN (<annotator>)` |
| `ContentCreatorName` | the method's author, if known | the annotator |
| segment `SegmentAlgorithmType` | `SEMIAUTOMATIC` (watershed) or `MANUAL` | `SEMIAUTOMATIC` when it corrects a model proposal, else `MANUAL` |
| segment `SegmentationAlgorithmIdentificationSequence` | the labelling method | the proposing model and its version |

`ContentDescription` repeats it in words. `seg_label_of` reads these back.

highdicom is an optional dependency (`pip install lungnlb[pacs]`); it is imported when used.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pydicom

SERIES_BASE = 9000
KINDS = ("original", "final")
MANUFACTURER = "LungNLB"
MODEL_NAME = "LungNLB MONAI Label app"


@dataclass(frozen=True)
class SegLabel:
    """What a SEG says about its label (see the module docstring's table)."""

    kind: str  # "original" or "final"
    version: int = 0  # final version (1, 2, ...); 0 for original
    annotator: str = ""  # who submitted a final label (ContentCreatorName)
    method: str = ""  # original: how it was made (e.g. "watershed", "radiologist")
    model: str = ""  # final: the model whose proposal was corrected (e.g. "lung_nlb_seg")
    model_version: str = ""  # final: that model's version
    software_version: str = "0.1.0"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"SEG label kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "final" and self.version < 1:
            raise ValueError(f"a final SEG needs a version >= 1, got {self.version}")

    @property
    def series_description(self) -> str:
        if self.kind == "original":
            return f"LungNLB original ({self.method or 'unknown method'})"[:64]
        return f"LungNLB final v{self.version} ({self.annotator or 'anonymous'})"[:64]

    @property
    def content_description(self) -> str:
        if self.kind == "original":
            return f"original label, {self.method or 'unknown method'}"[:64]
        by = f"; corrects {self.model} {self.model_version}".rstrip() if self.model else ""
        return f"final v{self.version} by {self.annotator or 'anonymous'}{by}"[:64]


def _require_highdicom():
    try:
        import highdicom
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("DICOM SEG needs highdicom: pip install 'lungnlb[pacs]' (highdicom 0.22 works with pydicom 2)") from error
    return highdicom


def _person_name(name: str) -> str:
    """A PN value: the name with characters PN reserves (^ = \\) replaced, at most 63 characters, as
    the family-name component (a trailing ^ marks a one-component name)."""
    return (re.sub(r"[\^=\\]", " ", name).strip()[:63] or "anonymous") + "^"


def write_seg(source_datasets: Sequence[pydicom.Dataset], mask: np.ndarray, label: SegLabel,
              segment_label: str = "tumour") -> pydicom.Dataset:
    """A binary one-segment SEG of `mask` (slices, rows, columns), slice k on `source_datasets[k]`."""
    hd = _require_highdicom()
    from pydicom.sr.codedict import codes

    mask = np.asarray(mask)
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3 or mask.shape[0] != len(source_datasets):
        raise ValueError(f"mask of shape {mask.shape} does not match {len(source_datasets)} source instance(s)")
    first = source_datasets[0]
    if mask.shape[1:] != (int(first.Rows), int(first.Columns)):
        raise ValueError(f"mask slices {mask.shape[1:]} differ from the source images' {int(first.Rows)} x {int(first.Columns)}")
    semiautomatic = (label.kind == "original" and label.method not in ("", "radiologist", "manual")) or \
                    (label.kind == "final" and bool(label.model))
    algorithm = None
    if semiautomatic:
        name = label.method if label.kind == "original" else label.model
        version = (label.software_version if label.kind == "original" else label.model_version) or "unknown"
        algorithm = hd.AlgorithmIdentificationSequence(name=name[:64], version=str(version)[:64],
                                                       family=codes.cid7162.ArtificialIntelligence)
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=segment_label,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=(hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC if semiautomatic
                        else hd.seg.SegmentAlgorithmTypeValues.MANUAL),
        algorithm_identification=algorithm,
    )
    creator = label.annotator if label.kind == "final" else ""
    seg = hd.seg.Segmentation(
        source_images=list(source_datasets),
        pixel_array=(mask > 0).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=hd.UID(),
        series_number=SERIES_BASE + (label.version if label.kind == "final" else 0),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=label.software_version,
        device_serial_number="0",
        content_description=label.content_description,
        content_creator_name=_person_name(creator) if creator else None,
        content_label=label.kind.upper(),
        omit_empty_frames=False,
    )
    seg.SeriesDescription = label.series_description
    return seg


def seg_label_of(seg: pydicom.Dataset) -> SegLabel | None:
    """The `SegLabel` a SEG written by `write_seg` carries; None for a SEG of another writer."""
    content_label = str(getattr(seg, "ContentLabel", "")).strip().upper()
    if content_label not in ("ORIGINAL", "FINAL") or str(getattr(seg, "Manufacturer", "")) != MANUFACTURER:
        return None
    kind = content_label.lower()
    version = int(getattr(seg, "SeriesNumber", SERIES_BASE) or SERIES_BASE) - SERIES_BASE if kind == "final" else 0
    model = model_version = method = ""
    segments = getattr(seg, "SegmentSequence", None) or []
    algorithm = getattr(segments[0], "SegmentationAlgorithmIdentificationSequence", None) if segments else None
    if algorithm:
        name, algo_version = str(algorithm[0].AlgorithmName), str(algorithm[0].AlgorithmVersion)
        if kind == "final":
            model, model_version = name, algo_version
        else:
            method = name
    elif kind == "original":
        match = re.fullmatch(r"LungNLB original \((.*)\)", str(getattr(seg, "SeriesDescription", "")))
        method = match.group(1) if match else ""
    annotator = str(getattr(seg, "ContentCreatorName", "") or "").strip("^")
    return SegLabel(kind=kind, version=max(version, 1) if kind == "final" else 0, annotator=annotator, method=method,
                    model=model, model_version=model_version)


def referenced_series_uid(seg: pydicom.Dataset) -> str | None:
    """The SeriesInstanceUID of the images a SEG was drawn on (its ReferencedSeriesSequence)."""
    sequence = getattr(seg, "ReferencedSeriesSequence", None)
    return str(sequence[0].SeriesInstanceUID) if sequence else None


def read_seg(seg: pydicom.Dataset, sop_instance_uids: Sequence[str]) -> np.ndarray:
    """The union of a SEG's segments as a bool mask (slices, rows, columns), slice k on
    `sop_instance_uids[k]` (frames are matched by the source instance each one was derived from;
    a slice without a frame is empty). ValueError naming the problem for a SEG that references
    none of these instances or none frame by frame."""
    hd = _require_highdicom()
    try:
        segmentation = hd.seg.Segmentation.from_dataset(seg, copy=False)
    except (AttributeError, ValueError, KeyError) as error:
        raise ValueError(f"not a readable DICOM SEG: {error}") from error
    referenced = {uid for _, _, uid in segmentation.get_source_image_uids()}
    known = [uid for uid in sop_instance_uids if uid in referenced]
    if not known:
        raise ValueError("the SEG references none of the series' instances frame by frame "
                         f"(SeriesInstanceUID {getattr(seg, 'SeriesInstanceUID', '?')})")
    pixels = segmentation.get_pixels_by_source_instance(
        source_sop_instance_uids=known, assert_missing_frames_are_empty=True, skip_overlap_checks=True)
    found = dict(zip(known, pixels.reshape(len(known), pixels.shape[1], pixels.shape[2], -1).any(axis=-1)))
    rows, columns = int(seg.Rows), int(seg.Columns)
    return np.stack([found.get(uid, np.zeros((rows, columns), dtype=bool)) for uid in sop_instance_uids])
