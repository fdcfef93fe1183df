"""Evaluate a model on a prepared studies folder, per patient, at each image's own resolution.

predict (`lungnlb.evaluation.predict`) -> score each slice (`lungnlb.evaluation.scoring`) ->
report (`lungnlb.evaluation.report`, whose docstring lists the keys) -> Markdown (`to_markdown`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lungnlb.evaluation.predict import SliceResult, predict_folder
from lungnlb.evaluation.report import HEADLINE, POLICY, build_report
from lungnlb.evaluation.scoring import score_slices

__all__ = ["EXCLUDE", "POLICY", "SliceResult", "evaluate", "seen_cases", "to_markdown"]


EXCLUDE = {"seen": "the checkpoint trained on them or was selected and calibrated on them",
           "trained": "the checkpoint trained on them (its validation patients are kept)",
           "none": "nothing left out: the figures include patients the checkpoint trained on"}


def seen_cases(config: dict[str, Any], exclude: str = "seen") -> set[str]:
    """Patients to leave out of an evaluation of a checkpoint (its config's training_data), per ``EXCLUDE``."""
    if exclude not in EXCLUDE:
        raise ValueError(f"unknown exclusion {exclude!r}: expected one of {sorted(EXCLUDE)}")
    data = config.get("training_data") or {}
    trained = set(data.get("train_cases") or [])
    validation = set((data.get("held_out_cases") or {}).get("val") or [])
    return {"seen": trained | validation, "trained": trained, "none": set()}[exclude]


def evaluate(
    studies: str | Path, predictor, image_ids: list[str] | None = None, n_bootstrap: int = 1000,
    seed: int = 0, progress: bool = False, exclude_cases: set[str] | frozenset[str] = frozenset(),
    crop_rule: str = "pad", exclude_reason: str = EXCLUDE["seen"],
) -> tuple[dict[str, Any], list[SliceResult]]:
    """Predict and score a studies folder, leaving out ``exclude_cases``: (report, slice results)."""
    results, info = predict_folder(studies, predictor, image_ids, progress, exclude_cases, crop_rule)
    if not results:
        raise ValueError(f"no labelled slices (masks or class labels) to evaluate in {studies}"
                         + (f" once {len(info['excluded_cases'])} excluded patients are left out" if info["excluded_cases"] else ""))
    report = build_report(score_slices(results, predictor.threshold), predictor.threshold, n_bootstrap, seed)
    report["crop_rule"] = crop_rule
    report["excluded_patients"] = {"count": len(info["excluded_cases"]), "patients": info["excluded_cases"],
                                   "why": exclude_reason}
    report["duplicates"] = info["duplicates"]
    return report, results


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _interval(interval) -> str:
    return f"{interval[0]:.3f} – {interval[1]:.3f}" if interval else ""


def to_markdown(report: dict[str, Any], title: str = "LungNLB evaluation") -> str:
    """Headline figures with their intervals and coverage, then per source, readers and tumour-free slices."""
    lines = [f"# {title}", "", report["policy"], "",
             f"{report['n_patients']} patients, {report['n_slices']} slices; "
             f"{report['excluded_patients']['count']} patients left out ({report['excluded_patients']['why']}); "
             f"{len(report['duplicates'])} repeated slices dropped; crop rule `{report['crop_rule']}`.", "",
             "| metric | value | 95% CI (patients) | over |", "|---|---|---|---|"]
    for key in HEADLINE:
        lines.append(f"| {key} | {_number(report.get(key))} | {_interval(report['ci'].get(key))} | {report['coverage'][key]} |")
    lines += ["", "| source | patients | slices | dice | recall | specificity | f1 |", "|---|---|---|---|---|---|---|"]
    for source, entry in report["by_source"].items():
        cells = [str(entry["n_patients"]), str(entry["n_slices"])] + [_number(entry.get(k)) for k in ("dice", "recall", "specificity", "f1")]
        lines.append(f"| {source} | " + " | ".join(cells) + " |")
    if report.get("readers"):
        r = report["readers"]
        lines += ["", "| against the readers (Dice) | mean over slices | mean over patients |", "|---|---|---|",
                  f"| model vs consensus | {_number(r['model_vs_consensus']['dice'])} | |",
                  f"| model vs each reader | {_number(r['model_vs_each_reader']['mean_over_slices'])} | "
                  f"{_number(r['model_vs_each_reader']['mean_over_patients'])} |",
                  f"| reader vs >= 2 others (human reference) | {_number(r['human_reference']['mean_over_slices'])} | "
                  f"{_number(r['human_reference']['mean_over_patients'])} |"]
    if report.get("tumour_free"):
        t = report["tumour_free"]
        lines += ["", f"Tumour-free whole slices: {t['n_tumour_free_slices']} of {t['n_patients']} patients; "
                  f"called tumour {_number(t['false_positive_rate'])}, specificity {_number(t['specificity'])}; "
                  f"false-positive components per slice {_number(t['false_positive_components_per_slice'])}; "
                  f"lesion sensitivity {_number(t['lesion_sensitivity'])} ({t['n_lesions']} lesions)"
                  + (f"; FROC score {t['froc']['score']:.3f}" if t.get("froc") else "") + "."]
        lines += [f"- series {row['image_id']} ({row['patient']}): {row['called_tumour']} of "
                  f"{row['n_tumour_free_slices']} tumour-free slices called tumour" for row in t.get("by_series", [])]
    without = report["patients_without_reference"]
    lines += ["", f"Patients without a tumour slice (no Dice): {without['count']}."]
    return "\n".join(lines) + "\n"
