"""PASCAL VOC box files (Lung-PET-CT-Dx): one XML per annotated slice, named by its SOP Instance UID.

Boxes are ``(x_min, y_min, x_max, y_max)`` in pixel columns and rows, inclusive, as written.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from lungnlb.io.image import ImageReadError


@dataclass
class VocObject:
    """One labelled box."""

    label: str
    box: tuple[int, int, int, int]


@dataclass
class VocAnnotation:
    """The boxes of one slice; ``sop_uid`` is the file stem (the slice's SOPInstanceUID)."""

    path: Path
    sop_uid: str
    size: tuple[int, int] | None  # (width, height) as declared
    objects: list[VocObject]


def _int(node: ET.Element, name: str, path: Path) -> int:
    value = node.findtext(name)
    if value is None:
        raise ImageReadError(path, f"VOC box lacks <{name}>")
    return int(round(float(value)))


def read_voc(path: str | Path) -> VocAnnotation:
    """Parse one VOC XML file."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as error:
        raise ImageReadError(path, f"unreadable VOC XML ({error})") from error
    if root.tag != "annotation":
        raise ImageReadError(path, f"not a PASCAL VOC file (root <{root.tag}>)")
    objects = []
    for node in root.iter("object"):
        box = node.find("bndbox")
        if box is None:
            raise ImageReadError(path, "object without <bndbox>")
        coords = tuple(_int(box, key, path) for key in ("xmin", "ymin", "xmax", "ymax"))
        if coords[0] > coords[2] or coords[1] > coords[3]:
            raise ImageReadError(path, f"box {coords} has min > max")
        objects.append(VocObject((node.findtext("name") or "").strip(), coords))
    size = root.find("size")
    declared = (_int(size, "width", path), _int(size, "height", path)) if size is not None else None
    return VocAnnotation(path, path.stem, declared, objects)


def read_voc_folder(folder: str | Path) -> dict[str, VocAnnotation]:
    """All ``*.xml`` VOC files of a folder, keyed by SOP Instance UID."""
    return {annotation.sop_uid: annotation for annotation in map(read_voc, sorted(Path(folder).glob("*.xml")))}
