"""`lungnlb prepare` on small real subsets of ../shared/data (symlinked into tmp; the test fails if the data is absent)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from monai.transforms import LoadImage

from lungnlb.cli import main
from lungnlb.prepare import iq_case, prepare

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SIDECAR_KEYS = {"source", "case", "intensity", "class_label", "label_method", "labelled_slices", "slice_class_labels",
                "params", "readers", "malignancy", "attribution"}


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target, target_is_directory=target.is_dir())


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A mixed source folder: one LIDC npz, one LIDC DICOM+XML patient, one Lung-PET-CT-Dx series, 4 JPEGs."""
    assert DATA.is_dir(), f"real data folder {DATA} is missing"
    root = tmp_path_factory.mktemp("src")
    lidc = DATA / "lidc-idri"
    npz = sorted((lidc / "slices").glob("*.npz"))[0]
    _link(npz, root / "lidc-idri" / "slices" / npz.name)
    patient = sorted((lidc / "dicom").iterdir())[1]
    _link(patient, root / "lidc-idri" / "dicom" / patient.name)
    dx = sorted((DATA / "lung-pet-ct-dx").glob("*/annotations"))[0].parent
    _link(dx / "annotations", root / "lung-pet-ct-dx" / dx.name / "annotations")
    series = sorted(p for p in (dx / "dicom").iterdir() if p.is_dir())[0]
    _link(series, root / "lung-pet-ct-dx" / dx.name / "dicom" / series.name)
    for class_name in ("normal", "malignant"):
        for jpg in sorted((DATA / "iq-othnccd" / class_name).glob("*.jpg"))[:2]:
            _link(jpg, root / "iq-othnccd" / class_name / jpg.name)
    return root


@pytest.fixture(scope="module")
def studies(source, tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("studies")
    return out, prepare(source, out, progress=False)


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_every_source_is_prepared(studies):
    out, summary = studies
    assert set(summary.written) == {"lidc-idri", "lung-pet-ct-dx", "iq-othnccd"} and not summary.skipped
    sidecars = [json.loads(p.read_text()) for p in (out / "meta").glob("*.json")]
    by_source = {s: [c for c in sidecars if c["source"] == s] for s in summary.written}
    assert len(by_source["iq-othnccd"]) == 4
    assert {c["label_method"] for c in by_source["lung-pet-ct-dx"]} == {"watershed"}
    assert {c["label_method"] for c in by_source["lidc-idri"]} == {"radiologist"}
    assert {c["intensity"] for c in by_source["lidc-idri"]} == {"hu", "normalized"}
    assert all(SIDECAR_KEYS <= set(c) for c in sidecars)


def test_images_load_with_monai_and_labels_match(studies):
    out, summary = studies
    loader = LoadImage(image_only=True)
    images = sorted(out.glob("*.nii.gz"))
    assert len(images) == sum(summary.written.values())
    labels = 0
    for path in images:
        image_id = path.name.removesuffix(".nii.gz")
        assert re.fullmatch(r"[A-Za-z0-9._-]+", image_id)
        image = loader(str(path))
        sidecar = json.loads((out / "meta" / f"{image_id}.json").read_text())
        assert image.ndim == (3 if sidecar["source"] == "lung-pet-ct-dx" or sidecar["intensity"] == "hu" else 2)
        label_path = out / "labels" / "original" / path.name
        assert label_path.is_file() == (sidecar["label_method"] is not None)
        if label_path.is_file():
            label = loader(str(label_path))
            assert label.shape == image.shape and np.allclose(label.affine, image.affine)
            assert set(np.unique(np.asarray(label))) <= {0, 1}
            mask = np.asarray(label).T  # back to (Z, Y, X) / (Y, X)
            annotated = [mask[z] for z in sidecar["labelled_slices"]] if mask.ndim == 3 else [mask]
            assert annotated and all(m.any() for m in annotated)
            labels += 1
    assert labels == sum(summary.masks.values()) > 0


def test_sidecars_carry_class_labels_and_provenance(studies):
    out, _ = studies
    for sidecar_path in (out / "meta").glob("*.json"):
        sidecar = json.loads(sidecar_path.read_text())
        if sidecar["source"] == "iq-othnccd":
            expected = 0 if sidecar["class_name"] == "normal" else 1
            assert sidecar["class_label"] == expected and sidecar["labelled_slices"] == []
            assert re.fullmatch(r"iq-othnccd/(normal|malignant)/\d{4}-\d{4}", sidecar["case"])
        elif sidecar["source"] == "lung-pet-ct-dx":
            assert sidecar["params"] and sidecar["class_label"] == 1 and sorted(map(int, sidecar["boxes"])) == sidecar["labelled_slices"]
        else:
            assert sidecar["case"].startswith("LIDC-IDRI-") and sidecar["class_label"] == 1
            assert sidecar["attribution"] and "10.7937/K9/TCIA.2015.LO9QL9SX" in sidecar["attribution"]
            if sidecar["intensity"] == "hu":
                assert sidecar["readers"] >= 1 and sidecar["malignancy"]


def test_rerun_is_idempotent_and_source_untouched(source, studies):
    out, first = studies
    before_out, before_src = _digest(out), _digest(source)
    again = prepare(source, out, progress=False)
    assert sum(again.written.values()) == 0
    assert sum(again.up_to_date.values()) == sum(first.written.values())
    assert _digest(out) == before_out and _digest(source) == before_src


def test_forced_format_and_output_inside_source(source, tmp_path):
    summary = prepare(source, tmp_path / "iq", fmt="iq-othnccd", progress=False)
    assert set(summary.written) == {"iq-othnccd"} and len(list((tmp_path / "iq").glob("*.nii.gz"))) == 4
    with pytest.raises(ValueError, match="must not be inside the source"):
        prepare(source, source / "lidc-idri" / "out", progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no data found"):
        prepare(empty, tmp_path / "o", progress=False)


def test_cli_prepare_reports_and_skips_corrupt_inputs(tmp_path, capsys):
    src = tmp_path / "src" / "normal"
    src.mkdir(parents=True)
    jpg = sorted((DATA / "iq-othnccd" / "normal").glob("*.jpg"))[0]
    _link(jpg, src / jpg.name)
    (src / "normal_999.jpg").write_bytes(jpg.read_bytes()[:200])
    assert main(["prepare", str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "iq-othnccd: 1 written" in printed and "skipped: 1" in printed and "normal_999.jpg" in printed
    assert main(["prepare", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2


def test_iq_case_blocks():
    assert iq_case("malignant", "malignant_040") == "iq-othnccd/malignant/0040-0059"
    assert iq_case("malignant", "malignant_059") == iq_case("malignant", "malignant_040")
    assert iq_case("normal", "normal_019") != iq_case("normal", "normal_020")
