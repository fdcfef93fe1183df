"""Evaluate a checkpoint (default: the shipped weights) on a data folder, per patient, on patients it never saw.

DATA is a prepared studies folder or any folder `lungnlb prepare` accepts (LIDC nodule crops and VOIs,
LIDC npz / DICOM + XML, Lung-PET-CT-Dx, IQ-OTH/NCCD, plain images). Patients the checkpoint trained
or was selected on (its config's training data) are left out unless --exclude says otherwise. Writes the JSON
report (--out; keys in `lungnlb.evaluation.report`) and Markdown beside it; --figures adds per-patient
Dice, FROC and PR curves, the worst segmentation cases and attention maps.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from lungnlb.io.atomic import atomic_write_text

from lungnlb.commands.train import DEFAULT_CONSENSUS, prepared_folder
from lungnlb.evaluation.crops import CROP_RULES
from lungnlb.stamp import run_stamp


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="prepared studies folder or source folder")
    parser.add_argument("--checkpoint", type=Path, help="checkpoint .pt (default: lungnlb/weights/default.pt)")
    parser.add_argument("--out", required=True, type=Path, help="report JSON (Markdown written beside it as .md)")
    parser.add_argument("--split", type=Path, help="split.json of a training run: evaluate only --subset of it")
    parser.add_argument("--subset", default="test", choices=("train", "val", "test"))
    parser.add_argument("--figures", nargs="?", type=Path, const=True, default=None,
                        help="write PNG figures (into DIR, default: <out>_figures/)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache", type=Path, help="where a source folder is prepared (default: a temp folder)")
    parser.add_argument("--consensus", type=int, default=DEFAULT_CONSENSUS,
                        help="reference of multi-reader sources: voxels at least N readers marked")
    parser.add_argument("--crop-rule", default="pad", choices=CROP_RULES,
                        help="how a nodule crop is fed to a whole-slice model (lungnlb.evaluation.crops)")
    parser.add_argument("--exclude", default="seen", choices=("seen", "trained", "none"),
                        help="patients left out: 'seen' (trained, selected or calibrated on; default), "
                             "'trained' (keep the validation patients), 'none' (flagged in the report)")


def run(args: argparse.Namespace) -> int:
    from lungnlb.data.studies import read_records
    from lungnlb.evaluation.evaluate import EXCLUDE, evaluate, seen_cases, to_markdown
    from lungnlb.inference import Predictor
    from lungnlb.training.split import load_split

    cache = args.cache or Path(tempfile.mkdtemp(prefix="lungnlb-evaluate-"))
    studies = prepared_folder(args.data, cache, args.consensus)
    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device)
    image_ids = None
    if args.split:
        image_ids = load_split(args.split, read_records(studies))["images"][args.subset]
    report, results = evaluate(studies, predictor, image_ids, n_bootstrap=args.bootstrap, progress=True,
                               exclude_cases=frozenset(seen_cases(predictor.config, args.exclude)),
                               crop_rule=args.crop_rule, exclude_reason=EXCLUDE[args.exclude])
    report["checkpoint"] = str(args.checkpoint or "default")
    report["model"] = predictor.config["model"]["name"]
    report["data"] = str(args.data)
    report["subset"] = args.subset if args.split else "all"
    report.update(run_stamp())
    if args.figures is not None:
        report["figures"] = [str(p) for p in _figures(args, predictor, report, results)]
    atomic_write_text(args.out, json.dumps(report, indent=2, default=float))
    atomic_write_text(args.out.with_suffix(".md"), to_markdown(report, f"LungNLB evaluation: {report['model']}"))
    print(to_markdown(report, f"LungNLB evaluation: {report['model']}"))
    return 0


def _figures(args, predictor, report, results) -> list[Path]:
    from lungnlb.evaluation.figures import attention_overlay, froc_curve, patient_dice, pr_curve, worst_cases

    folder = args.out.with_name(args.out.stem + "_figures") if args.figures is True else args.figures
    paths = [patient_dice(report, folder / "patient_dice.png"), froc_curve(report, folder / "froc.png"),
             pr_curve(results, folder / "pr_curve.png")]
    worst = worst_cases(results, folder, threshold=predictor.threshold)
    paths += worst
    shown = [r for r in results if r.mask is not None and r.mask.any() and not r.crop][:3] or results[:3]
    for result in shown:
        paths.append(attention_overlay(predictor.model, result.image, predictor.input_size,
                                       folder / f"attention_{result.image_id}_z{result.z}.png"))
    return [p for p in paths if p is not None]
