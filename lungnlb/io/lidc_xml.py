"""LIDC-IDRI reader XML -> per-slice nodule masks with a reader consensus.

Each ``readingSession`` is one radiologist. A contoured nodule (``unblindedReadNodule`` with at
least 3 ``edgeMap`` points per ``roi``) is rasterised on the slice its ``roi`` names — matched by
``imageSOP_UID``, falling back to ``imageZposition`` — as the filled polygon of its edge map
*without* the edge pixels (LIDC draws the edge map just outside the region it encloses; with this
rule the masks equal the npz masks of the same slices, Dice 1.000 on all 22 matched slices, see
docs/data.md); ``inclusion FALSE`` rois (holes) are removed afterwards. Nodules < 3 mm
(a single centroid point) and non-nodules carry no contour and are ignored.

Readers' nodules are matched to one another by voxel overlap (single linkage). A voxel belongs to
the consensus mask when at least ``consensus`` readers include it (an integer, default 2, the
crops' rule too: see `check_consensus`). The count is not capped at the number of readers who
marked the nodule, so a nodule only one reader contoured is not in the default consensus; its
slices still count as marked (`LidcMasks.mark_positions`), so they are never taken as tumour-free.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from skimage.draw import polygon

from lungnlb.io.image import ImageReadError

CHARACTERISTICS = ("subtlety", "internalStructure", "calcification", "sphericity", "margin", "lobulation", "spiculation", "texture", "malignancy")


@dataclass
class Roi:
    """One contour of one reader on one slice: edge points (x=column, y=row)."""

    sop_uid: str
    z: float
    inclusion: bool
    points: np.ndarray


@dataclass
class ReaderNodule:
    """One reader's contoured nodule."""

    reader: int
    nodule_id: str
    characteristics: dict[str, int]
    rois: list[Roi]

    @property
    def malignancy(self) -> int | None:
        return self.characteristics.get("malignancy")


@dataclass
class ConsensusNodule:
    """A nodule as matched across readers, with its consensus mask's slice indices."""

    readers: list[int]
    nodule_ids: list[str]
    malignancy: list[int]
    slices: list[int] = field(default_factory=list)


@dataclass
class LidcMasks:
    """Consensus mask of all nodules on a series (Z, Y, X), the matched nodules, the number of
    reading sessions, and the slice position of every reader mark (see `mark_positions`)."""

    mask: np.ndarray
    nodules: list[ConsensusNodule]
    readers: int
    mark_positions: list[float] = field(default_factory=list)

    @property
    def labelled_slices(self) -> list[int]:
        return [int(z) for z in np.flatnonzero(self.mask.any(axis=(1, 2)))]


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _children(node: ET.Element, name: str) -> list[ET.Element]:
    return [child for child in node if _local(child.tag) == name]


def _text(node: ET.Element, name: str) -> str | None:
    found = _children(node, name)
    return found[0].text.strip() if found and found[0].text else None


def _roi(node: ET.Element) -> Roi:
    points = np.array(
        [[int(_text(edge, "xCoord")), int(_text(edge, "yCoord"))] for edge in _children(node, "edgeMap")], dtype=np.int64
    ).reshape(-1, 2)
    return Roi(
        sop_uid=_text(node, "imageSOP_UID") or "",
        z=float(_text(node, "imageZposition") or "nan"),
        inclusion=(_text(node, "inclusion") or "TRUE").upper() == "TRUE",
        points=points,
    )


def _sessions(path: Path) -> list[ET.Element]:
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as error:
        raise ImageReadError(path, f"unreadable LIDC XML ({error})") from error
    sessions = [node for node in root.iter() if _local(node.tag) == "readingSession"]
    if not sessions:
        raise ImageReadError(path, "no readingSession: not an LIDC reader XML")
    return sessions


def _contoured_nodules(sessions: list[ET.Element]) -> list[ReaderNodule]:
    nodules = []
    for reader, session in enumerate(sessions):
        for node in _children(session, "unblindedReadNodule"):
            rois = [_roi(r) for r in _children(node, "roi")]
            if not any(len(r.points) >= 3 for r in rois):
                continue  # < 3 mm nodule: a centroid, no contour
            characteristics = {}
            for group in _children(node, "characteristics"):
                for name in CHARACTERISTICS:
                    value = _text(group, name)
                    if value is not None and value.isdigit():
                        characteristics[name] = int(value)
            nodules.append(ReaderNodule(reader, _text(node, "noduleID") or "", characteristics, rois))
    return nodules


def _marks(sessions: list[ET.Element]) -> list[Roi]:
    """Every mark of every reader: each nodule roi (contour or < 3 mm centroid) and each non-nodule."""
    marks = []
    for session in sessions:
        for node in _children(session, "unblindedReadNodule"):
            marks += [_roi(r) for r in _children(node, "roi")]
        marks += [_roi(node) for node in _children(session, "nonNodule")]
    return marks


def parse_lidc_xml(path: str | Path) -> tuple[int, list[ReaderNodule]]:
    """Parse an LIDC XML file -> (number of reading sessions, contoured nodules of every reader)."""
    sessions = _sessions(Path(path))
    return len(sessions), _contoured_nodules(sessions)


