"""Rewrite the docs' generated sections from the committed result files (nothing is rerun).

    .venv/bin/python -m experiments.doc_tables            # rewrite every section below
    .venv/bin/python -m experiments.doc_tables --check    # exit 1 naming the sections that differ

A section stands between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` in one docs file;
`SECTIONS` says which file and which function renders it from which result files. Each section
names its result files with their date and commit; the run that made a file is its own command
(`experiments.paper_tables`, `experiments.gpu_reference`, `experiments.patient_cv`,
`experiments.shipped_evaluation`, `experiments.intensity_fit`, `benchmarks.speed`,
`benchmarks.watershed_quality`), which writes
the file; this command only turns files into tables, so a table cannot drift from its file
(`tests/test_doc_tables.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
from pathlib import Path
from typing import Callable

from lungnlb.io.atomic import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments" / "results"
BENCHMARKS = ROOT / "benchmarks" / "results"


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _source(*paths: Path) -> str:
    """`file` (date, commit) for each result file a section is made from."""
    parts = []
    for path in paths:
        data = _load(path)
        parts.append(f"`{path.relative_to(ROOT)}` ({data['date'][:10]}, commit {data['commit']})")
    return "From " + ", ".join(parts) + "; `python -m experiments.doc_tables` writes this section."


def _n(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _ci(report: dict, key: str) -> str:
    interval = (report.get("ci") or {}).get(key)
    return f"{_n(report.get(key))} ({interval[0]:.3f}–{interval[1]:.3f})" if interval else _n(report.get(key))


def _paper_tables(path: Path) -> str:
    """Tables I and II, the paper's claims (and the runs, where recorded) of one result file."""
    from experiments.paper_tables import markdown

    return _source(path) + "\n\n" + markdown(_load(path)).rstrip("\n")


def paper_tables() -> str:
    """The whole-slice recipe's tables, cpu budget."""
    return _paper_tables(EXPERIMENTS / "paper_tables_cpu.json")


def paper_tables_native() -> str:
    """The native recipe's tables, cpu budget: the parts run so far."""
    return _paper_tables(EXPERIMENTS / "paper_tables_native_cpu.json")


GPU_ROWS = (  # (label, result file, row in it, row in the CPU evaluation file)
    ("unet", "gpu_reference_512.json", "unet", "unet"),
    ("unetpp", "gpu_reference_512.json", "unetpp", "unetpp"),
    ("unet_sl_nlb", "gpu_reference_512.json", "unet_sl_nlb", "unet_sl_nlb"),
    ("unet_sl_nlb, alone", "gpu_reference_512_sl_nlb_long.json", "unet_sl_nlb", "unet_sl_nlb_2900"),
)


def _steps(run: dict, row: dict) -> str:
    """Planned steps, or `done of planned` for a run stopped at its deadline (the last progress line)."""
    if row["train"]["stopped_at_deadline"]:
        done = re.findall(r"(\d+)/\d+ \[", row["train_log_tail"])
        return f"{done[-1]} of {run['steps']} ({row['best_step']})"
    return f"{run['steps']} ({row['best_step']})"


