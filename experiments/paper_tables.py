"""Reproduce the paper's Table I (classification) and Table II (segmentation) on ../shared/data.

Every row is trained with `lungnlb.training.train` under one budget (same steps, batch, input size,
patient split and data) for each seed, then evaluated on the held-out test patients at native
resolution with `lungnlb.evaluation.evaluate` (Dice / IoU over tumour slices, P / R / F1 for
neoplasm present). Prints both tables as mean ± sd over seeds beside the paper's figures, checks
the paper's claims, and compares `distance="paper"` with `distance="chebyshev"` for unet_sl_nlb.

    python -m experiments.paper_tables --budget cpu --json experiments/results/paper_tables_cpu.json
    python -m experiments.doc_tables      # the tables in docs/results.md, from that file

Budgets: smoke (seconds, a handful of cases, for the test), cpu (2 CPU cores), gpu (full size).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from lungnlb.runtime import enable_huge_pages  # noqa: E402

enable_huge_pages()  # before torch is imported, as the lungnlb command does
import torch  # noqa: E402

from lungnlb.data.studies import is_studies_folder  # noqa: E402
from lungnlb.evaluation.evaluate import evaluate  # noqa: E402
from lungnlb.inference import Predictor  # noqa: E402
from lungnlb.io.atomic import atomic_write_text  # noqa: E402
from lungnlb.networks import is_segmentation_model, list_models  # noqa: E402
from lungnlb.stamp import run_stamp  # noqa: E402
from lungnlb.training import TrainConfig, make_split, read_records, save_split, train  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
ROWS = ["unet", "unet_sa", "unet_nlb", "unet_localized_nlb", "unet_sb_nlb", "unet_sl_nlb", "unetpp",
        "deeplabv3plus", "resnet50", "efficientnet_b4"]
CHEBYSHEV = "unet_sl_nlb[chebyshev]"
# Only the paper's figures quoted in the project's issue are filled in; the rest are not invented.
PAPER = {
    "unet_sl_nlb": {"f1": 0.863, "dice": 0.935, "iou": 0.878},
    "unetpp": {"dice": 0.903, "iou": 0.823},
}
PAPER_BASELINE_F1 = 0.784  # "S-L NLB F1 0.863 vs 0.784" (the best plain / self-attention U-Net in Table I)
BUDGETS = {
    "smoke": {"input_size": 128, "steps": 2, "batch_size": 2, "lr": 1e-3, "seeds": [0], "rows": ["unet", "unet_sl_nlb"],
              "max_cases": 1, "chebyshev": False, "workers": 0},
    # 300 steps: what all 11 rows x 3 seeds fit into one working session of two CPU cores (the wall time it
    # took is in docs/results.md)
    "cpu": {"input_size": 128, "steps": 300, "batch_size": 4, "lr": 2e-3, "seeds": [0, 1, 2], "rows": ROWS,
            "max_cases": None, "chebyshev": True, "workers": 0},
    # a GPU step is short (experiments/gpu_reference.py measures it): CPU augmentation needs workers to keep up
    "gpu": {"input_size": 512, "steps": 3000, "batch_size": 16, "lr": 1e-3, "seeds": [0, 1, 2], "rows": ROWS,
            "max_cases": None, "chebyshev": True, "workers": 8},
}
NLB_ORDER = ["unet_sl_nlb", "unet_sb_nlb", "unet_localized_nlb", "unet_nlb", "unet"]


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


def run_row(row: str, seed: int, budget: dict, studies: Path, split_path: Path, test_ids: list[str], out: Path) -> dict:
    """Train one (row, seed) and evaluate it on the test images; returns the metrics."""
    model, kwargs = (("unet_sl_nlb", {"distance": "chebyshev"}) if row == CHEBYSHEV else (row, {}))
    config = TrainConfig(data=str(studies), out=str(out / row / f"seed{seed}"), model=model, model_kwargs=kwargs,
                         input_size=budget["input_size"], steps=budget["steps"], batch_size=budget["batch_size"],
                         lr=budget["lr"], seed=seed, split=str(split_path), val_every=budget["steps"], progress=False,
                         tensorboard=False, device=None, num_workers=budget["workers"])
    started = time.perf_counter()
    result = train(config)
    predictor = Predictor.from_checkpoint(result["last"], device="cuda" if torch.cuda.is_available() else "cpu")
    report, _ = evaluate(studies, predictor, test_ids, n_bootstrap=0)
    keys = ("dice", "iou", "false_positive_rate", "precision", "recall", "f1")
    return {"row": row, "seed": seed, "seconds": time.perf_counter() - started, **{k: report.get(k) for k in keys}}


def mean_sd(runs: list[dict], row: str, key: str) -> tuple[float, float] | None:
    values = [r[key] for r in runs if r["row"] == row and r.get(key) is not None]
    return (float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0) if values else None


def _fmt(value: tuple[float, float] | None) -> str:
    return "–" if value is None else f"{value[0]:.3f} ± {value[1]:.3f}"


def _paper(row: str, key: str) -> str:
    value = PAPER.get(row, {}).get(key)
    return "–" if value is None else f"{value:.3f}"


def tables(runs: list[dict], rows: list[str]) -> str:
    lines = ["### Table I — classification (neoplasm present), held-out test patients", "",
             "| model | precision | recall | F1 | paper F1 |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row} | {_fmt(mean_sd(runs, row, 'precision'))} | {_fmt(mean_sd(runs, row, 'recall'))} | "
                     f"{_fmt(mean_sd(runs, row, 'f1'))} | {_paper(row, 'f1')} |")
    lines += ["", f"Paper: best plain / self-attention U-Net F1 {PAPER_BASELINE_F1}.", "",
              "### Table II — segmentation (Dice / IoU over tumour slices), held-out test patients", "",
              "| model | Dice | IoU | paper Dice | paper IoU |", "|---|---|---|---|---|"]
    for row in rows:
        if row == CHEBYSHEV or is_segmentation_model(row):
            lines.append(f"| {row} | {_fmt(mean_sd(runs, row, 'dice'))} | {_fmt(mean_sd(runs, row, 'iou'))} | "
                         f"{_paper(row, 'dice')} | {_paper(row, 'iou')} |")
    return "\n".join(lines) + "\n"


def _ordered(runs: list[dict], order: list[str], key: str) -> tuple[bool, str]:
    values = [mean_sd(runs, row, key) for row in order]
    if any(v is None for v in values):
        return False, "not all rows ran"
    means = [v[0] for v in values]
    holds = all(a >= b for a, b in zip(means, means[1:]))
    return holds, " >= ".join(f"{row} {m:.3f}" for row, m in zip(order, means))


def claims(runs: list[dict]) -> str:
    """Whether our numbers support each of the paper's claims (comparison of means over seeds)."""
    lines = ["### The paper's claims on our data", ""]
    for key, name in (("f1", "classification F1"), ("dice", "segmentation Dice")):
        holds, text = _ordered(runs, NLB_ORDER, key)
        lines.append(f"- S-L >= S-B >= Localized >= Basic >= plain ({name}): "
                     f"{'supported' if holds else 'NOT supported'} — {text}")
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
    lines.append("- 'supported' compares means only; with sd of the size shown, small differences are not significant.")
    return "\n".join(lines) + "\n"


