"""Turn a source folder (LIDC npz / LIDC nodule crops / LIDC nodule VOIs / LIDC DICOM+XML /
Lung-PET-CT-Dx / IQ-OTH/NCCD / plain images) into a MONAI Label studies folder:

    <out>/<image_id>.nii.gz                 image (slices stay 2D, volumes 3D, geometry kept)
    <out>/labels/original/<image_id>.nii.gz uint8 0/1 mask: radiologist (LIDC) or watershed (boxes)
    <out>/labels/reader<k>/<image_id>.nii.gz one LIDC reader's own mask (nodule crops only)
    <out>/meta/<image_id>.json              sidecar: provenance and slice-level class labels

Layouts are discovered per item anywhere below the source, npz files by their arrays:
``images``/``masks`` (lidc-npz), ``image``/``nodule``/``slice`` (lidc-crops), ``img_R<n>``
(lidc-vois, with the ``nodules.csv`` beside them); DICOM series folders, matched to LIDC reader XML by
SeriesInstanceUID (lidc-dicom) or to PASCAL VOC files named by a slice's SOPInstanceUID
(lung-pet-ct-dx); JPEG/PNG in ``normal``/``benign``/``malignant`` folders (iq-othnccd); anything else
readable (images).
Reruns skip items whose sidecar records the same source fingerprint: same files, no duplicates.
Nothing is ever written under the source folder.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from lungnlb.data.sources import ATTRIBUTION
from lungnlb.data.studies import image_path, iter_sidecars, label_path, write_sidecar
from lungnlb.io import (
    ImageData,
    ImageReadError,
    check_consensus,
    lidc_consensus,
    read_crop_file,
    read_dicom_series,
    read_image,
    read_npz_slices,
    read_ratings,
    read_voc,
    read_voi_file,
    write_nifti,
)
from lungnlb.io.dicom import list_dicom_series, walk_files
from lungnlb.io.lidc_crops import is_crop_file
from lungnlb.io.lidc_vois import RATINGS_FILE, is_voi_file
from lungnlb.io.npz_slices import REQUIRED_KEYS as NPZ_SLICE_KEYS
from lungnlb.io.raster import RASTER_SUFFIXES

LOGGER = logging.getLogger(__name__)
NPZ_KINDS = ("lidc-npz", "lidc-crops", "lidc-vois")
FORMATS = ("auto", "lidc-npz", "lidc-crops", "lidc-vois", "lidc-dicom", "lung-pet-ct-dx", "iq-othnccd", "images")
DEFAULT_CONSENSUS = 2  # readers; the usual LIDC reference (at least two of the four)
CONSENSUS_RULE = "voxel included by >= consensus readers"
# A slice at least this many slices from every slice a reader marked or a box covers is tumour-free
# (box- and contour-annotated CT only: crops are centred on nodules).
TUMOUR_FREE_DISTANCE = 5
TUMOUR_FREE_RULE = {
    "distance": TUMOUR_FREE_DISTANCE,
    "rule": "class 0, empty mask: slices >= distance slices from every marked slice (any reader mark, or any box)",
}
IQ_CLASSES = {"normal": 0, "benign": 1, "malignant": 1}
IQ_CASE_BLOCK = 20
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr")
@dataclass
class Item:
    """One unit of work: a source path of a detected format and what is needed to convert it."""

    kind: str
    path: Path
    extra: dict = field(default_factory=dict)


@dataclass
class Prepared:
    """One output image: array + affine, optional mask, sidecar fields, further label tags."""

    image_id: str
    image: ImageData
    mask: np.ndarray | None
    sidecar: dict
    labels: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class PrepareSummary:
    """What a run did."""

    written: Counter = field(default_factory=Counter)  # per source
    up_to_date: Counter = field(default_factory=Counter)
    masks: Counter = field(default_factory=Counter)
    skipped: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        sources = sorted(set(self.written) | set(self.up_to_date))
        rows = [f"{s}: {self.written[s]} written, {self.up_to_date[s]} up to date, {self.masks[s]} masks" for s in sources]
        total = sum(self.written.values()) + sum(self.up_to_date.values())
        rows.append(f"images: {total}, masks: {sum(self.masks.values())}, skipped: {len(self.skipped)}")
        rows += [f"  skipped {reason}" for reason in self.skipped]
        return rows


def safe_id(text: str) -> str:
    """Filesystem-safe id: letters, digits, '-', '_' and '.' only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "image"


