"""Reproduce the paper's Table I (classification) and Table II (segmentation) on ../shared/data.

Every row trains through the one engine, `lungnlb.training.train`, for the same wall-clock budget on
one machine (`TrainConfig.time_budget_s`: the engine times its first steps and shortens its cosine
schedule to the steps that fit), then is evaluated on the split's test patients with
`lungnlb.evaluation.evaluate` (Dice / IoU over tumour slices, P / R / F1 for neoplasm present).

Recipe (`RECIPE`): the shipped weights' native one (lungnlb/weights/README.md): 64 x 64 patches at the
slices' own pixel size, batch 16, lr 2e-3, slices with a mask 70 % of the draws, no class balancing,
the checkpoint chosen and calibrated on 400 validation slices. The four NLB variants use the shipped
model's grid of 4 (the geometry of docs/method.md, 16-pixel cells in the 64-pixel window), so every
segmentation row takes 64-pixel patches; a row whose size divisor does not divide 64 trains on the
smallest patch it takes (`patch_size_for`), recorded with its run. The classification-only rows
(resnet50, efficientnet_b4) have no mask head, so a patch has no truth for them: they train on whole
slices resized to `CLASSIFIER_INPUT` pixels, as in the paper. The peer row `nnunet_2d` (nnU-Net v2,
2d, planned by itself; `experiments.nnunet_row`) gets the same split, budget and evaluation.

Split: by patient, experiments/results/native_split.json (119 test cases: 112 LIDC-IDRI patients of
nodule crops, 7 IQ-OTH/NCCD blocks); the smoke budget makes a tiny one from its few cases.

Runnable in parts: each (row, seed) is merged into the result file as soon as it ends (the same row
and seed replaced, every other kept, written atomically), so `--rows` / `--seeds` parts can run in
different sessions or on a GPU and add up; a file made with another budget, recipe, machine or split
is refused. The tables show mean ± sd over the seeds present and how many there are.

    python -m experiments.paper_tables --budget cpu --rows unet unet_sl_nlb --seeds 0 \\
        --json experiments/results/paper_tables_native_cpu.json
    python -m experiments.paper_tables --budget gpu --json experiments/results/paper_tables_native_gpu.json
    python -m experiments.paper_tables --show experiments/results/paper_tables_native_cpu.json
    python -m experiments.doc_tables      # the tables in docs/results.md, from the result files

Budgets (`BUDGETS`): smoke (seconds, a handful of cases, for the test), cpu (2 CPU cores), gpu (one GPU).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from lungnlb.runtime import enable_huge_pages

enable_huge_pages()  # before torch is imported, as the lungnlb command does
import torch

from lungnlb.checkpoint import read_config
from lungnlb.data.studies import is_studies_folder
from lungnlb.evaluation.evaluate import evaluate
from lungnlb.evaluation.report import HEADLINE
from lungnlb.inference import Predictor
from lungnlb.io.atomic import atomic_write_text
from lungnlb.networks import is_segmentation_model, size_divisor
from lungnlb.stamp import load_average, run_stamp
from lungnlb.training import (
    TrainConfig,
    load_split,
    make_split,
    read_records,
    save_split,
    train,
)

DATA = ROOT.parent / "shared" / "data"
NATIVE_SPLIT = ROOT / "experiments" / "results" / "native_split.json"
ROWS = ["unet", "unet_sa", "unet_nlb", "unet_localized_nlb", "unet_sb_nlb", "unet_sl_nlb", "unetpp",
        "deeplabv3plus", "resnet50", "efficientnet_b4"]
CHEBYSHEV = "unet_sl_nlb[chebyshev]"
NNUNET = "nnunet_2d"
NLB_ROWS = ("unet_nlb", "unet_localized_nlb", "unet_sb_nlb", "unet_sl_nlb")
NLB_KWARGS = {"grid": 4}  # the shipped model's grid: 64-pixel patches for all four variants
# slice_probe off: the tables compare the networks' own heads, within the same budget for every row
RECIPE = {"patch_size": 64, "batch_size": 16, "lr": 2e-3, "seg_fraction": 0.7, "balance_classes": False,
          "val_slices": 400, "slice_probe": False}
CLASSIFIER_INPUT = 128  # whole slices, resized, for the rows without a mask head
# Only the paper's figures quoted in the project's issue are filled in; the rest are not invented.
PAPER = {
    "unet_sl_nlb": {"f1": 0.863, "dice": 0.935, "iou": 0.878},
    "unetpp": {"dice": 0.903, "iou": 0.823},
}
PAPER_BASELINE_F1 = 0.784  # "S-L NLB F1 0.863 vs 0.784" (the best plain / self-attention U-Net in Table I)
BUDGETS = {
    # max_steps only caps the cpu and gpu runs: the time budget decides their length
    "smoke": {"seconds": 5.0, "max_steps": 4, "workers": 0, "seeds": [0], "rows": ["unet", "unet_sl_nlb"],
              "split": None, "max_cases": 1},
    "cpu": {"seconds": 240.0, "max_steps": 3000, "workers": 1, "seeds": [0, 1, 2], "rows": ROWS + [CHEBYSHEV],
            "split": NATIVE_SPLIT, "max_cases": None},
    "gpu": {"seconds": 420.0, "max_steps": 30000, "workers": 8, "seeds": [0, 1, 2], "rows": ROWS + [CHEBYSHEV],
            "split": NATIVE_SPLIT, "max_cases": None},
}
NLB_ORDER = ["unet_sl_nlb", "unet_sb_nlb", "unet_localized_nlb", "unet_nlb", "unet"]
RESULT_KEYS = HEADLINE + ("n_patients", "n_tumour_slices", "n_tumour_free_slices")


def prepared(data: Path, cache: Path) -> Path:
    """The prepared studies folder for `data` (prepared into `cache` once)."""
    if is_studies_folder(data):
        return data
    if not is_studies_folder(cache):
        from lungnlb.prepare import prepare

        prepare(data, cache)
    return cache


def limited_split(split: dict, records: list[dict], max_cases: int | None) -> dict:
    """Keep at most `max_cases` cases per (source, subset) — the smoke budget's tiny data."""
    if max_cases is None:
        return split
    source = {r["case"]: r["source"] for r in records}
    cases = {}
    for subset, members in split["cases"].items():
        kept: dict[str, list[str]] = {}
        for case in members:
            bucket = kept.setdefault(source[case], [])
            if len(bucket) < max_cases:
                bucket.append(case)
        cases[subset] = sorted(c for bucket in kept.values() for c in bucket)
    from lungnlb.training.split import with_images

    return with_images({**split, "cases": cases}, records)


