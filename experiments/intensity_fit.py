"""Measure every source's map to HU and decide whether a mediastinal window is needed.

Writes ``experiments/results/intensity_fit.json`` (with "date" and "commit") and prints a table:

1. **Crops (8-bit) against VOIs (HU).** The VOIs' boxes are cut from the same CT slices as the
   crops, so the middle slice of every VOI nodule is found pixel for pixel inside one of that
   patient's crops (normalised cross-correlation > 0.999, offsets within ``SEARCH`` of the centre).
   Each matched crop then has an exact affine map ``HU = a_i v + b_i`` (least squares on the
   overlap), which gives the true HU of all its 72 x 72 pixels. Rules compared, each with
   constants from a pooled fit over all matched crops: one fixed line, and
   `LungAnchoredToHU` with a fixed slope. Error = mean |HU_rule - HU_true| per crop, both clipped
   to the lung window, then per patient.
2. **npz slices against DICOM** (LIDC-IDRI-0001..0003): the pooled linear fit vs `LungAnchoredToHU`
   with two landmarks, constants pooled over all matched slices and, as a check that they are not
   tuned to a patient, over the other patients only (leave one patient out).
3. **Mediastinal window.** Share of tumour voxels above the lung window's top (+150 HU, saturated)
   in the VOIs (the publisher's masks) and in the Lung-PET-CT-Dx tumour boxes (pixels > -300 HU), and the
   tumour-vs-adjacent-soft-tissue contrast in model-input units under the lung window
   (-600, 1500) and a mediastinal window (40, 400).

    .venv/bin/python -m experiments.intensity_fit
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage

from experiments.npz_hu_fit import patients_with_dicom
from lungnlb.io import read_dicom_series, read_voc_folder
from lungnlb.io.dicom import list_dicom_series
from lungnlb.io.intensity import (
    CROPS_TO_HU,
    LUNG_WINDOW,
    NORMALIZED_TO_HU,
    NPZ_TO_HU_POOLED,
    LinearToHU,
    LungAnchoredToHU,
    window_bounds,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "experiments" / "results" / "intensity_fit.json"
SEARCH = 6  # pixels either side of the centred offset searched for a VOI slice inside a crop
MIN_R = 0.999
MEDIASTINAL_WINDOW = (40.0, 400.0)
HU_BANDS = ((-1350, -700), (-700, -300), (-300, 150))
# A linear window loses information only where it clips, and hides a tumour/neighbour difference only
# when both sides clip to the same value: a second channel is needed when that happens for more than
# this share of tumours.
CLIPPED_NEEDS_CHANNEL = 0.05


# ---- 1. crops vs VOIs ----


def locate(crops: np.ndarray, template: np.ndarray) -> tuple[float, int, int, int]:
    """(r, crop index, row, column) of the best normalised cross-correlation of ``template`` in ``crops``.

    Only offsets within ``SEARCH`` of the centred position are tried: both are centred on the nodule.
    """
    h, w = template.shape
    size = crops.shape[-1]
    if h > size or w > size or template.std() == 0:
        return -1.0, -1, -1, -1
    (y0, y1), (x0, x1) = ((max(0, (size - n) // 2 - SEARCH), min(size - n, (size - n) // 2 + SEARCH)) for n in (h, w))
    region = crops[:, y0 : y1 + h, x0 : x1 + w]
    windows = sliding_window_view(region.astype(np.float32), (h, w), axis=(1, 2))
    z = (template - template.mean()) / template.std()
    r = np.einsum("nyxhw,hw->nyx", windows, z) / (h * w) / (windows.std(axis=(3, 4)) + 1e-6)
    n, y, x = np.unravel_index(int(np.argmax(r)), r.shape)
    return float(r[n, y, x]), int(n), int(y + y0), int(x + x0)


@dataclass
class VoiInCrop:
    """The middle slice (largest mask) of one VOI nodule, found at (row, column) of one of the patient's crops."""

    patient: str
    template: np.ndarray  # (h, w) float32 HU
    mask: np.ndarray  # (h, w) the VOI's mask on that slice
    crop_image: np.ndarray  # (72, 72) uint8
    crop_readers: np.ndarray  # (readers, 72, 72) bool, that crop's outlines
    row: int
    column: int


