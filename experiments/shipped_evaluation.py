"""Evaluate the shipped weights on every kind of data in ../shared/data, per patient, and regenerate
the evaluation section of docs/results.md from the result files (through `experiments.doc_tables`).

    .venv/bin/python -m experiments.shipped_evaluation [--data ../shared/data] [--checkpoint CKPT]
    .venv/bin/python -m experiments.shipped_evaluation --checkpoint CANDIDATE --out DIR   # a candidate's

Four evaluations (`lungnlb.evaluation.evaluate`, one report each in experiments/results/):
- crops: the LIDC nodule crops, reference = at least 2 of 4 readers, patients the weights never saw;
- vois: the LIDC nodule volumes (HU, the publisher's masks: the readers' union), patients the weights never saw;
- whole_unseen: the whole-slice sources (LIDC npz / DICOM, Lung-PET-CT-Dx, IQ-OTH/NCCD) less the
  patients the weights trained on — what is left are their validation patients, which picked the
  checkpoint and calibrated its threshold, and are flagged as such;
- whole_all: the same with every patient, for the tumour-free far slices of the box-annotated CT
  (never labelled in training, but their patient was trained on: flagged).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from experiments import doc_tables
from lungnlb.commands.train import prepared_folder
from lungnlb.evaluation.evaluate import EXCLUDE, evaluate, seen_cases
from lungnlb.evaluation.figures import froc_curve, patient_dice
from lungnlb.inference import Predictor
from lungnlb.io.atomic import atomic_write_text
from lungnlb.stamp import run_stamp

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
WHOLE_SLICE_SOURCES = ("lidc-idri", "lung-pet-ct-dx", "iq-othnccd")
SETS = {  # name: (folders under --data, patients left out)
    "crops": (("lidc-nodules/crops",), "seen"),
    "vois": (("lidc-nodules/vois",), "seen"),
    "whole_unseen": (WHOLE_SLICE_SOURCES, "trained"),
    "whole_all": (WHOLE_SLICE_SOURCES, "none"),
}
BEGIN, END = "<!-- shipped-evaluation:begin -->", "<!-- shipped-evaluation:end -->"


def source_folder(data: Path, folders: tuple[str, ...], work: Path) -> Path:
    """A folder holding links to ``folders`` of ``data`` (prepare reads one folder)."""
    link_root = work / ("src_" + "_".join(f.replace("/", "-") for f in folders))
    link_root.mkdir(parents=True, exist_ok=True)
    for folder in folders:
        link = link_root / folder.replace("/", "-")
        if not link.exists():
            link.symlink_to((data / folder).resolve(), target_is_directory=True)
    return link_root


def run_set(name: str, data: Path, work: Path, predictor: Predictor, n_bootstrap: int, results: Path) -> dict:
    folders, exclude = SETS[name]
    studies = prepared_folder(source_folder(data, folders, work), work / ("studies_" + folders[0].replace("/", "-")))
    report, _ = evaluate(studies, predictor, n_bootstrap=n_bootstrap, progress=True,
                         exclude_cases=frozenset(seen_cases(predictor.config, exclude)), exclude_reason=EXCLUDE[exclude])
    report.update(set=name, data=[str(data / f) for f in folders], model=predictor.config["model"]["name"], **run_stamp())
    figures = [patient_dice(report, results / f"evaluation_{name}_patient_dice.png"),
               froc_curve(report, results / f"evaluation_{name}_froc.png")]
    report["figures"] = [os.path.relpath(p, ROOT) for p in figures if p is not None]
    atomic_write_text(results / f"evaluation_{name}.json", json.dumps(report, indent=1, default=float))
    return report


def _n(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def _ci(report: dict, key: str) -> str:
    interval = report["ci"].get(key)
    return f"{_n(report.get(key))} ({interval[0]:.3f}–{interval[1]:.3f})" if interval else _n(report.get(key))


def section(reports: dict[str, dict]) -> str:
    """The Markdown of the evaluation section, from the reports alone."""
    stamp = next(iter(reports.values()))
    lines = [BEGIN, "", "## The shipped weights, per patient, on patients they never saw", "",
             "    .venv/bin/python -m experiments.shipped_evaluation", "",
             f"Generated {stamp['date']} at commit {stamp['commit']} from `experiments/results/evaluation_*.json`. "
             "Intervals: 95%, resampling patients.", "",
             "| set | patients | slices | Dice (tumour slices) | recall | specificity | F1 | left out |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in reports.items():
        lines.append(f"| {name} | {r['n_patients']} | {r['n_slices']} | {_ci(r, 'dice')} | {_ci(r, 'recall')} | "
                     f"{_ci(r, 'specificity')} | {_ci(r, 'f1')} | {r['excluded_patients']['count']}: "
                     f"{r['excluded_patients']['why']} |")
    crops = reports.get("crops", {}).get("readers")
    if crops:
        lines += ["", "Against the radiologists (crops, Dice):", "",
                  "| | mean over slices | mean over patients |", "|---|---|---|",
                  f"| model vs 2-of-4 consensus | {_n(crops['model_vs_consensus']['dice'])} | |",
                  f"| model vs each reader | {_n(crops['model_vs_each_reader']['mean_over_slices'])} | "
                  f"{_n(crops['model_vs_each_reader']['mean_over_patients'])} |",
                  f"| each reader vs >= 2 of the others | {_n(crops['human_reference']['mean_over_slices'])} | "
                  f"{_n(crops['human_reference']['mean_over_patients'])} |"]
    lines += ["", "Tumour-free whole slices:", "",
              "| set | tumour-free slices | called tumour | FP components / slice | lesion sensitivity | FROC score |",
              "|---|---|---|---|---|---|"]
    for name, r in reports.items():
        t = r.get("tumour_free")
        if t and t["n_tumour_free_slices"]:
            froc = t.get("froc", {}).get("score")
            lines.append(f"| {name} | {t['n_tumour_free_slices']} | {_n(t['false_positive_rate'])} | "
                         f"{_n(t['false_positive_components_per_slice'])} | {_n(t['lesion_sensitivity'])} | {_n(froc)} |")
            lines += [f"| {name}: series {row['image_id']} | {row['n_tumour_free_slices']} | "
                      f"{_n(row['called_tumour'] / row['n_tumour_free_slices'])} | | | |" for row in t.get("by_series", [])]
    lines += [""] + [f"![{name}](../{figure})" for name, r in reports.items() for figure in r["figures"]] + ["", END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--checkpoint", type=Path, help="default: the shipped weights")
    parser.add_argument("--work", type=Path, help="where the studies folders are prepared (default: a temp folder)")
    parser.add_argument("--sets", nargs="+", default=["crops", "vois", "whole_unseen"], choices=list(SETS),
                        help="whole_all adds every whole-slice patient, trained-on ones included (flagged)")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--out", type=Path, help="write the reports here and leave docs/results.md alone "
                        "(for a candidate; default: the shipped weights' result files and docs)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="lungnlb-shipped-evaluation-"))
    predictor = Predictor.from_checkpoint(args.checkpoint)
    results = args.out or RESULTS
    results.mkdir(parents=True, exist_ok=True)
    reports = {name: run_set(name, args.data, work, predictor, args.bootstrap, results) for name in args.sets}
    print(section(reports))
    if args.out:
        return 0
    return doc_tables.main(["shipped-evaluation"])  # docs/results.md from every evaluation_*.json now present


if __name__ == "__main__":
    raise SystemExit(main())