def markdown(result: dict) -> str:
    """The budget, both tables and the claims, from a result file (what `--json` writes) alone."""
    split = result["split"]
    header = (f"Budget `{result['budget']}`: {result['settings']}; split {split['file']} (seed {split['seed']}, "
              f"by patient / case block); test: {split['test_images']} images of cases {', '.join(split['test_cases'])}.\n\n")
    return header + tables(result["runs"], result["rows"]) + "\n" + claims(result["runs"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/lungnlb-paper-studies"),
                        help="prepared studies folder made from --data (reused)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "paper_tables")
    parser.add_argument("--rows", nargs="*", help="subset of rows (default: the budget's)")
    parser.add_argument("--seeds", type=int, nargs="*", help="override the budget's seeds")
    parser.add_argument("--steps", type=int, help="override the budget's training steps")
    parser.add_argument("--markdown", type=Path, help="also write the tables and claims to this file")
    parser.add_argument("--json", type=Path, help="also write the result file (runs, budget, split, date, commit)")
    args = parser.parse_args(argv)

    budget = dict(BUDGETS[args.budget])
    budget["seeds"] = args.seeds or budget["seeds"]
    budget["steps"] = args.steps or budget["steps"]
    rows = [r for r in (args.rows or budget["rows"]) if r in list_models()]
    if budget["chebyshev"] and not args.rows:
        rows.append(CHEBYSHEV)
    studies = prepared(args.data, args.cache)
    records = read_records(studies)
    split = limited_split(make_split(records, seed=0), records, budget["max_cases"])
    split_path = save_split(split, args.out / "split.json")
    runs = []
    for row in rows:
        for seed in budget["seeds"]:
            runs.append(run_row(row, seed, budget, studies, split_path, split["images"]["test"], args.out))
            print(json.dumps(runs[-1], default=float), flush=True)
            atomic_write_text(args.out / "runs.json", json.dumps(runs, indent=2, default=float))  # kept if stopped
    result = {**run_stamp(), "budget": args.budget,
              "settings": {k: budget[k] for k in ("input_size", "steps", "batch_size", "lr", "seeds")},
              "split": {"file": split_path.name, "seed": 0, "test_images": len(split["images"]["test"]),
                        "test_cases": split["cases"]["test"]},
              "rows": rows, "runs": runs}
    text = markdown(result)
    print(text)
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2, default=float) + "\n")
    if args.markdown:
        command = "python -m experiments.paper_tables " + " ".join(argv if argv is not None else sys.argv[1:])
        args.markdown.write_text(f"# Results: the paper's tables on public data\n\nCommand: `{command}`\n\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