def vois_in_crops(data: Path = DATA / "lidc-nodules", limit: int | None = None) -> Iterator[VoiInCrop]:
    """Every VOI nodule whose middle slice is found in one of the patient's crops (r >= ``MIN_R``)."""
    vois = sorted(p for p in (data / "vois").glob("*.npz") if (data / "crops" / p.name).exists())
    for path in vois[:limit]:
        with np.load(data / "crops" / path.name) as crop_file:
            crops, readers = crop_file["image"], crop_file["masks"]
        with np.load(path) as arrays:
            nodules = [(arrays[key], arrays["mask_" + key[4:]]) for key in arrays.files if key.startswith("img_")]
        for volume, mask in nodules:
            middle = int(np.argmax(mask.sum(axis=(1, 2))))
            template = volume[middle].astype(np.float32)
            r, n, y, x = locate(crops, template)
            if r >= MIN_R:
                yield VoiInCrop(path.stem, template, mask[middle], crops[n], readers[n].astype(bool), y, x)


def matched_crops(data: Path = DATA / "lidc-nodules", limit: int | None = None) -> list[dict]:
    """One entry per VOI nodule found in a crop: patient, crop image (72, 72) and its exact (a, b)."""
    found = []
    for match in vois_in_crops(data, limit):
        template, y, x = match.template, match.row, match.column
        v = match.crop_image[y : y + template.shape[0], x : x + template.shape[1]].astype(np.float64).ravel()
        a, b = np.polyfit(v, template.ravel(), 1)
        residual = template.ravel() - (a * v + b)
        found.append({"patient": match.patient, "image": match.crop_image, "a": a, "b": b,
                      "residual_sd": residual.std(), "edge_residual": np.abs(residual[(v == 0) | (v == 255)]).max(initial=0.0)})
    return found


def clipped_error(predicted: np.ndarray, true: np.ndarray) -> np.ndarray:
    """|predicted - true| in HU after clipping both to the lung window (what the model sees)."""
    low, high = window_bounds(LUNG_WINDOW)
    return np.abs(np.clip(predicted, low, high) - np.clip(true, low, high))


def error_summary(errors: dict[str, list[float]]) -> dict:
    """Per-patient means of per-image errors -> median / 90th percentile / max over patients."""
    per_patient = np.array([np.mean(e) for e in errors.values()])
    return {"patients": len(per_patient), "median": float(np.median(per_patient)),
            "p90": float(np.percentile(per_patient, 90)), "max": float(per_patient.max()),
            "mean": float(per_patient.mean())}


def band_errors(rule, crops: list[dict]) -> dict:
    """Mean clipped error by true-HU band over all matched crop pixels."""
    sums = {band: [0.0, 0] for band in HU_BANDS}
    for c in crops:
        true = c["a"] * c["image"] + c["b"]
        error = clipped_error(rule(c["image"]), true)
        for band in HU_BANDS:
            inside = (true >= band[0]) & (true < band[1])
            sums[band][0] += error[inside].sum()
            sums[band][1] += inside.sum()
    return {f"{lo}..{hi}": float(s / max(n, 1)) for (lo, hi), (s, n) in sums.items()}