def _xml_index(files: list[Path]) -> tuple[dict[str, Path], dict[str, Path]]:
    """All XML among ``files``: VOC files by SOP UID (file stem), LIDC reader files by SeriesInstanceUID."""
    voc, lidc = {}, {}
    for path in (p for p in files if p.suffix.lower() == ".xml"):
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError:
            continue
        tag = root.tag.rsplit("}", 1)[-1]
        if tag == "annotation":
            voc[path.stem] = path
        elif tag == "LidcReadMessage":
            series = next((n.text.strip() for n in root.iter() if n.tag.endswith("SeriesInstanceUid") and n.text), None)
            if series:
                lidc[series] = path
    return voc, lidc


def _npz_item(path: Path) -> Item:
    """The item of an npz file, its kind recognised by its array names (read without the data)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = set(data.files)
    except Exception as error:
        raise ImageReadError(path, f"unreadable or corrupt npz file ({type(error).__name__}: {error})") from error
    if set(NPZ_SLICE_KEYS) <= keys:
        return Item("lidc-npz", path)
    if is_crop_file(keys):
        return Item("lidc-crops", path)
    if is_voi_file(keys):
        ratings = path.parent / RATINGS_FILE
        return Item("lidc-vois", path, {"ratings": ratings if ratings.is_file() else None})
    raise ImageReadError(path, f"npz of no known layout (arrays {sorted(keys)[:8]}): expected images/masks, "
                               "image/masks/nodule/slice or img_R<n>/mask_R<n>")


def discover(src: Path) -> tuple[list[Item], list[str]]:
    """Items of every recognised layout below ``src`` (sorted, deterministic) and skip reasons."""
    items, skipped = [], []
    files = walk_files(src)
    for path in (p for p in files if p.suffix.lower() == ".npz"):
        try:
            items.append(_npz_item(path))
        except ImageReadError as error:
            skipped.append(str(error))
    voc, lidc = _xml_index(files)
    for folder in list_dicom_series(src):
        items.append(Item("dicom", folder, {"voc": voc, "lidc": lidc}))
    for path in (p for p in files if p.suffix.lower() in RASTER_SUFFIXES):
        kind = "iq-othnccd" if path.parent.name.lower() in IQ_CLASSES else "images"
        items.append(Item(kind, path))
    for path in (p for p in files if p.name.lower().endswith(VOLUME_SUFFIXES)):
        items.append(Item("images", path))
    return items, skipped


def _sidecar(source: str, case: str, intensity: str, **fields) -> dict:
    base = {
        "source": source,
        "case": case,
        "intensity": intensity,
        "class_label": None,
        "label_method": None,
        "labelled_slices": [],
        "slice_class_labels": {},
        "params": None,
        "readers": None,
        "malignancy": None,
        "attribution": ATTRIBUTION.get(source),
    }
    return base | fields


def _from_npz(item: Item) -> Iterator[Prepared]:
    for s in read_npz_slices(item.path):
        has_mask = bool(s.mask.any())
        yield Prepared(
            safe_id(f"{s.patient}_npz_{s.name}"),
            s.image,
            s.mask,
            _sidecar(
                "lidc-idri",
                s.patient,
                "normalized",
                class_label=1 if has_mask else None,
                label_method="radiologist",
                labelled_slices=[0],
                malignancy=s.malignancy,
                is_cancer=s.is_cancer,
                source_files=[str(item.path)],
                npz_index=s.image.meta["npz_index"],
            ),
        )


def _crop_sidecar(source: str, case: str, intensity: str, reference: np.ndarray, **fields) -> dict:
    """Sidecar of a nodule-centred crop (Z, Y, X): every slice labelled, class 1 where ``reference``
    marks something and no class elsewhere (a crop centred on a nodule is no tumour-free example)."""
    positive = [int(z) for z in np.flatnonzero(reference.any(axis=(1, 2)))]
    return _sidecar(
        source,
        case,
        intensity,
        class_label=1 if positive else None,
        label_method="radiologist",
        labelled_slices=list(range(len(reference))),
        slice_class_labels={str(z): 1 for z in positive},
        crop=True,
        **fields,
    )


def _from_crops(item: Item, consensus: int) -> Iterator[Prepared]:
    """One image per nodule: the reference of ``consensus`` readers and each marking reader's own mask."""
    for crop in read_crop_file(item.path):
        reference = crop.consensus(consensus)
        tags = {f"reader{r + 1}": crop.readers[r] for r in crop.marking_readers}
        sidecar = _crop_sidecar(
            "lidc-crops",
            crop.patient,
            "crops8bit",
            reference,
            params={"consensus": consensus, "rule": CONSENSUS_RULE},
            readers=len(crop.readers),
            reader_tags=sorted(tags),
            nodule=crop.nodule,
            crop_slices=crop.slices,
            spacing_known=False,
            source_files=[str(item.path)],
        )
        yield Prepared(safe_id(f"{crop.patient}_crop_n{crop.nodule:02d}"), crop.image, reference, sidecar, tags)


