"""Train / validation / test splits by patient (or case block), never by slice.

Every image of a prepared studies folder carries a `case` in its sidecar: the patient id (LIDC npz
slices and LIDC DICOM of one patient share it) or, for IQ-OTH/NCCD, a contiguous block of file
numbers. Whole cases go to one subset. Cases are stratified by (source, case class) so each subset
sees every source and both classes where the counts allow: per stratum of n cases,
n_test = max(1, round(test_fraction * n)) and n_val = max(1, round(val_fraction * n)) when n >= 3,
otherwise all n cases train.

The split is a JSON file {"seed", "fractions", "cases": {subset: [case, ...]},
"images": {subset: [image_id, ...]}} written beside a run, reusable with `--split`.
"""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

from lungnlb.io.atomic import atomic_write_text

SUBSETS = ("train", "val", "test")


def case_strata(records: list[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    """Map case -> (source, class) with class "1" if any image of the case has a neoplasm, "0" if none, "?" if unknown."""
    labels: dict[str, set] = defaultdict(set)
    sources: dict[str, str] = {}
    for record in records:
        sources[record["case"]] = record["source"]
        labels[record["case"]].add(record.get("class_label"))
    strata = {}
    for case, found in labels.items():
        klass = "1" if 1 in found else "0" if 0 in found else "?"
        strata[case] = (sources[case], klass)
    return strata


def make_split(
    records: list[dict[str, Any]], seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15
) -> dict[str, Any]:
    """Split image records (dicts with `image_id`, `case`, `source`, `class_label`) by case."""
    if not records:
        raise ValueError("cannot split an empty set of images")
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(f"need 0 <= val, test fractions and val + test < 1, got {val_fraction}, {test_fraction}")
    by_stratum: dict[tuple[str, str], list[str]] = defaultdict(list)
    for case, stratum in sorted(case_strata(records).items()):
        by_stratum[stratum].append(case)
    rng = random.Random(seed)
    cases: dict[str, list[str]] = {subset: [] for subset in SUBSETS}
    for stratum in sorted(by_stratum):
        members = sorted(by_stratum[stratum])
        rng.shuffle(members)
        n = len(members)
        n_test = max(1, round(test_fraction * n)) if n >= 3 and test_fraction > 0 else 0
        n_val = max(1, round(val_fraction * n)) if n >= 3 and val_fraction > 0 else 0
        cases["test"] += members[:n_test]
        cases["val"] += members[n_test : n_test + n_val]
        cases["train"] += members[n_test + n_val :]
    return with_images(
        {"seed": seed, "fractions": {"val": val_fraction, "test": test_fraction}, "cases": cases}, records
    )


def with_images(split: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """`split` with its image lists re-derived from its cases (images of unknown cases are left out)."""
    subset_of = {case: subset for subset, members in split["cases"].items() for case in members}
    images: dict[str, list[str]] = {subset: [] for subset in SUBSETS}
    for record in sorted(records, key=lambda r: r["image_id"]):
        subset = subset_of.get(record["case"])
        if subset is not None:
            images[subset].append(record["image_id"])
    return {**split, "cases": {k: sorted(v) for k, v in split["cases"].items()}, "images": images}


def all_train_split(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Every case in `train` (for the final model trained on all data)."""
    cases = sorted({record["case"] for record in records})
    return with_images({"seed": None, "fractions": {"val": 0.0, "test": 0.0},
                         "cases": {"train": cases, "val": [], "test": []}}, records)


def save_split(split: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a split JSON atomically."""
    return atomic_write_text(path, json.dumps(split, indent=2))


def load_split(path: str | os.PathLike, records: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Read a split JSON; with `records`, re-derive image lists from its cases (new images of a known case follow it)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} not found")
    split = json.loads(path.read_text(encoding="utf-8"))
    if "cases" not in split or not all(subset in split["cases"] for subset in SUBSETS):
        raise ValueError(f"split file {path} has no 'cases' with subsets {SUBSETS}")
    return with_images(split, records) if records is not None else split