def fit_crops(crops: list[dict]) -> dict:
    """Pooled constants of both crop rules and their errors."""
    low, high = window_bounds(LUNG_WINDOW)
    v = np.concatenate([c["image"].ravel() for c in crops]).astype(np.float64)
    hu = np.concatenate([(c["a"] * c["image"] + c["b"]).ravel() for c in crops])
    inside = (hu > low) & (hu < high)
    fixed = LinearToHU(*(float(x) for x in np.polyfit(v[inside], hu[inside], 1)))

    probe = LungAnchoredToHU(lung_hu=0.0, slope=1.0, darkest=CROPS_TO_HU.darkest)
    levels = np.array([probe.landmarks(c["image"])[0] for c in crops])
    lung_hu = float(np.median([c["a"] * level + c["b"] for c, level in zip(crops, levels)]))
    offset = np.concatenate([(c["image"].ravel() - level) for c, level in zip(crops, levels)])
    slope = float(np.sum(offset[inside] * (hu[inside] - lung_hu)) / np.sum(offset[inside] ** 2))
    anchored = LungAnchoredToHU(lung_hu=round(lung_hu), slope=round(slope, 2), darkest=CROPS_TO_HU.darkest)

    result = {"matched_crops": len(crops), "patients": len({c["patient"] for c in crops}),
              "per_crop_fit": {
                  "slope_percentiles_5_25_50_75_95": np.percentile([c["a"] for c in crops], [5, 25, 50, 75, 95]).round(2).tolist(),
                  "intercept_percentiles_5_25_50_75_95": np.percentile([c["b"] for c in crops], [5, 25, 50, 75, 95]).round(0).tolist(),
                  "share_with_padding_minimum_below_-1100": float(np.mean([c["b"] < -1100 for c in crops])),
                  "residual_sd_hu_median": float(np.median([c["residual_sd"] for c in crops])),
                  "max_residual_at_levels_0_or_255_hu": float(max(c["edge_residual"] for c in crops)),
              },
              "rules": {}}
    for name, rule in (("fixed_linear", fixed), ("lung_anchored", anchored), ("library", CROPS_TO_HU)):
        errors: dict[str, list[float]] = {}
        for c in crops:
            errors.setdefault(c["patient"], []).append(float(clipped_error(rule(c["image"]), c["a"] * c["image"] + c["b"]).mean()))
        result["rules"][name] = {"constants": rule.as_config(), "per_patient_error_hu": error_summary(errors),
                                 "error_by_true_hu_band": band_errors(rule, crops)}
    return result


def crop_saturation(data: Path = DATA / "lidc-nodules" / "crops") -> dict:
    """Share of all crop pixels at grey level 0 and 255."""
    counts = np.zeros(256, dtype=np.int64)
    for path in sorted(data.glob("*.npz")):
        counts += np.bincount(np.load(path)["image"].ravel(), minlength=256)
    return {"share_at_0": float(counts[0] / counts.sum()), "share_at_255": float(counts[255] / counts.sum())}


# ---- 2. npz vs DICOM ----


def npz_landmarks(pairs: list[tuple[np.ndarray, np.ndarray]], rule: LungAnchoredToHU) -> tuple[list[float], list[float]]:
    """True HU (from each slice's own exact fit) at the parenchyma level and at the high percentile."""
    lung, high = [], []
    for npz, dicom in pairs:
        inside = npz != 0
        a, b = np.polyfit(npz[inside], dicom[inside], 1)
        level = LungAnchoredToHU(lung_hu=0.0, slope=1.0, darkest=rule.darkest, masked=True).landmarks(npz)[0]
        lung.append(a * level + b)
        high.append(a * np.percentile(npz[inside], rule.high_percentile) + b)
    return lung, high


def anchored_from(pairs: list[tuple[np.ndarray, np.ndarray]]) -> LungAnchoredToHU:
    lung, high = npz_landmarks(pairs, NORMALIZED_TO_HU)
    return LungAnchoredToHU(lung_hu=round(float(np.median(lung))), slope=NORMALIZED_TO_HU.slope,
                            darkest=NORMALIZED_TO_HU.darkest, high_percentile=NORMALIZED_TO_HU.high_percentile,
                            high_hu=round(float(np.median(high))), masked=True)