@functools.lru_cache(maxsize=8)
def _ratings(path: Path, mtime_ns: int) -> dict:
    """`read_ratings`, read once per version of a csv for all the VOI files beside it."""
    return read_ratings(path)


def _from_vois(item: Item) -> Iterator[Prepared]:
    """One image per nodule at native spacing with the publisher's mask and its csv ratings."""
    csv_path = item.extra["ratings"]
    ratings = _ratings(csv_path, csv_path.stat().st_mtime_ns) if csv_path else None
    for voi in read_voi_file(item.path, ratings):
        sidecar = _crop_sidecar(
            "lidc-vois",
            voi.patient,
            "hu",
            voi.mask,
            params={"rule": "the publisher's majority vote of the readers"},
            malignancy=(voi.ratings or {}).get("Malignancy_value"),
            ratings=voi.ratings,
            nodule=voi.nodule,
            source_files=[str(item.path)] + ([str(csv_path)] if csv_path else []),
        )
        yield Prepared(safe_id(f"{voi.patient}_voi_R{voi.nodule}"), voi.image, voi.mask, sidecar)


def tumour_free_slices(depth: int, marked: Iterable[float]) -> list[int]:
    """Slices of a ``depth``-slice volume at least `TUMOUR_FREE_DISTANCE` slices from every marked
    position (fractional or outside the volume for marks beyond a partial series); none when a mark
    could not be placed (NaN), every slice when nothing is marked."""
    marked = np.asarray(list(marked), dtype=float)
    if np.isnan(marked).any():
        return []
    distance = np.abs(np.arange(depth)[:, None] - marked[None, :])
    return [int(z) for z in np.flatnonzero(np.all(distance >= TUMOUR_FREE_DISTANCE, axis=1))]


def slice_labels(depth: int, positive: list[int], tumour_free: list[int]) -> tuple[list[int], dict[str, int], int | None]:
    """(labelled_slices, slice_class_labels, class_label) of a ``depth``-slice volume with these
    positive and tumour-free slices; the volume is class 0 only when every slice is tumour-free."""
    classes = {z: 0 for z in tumour_free} | {z: 1 for z in positive}
    volume_class = 1 if positive else (0 if len(tumour_free) == depth else None)
    return sorted(classes), {str(z): c for z, c in sorted(classes.items())}, volume_class


