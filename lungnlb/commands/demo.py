"""Segment a CT slice with the NLB U-Net and write a PNG overlay (defaults: the bundled sample and shipped weights).

For a volume the slice with the highest tumour probability is shown. Where the image has an `original`
label in a prepared studies folder, its contour is drawn too, so the model can be compared with it,
and the title says whether the checkpoint trained on (or was selected on) that patient: the bundled
sample's patients were all in the shipped weights' training data.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

SAMPLE_STUDIES = Path(__file__).resolve().parents[2] / "sample_data" / "studies"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", type=Path, help="CT image (DICOM file or series folder, NIfTI, NRRD, PNG/JPEG); "
                        "default: a tumour image of the bundled sample")
    parser.add_argument("--checkpoint", type=Path, help="model checkpoint (.pt); default: the shipped weights")
    parser.add_argument("--out", type=Path, default=Path("lungnlb_demo.png"), help="PNG to write")
    parser.add_argument("--threshold", type=float,
                        help="probability above which a pixel is tumour (default: the checkpoint's)")


def default_sample_image(studies: Path = SAMPLE_STUDIES) -> Path:
    """The first image of the bundled studies folder whose sidecar says a neoplasm is present."""
    from lungnlb.data.studies import image_path, iter_sidecars

    for image_id, sidecar in iter_sidecars(studies):
        if sidecar.get("class_label") == 1:
            return image_path(studies, image_id)
    raise FileNotFoundError(f"no image with a tumour in the bundled sample {studies}")


def original_label(image_path: Path) -> np.ndarray | None:
    """The `labels/original` mask beside an image of a prepared studies folder, if there is one."""
    from lungnlb.data.studies import image_id_of, label_path
    from lungnlb.io import read_image

    candidate = label_path(image_path.parent, image_id_of(image_path))
    return read_image(candidate).array > 0 if candidate.exists() else None


def patient_status(image_path: Path, config: dict) -> str:
    """Whether the checkpoint saw the image's patient (from the sidecar's case), in words."""
    from lungnlb.data.studies import image_id_of, read_sidecar
    from lungnlb.evaluation.evaluate import seen_cases

    sidecar = read_sidecar(image_path.parent, image_id_of(image_path))
    if sidecar is None:
        return "patient unknown to the checkpoint's records"
    case = sidecar.get("case")
    return "a patient seen in training" if case in seen_cases(config) else "a patient never trained on"


def run(args: argparse.Namespace) -> int:
    from lungnlb.checkpoint import default_checkpoint_path, load_model
    from lungnlb.data.studies import read_study_image
    from lungnlb.inference import Predictor
    from lungnlb.visualize import save_overlay

    image_path = args.image or default_sample_image()
    image = read_study_image(image_path)
    checkpoint = args.checkpoint or default_checkpoint_path()
    if checkpoint is None:
        raise FileNotFoundError("no trained weights are shipped with this install; pass --checkpoint")
    model, config = load_model(checkpoint)
    predictor = Predictor(model, config)
    result = predictor.predict(image.array, image.intensity)
    threshold = predictor.threshold if args.threshold is None else args.threshold

    slices = image.array if image.array.ndim == 3 else image.array[None]
    probability = result.probability if image.array.ndim == 3 else result.probability[None]
    slice_probability = np.atleast_1d(result.slice_probability)
    z = int(np.argmax(slice_probability))
    reference = original_label(image_path)
    if reference is not None and reference.ndim == 3:
        reference = reference[z]
    save_overlay(args.out, slices[z], probability[z] > threshold, reference,
                 title=f"{image_path.name}  slice {z}  tumour probability {slice_probability[z]:.2f}\n"
                       f"({patient_status(image_path, config)})")
    print(f"tumour probability {slice_probability[z]:.3f} (slice {z}); "
          f"mask {int((probability[z] > threshold).sum())} px; overlay written to {args.out}")
    return 0