def budget_split(budget: dict, records: list[dict], split_file: Path | None) -> dict:
    """The split a budget evaluates on: a split file (by patient), or a tiny seeded one (smoke)."""
    path = split_file or budget["split"]
    if path is not None:
        return load_split(path, records)
    return limited_split(make_split(records, seed=0), records, budget["max_cases"])


def split_summary(split: dict, records: list[dict], name: str) -> dict:
    """What identifies a split in a result file: its name, a digest of its cases, its test cases and images."""
    digest = hashlib.sha256(json.dumps(split["cases"], sort_keys=True).encode()).hexdigest()[:16]
    test = set(split["cases"]["test"])
    crops = sorted({r["case"] for r in records if r["case"] in test and r["source"] == "lidc-crops"})
    return {"file": name, "cases_sha256": digest, "test_images": len(split["images"]["test"]),
            "test_cases": split["cases"]["test"], "test_patients_with_crops": len(crops)}


def row_model(row: str) -> tuple[str, dict]:
    """(registry model, its kwargs) of a table row."""
    if row == CHEBYSHEV:
        return "unet_sl_nlb", {**NLB_KWARGS, "distance": "chebyshev"}
    return row, (dict(NLB_KWARGS) if row in NLB_ROWS else {})


def patch_size_for(model: str, kwargs: dict, wanted: int = RECIPE["patch_size"]) -> int:
    """The smallest patch of at least `wanted` pixels that the model's size divisor allows."""
    divisor = size_divisor(model, **kwargs)
    return divisor * math.ceil(wanted / divisor)


def row_config(row: str, seed: int, budget: dict, studies: Path, split_path: Path, out: Path) -> TrainConfig:
    """The engine's configuration of one (row, seed): the recipe, the row's input, the budget."""
    model, kwargs = row_model(row)
    if is_segmentation_model(model):
        sizes = {"patch_size": patch_size_for(model, kwargs)}
    else:
        sizes = {"patch_size": None, "input_size": CLASSIFIER_INPUT}
    return TrainConfig(data=str(studies), out=str(out / row / f"seed{seed}"), model=model, model_kwargs=kwargs,
                       **{**RECIPE, **sizes}, steps=budget["max_steps"], val_every=budget["max_steps"],
                       time_budget_s=budget["seconds"], seed=seed, split=str(split_path), progress=False,
                       tensorboard=False, device=None, num_workers=budget["workers"])


