"""Train a segmentation + classification model on a prepared studies folder (or any source folder).

Splits by patient / case block (split.json is written beside the run; reuse it with --split),
writes atomic checkpoints best.pt / last.pt with a JSON config beside each, TensorBoard logs under
RUN_DIR/tensorboard. Multi-GPU / multi-process: `torchrun --nproc_per_node N -m lungnlb.cli train ...`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lungnlb.prepare import DEFAULT_CONSENSUS, prepare
from lungnlb.training.trainer import TrainConfig, train


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path,
                        help="prepared studies folder, or a source folder to prepare first (see --cache)")
    parser.add_argument("--out", required=True, type=Path, help="run folder: checkpoints, split.json, logs")
    parser.add_argument("--model", default="unet_sl_nlb", help="registry model name (see lungnlb.networks)")
    parser.add_argument("--model-kwargs", default="{}", help='JSON keyword arguments for build_model, e.g. \'{"distance": "chebyshev"}\'')
    parser.add_argument("--input-size", type=int, default=256, help="slices are resized to SIZE x SIZE (512 = full)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=8, help="per process")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--seg-weight", type=float, default=1.0, help="weight of the DiceCE segmentation loss")
    parser.add_argument("--cls-weight", type=float, default=1.0, help="weight of the BCE classification loss")
    parser.add_argument("--seg-fraction", type=float, default=0.5,
                        help="expected share of slices with a mask per batch (negative: sample uniformly)")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-every", type=int, default=200)
    parser.add_argument("--split", type=Path, help="reuse this split.json instead of making a new split")
    parser.add_argument("--val-fraction", type=float, default=0.15)
    parser.add_argument("--test-fraction", type=float, default=0.15)
    parser.add_argument("--all-data", action="store_true", help="train on every case (no validation / test)")
    parser.add_argument("--no-amp", action="store_true", help="disable mixed precision on GPU")
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--no-balance-classes", action="store_true",
                        help="plain BCE instead of weighting positives by the drawn negative/positive ratio")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt and its optimiser state")
    parser.add_argument("--cache", type=Path, help="where a source folder is prepared (default: RUN_DIR/studies)")


def prepared_folder(data: Path, cache: Path, consensus: int = DEFAULT_CONSENSUS) -> Path:
    """`data` if it is a prepared studies folder, else `data` prepared into `cache` (LIDC reference:
    voxels at least `consensus` readers include) and `cache` returned.

    Preparing is idempotent: items already in `cache` from the same files and options are kept, so
    a cache made with another `consensus` or from changed files is brought up to date.
    """
    if not data.exists():
        raise FileNotFoundError(f"data folder {data} does not exist")
    if (data / "meta").is_dir():
        return data
    prepare(data, cache, consensus=consensus)
    return cache


def run(args: argparse.Namespace) -> int:
    try:
        model_kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as error:
        raise ValueError(f"--model-kwargs is not valid JSON: {error}") from error
    studies = prepared_folder(args.data, args.cache or args.out / "studies")
    config = TrainConfig(
        data=str(studies), out=str(args.out), model=args.model, model_kwargs=model_kwargs,
        input_size=args.input_size, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, seg_weight=args.seg_weight, cls_weight=args.cls_weight,
        seg_fraction=None if args.seg_fraction < 0 else args.seg_fraction, grad_clip=args.grad_clip,
        seed=args.seed, val_every=args.val_every, split=str(args.split) if args.split else None,
        val_fraction=args.val_fraction, test_fraction=args.test_fraction, all_data=args.all_data,
        amp=not args.no_amp, augment=not args.no_augment, balance_classes=not args.no_balance_classes,
        device=args.device, num_workers=args.num_workers, resume=args.resume,
    )
    result = train(config)
    print(json.dumps({"best": str(result["best"]), "last": str(result["last"]), "split": str(result["split"]),
                      "validation": result["metrics"]}, indent=2, default=float))
    return 0
