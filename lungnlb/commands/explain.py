"""Write the attention maps of each non-local block overlaid on one image (PNG)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", type=Path, help="a slice (DICOM file, 2D NIfTI, PNG/JPEG) or a volume")
    parser.add_argument("--checkpoint", type=Path, help="checkpoint .pt (default: lungnlb/weights/default.pt)")
    parser.add_argument("--slice", type=int, help="z index for a volume (default: the slice the model rates most likely)")
    parser.add_argument("--out", type=Path, help="PNG to write (default: <image name>_attention.png)")
    parser.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> int:
    from lungnlb.data.studies import read_study_image
    from lungnlb.evaluation.figures import attention_overlay
    from lungnlb.inference import Predictor

    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device)
    image = read_study_image(args.image)
    volume = predictor.model_input(image.array, image.intensity)
    volume = volume[None] if volume.ndim == 2 else volume
    z = args.slice
    if z is None:
        z = int(np.argmax(predictor.predict_normalized(volume)[1]))
    if not 0 <= z < volume.shape[0]:
        raise ValueError(f"--slice {z} is outside the volume's {volume.shape[0]} slices")
    name = args.image.name.split(".")[0]
    out = args.out or Path(f"{name}_attention.png")
    written = attention_overlay(predictor.model, volume[z], predictor.input_size, out)
    if written is None:
        raise ValueError(f"model {predictor.config['model']['name']} has no non-local blocks to explain")
    print(written)
    return 0
