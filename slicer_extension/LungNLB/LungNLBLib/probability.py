"""Per-slice tumour probabilities as a table: one row per slice with the probability and the mask's area."""

from typing import Dict, List, NamedTuple, Optional, Sequence, Union

import numpy as np

from .geometry import as_volume


class SliceProbability(NamedTuple):
    z: int
    probability: float  # tumour probability of the slice from the classification head, in [0, 1]
    mask_pixels: int  # pixels of the predicted mask on that slice (-1 when no mask came back)


ProbabilityInput = Union[Sequence[float], Dict[int, float], Dict[str, float]]


def probability_table(
    slice_probabilities: ProbabilityInput, mask: Optional[np.ndarray] = None, first_slice: int = 0
) -> List[SliceProbability]:
    """Rows sorted by z from a list (z = ``first_slice`` + position) or a ``{z: p}`` mapping (JSON keys are strings).

    ValueError for a probability outside [0, 1] or not finite, or a z outside the mask's slices.
    """
    if isinstance(slice_probabilities, dict):
        pairs = [(int(z), float(p)) for z, p in slice_probabilities.items()]
    else:
        pairs = [(first_slice + index, float(p)) for index, p in enumerate(slice_probabilities)]
    volume = as_volume(mask) if mask is not None else None
    rows = []
    for z, probability in sorted(pairs):
        if not (0.0 <= probability <= 1.0):
            raise ValueError(f"slice {z}: tumour probability {probability} is not in [0, 1]")
        if volume is not None and not 0 <= z < volume.shape[0]:
            raise ValueError(f"slice {z} has a probability but the mask has only {volume.shape[0]} slices")
        pixels = int(np.count_nonzero(volume[z])) if volume is not None else -1
        rows.append(SliceProbability(z, probability, pixels))
    return rows


def probability_at(rows: Sequence[SliceProbability], z: int) -> Optional[float]:
    """The probability of slice ``z``, None when the table has no row for it."""
    for row in rows:
        if row.z == z:
            return row.probability
    return None


def merge_rows(old: Sequence[SliceProbability], new: Sequence[SliceProbability]) -> List[SliceProbability]:
    """The table after a partial update (e.g. one re-segmented slice): rows of ``new`` replace rows of ``old``."""
    merged = {row.z: row for row in old}
    merged.update({row.z: row for row in new})
    return [merged[z] for z in sorted(merged)]


def format_table(rows: Sequence[SliceProbability], threshold: float = 0.5) -> str:
    """Plain-text table (for logs and the in-Slicer test output)."""
    lines = ["slice  p(tumour)  call    mask px"]
    for row in rows:
        call = "tumour" if row.probability >= threshold else "-"
        pixels = "" if row.mask_pixels < 0 else str(row.mask_pixels)
        lines.append(f"{row.z:5d}  {row.probability:9.3f}  {call:6s}  {pixels:>7s}")
    return "\n".join(lines)
