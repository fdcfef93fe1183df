"""The extension's screenshot: what the LungNLB module's logic shows for a patient the shipped weights never saw.

Not a picture of Slicer's window (Slicer cannot be installed here): the module's own logic class runs headless
on Slicer's MRML (`slicer-core`, with the stand-ins of slicer_extension/LungNLB/Testing/headless.py) against a
real `monailabel start_server` with the LungNLB app and the shipped weights, on a studies folder that
`lungnlb prepare` makes from a DICOM series and its LIDC reader XML. The module loads the sample (the series in
HU, its radiologists' label as the `original` segment) with Slicer's reader, goes to the slice with the largest
label and runs *Segment current slice*; the figure draws that CT slice with the segment the module then holds
(red) and the radiologists' label (green), the slice's tumour probability as the module's table has it, and
their Dice.

    PYTHONPATH=slicer_extension/LungNLB .venv/bin/python -m experiments.slicer_screenshot
                                          # -> slicer_extension/Screenshots/LungNLB-1.png (+ .json)

The series is LIDC-IDRI-0003's in ../shared/data (a test case of the shipped weights' split,
`training_data.held_out_cases`: never trained on).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

import benchmarks.app_server
from benchmarks.app_server import REPO, start_server, stop_server
from benchmarks.app_studies import lidc_dir
from lungnlb.checkpoint import default_checkpoint_path
from lungnlb.cli import main as lungnlb_cli
from lungnlb.io.atomic import atomic_write_text
from lungnlb.overlap import dice
from lungnlb.stamp import run_stamp

PATIENT = "LIDC-IDRI-0003"
OUT = REPO / "slicer_extension" / "Screenshots" / "LungNLB-1.png"


def prepare_held_out(patient: str, studies: Path) -> None:
    """`lungnlb prepare` on the patient's DICOM series; refuses a patient the shipped weights trained on."""
    config = json.loads(default_checkpoint_path().with_suffix(".json").read_text(encoding="utf-8"))
    if patient not in set(config["training_data"]["held_out_cases"]["test"]):
        raise ValueError(f"{patient} is not a held-out test case of the shipped weights")
    if lungnlb_cli(["prepare", str(lidc_dir() / "dicom" / patient), str(studies)]) != 0:
        raise RuntimeError(f"lungnlb prepare failed on {patient}")


def run_module(studies: Path, work: Path):
    """The module's logic against a real server: load the one sample, segment the slice shown."""
    try:
        from Testing import headless
    except ImportError:
        raise SystemExit("the Slicer module is not importable: run with PYTHONPATH=slicer_extension/LungNLB") from None

    headless.install(work / "settings" / "Slicer.ini")
    import LungNLB

    process, url = start_server(studies, {"model_dir": str(work / "model"), "device": "cpu", "tracking": "none"},
                                work / "server.log")
    try:
        logic = LungNLB.LungNLBLogic()
        logic.connectSession(url, "screenshot", timeout=120.0)
        files = logic.run(logic.nextSampleJob("random"))
        original = logic.mask()
        logic.jumpToSlice(int(np.argmax(original.reshape(original.shape[0], -1).sum(axis=1))))
        z = logic.requireSlice()
        logic.run(logic.segmentCurrentSliceJob())
        import slicer.util

        image = slicer.util.arrayFromVolume(logic.volumeNode())[z].copy()
        return files.image_id, z, image, original[z], logic.mask()[z], logic.rows, logic.modelVersion
    finally:
        stop_server(process)


def draw(path: Path, image_id: str, z: int, image, reference, segment, rows, version: str) -> dict:
    from lungnlb.visualize import PREDICTION_COLOUR, REFERENCE_COLOUR, draw_slice, plt

    probability = rows[0].probability if rows else float("nan")
    score = dice(segment, reference)
    rows_, cols_ = np.nonzero(reference)
    centre = int(rows_.mean()), int(cols_.mean())
    half = 48
    top, left = (min(max(0, c - half), size - 2 * half) for c, size in zip(centre, image.shape))
    figure, axes = plt.subplots(1, 2, figsize=(10, 5.4), dpi=110)
    draw_slice(axes[0], image, segment, reference, f"{image_id}: slice {z} of the series as the module loaded it")
    axes[0].add_patch(plt.Rectangle((left, top), 2 * half, 2 * half, fill=False, color="yellow", linewidth=0.8))
    crop = (slice(top, top + 2 * half), slice(left, left + 2 * half))
    draw_slice(axes[1], image[crop], segment[crop], reference[crop],
               f"Segment current slice: p(tumour) {probability:.3f}, Dice with the radiologist {score:.2f}")
    handles = [plt.Line2D([], [], color=PREDICTION_COLOUR, label="tumour segment after 'Segment current slice'"),
               plt.Line2D([], [], color=REFERENCE_COLOUR, label="radiologist's label (the sample's original)")]
    axes[1].legend(handles=handles, loc="lower right", fontsize=7, framealpha=0.7)
    figure.suptitle("LungNLB module logic, headless on Slicer's MRML (not Slicer's window); shipped weights (model "
                    f"version {version})\non a CT series of a patient they never trained on", fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return {"image_id": image_id, "p_tumour": round(float(probability), 4), "dice": round(float(score), 4),
            "segment_pixels": int(segment.sum()), "reference_pixels": int(reference.sum()), "model_version": version}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patient", default=PATIENT)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--start-timeout", type=float, default=1800.0,
                        help="seconds to wait for the server to answer (a busy machine starts it slowly)")
    args = parser.parse_args(argv)
    benchmarks.app_server.START_TIMEOUT_S = args.start_timeout
    with tempfile.TemporaryDirectory(prefix="lungnlb-screenshot-") as folder:
        work = Path(folder)
        prepare_held_out(args.patient, work / "studies")
        image_id, z, image, reference, segment, rows, version = run_module(work / "studies", work)
    record = {**draw(args.out, image_id, z, image, reference, segment, rows, version), "slice": z, **run_stamp()}
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