def _series_id(image: ImageData, folder: Path) -> str:
    patient = image.meta.get("patient_id") or folder.parent.name
    short = folder.name if len(folder.name) <= 24 else hashlib.sha1(image.meta["series_instance_uid"].encode()).hexdigest()[:10]
    return safe_id(f"{patient}_{short}")


def _z_of_slices(image: ImageData) -> list[float]:
    """ImagePositionPatient z of each slice (the LIDC XML fallback key), from the affine."""
    n = image.array.shape[0]
    origin_ras, step_ras = image.affine[:3, 3], image.affine[:3, 2]
    return [float(origin_ras[2] + k * step_ras[2]) for k in range(n)]


def _from_lidc_dicom(item: Item, image: ImageData, xml_path: Path, consensus: int) -> Prepared:
    result = lidc_consensus(xml_path, image.meta["sop_instance_uids"], _z_of_slices(image), image.array.shape[1:], consensus)
    free = tumour_free_slices(len(image.array), result.mark_positions)
    labelled, slice_classes, volume_class = slice_labels(len(image.array), result.labelled_slices, free)
    malignancy = sorted({m for n in result.nodules for m in n.malignancy})
    return Prepared(
        _series_id(image, item.path),
        image,
        result.mask,
        _sidecar(
            "lidc-idri",
            image.meta.get("patient_id") or item.path.parent.parent.name,
            "hu",
            class_label=volume_class,
            label_method="radiologist",
            labelled_slices=labelled,
            slice_class_labels=slice_classes,
            params={"consensus": consensus, "rule": CONSENSUS_RULE, "tumour_free": TUMOUR_FREE_RULE},
            readers=result.readers,
            malignancy=malignancy or None,
            nodules=[vars(n) for n in result.nodules],
            series_instance_uid=image.meta["series_instance_uid"],
            sop_instance_uids=image.meta["sop_instance_uids"],
            source_files=[str(xml_path), str(item.path)],
        ),
    )


def _from_voc(item: Item, image: ImageData, boxes: dict[int, Path], box_to_mask: Callable, params: object) -> Prepared:
    mask = np.zeros(image.array.shape, dtype=bool)
    box_record: dict[str, list] = {}
    for z, voc_path in sorted(boxes.items()):
        annotation = read_voc(voc_path)
        for obj in annotation.objects:
            x0, y0, x1, y1 = obj.box
            rows, cols = image.array.shape[1:]
            if x1 >= cols or y1 >= rows or x0 < 0 or y0 < 0:
                raise ImageReadError(voc_path, f"box {obj.box} outside the {cols}x{rows} slice")
            mask[z] |= box_to_mask(image.array[z], obj.box, params)
            box_record.setdefault(str(z), []).append({"label": obj.label, "box": list(obj.box)})
    boxed = sorted(boxes)
    depth = len(image.array)
    labelled, slice_classes, volume_class = slice_labels(depth, boxed, tumour_free_slices(depth, boxed))
    return Prepared(
        _series_id(image, item.path),
        image,
        mask,
        _sidecar(
            "lung-pet-ct-dx",
            image.meta.get("patient_id") or item.path.parent.parent.name,
            "hu",
            class_label=volume_class,
            label_method="watershed",
            labelled_slices=labelled,
            slice_class_labels=slice_classes,
            params=(params.as_dict() if hasattr(params, "as_dict") else {}) | {"tumour_free": TUMOUR_FREE_RULE},
            boxes=box_record,
            series_instance_uid=image.meta["series_instance_uid"],
            sop_instance_uids=image.meta["sop_instance_uids"],
            source_files=[str(item.path)] + [str(boxes[z]) for z in boxed],
        ),
    )