def check_consensus(consensus: int) -> int:
    """``consensus``, a number of readers >= 1 (whole numbers only: the fraction of earlier versions is refused)."""
    if isinstance(consensus, bool) or not isinstance(consensus, (int, np.integer)) or consensus < 1:
        raise ValueError(f"consensus must be a whole number of readers >= 1, got {consensus!r}")
    return int(consensus)


def mark_positions(marks: list[Roi], sop_uids: list[str], z_positions: list[float]) -> list[float]:
    """Slice position of each mark in the volume, sorted: its index when its SOP UID is a slice of the
    volume, else where its ``imageZposition`` falls on the volume's slice axis (fractional, or beyond
    0..Z-1 for a mark outside a partial series); NaN when neither locates it."""
    sop_index = {uid: i for i, uid in enumerate(sop_uids)}
    z = np.asarray(z_positions, dtype=float)
    step = (z[-1] - z[0]) / (len(z) - 1) if len(z) > 1 and z[-1] != z[0] else math.nan
    positions = []
    for mark in marks:
        if mark.sop_uid in sop_index:
            positions.append(float(sop_index[mark.sop_uid]))
        else:
            positions.append(float((mark.z - z[0]) / step))  # NaN without a step or a z
    return sorted(positions)


def _slice_index(roi: Roi, sop_index: dict[str, int], z_positions: np.ndarray, z_tolerance: float) -> int | None:
    if roi.sop_uid in sop_index:
        return sop_index[roi.sop_uid]
    if len(z_positions) and math.isfinite(roi.z):
        nearest = int(np.argmin(np.abs(z_positions - roi.z)))
        if abs(z_positions[nearest] - roi.z) <= z_tolerance:
            return nearest
    return None


def rasterise_nodule(nodule: ReaderNodule, sop_uids: list[str], z_positions: list[float], shape: tuple[int, int]) -> np.ndarray:
    """One reader's nodule -> bool mask (Z, Y, X) on the series grid (filled contours minus edge pixels)."""
    z_positions = np.asarray(z_positions, dtype=float)
    gaps = np.diff(np.sort(z_positions))
    tolerance = 0.25 * float(gaps.min()) if len(gaps) else 0.01
    sop_index = {uid: i for i, uid in enumerate(sop_uids)}
    mask = np.zeros((len(sop_uids), *shape), dtype=bool)
    holes = np.zeros_like(mask)
    for roi in nodule.rois:
        z = _slice_index(roi, sop_index, z_positions, tolerance)
        if z is None or len(roi.points) < 3:
            continue
        region = np.zeros(shape, dtype=bool)
        rows, cols = polygon(roi.points[:, 1], roi.points[:, 0], shape=shape)
        region[rows, cols] = True
        inside = (roi.points[:, 1] < shape[0]) & (roi.points[:, 0] < shape[1]) & (roi.points >= 0).all(axis=1)
        region[roi.points[inside, 1], roi.points[inside, 0]] = False  # the edge map lies outside the region
        (mask if roi.inclusion else holes)[z] |= region
    return mask & ~holes


def _group_by_overlap(masks: list[np.ndarray]) -> list[list[int]]:
    parent = list(range(len(masks)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            if np.logical_and(masks[i], masks[j]).any():
                parent[find(j)] = find(i)
    groups: dict[int, list[int]] = {}
    for i in range(len(masks)):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def lidc_consensus(
    xml_path: str | Path,
    sop_uids: list[str],
    z_positions: list[float],
    shape: tuple[int, int],
    consensus: int = 2,
) -> LidcMasks:
    """Consensus nodule mask (Z, Y, X) for the series slices ``sop_uids`` (ordered as the volume):
    voxels at least ``consensus`` readers include.

    ``z_positions`` are the slices' ImagePositionPatient z (the fallback match); ``shape`` is
    (rows, columns). Only contours on these slices count.
    """
    consensus = check_consensus(consensus)
    sessions = _sessions(Path(xml_path))
    nodules = _contoured_nodules(sessions)
    reader_masks = [rasterise_nodule(n, sop_uids, z_positions, shape) for n in nodules]
    kept = [i for i, m in enumerate(reader_masks) if m.any()]
    mask = np.zeros((len(sop_uids), *shape), dtype=bool)
    matched = []
    for group in _group_by_overlap([reader_masks[i] for i in kept]):
        members = [nodules[kept[i]] for i in group]
        readers = sorted({m.reader for m in members})
        votes = np.zeros(mask.shape, dtype=np.int32)
        for reader in readers:
            votes += np.any([reader_masks[kept[i]] for i in group if nodules[kept[i]].reader == reader], axis=0)
        nodule_mask = votes >= consensus
        mask |= nodule_mask
        matched.append(
            ConsensusNodule(
                readers=readers,
                nodule_ids=[m.nodule_id for m in members],
                malignancy=[m.malignancy for m in members if m.malignancy is not None],
                slices=[int(z) for z in np.flatnonzero(nodule_mask.any(axis=(1, 2)))],
            )
        )
    return LidcMasks(mask, matched, len(sessions), mark_positions(_marks(sessions), sop_uids, z_positions))
