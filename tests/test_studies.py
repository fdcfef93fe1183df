"""The studies-folder contract lives in `lungnlb.data.studies`: its sidecars, and the intensity kind
an image is read with, which only its sidecar knows (a NIfTI file does not say whether it holds
HU, 8-bit or normalised values)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from lungnlb.data.studies import (
    image_path,
    is_studies_folder,
    read_records,
    read_sidecar,
    read_study_image,
    sidecar_path,
    write_sidecar,
)
from lungnlb.io import read_image, write_nifti
from lungnlb.io.image import axial_affine

REPO = Path(__file__).resolve().parents[1]
# files the training issue is rewriting now (not to be edited beside it); when it lands,
# `data / "meta"` becomes `is_studies_folder(data)` and `studies / "labels" / "original"` `label_path`


def _crop_study(root: Path) -> Path:
    """A studies folder with one image of 8-bit integers whose sidecar says it is an LIDC crop."""
    array = np.arange(64 * 64, dtype=np.float32).reshape(64, 64) % 256
    write_nifti(array, axial_affine((1.0, 1.0)), image_path(root, "crop"))
    write_sidecar(root, "crop", {"case": "p1", "source": "lidc-crops", "intensity": "crops8bit"})
    return image_path(root, "crop")


def test_an_image_is_read_with_its_sidecars_intensity(tmp_path):
    path = _crop_study(tmp_path)
    assert read_image(path).intensity == "windowed8bit", "the io layer guesses from values alone"
    assert read_study_image(path).intensity == "crops8bit"
    assert read_study_image(path, intensity="normalized").intensity == "normalized", "an explicit kind wins"


def test_sidecars_round_trip_and_bad_ones_are_refused(tmp_path):
    _crop_study(tmp_path)
    assert is_studies_folder(tmp_path) and not is_studies_folder(tmp_path / "meta")
    assert read_sidecar(tmp_path, "crop")["intensity"] == "crops8bit"
    assert read_sidecar(tmp_path, "absent") is None
    assert [r["image_id"] for r in read_records(tmp_path)] == ["crop"]
    sidecar_path(tmp_path, "list").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        read_sidecar(tmp_path, "list")
    sidecar_path(tmp_path, "broken").write_text("{")
    with pytest.raises(ValueError):
        read_sidecar(tmp_path, "broken")


def _spells_the_layout(path: Path) -> list[int]:
    """Lines where code (not a docstring) builds a studies path from the folder names itself."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant):
            if node.right.value in ("meta", "original") or str(node.right.value).startswith("meta/"):
                lines.append(node.lineno)
    return lines


def test_the_probe_sees_a_hand_built_sidecar_path(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('from pathlib import Path\nsidecar = Path("s") / "meta" / "x.json"\n')
    assert _spells_the_layout(probe) == [2]


def test_only_the_data_layer_spells_the_studies_layout():
    """Every reader and writer of `meta/` and `labels/original/` goes through lungnlb.data.studies,
    so the layout (and a datastore that is not a folder) changes in one module."""
    files = [p for folder in ("lungnlb", "apps", "benchmarks", "experiments", "sample_data")
             for p in (REPO / folder).rglob("*.py")]
    found = {str(p.relative_to(REPO)): lines for p in files if (lines := _spells_the_layout(p))}
    found.pop("lungnlb/data/studies.py", None)
    assert not found, f"build these paths with lungnlb.data.studies: {found}"