def _from_dicom(item: Item, fmt: str, consensus: int) -> Iterator[Prepared]:
    image = read_dicom_series(item.path)
    uids = image.meta["sop_instance_uids"]
    lidc_xml = item.extra["lidc"].get(image.meta["series_instance_uid"])
    boxes = {z: item.extra["voc"][uid] for z, uid in enumerate(uids) if uid in item.extra["voc"]}
    if lidc_xml is not None and fmt in ("auto", "lidc-dicom"):
        yield _from_lidc_dicom(item, image, lidc_xml, consensus)
    elif boxes and fmt in ("auto", "lung-pet-ct-dx"):
        from lungnlb.labels import WatershedParams, box_to_mask

        yield _from_voc(item, image, boxes, box_to_mask, WatershedParams())
    elif fmt in ("auto", "images"):
        yield _plain(item, image)


def _plain(item: Item, image: ImageData) -> Prepared:
    name = image.meta.get("patient_id") and _series_id(image, item.path) or safe_id(item.path.name.split(".")[0])
    return Prepared(name, image, None, _sidecar("other", name, image.intensity, source_files=[str(item.path)]))


def iq_case(class_name: str, stem: str) -> str:
    """IQ-OTH/NCCD case id: the block of IQ_CASE_BLOCK consecutive file numbers within the class."""
    number = re.search(r"(\d+)$", stem)
    if number is None:
        return f"iq-othnccd/{class_name}/{stem}"
    start = int(number.group(1)) // IQ_CASE_BLOCK * IQ_CASE_BLOCK
    return f"iq-othnccd/{class_name}/{start:04d}-{start + IQ_CASE_BLOCK - 1:04d}"


def _from_iq(item: Item) -> Iterator[Prepared]:
    class_name = item.path.parent.name.lower()
    stem = item.path.stem
    image_id = safe_id(f"iq-othnccd_{stem}" if stem.lower().startswith(class_name) else f"iq-othnccd_{class_name}_{stem}")
    yield Prepared(
        image_id,
        read_image(item.path),
        None,
        _sidecar("iq-othnccd", iq_case(class_name, stem), "windowed8bit", class_label=IQ_CLASSES[class_name],
                 class_name=class_name, source_files=[str(item.path)]),
    )


def convert(item: Item, fmt: str, consensus: int = DEFAULT_CONSENSUS) -> Iterator[Prepared]:
    """The prepared images of one item, if its kind fits the requested format."""
    if item.kind == "dicom":
        yield from _from_dicom(item, fmt, consensus)
    elif item.kind == "lidc-npz" and fmt in ("auto", "lidc-npz"):
        yield from _from_npz(item)
    elif item.kind == "lidc-crops" and fmt in ("auto", "lidc-crops"):
        yield from _from_crops(item, consensus)
    elif item.kind == "lidc-vois" and fmt in ("auto", "lidc-vois"):
        yield from _from_vois(item)
    elif item.kind == "iq-othnccd" and fmt in ("auto", "iq-othnccd"):
        yield from _from_iq(item)
    elif fmt == "images" or (item.kind == "images" and fmt == "auto"):
        if item.kind not in NPZ_KINDS:
            yield _plain(item, read_image(item.path))


def fingerprint(item: Item, fmt: str, consensus: int) -> str:
    """Hash of the item's source files (path, size, mtime) and the options that shape its output."""
    paths = sorted(item.path.iterdir()) if item.path.is_dir() else [item.path]
    if item.kind == "dicom":
        paths += sorted(item.extra["voc"].values()) + sorted(item.extra["lidc"].values())
    if item.extra.get("ratings"):
        paths.append(item.extra["ratings"])
    digest = hashlib.sha1(f"{fmt}|{consensus}|{item.kind}".encode())
    for path in paths:
        stat = path.stat()
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def _existing(out: Path) -> dict[str, list[dict]]:
    """Sidecars already in ``out`` whose image (and labels, if any) exist, grouped by source fingerprint."""
    found: dict[str, list[dict]] = {}
    for image_id, data in iter_sidecars(out):
        tags = (["original"] if data.get("label_method") is not None else []) + data.get("reader_tags", [])
        files = [image_path(out, image_id)] + [label_path(out, image_id, tag) for tag in tags]
        if all(f.is_file() for f in files) and "fingerprint" in data:
            found.setdefault(data["fingerprint"], []).append(data)
    return found