def npz_errors(rule, pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """Mean clipped error inside the lung mask, and the error at the parenchyma (the DICOM's lung mode)."""
    errors, parenchyma = [], []
    for npz, dicom in pairs:
        inside = npz != 0
        predicted = rule(npz)[inside]
        errors.append(float(clipped_error(predicted, dicom[inside]).mean()))
        lung = inside & (dicom > -1000) & (dicom < -700)
        parenchyma.append(float(np.median(rule(npz)[lung]) - np.median(dicom[lung])))
    return {"mean_error_hu": float(np.mean(errors)), "parenchyma_offset_hu": float(np.mean(parenchyma))}


def fit_npz() -> dict:
    patients = patients_with_dicom(DATA / "lidc-idri")
    every = [pair for _, pairs in patients for pair in pairs]
    pooled = LinearToHU(*NPZ_TO_HU_POOLED)
    anchored = anchored_from(every)
    result = {"constants": {"pooled_linear": pooled.as_config(), "lung_anchored": anchored.as_config(),
                            "library": NORMALIZED_TO_HU.as_config()},
              "per_patient": {}}
    for patient, pairs in patients:
        others = [pair for other, more in patients if other != patient for pair in more]
        result["per_patient"][patient] = {
            "slices": len(pairs),
            "pooled_linear": npz_errors(pooled, pairs),
            "lung_anchored": npz_errors(anchored, pairs),
            "lung_anchored_leave_patient_out": npz_errors(anchored_from(others), pairs),
        }
    return result


# ---- 3. mediastinal window ----


def window_units(hu: float, window: tuple[float, float]) -> float:
    low, high = window_bounds(window)
    return float(np.clip((hu - low) / (high - low), 0.0, 1.0))


def contrast(tumour: np.ndarray, neighbour: np.ndarray) -> dict:
    """Tumour vs neighbouring soft tissue: medians in HU and the difference in both windows' input units."""
    t, n = float(np.median(tumour)), float(np.median(neighbour))
    return {"tumour_hu": t, "neighbour_hu": n, "merged": min(t, n) > window_bounds(LUNG_WINDOW)[1],
            "lung_window": abs(window_units(t, LUNG_WINDOW) - window_units(n, LUNG_WINDOW)),
            "mediastinal_window": abs(window_units(t, MEDIASTINAL_WINDOW) - window_units(n, MEDIASTINAL_WINDOW))}


def soft_tissue_ring(tumour: np.ndarray, hu: np.ndarray, width: int) -> np.ndarray:
    """Pixels within ``width`` of the tumour, outside it, denser than -300 HU (vessel, pleura, wall, mediastinum)."""
    structure = np.zeros((3,) * tumour.ndim, dtype=bool)
    structure[(1,) * (tumour.ndim - 2) + (slice(None), 1)] = True
    structure[(1,) * (tumour.ndim - 2) + (1, slice(None))] = True
    return ndimage.binary_dilation(tumour, structure, iterations=width) & ~tumour & (hu > -300)


def mediastinal_measure() -> dict:
    top = window_bounds(LUNG_WINDOW)[1]
    voxels = above = 0
    nodules_over_5pc, nodules, voi_contrasts = 0, 0, []
    for path in sorted((DATA / "lidc-nodules" / "vois").glob("*.npz")):
        arrays = np.load(path)
        for key in (k for k in arrays.files if k.startswith("img_")):
            hu, mask = arrays[key].astype(np.float32), arrays["mask_" + key[4:]] > 0
            if not mask.any():
                continue
            nodules += 1
            voxels += int(mask.sum())
            over = int((hu[mask] > top).sum())
            above += over
            nodules_over_5pc += over > 0.05 * mask.sum()
            ring = soft_tissue_ring(mask, hu, 2)
            if ring.sum() >= 20:
                voi_contrasts.append(contrast(hu[mask], hu[ring]))

    box_pixels = box_above = 0
    box_contrasts = []
    for case in sorted((DATA / "lung-pet-ct-dx").glob("*/")):
        boxes = read_voc_folder(case / "annotations") if (case / "annotations").is_dir() else {}
        for series in list_dicom_series(case / "dicom"):
            volume = read_dicom_series(series)
            for z, uid in enumerate(volume.meta["sop_instance_uids"]):
                for obj in boxes[uid].objects if uid in boxes else []:
                    x0, y0, x1, y1 = obj.box
                    box = np.zeros(volume.array.shape[1:], dtype=bool)
                    box[y0 : y1 + 1, x0 : x1 + 1] = True
                    hu = volume.array[z]
                    tumour = box & (hu > -300)
                    box_pixels += int(tumour.sum())
                    box_above += int((hu[tumour] > top).sum())
                    ring = soft_tissue_ring(box, hu, 10)
                    if tumour.any() and ring.sum() >= 20:
                        box_contrasts.append(contrast(hu[tumour], hu[ring]))

    def summary(values: list[dict]) -> dict:
        lung = np.array([v["lung_window"] for v in values])
        med = np.array([v["mediastinal_window"] for v in values])
        return {"n": len(values), "lung_window_median": float(np.median(lung)),
                "mediastinal_window_median": float(np.median(med)),
                "share_below_one_8bit_level_lung_window": float(np.mean(lung < 1 / 255)),
                "share_merged_by_lung_window": float(np.mean([v["merged"] for v in values])),
                "share_one_side_above_top": float(np.mean([max(v["tumour_hu"], v["neighbour_hu"]) > window_bounds(LUNG_WINDOW)[1] for v in values])),
                "tumour_hu_median": float(np.median([v["tumour_hu"] for v in values])),
                "neighbour_hu_median": float(np.median([v["neighbour_hu"] for v in values]))}

    clipped = [c["merged"] for c in voi_contrasts + box_contrasts]
    return {
        "lung_window_top_hu": top,
        "vois": {"nodules": nodules, "voxels": voxels, "share_above_top": above / voxels,
                 "nodules_with_over_5pc_saturated": int(nodules_over_5pc), "contrast": summary(voi_contrasts)},
        "lung_pet_ct_dx_boxes": {"pixels_over_-300_hu": box_pixels, "share_above_top": box_above / max(box_pixels, 1),
                                 "contrast": summary(box_contrasts) if box_contrasts else None},
        "rule": f"a second channel is needed if, for over {CLIPPED_NEEDS_CHANNEL:.0%} of tumours, the median HU of the "
                "tumour and of its neighbouring soft tissue are both above the lung window's top (merged by clipping)",
        "share_merged": float(np.mean(clipped)),
        "second_channel_needed": bool(np.mean(clipped) > CLIPPED_NEEDS_CHANNEL),
    }


def commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def main() -> int:
    crops = fit_crops(matched_crops())
    crops["saturation"] = crop_saturation()
    result = {"date": datetime.date.today().isoformat(), "commit": commit(), "crops8bit": crops,
              "normalized": fit_npz(), "mediastinal_window": mediastinal_measure()}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")

    print(f"crops8bit: {crops['matched_crops']} crops of {crops['patients']} patients matched to VOIs; "
          f"per-crop slope {crops['per_crop_fit']['slope_percentiles_5_25_50_75_95']}")
    print(f"{'rule':<16}{'constants':<58}{'median':>8}{'p90':>8}{'max':>8}  (per-patient mean |error| HU)")
    for name, rule in crops["rules"].items():
        e = rule["per_patient_error_hu"]
        text = ", ".join(f"{k}={v}" for k, v in rule["constants"].items() if k != "rule" and v is not None)
        print(f"{name:<16}{text:<58}{e['median']:>8.0f}{e['p90']:>8.0f}{e['max']:>8.0f}")
    print(f"normalized: {'patient':<16}{'pooled':>8}{'anchored':>10}{'leave-out':>11}  (mean |error| HU; parenchyma offset)")
    for patient, row in result["normalized"]["per_patient"].items():
        cells = [row[k] for k in ("pooled_linear", "lung_anchored", "lung_anchored_leave_patient_out")]
        print(f"            {patient:<16}" + "".join(f"{c['mean_error_hu']:>7.0f}/{c['parenchyma_offset_hu']:+.0f}" for c in cells))
    m = result["mediastinal_window"]
    print(f"mediastinal window: tumour voxels above +150 HU: VOIs {m['vois']['share_above_top']:.2%}, "
          f"Lung-PET-CT-Dx boxes {m['lung_pet_ct_dx_boxes']['share_above_top']:.2%}; tumour/neighbour pairs "
          f"merged {m['share_merged']:.1%}; second channel needed: {m['second_channel_needed']}")
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
