"""Evaluate a checkpoint (default: the shipped weights) on a data folder: Dice/IoU, P/R/F1 with 95% CIs.

DATA is a prepared studies folder or any folder `lungnlb prepare` accepts. Writes JSON (--out) and
Markdown beside it; --figures adds a PR curve, the worst segmentation cases and attention maps.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from lungnlb.commands.train import prepared_folder


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


def _atomic_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        stream.write(text)
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> int:
    from lungnlb.evaluation.evaluate import evaluate, to_markdown
    from lungnlb.inference import Predictor
    from lungnlb.training.dataset import read_records
    from lungnlb.training.split import load_split

    cache = args.cache or Path(tempfile.mkdtemp(prefix="lungnlb-evaluate-"))
    studies = prepared_folder(args.data, cache)
    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device)
    image_ids = None
    if args.split:
        image_ids = load_split(args.split, read_records(studies))["images"][args.subset]
    report, results = evaluate(studies, predictor, image_ids, n_bootstrap=args.bootstrap, progress=True)
    report["checkpoint"] = str(args.checkpoint or "default")
    report["model"] = predictor.config["model"]["name"]
    report["data"] = str(args.data)
    report["subset"] = args.subset if args.split else "all"
    if args.figures is not None:
        report["figures"] = [str(p) for p in _figures(args, predictor, results)]
    _atomic_text(args.out, json.dumps(report, indent=2, default=float))
    _atomic_text(args.out.with_suffix(".md"), to_markdown(report, f"LungNLB evaluation: {report['model']}"))
    print(to_markdown(report, f"LungNLB evaluation: {report['model']}"))
    return 0


def _figures(args, predictor, results) -> list[Path]:
    from lungnlb.evaluation.figures import attention_overlay, pr_curve, worst_cases

    folder = args.out.with_name(args.out.stem + "_figures") if args.figures is True else args.figures
    paths = [pr_curve(results, folder / "pr_curve.png")]
    worst = worst_cases(results, folder, threshold=predictor.threshold)
    paths += worst
    shown = [r for r in results if r.mask is not None and r.mask.any()][:3] or results[:3]
    for result in shown:
        paths.append(attention_overlay(predictor.model, result.image, predictor.input_size,
                                       folder / f"attention_{result.image_id}_z{result.z}.png"))
    return [p for p in paths if p is not None]