def device_name() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def machine() -> str:
    """The machine a budget's seconds were spent on (runs on different machines do not share a table)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU, {torch.get_num_threads()} threads"


def scored(report: dict) -> dict:
    """The figures of an evaluation report a result file keeps for each run."""
    return {key: report.get(key) for key in RESULT_KEYS}


def run_row(row: str, seed: int, budget: dict, studies: Path, split_path: Path, test_ids: list[str], out: Path) -> dict:
    """Train one (row, seed) within the budget, evaluate it on the test images; the run's record,
    stamped with the date and commit it started at (the code it ran)."""
    stamp = run_stamp()
    if row == NNUNET:
        from experiments.nnunet_row import run_nnunet

        return {"row": row, "seed": seed, **stamp,
                **run_nnunet(studies, split_path, test_ids, seed, budget, out / row / f"seed{seed}", RECIPE)}
    config = row_config(row, seed, budget, studies, split_path, out)
    started, cpu_started = time.perf_counter(), time.process_time()
    result = train(config)
    trained, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    predictor = Predictor.from_checkpoint(result["best"], device=device_name())
    report, _ = evaluate(studies, predictor, test_ids, n_bootstrap=0)
    size = {"patch_size": config.patch_size} if config.patch_size else {"input_size": config.input_size}
    return {"row": row, "seed": seed, **stamp, "model": config.model, "model_kwargs": config.model_kwargs,
            **size, "steps": int(read_config(result["best"])["step"]), "train_seconds": round(trained, 1),
            "train_cpu_seconds": round(cpu, 1), "seconds": round(time.perf_counter() - started, 1),
            "load_average": load_average(), **scored(report)}


def settings(budget: dict) -> dict:
    """What every run of one table shares: budget, recipe, machine (compared before a merge)."""
    return {"budget_s": budget["seconds"], "max_steps": budget["max_steps"], "num_workers": budget["workers"],
            "recipe": RECIPE, "nlb_kwargs": NLB_KWARGS, "classifier_input_size": CLASSIFIER_INPUT,
            "machine": machine()}


def merged(existing: dict | None, fresh: dict, runs: list[dict]) -> dict:
    """`existing` with `runs` added (a run of the same row and seed replaced), under `fresh`'s budget,
    settings and split; refuses (ValueError) to mix runs made with another budget, recipe or split."""
    if existing is not None:
        differ = [key for key in ("budget", "settings", "split") if existing.get(key) != fresh[key]]
        if differ:
            raise ValueError(f"refusing to merge: the result file's {', '.join(differ)} differ from this run's "
                             f"({', '.join(f'{k}: {existing.get(k)} vs {fresh[k]}' for k in differ)}); "
                             "write the runs to another --json file")
    done = {(run["row"], run["seed"]) for run in runs}
    kept = [run for run in (existing or {}).get("runs", []) if (run["row"], run["seed"]) not in done]
    order = {row: index for index, row in enumerate(ROWS + [CHEBYSHEV, NNUNET])}
    every = sorted(kept + runs, key=lambda run: (order.get(run["row"], len(order)), run["row"], run["seed"]))
    return {**run_stamp(), **fresh, "runs": every}


def read_result(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def merge_into(path: Path, fresh: dict, runs: list[dict]) -> dict:
    """Merge `runs` into the result file at `path` (created when missing), atomically; the merged result."""
    result = merged(read_result(path), fresh, runs)
    atomic_write_text(path, json.dumps(result, indent=2, default=float) + "\n")
    return result


def table_rows(runs: list[dict]) -> list[str]:
    """The rows present, in the tables' order."""
    present = {run["row"] for run in runs}
    return [row for row in ROWS + [CHEBYSHEV, NNUNET] if row in present] + sorted(present - set(ROWS) - {CHEBYSHEV, NNUNET})


def mean_sd(runs: list[dict], row: str, key: str) -> tuple[float, float] | None:
    values = [r[key] for r in runs if r["row"] == row and r.get(key) is not None]
    return (float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0) if values else None


def seeds(runs: list[dict], row: str) -> int:
    return sum(run["row"] == row for run in runs)


def _fmt(value: tuple[float, float] | None) -> str:
    return "–" if value is None else f"{value[0]:.3f} ± {value[1]:.3f}"