def gpu_reference() -> str:
    """The 512 px rows trained on one GPU, evaluated on the CPU on the original prepared data."""
    evaluation_path = EXPERIMENTS / "gpu_reference_512_evaluate.json"
    evaluation = _load(evaluation_path)
    files = sorted({name for _, name, _, _ in GPU_ROWS})
    runs = {name: _load(EXPERIMENTS / name) for name in files}
    tests = [evaluation[key] for *_, key in GPU_ROWS]
    best_dice, best_f1 = max(t["dice"] for t in tests), max(t["f1"] for t in tests)
    validation_slices = {runs[name]["rows"][row]["validation"]["n_tumour_slices"] for _, name, row, _ in GPU_ROWS}
    lines = [_source(*(EXPERIMENTS / name for name in files), evaluation_path), "",
             f"| row, {runs[files[0]]['recipe']['input_size']} px, seed {runs[files[0]]['recipe']['seed']} | steps (best at) "
             f"| validation Dice ({'/'.join(map(str, sorted(validation_slices)))} slices) / F1 "
             f"| test Dice ({tests[0]['n_tumour_slices']} tumour slices) | IoU | precision | recall | F1 (95% CI) "
             "| IQ-OTH/NCCD F1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (label, name, row_name, _), test in zip(GPU_ROWS, tests):
        run = runs[name]
        row = run["rows"][row_name]
        dice, f1 = _ci(test, "dice"), _ci(test, "f1")
        dice = dice.replace(_n(test["dice"]), f"**{_n(test['dice'])}**", 1) if test["dice"] == best_dice else dice
        f1 = f1.replace(_n(test["f1"]), f"**{_n(test['f1'])}**", 1) if test["f1"] == best_f1 else f1
        lines.append(f"| {label} | {_steps(run, row)} | {_n(row['validation']['dice'])} / {_n(row['validation']['f1'])} "
                     f"| {dice} | {_n(test['iou'])} | {_n(test['precision'])} | {_n(test['recall'])} | {f1} "
                     f"| {_n(test['by_source']['iq-othnccd']['f1'])} |")
    return "\n".join(lines)


def patient_cv() -> str:
    """Leave-one-patient-out segmentation, one row per held-out patient."""
    path = EXPERIMENTS / "patient_cv.json"
    result = _load(path)
    rows = result["rows"]
    lines = [_source(path), "",
             "| held-out patient | validation patient | tumour slices | Dice | IoU |", "|---|---|---|---|---|"]
    lines += [f"| {r['patient']} | {r['validation_patient']} | {r['tumour_slices']} | {_n(r['dice'])} | {_n(r['iou'])} |"
              for r in rows]
    lines.append(f"| **mean** | | | **{_n(sum(r['dice'] for r in rows) / len(rows))}** "
                 f"| {_n(sum(r['iou'] for r in rows) / len(rows))} |")
    return "\n".join(lines)


NATIVE_ROWS = (  # (label, evaluation report)
    ("the weights below, their components counted through a volume's slices (shipped)", EXPERIMENTS / "native_test.json"),
    ("the weights below with a slice probe for the JPEGs, components counted slice by slice (before)",
     EXPERIMENTS / "before_volume_components" / "native_test.json"),
    ("the weights below + 1000 steps with MIL weak positives and top negatives (tumour-free whole slices), "
     "threshold 0.2, no slice probe", EXPERIMENTS / "weights_before_probe" / "native_test.json"),
    ("the 4200-step weights + 500 steps with MIL weak positives (IQ-OTH/NCCD tumour slices), threshold 0.4",
     EXPERIMENTS / "weak_positive_weights" / "native_test.json"),
    ("native, 64 px patches, best of 5600 steps (4200), lung field, threshold 0.5 (the base)",
     EXPERIMENTS / "native_4200_weights" / "native_test.json"),
    ("native, 3000 steps, threshold 0.2 (earlier)", EXPERIMENTS / "native_3000_weights" / "native_test.json"),
    ("the 3000-step weights + 1500 steps with hard negatives (not shipped)",
     EXPERIMENTS / "hard_negative_finetune" / "native_test.json"),
    ("native, 700 steps", EXPERIMENTS / "native_700_weights" / "native_test.json"),
    ("previous, whole slices at 128 px", EXPERIMENTS / "whole_slice_weights" / "test_split_crops.json"),
)


def native_vs_previous() -> str:
    """The shipped native-resolution weights and the previous whole-slice weights, same held-out split."""
    lines = [_source(*(path for _, path in NATIVE_ROWS)), "",
             "| weights | patients | Dice, tumour slices | IoU | recall | model vs each reader | IQ-OTH/NCCD F1 "
             "| tumour-free whole slices called tumour | left out (seen) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, path in NATIVE_ROWS:
        r = _load(path)
        readers = (r.get("readers") or {}).get("model_vs_each_reader") or {}
        iq = (r.get("by_source") or {}).get("iq-othnccd") or {}
        free = r.get("tumour_free") or {}
        n_free = free.get("n_tumour_free_slices")
        called = f"{round(free['false_positive_rate'] * n_free)} of {n_free}" if n_free else "–"
        left = r["excluded_patients"]
        lines.append(f"| {label} | {r['n_patients']} | {_ci(r, 'dice')} | {_ci(r, 'iou')} | {_ci(r, 'recall')} | "
                     f"{_n(readers.get('mean_over_slices'))} | {_n(iq.get('f1'))} | {called} | "
                     f"{left['count']}{': ' + left['why'] if left['count'] else ''} |")
    return "\n".join(lines)


def shipped_evaluation() -> str:
    """The shipped weights on every kind of data (the section `experiments.shipped_evaluation` writes)."""
    from experiments.shipped_evaluation import BEGIN, END, SETS, section

    reports = {name: _load(EXPERIMENTS / f"evaluation_{name}.json") for name in SETS
               if (EXPERIMENTS / f"evaluation_{name}.json").is_file()}
    return section(reports).removeprefix(BEGIN).removesuffix(END).strip("\n")


def speed() -> str:
    """Latency, parameters and memory of every network, and the speed targets."""
    from lungnlb.runtime import HUGE_PAGES

    path = BENCHMARKS / "speed.json"
    report = _load(path)
    matmul, subject = report["matmul"], report["subject"]
    lines = [_source(path), "",
             f"{len(matmul['runs_s'])} interleaved rounds, {report['threads']} threads, `{HUGE_PAGES}={report[HUGE_PAGES]}`, "
             f"matmul {matmul['gflops']:.1f} GFLOP/s median, {matmul['gflops_best']:.1f} best:", "",
             "| model | params | x unet | median ms | x unet | min ms | x unet | peak MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in report["models"].items():
        lines.append(f"| {name} | {row['parameters']:,} | {row['parameter_ratio_vs_unet']:.3f} | {row['latency_s'] * 1e3:.1f} | "
                     f"{row['latency_ratio_vs_unet']:.3f} | {row['latency_min_s'] * 1e3:.1f} | "
                     f"{row['latency_min_ratio_vs_unet']:.3f} | {row['peak_memory_mib']:.1f} |")
    name, models = subject["name"], report["models"]
    lines += ["", f"{name} {subject['flops'] / 1e9:.2f} GFLOP per forward (FlopCounterMode), "
              f"{subject['gflops']:.1f} GFLOP/s median = {100 * subject['fraction_of_matmul']:.0f} % of matmul "
              f"({subject['gflops_best']:.1f} best = {100 * subject['fraction_of_matmul_best']:.0f} %); against unet_sa "
              f"{models[name]['latency_s'] / models['unet_sa']['latency_s']:.3f}x its median, "
              f"{models[name]['latency_min_s'] / models['unet_sa']['latency_min_s']:.3f}x its minimum. Targets "
              f"(on medians / on minima): " + "; ".join(
                  f"{check} {'PASS' if passed else 'FAIL'} / {'PASS' if report['targets_on_minimum'][check] else 'FAIL'}"
                  for check, passed in report["targets"].items()) + "."]
    return "\n".join(lines)


def watershed_quality() -> str:
    """The watershed against the radiologists' masks, as `benchmarks.watershed_quality` prints it."""
    from benchmarks.watershed_quality import print_table

    path = BENCHMARKS / "watershed_quality.json"
    report = _load(path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        print_table(report["summary"], report["timing"])
    return _source(path) + "\n\n```\n" + printed.getvalue().rstrip("\n") + "\n```"


def _signed(value: float) -> str:
    """-29.4 -> "−29", 0.9 -> "+1", -0.2 -> "−0" (the sign says which side of the truth)."""
    return f"{'−' if value < 0 else '+'}{abs(value):.0f}"


def intensity_crops() -> str:
    """HU rules for the 8-bit LIDC crops: per-patient error of one line against the anchored rule."""
    path = EXPERIMENTS / "intensity_fit.json"
    rules = _load(path)["crops8bit"]["rules"]
    bands = list(rules["lung_anchored"]["error_by_true_hu_band"])
    lines = [_source(path), "",
             f"| rule (per-patient mean error, HU, {rules['lung_anchored']['per_patient_error_hu']['patients']} patients) "
             "| median | 90th pct | max | " + " | ".join(band.replace("-", "−") for band in bands) + " |",
             "|---|---|---|---|" + "---|" * len(bands)]
    line = rules["fixed_linear"]["constants"]
    labels = {"fixed_linear": f"one line, `HU = {line['slope']:.2f} v − {abs(line['intercept']):.0f}`",
              "lung_anchored": f"parenchyma-anchored, slope {rules['lung_anchored']['constants']['slope']:.2f}"
                               + (" (used)" if rules["library"]["constants"] == rules["lung_anchored"]["constants"] else "")}
    for key, label in labels.items():
        error = rules[key]["per_patient_error_hu"]
        lines.append(f"| {label} | {error['median']:.0f} | {error['p90']:.0f} | {error['max']:.0f} | "
                     + " | ".join(f"{rules[key]['error_by_true_hu_band'][band]:.0f}" for band in bands) + " |")
    return "\n".join(lines)


def intensity_npz() -> str:
    """HU rules for the normalised LIDC npz slices, per patient, with the parenchyma's offset."""
    path = EXPERIMENTS / "intensity_fit.json"
    patients = _load(path)["normalized"]["per_patient"]
    columns = ("pooled_linear", "lung_anchored", "lung_anchored_leave_patient_out")
    lines = [_source(path), "", "| patient | pooled line | landmarks | landmarks, leave patient out |", "|---|---|---|---|"]
    for patient, result in patients.items():
        lines.append(f"| {patient} | " + " | ".join(
            f"{result[c]['mean_error_hu']:.0f} (lung {_signed(result[c]['parenchyma_offset_hu'])})" for c in columns) + " |")
    return "\n".join(lines)


def mediastinal_window() -> str:
    """Whether tumour and neighbouring soft tissue both clip in the lung window."""
    path = EXPERIMENTS / "intensity_fit.json"
    result = _load(path)["mediastinal_window"]
    vois, boxes = result["vois"], result["lung_pet_ct_dx_boxes"]
    top = f"{result['lung_window_top_hu']:+.0f}"

    def contrast(c: dict) -> str:
        return f"{c['lung_window_median']:.3f} / {c['mediastinal_window_median']:.3f}"

    def merged(c: dict) -> str:
        return f"{round(c['share_merged_by_lung_window'] * c['n'])} of {c['n']}"

    lines = [_source(path), "",
             f"| | tumour pixels above {top} HU | tumour vs soft tissue next to it (median, input units): lung / "
             f"mediastinal window | pairs both above {top} HU |", "|---|---|---|---|",
             f"| LIDC VOIs, publisher's masks ({vois['nodules']} nodules; {vois['contrast']['n']} with soft tissue within "
             f"2 voxels) | {100 * vois['share_above_top']:.1f} % ({vois['nodules_with_over_5pc_saturated']} nodules over "
             f"5 %: calcification) | {contrast(vois['contrast'])} | {merged(vois['contrast'])} |",
             f"| Lung-PET-CT-Dx boxes, pixels > −300 HU ({boxes['contrast']['n']} boxes, ring of 10 px) "
             f"| {100 * boxes['share_above_top']:.1f} % | {contrast(boxes['contrast'])} | {merged(boxes['contrast'])} |"]
    return "\n".join(lines)


DOCS = ROOT / "docs"
SECTIONS: dict[str, tuple[Path, Callable[[], str]]] = {
    "shipped-evaluation": (DOCS / "results.md", shipped_evaluation),
    "native-vs-previous": (DOCS / "results.md", native_vs_previous),
    "paper-tables-native": (DOCS / "results.md", paper_tables_native),
    "paper-tables": (DOCS / "results.md", paper_tables),
    "gpu-reference": (DOCS / "results.md", gpu_reference),
    "patient-cv": (DOCS / "results.md", patient_cv),
    "speed": (DOCS / "method.md", speed),
    "watershed-quality": (DOCS / "labels.md", watershed_quality),
    "intensity-crops": (DOCS / "data.md", intensity_crops),
    "intensity-npz": (DOCS / "data.md", intensity_npz),
    "mediastinal-window": (DOCS / "data.md", mediastinal_window),
}


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def current(text: str, name: str) -> str | None:
    """What stands between the markers of ``name`` in ``text`` (None when they are missing)."""
    begin, end = markers(name)
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        return None
    return text[text.index(begin) + len(begin): text.index(end)].strip("\n")


def replaced(text: str, name: str, body: str) -> str:
    begin, end = markers(name)
    return text[: text.index(begin) + len(begin)] + "\n\n" + body + "\n\n" + text[text.index(end):]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a section differs")
    parser.add_argument("sections", nargs="*", help=f"default: all of {', '.join(SECTIONS)}")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; known: {', '.join(SECTIONS)}")
    stale = []
    for name in args.sections or SECTIONS:
        path, render = SECTIONS[name]
        text = path.read_text(encoding="utf-8")
        if current(text, name) is None:
            raise SystemExit(f"{path.relative_to(ROOT)}: no single pair of {' / '.join(markers(name))}")
        body = render()
        if current(text, name) != body.strip("\n"):
            stale.append(f"{name} ({path.relative_to(ROOT)})")
            if not args.check:
                atomic_write_text(path, replaced(text, name, body))
    verb = "differ from their result files" if args.check else "rewritten"
    print(f"{len(stale)} section(s) {verb}" + (": " + ", ".join(stale) if stale else ""))
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
