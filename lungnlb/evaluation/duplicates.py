"""The same CT slice reaching one evaluation twice, found by content.

A slice can arrive through two pipelines (the LIDC npz slices are lung-masked, rescaled copies of
DICOM slices of the same patients), or twice through one (an npz file repeats a slice once per
nodule on it, each copy with that nodule's mask). Two slices of one patient, from different images
and of the same shape, are the same slice when the Pearson correlation of their raw values over the
pixels where both are non-zero is at least ``min_correlation`` and that pair is the best match of
both slices. Slices within one volume are never compared: neighbouring slices of a volume correlate
as strongly as copies do, across images they do not (measured on the LIDC npz/DICOM pairs:
matches >= 0.991, the next best slice <= 0.97).

Which copy is kept: the one whose intensity is closest to the scanner's (HU first, then 8-bit crops,
windowed 8-bit, normalised); when the copies came through the same pipeline their reference masks
are merged (union), so the nodules marked on each copy all stay.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PRIORITY = ("hu", "crops8bit", "windowed8bit", "normalized")
MIN_SUPPORT = 0.02  # share of the slice that must be non-zero in both images to compare them


@dataclass
class SliceKey:
    """One candidate slice: where it is, whose it is, its raw values."""

    image_id: str
    z: int
    case: str
    intensity: str
    raw: np.ndarray


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r of ``a`` and ``b`` over the pixels where both are non-zero (0 when too few)."""
    support = (a != 0) & (b != 0) & np.isfinite(a) & np.isfinite(b)
    if support.sum() < MIN_SUPPORT * a.size:
        return 0.0
    x, y = a[support].astype(np.float64), b[support].astype(np.float64)
    x -= x.mean()
    y -= y.mean()
    denominator = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denominator) if denominator > 0 else 0.0


def _rank(key: SliceKey) -> tuple[int, str, int]:
    kind = PRIORITY.index(key.intensity) if key.intensity in PRIORITY else len(PRIORITY)
    return kind, key.image_id, key.z


def find_duplicates(keys: list[SliceKey], min_correlation: float = 0.99) -> list[tuple[SliceKey, SliceKey, float]]:
    """Pairs (kept, dropped, r) of the same slice among ``keys`` (all of one patient)."""
    scores: dict[tuple[int, int], float] = {}
    for i, a in enumerate(keys):
        for j in range(i + 1, len(keys)):
            b = keys[j]
            if a.image_id != b.image_id and a.raw.shape == b.raw.shape:
                scores[i, j] = correlation(a.raw, b.raw)
    best: dict[tuple[int, str], float] = {}
    for (i, j), r in scores.items():
        best[i, keys[j].image_id] = max(best.get((i, keys[j].image_id), -1.0), r)
        best[j, keys[i].image_id] = max(best.get((j, keys[i].image_id), -1.0), r)
    pairs, dropped = [], set()
    for (i, j), r in sorted(scores.items(), key=lambda item: -item[1]):
        mutual = r >= best[i, keys[j].image_id] and r >= best[j, keys[i].image_id]
        if r >= min_correlation and mutual and i not in dropped and j not in dropped:
            kept, gone = sorted((keys[i], keys[j]), key=_rank)
            dropped.add(j if gone is keys[j] else i)
            pairs.append((kept, gone, r))
    return pairs