def _paper(row: str, key: str) -> str:
    value = PAPER.get(row, {}).get(key)
    return "–" if value is None else f"{value:.3f}"


def segments(row: str) -> bool:
    return row in (CHEBYSHEV, NNUNET) or is_segmentation_model(row)


def tables(runs: list[dict]) -> str:
    """Table I (every row) and Table II (the rows with a mask head), mean ± sd over the seeds present."""
    rows = table_rows(runs)
    lines = ["### Table I — classification (neoplasm present), held-out test patients", "",
             "| model | seeds | precision | recall | specificity | F1 | paper F1 |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        cells = " | ".join(_fmt(mean_sd(runs, row, key)) for key in ("precision", "recall", "specificity", "f1"))
        lines.append(f"| {row} | {seeds(runs, row)} | {cells} | {_paper(row, 'f1')} |")
    note = (f"Paper: best plain / self-attention U-Net F1 {PAPER_BASELINE_F1}. Specificity: the share of the "
            "tumour-free slices called tumour-free; where the test slices are mostly tumour (crops), F1 alone "
            "cannot tell a classifier from one that calls every slice tumour.")
    lines += ["", note, "",
              "### Table II — segmentation (Dice / IoU over tumour slices), held-out test patients", "",
              "| model | seeds | Dice | IoU | paper Dice | paper IoU |", "|---|---|---|---|---|---|"]
    for row in rows:
        if segments(row):
            lines.append(f"| {row} | {seeds(runs, row)} | {_fmt(mean_sd(runs, row, 'dice'))} | "
                         f"{_fmt(mean_sd(runs, row, 'iou'))} | {_paper(row, 'dice')} | {_paper(row, 'iou')} |")
    return "\n".join(lines) + "\n"


def runs_table(runs: list[dict]) -> str:
    """Per run: the input the row trained on, the steps the budget allowed and the seconds spent."""
    timed = [run for run in runs if "steps" in run]
    if not timed:
        return ""
    header = ("| model | seed | input | steps | training s (CPU s of the process) | training + evaluation s "
              "| load average after |")
    lines = ["### Runs", "", header, "|---|---|---|---|---|---|---|"]
    for run in timed:
        size = f"{run['patch_size']} px patches" if run.get("patch_size") else (
            f"{run['input_size']} px slices" if run.get("input_size") else run.get("input", "–"))
        cpu = f" ({run['train_cpu_seconds']:.0f})" if "train_cpu_seconds" in run else ""
        load = " / ".join(f"{value:.1f}" for value in run.get("load_average", [])) or "–"
        lines.append(f"| {run['row']} | {run['seed']} | {size} | {run['steps']} | {run['train_seconds']:.0f}{cpu} | "
                     f"{run['seconds']:.0f} | {load} |")
    return "\n".join(lines) + "\n"


def _ordered(runs: list[dict], order: list[str], key: str) -> str:
    """'supported' / 'NOT supported' with the means in `order`, or 'not tested' naming the rows missing."""
    values = [mean_sd(runs, row, key) for row in order]
    missing = [row for row, value in zip(order, values) if value is None]
    if missing:
        return f"not tested — no runs of {', '.join(missing)}"
    means = [v[0] for v in values]
    holds = all(a >= b for a, b in itertools.pairwise(means))
    return f"{'supported' if holds else 'NOT supported'} — " + " >= ".join(
        f"{row} {m:.3f}" for row, m in zip(order, means))


def claims(runs: list[dict]) -> str:
    """Whether our numbers support each of the paper's claims (comparison of means over seeds)."""
    lines = ["### The paper's claims on our data", ""]
    for key, name in (("f1", "classification F1"), ("dice", "segmentation Dice")):
        lines.append(f"- S-L >= S-B >= Localized >= Basic >= plain ({name}): {_ordered(runs, NLB_ORDER, key)}")
    sl_dice, pp_dice = mean_sd(runs, "unet_sl_nlb", "dice"), mean_sd(runs, "unetpp", "dice")
    if sl_dice and pp_dice:
        lines.append(f"- NLB U-Net beats U-Net++ (Dice): {'supported' if sl_dice[0] > pp_dice[0] else 'NOT supported'}"
                     f" — {sl_dice[0]:.3f} vs {pp_dice[0]:.3f}")
    sl_f1 = mean_sd(runs, "unet_sl_nlb", "f1")
    for classifier in ("resnet50", "efficientnet_b4"):
        other = mean_sd(runs, classifier, "f1")
        if sl_f1 and other:
            lines.append(f"- NLB U-Net beats {classifier} (F1): {'supported' if sl_f1[0] > other[0] else 'NOT supported'}"
                         f" — {sl_f1[0]:.3f} vs {other[0]:.3f}")
    cheb = mean_sd(runs, CHEBYSHEV, "dice")
    if sl_dice and cheb:
        lines.append(f"- distance 'paper' vs 'chebyshev' (unet_sl_nlb Dice): {sl_dice[0]:.3f} vs {cheb[0]:.3f}")
    peer = mean_sd(runs, NNUNET, "dice")
    if sl_dice and peer:
        lines.append(f"- NLB U-Net beats nnU-Net v2 2d (Dice): {'supported' if sl_dice[0] > peer[0] else 'NOT supported'}"
                     f" — {sl_dice[0]:.3f} vs {peer[0]:.3f}")
    lines.append("- 'supported' compares means only; with sd of the size shown, small differences are not significant.")
    return "\n".join(lines) + "\n"


def _split_text(split: dict) -> str:
    test_cases = split["test_cases"]
    count = len(test_cases) if isinstance(test_cases, list) else test_cases
    crops = f", {split['test_patients_with_crops']} of them LIDC-IDRI patients with nodule crops" \
        if "test_patients_with_crops" in split else ""
    return f"split {split['file']} (by patient / case block); test: {split['test_images']} images of {count} cases{crops}"


def markdown(result: dict) -> str:
    """The budget, both tables, the runs and the claims, from a result file alone."""
    header = f"Budget `{result['budget']}`: {result['settings']}; {_split_text(result['split'])}.\n\n"
    runs = result["runs"]
    return header + tables(runs) + "\n" + claims(runs) + ("\n" + runs_table(runs) if runs_table(runs) else "")


def chosen_rows(parser: argparse.ArgumentParser, requested: list[str] | None, budget: dict) -> list[str]:
    """The rows to run: the requested ones (all known), else the budget's; nnU-Net's when it is installed."""
    known = ROWS + [CHEBYSHEV, NNUNET]
    unknown = sorted(set(requested or []) - set(known))
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {', '.join(known)}")
    if requested:
        return requested
    from experiments.nnunet_row import nnunet_available

    if budget["split"] is not None and nnunet_available():
        return budget["rows"] + [NNUNET]
    if budget["split"] is not None:
        print(f"{NNUNET} left out: nnunetv2 is not installed (pip install '.[nnunet]', docs/results.md)", file=sys.stderr)
    return budget["rows"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/lungnlb-paper-studies"),
                        help="prepared studies folder made from --data (reused)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "paper_tables")
    parser.add_argument("--split", type=Path, help="split file (default: the budget's)")
    parser.add_argument("--rows", nargs="*", help="subset of rows (default: the budget's)")
    parser.add_argument("--seeds", type=int, nargs="*", help="override the budget's seeds")
    parser.add_argument("--markdown", type=Path, help="also write the tables and claims to this file")
    parser.add_argument("--json", type=Path, help="result file to merge the runs into (default: OUT/paper_tables.json)")
    parser.add_argument("--show", type=Path, help="only print the tables of this result file")
    args = parser.parse_args(argv)
    if args.show:
        print(markdown(json.loads(args.show.read_text(encoding="utf-8"))))
        return 0

    budget = BUDGETS[args.budget]
    rows = chosen_rows(parser, args.rows, budget)
    studies = prepared(args.data, args.cache)
    records = read_records(studies)
    split = budget_split(budget, records, args.split)
    split_path = save_split(split, args.out / "split.json")
    fresh = {"budget": args.budget, "settings": settings(budget),
             "split": split_summary(split, records, (args.split or budget["split"] or split_path).name)}
    path = args.json or args.out / "paper_tables.json"
    result = merged(read_result(path), fresh, [])  # a file of another budget, recipe or split: refused before training
    for row in rows:
        for seed in args.seeds or budget["seeds"]:
            run = run_row(row, seed, budget, studies, split_path, split["images"]["test"], args.out)
            print(json.dumps(run, default=float), flush=True)
            result = merge_into(path, fresh, [run])  # each run kept as soon as it ends
    text = markdown(result)
    print(text)
    if args.markdown:
        command = "python -m experiments.paper_tables " + " ".join(argv if argv is not None else sys.argv[1:])
        atomic_write_text(args.markdown, f"# Results: the paper's tables on public data\n\nCommand: `{command}`\n\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
