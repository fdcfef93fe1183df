"""Train a segmentation + classification model on a prepared studies folder (or any source folder).

Splits by patient / case block (split.json is written beside the run; reuse it with --split),
writes atomic checkpoints best.pt / last.pt with a JSON config beside each, TensorBoard logs under
RUN_DIR/tensorboard. Multi-GPU / multi-process: `torchrun --nproc_per_node N -m lungnlb.cli train ...`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path

from lungnlb.data.studies import is_studies_folder
from lungnlb.prepare import DEFAULT_CONSENSUS, prepare
from lungnlb.training.trainer import TrainConfig, train


HELP = {
    "data": "prepared studies folder, or a source folder to prepare first (see --cache)",
    "out": "run folder: checkpoints, split.json, logs",
    "model": "registry model name (see lungnlb.networks)",
    "model_kwargs": 'JSON keyword arguments for build_model, e.g. \'{"distance": "chebyshev"}\'',
    "input_size": "whole-slice training: slices are resized to SIZE x SIZE (512 = full)",
    "patch_size": "native-resolution training on SIZE x SIZE patches at the slices' own pixel size "
                  "(sliding-window inference); overrides --input-size",
    "pos_fraction": "native-resolution training: share of patches centred on a lesion",
    "reader_targets": "native-resolution training: on LIDC crops, train on the share of readers who outlined "
                      "each pixel (0.5 = the reference consensus) instead of the reference alone, and on the "
                      "slices only one reader outlined",
    "faint_lesion_weight": "draw the training slices whose lesion is ground glass (its mean below -500 HU) this many "
                           "times as often as the other lesion slices",
    "kernel_augment": "native-resolution training: probability of each of two augmentation steps, a softer "
                      "(Gaussian blur) and a sharper (unsharp mask) reconstruction kernel (0: none)",
    "batch_size": "per process",
    "seg_weight": "weight of the DiceCE segmentation loss",
    "cls_weight": "weight of the BCE classification loss",
    "seg_fraction": "expected share of slices with a lesion (a non-empty mask) per batch, the rest tumour-free or "
                    "classification-only ('none': sample uniformly)",
    "balance_classes": "weight positives by the drawn negative/positive ratio in the BCE",
    "grad_clip": "max gradient norm (0: off)",
    "val_slices": "validate on at most N slices, a seeded draw keeping the mix of tumour and tumour-free slices "
                  "('none': all)",
    "time_budget_s": "wall-clock budget of the training steps in seconds: after a few timed steps the run is "
                     "shortened to what fits (the learning-rate schedule follows); validations come on top",
    "split": "reuse this split.json instead of making a new split",
    "all_data": "train on every case (no validation / test)",
    "amp": "mixed precision on GPU",
    "device": "torch device (default: cuda if available, else cpu)",
    "resume": "continue from RUN_DIR/last.pt and its optimiser state",
    "keep_validated": "also keep the checkpoint of every validation as RUN_DIR/step_N.pt (+ .json), so a rule "
                      "written before the run can choose among them afterwards",
    "init": "start from this checkpoint's weights (the same --model and --model-kwargs)",
    "hard_negatives_from": "native-resolution training: add crops around this checkpoint's false alarms on the "
                           "training whole slices as hard negatives",
    "hard_negative_fraction": "expected share of hard-negative crops per batch",
    "weak_positives": "native-resolution training: per batch, this many windows of tumour slices that have no "
                      "mask (IQ-OTH/NCCD), each the window the model ranks highest on its slice, trained to be "
                      "called tumour (multiple-instance learning)",
    "top_negatives": "native-resolution training: per batch, this many windows of tumour-free whole slices, each the "
                     "window the model ranks highest on its slice, trained as background",
    "slice_probe": "native-resolution training: after selection, fit the best checkpoint's slice probe (a linear "
                   "tumour / no-tumour classifier of whole JPEG slices on its frozen encoder) where the split has "
                   "class-labelled JPEGs of both classes among the training and the validation cases",
}
NOT_OPTIONS = ("data", "out", "progress", "tensorboard")


def _optional(kind):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__
    return parse


def configure(parser: argparse.ArgumentParser) -> None:
    """One option per `TrainConfig` field, with the field's default: the CLI cannot drift from the config."""
    parser.add_argument("--data", required=True, type=Path, help=HELP["data"])
    parser.add_argument("--out", required=True, type=Path, help=HELP["out"])
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        if field.name in NOT_OPTIONS:
            continue
        flag, kind = "--" + field.name.replace("_", "-"), hints[field.name]
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        if kind is bool:
            name = flag if not default else "--no-" + flag[2:]
            parser.add_argument(name, dest=field.name, action="store_false" if default else "store_true",
                                help=HELP.get(field.name, "") + (" (on by default)" if default else ""))
        elif kind == dict[str, typing.Any]:
            parser.add_argument(flag, dest=field.name, type=json.loads, default=default, help=HELP.get(field.name))
        else:
            base = next(t for t in typing.get_args(kind) or (kind,) if t is not type(None))
            parser.add_argument(flag, dest=field.name, default=default, help=HELP.get(field.name),
                                type=_optional(base) if type(None) in typing.get_args(kind) else base)
    parser.add_argument("--cache", type=Path, help="where a source folder is prepared (default: RUN_DIR/studies)")


def prepared_folder(data: Path, cache: Path, consensus: int = DEFAULT_CONSENSUS) -> Path:
    """`data` if it is a prepared studies folder, else `data` prepared into `cache` (LIDC reference:
    voxels at least `consensus` readers include) and `cache` returned.

    Preparing is idempotent: items already in `cache` from the same files and options are kept, so
    a cache made with another `consensus` or from changed files is brought up to date.
    """
    if not data.exists():
        raise FileNotFoundError(f"data folder {data} does not exist")
    if is_studies_folder(data):
        return data
    prepare(data, cache, consensus=consensus)
    return cache


def run(args: argparse.Namespace) -> int:
    studies = prepared_folder(args.data, args.cache or args.out / "studies")
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name not in NOT_OPTIONS}
    config = TrainConfig(data=str(studies), out=str(args.out), **options)
    result = train(config)
    print(json.dumps({"best": str(result["best"]), "last": str(result["last"]), "split": str(result["split"]),
                      "validation": result["metrics"]}, indent=2, default=float))
    return 0