def storage_dtype(array: np.ndarray) -> type:
    """Smallest lossless type for the image: uint8 for 0..255 integers, int16 for integral HU, else float32."""
    if array.size == 0 or not np.all(np.mod(array, 1) == 0):
        return np.float32
    low, high = float(array.min()), float(array.max())
    if low >= 0 and high <= 255:
        return np.uint8
    return np.int16 if low >= -32768 and high <= 32767 else np.float32


def write_prepared(prepared: Prepared, out: Path) -> None:
    """Write one image (in its smallest lossless type), its masks and its sidecar (each atomically)."""
    array = prepared.image.array
    write_nifti(array, prepared.image.affine, image_path(out, prepared.image_id), storage_dtype(array))
    labels = ({"original": prepared.mask} if prepared.mask is not None else {}) | prepared.labels
    for tag, mask in labels.items():
        write_nifti(mask.astype(np.uint8), prepared.image.affine, label_path(out, prepared.image_id, tag), np.uint8)
    write_sidecar(out, prepared.image_id, prepared.sidecar)


def check_paths(src: Path, out: Path) -> None:
    """Refuse a missing source or an output inside the source (never write into the source)."""
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: source folder does not exist")
    src_r, out_r = src.resolve(), out.resolve()
    if out_r == src_r or src_r in out_r.parents:
        raise ValueError(f"{out}: the output folder must not be inside the source folder {src}")


def prepare(
    src: str | Path, out: str | Path, fmt: str = "auto", consensus: int = DEFAULT_CONSENSUS, progress: bool = True
) -> PrepareSummary:
    """Build the studies folder ``out`` from ``src``; returns what was written, kept and skipped.

    ``consensus``: the reference mask of LIDC reader outlines (XML, crops) is the voxels at least
    this many readers include.
    """
    src, out = Path(src), Path(out)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: expected one of {FORMATS}")
    consensus = check_consensus(consensus)
    check_paths(src, out)
    items, skipped = discover(src)
    summary = PrepareSummary(skipped=skipped)
    seen: dict[str, Path] = {}
    existing = _existing(out)
    for item in tqdm(items, desc="prepare", unit="item", disable=not progress):
        item_fingerprint = fingerprint(item, fmt, consensus)
        kept = existing.get(item_fingerprint, [])
        if kept:
            for data in kept:
                summary.up_to_date[data["source"]] += 1
                summary.masks[data["source"]] += data.get("label_method") is not None
            continue
        try:
            for prepared in convert(item, fmt, consensus):
                if prepared.image_id in seen:
                    raise ValueError(f"image id {prepared.image_id} already produced from {seen[prepared.image_id]}")
                seen[prepared.image_id] = item.path
                prepared.sidecar["fingerprint"] = item_fingerprint
                prepared.sidecar["source_files"] = [os.path.relpath(f, src) for f in prepared.sidecar.get("source_files", [])]
                write_prepared(prepared, out)
                source = prepared.sidecar["source"]
                summary.written[source] += 1
                summary.masks[source] += prepared.mask is not None
        except (ImageReadError, ValueError, OSError) as error:
            LOGGER.warning("skipping %s: %s", item.path, error)
            summary.skipped.append(f"{item.path}: {error}")
    if not summary.written and not summary.up_to_date:
        raise ValueError(f"{src}: no {'' if fmt == 'auto' else fmt + ' '}data found to prepare ({len(summary.skipped)} skipped)")
    return summary
