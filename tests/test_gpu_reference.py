"""The helpers of the GPU reference run that can be checked without a GPU: the compact transport
copy of a prepared folder (experiments/compact_studies.py) and the deadline of experiments/gpu_reference.py."""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from lungnlb.training import load_slices, make_split, read_records

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data" / "studies"


def _benchmark(name: str):
    return importlib.import_module(f"experiments.{name}")


def test_compact_copy_keeps_every_labelled_slice_within_half_a_grey_level(tmp_path):
    compact = _benchmark("compact_studies")
    out = tmp_path / "compact"
    for sub in ("meta", "labels/original"):
        (out / sub).mkdir(parents=True)
    for record in read_records(SAMPLE):
        compact.compact_image(SAMPLE, record, out)

    original = {(s.image_id, s.z): s for s in load_slices(SAMPLE, None)}
    copied = {}
    for sample in load_slices(out, None):
        source = json.loads((out / "meta" / f"{sample.image_id}.json").read_text())["compacted_from"]
        copied[(source["image_id"], source["z"])] = sample
    assert copied.keys() == original.keys() and any(s.mask is not None for s in original.values())
    for key, before in original.items():
        after = copied[key]
        assert (after.case, after.source, after.class_label) == (before.case, before.source, before.class_label)
        assert np.abs(after.image - before.image).max() <= 0.5 / 255 + 1e-6
        assert (after.mask is None) == (before.mask is None)
        if before.mask is not None:
            assert np.array_equal(after.mask, before.mask)
    # splits are by case, and every case keeps its source and class: the same cases per subset
    assert make_split(read_records(out), seed=0)["cases"] == make_split(read_records(SAMPLE), seed=0)["cases"]


def test_rows_still_running_at_the_deadline_are_stopped(tmp_path):
    gpu_reference = _benchmark("gpu_reference")
    commands = {"slow": [sys.executable, "-c", "import time; time.sleep(60)"],
                "quick": [sys.executable, "-c", "print('done')"]}
    logs = {row: tmp_path / f"{row}.log" for row in commands}
    start = time.monotonic()
    status = gpu_reference.run_all(commands, logs, deadline=time.monotonic() + 3)
    assert time.monotonic() - start < 30
    assert status["quick"]["returncode"] == 0 and not status["quick"]["stopped_at_deadline"]
    assert status["slow"]["stopped_at_deadline"] and status["slow"]["returncode"] != 0
    assert gpu_reference.log_tail(logs["quick"]) == "done"


def test_every_row_gets_the_steps_that_fit_the_budget_together():
    gpu_reference = _benchmark("gpu_reference")
    # three rows share the GPU: 280 s / (55 + 47 + 126 ms) = 1228 steps, rounded down to 1200
    assert gpu_reference.planned_steps(280, {"a": 55.0, "b": 47.0, "c": 126.0}, 3000) == 1200
    assert gpu_reference.planned_steps(280, {"a": 55.0}, 3000) == 3000  # capped by the recipe
    assert gpu_reference.planned_steps(1, {"a": 55.0}, 3000) == 18  # under 100: not rounded to 0


def test_native_pack_keeps_the_patch_slices_cut_to_the_body(tmp_path):
    """--native-patches: only slices with a lesion mask or tumour-free ones, each within the body's
    box (+ half a patch) and otherwise as before; --slice-step 2: every other one of a volume's."""
    compact = _benchmark("compact_studies")
    records = read_records(SAMPLE)
    usable = [s for s in load_slices(SAMPLE, None) if s.class_label == 0 or (s.mask is not None and s.mask.any())]
    assert usable and len(usable) < len(load_slices(SAMPLE, None))
    out, halved = tmp_path / "native", tmp_path / "halved"
    written = sum(compact.compact_image(SAMPLE, record, out, native_patches=True) for record in records)
    assert written == len(usable)
    original = {(s.image_id, s.z): s for s in usable}
    for sample in load_slices(out, None):
        source = json.loads((out / "meta" / f"{sample.image_id}.json").read_text())["compacted_from"]
        before = original[(source["image_id"], source["z"])]
        assert sample.class_label == 0 or sample.mask.any()
        assert all(a <= b for a, b in zip(sample.image.shape, before.image.shape))
        box = compact.body_region(before.image)
        assert np.abs(sample.image - before.image[box]).max() <= 0.5 / 255 + 1e-6
        if before.mask is not None:
            assert sample.mask.sum() == before.mask.sum()  # the lesion lies inside the cut
    per_image = {}
    for sample in usable:
        per_image[sample.image_id] = per_image.get(sample.image_id, 0) + 1
    kept = sum(compact.compact_image(SAMPLE, record, halved, native_patches=True, slice_step=2) for record in records)
    assert kept == sum((count + 1) // 2 for count in per_image.values()) < written
