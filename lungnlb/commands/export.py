"""Export a checkpoint (default: the shipped weights) as TorchScript and/or a MONAI bundle folder."""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, help="checkpoint .pt (default: lungnlb/weights/default.pt)")
    parser.add_argument("--torchscript", type=Path, help="write a TorchScript file here (e.g. model.ts)")
    parser.add_argument("--bundle", type=Path, help="write a MONAI bundle folder here")


def run(args: argparse.Namespace) -> int:
    from lungnlb.checkpoint import default_checkpoint_path
    from lungnlb.export import export_bundle, export_torchscript

    if args.torchscript is None and args.bundle is None:
        raise ValueError("nothing to export: give --torchscript FILE and/or --bundle DIR")
    checkpoint = args.checkpoint or default_checkpoint_path()
    if checkpoint is None:
        raise FileNotFoundError("no --checkpoint given and no default weights shipped in lungnlb/weights/")
    if args.torchscript is not None:
        print(f"TorchScript: {export_torchscript(checkpoint, args.torchscript)}")
    if args.bundle is not None:
        folder = export_bundle(checkpoint, args.bundle)
        print(f"MONAI bundle: {folder}\n  run: python -m monai.bundle run --config_file {folder}/configs/inference.json "
              f"--bundle_root {folder} --input_file IMAGE.nii.gz --output_dir OUT")
    return 0
