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
from lungnlb.io import lidc_consensus, parse_lidc_xml, read_dicom_series, read_voc_folder
from lungnlb.prepare import TUMOUR_FREE_DISTANCE, _z_of_slices, iq_case, prepare, slice_labels, tumour_free_slices

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
            if mask.ndim == 2:
                assert sidecar["labelled_slices"] == [0] and mask.any()
            else:  # a labelled slice has a mask exactly when it is a tumour slice (tumour-free: class 0)
                classes = sidecar["slice_class_labels"]
                assert sidecar["labelled_slices"] and set(classes) == set(map(str, sidecar["labelled_slices"]))
                assert all(bool(mask[z].any()) == (classes[str(z)] == 1) for z in sidecar["labelled_slices"])
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
            assert sidecar["params"]["tumour_free"]["distance"] == TUMOUR_FREE_DISTANCE and sidecar["class_label"] == 1
            assert sorted(map(int, sidecar["boxes"])) == [int(z) for z, c in sidecar["slice_class_labels"].items() if c == 1]
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


def test_tumour_free_slices_rule():
    far = TUMOUR_FREE_DISTANCE
    assert tumour_free_slices(20, [10]) == list(range(0, 10 - far + 1)) + list(range(10 + far, 20))
    assert tumour_free_slices(12, [-3.0]) == list(range(far - 3, 12))  # a mark beyond a partial series
    assert tumour_free_slices(12, [2.5, 6]) == [11]  # fractional positions (z between two slices)
    assert tumour_free_slices(8, []) == list(range(8)) and tumour_free_slices(8, [float("nan")]) == []
    assert slice_labels(6, [2], [5]) == ([2, 5], {"2": 1, "5": 0}, 1)
    assert slice_labels(3, [], [0, 1, 2])[2] == 0 and slice_labels(3, [], [2])[2] is None


def test_boxed_series_gets_tumour_free_slices(studies):
    """Lung-PET-CT-Dx: slices >= TUMOUR_FREE_DISTANCE from every boxed slice are class 0 with an empty mask."""
    out, _ = studies
    sidecar_path = next(p for p in (out / "meta").glob("*.json") if json.loads(p.read_text())["source"] == "lung-pet-ct-dx")
    sidecar = json.loads(sidecar_path.read_text())
    series = DATA / "lung-pet-ct-dx" / sidecar["case"] / "dicom" / Path(sidecar["source_files"][0]).name
    boxes = read_voc_folder(DATA / "lung-pet-ct-dx" / sidecar["case"] / "annotations")
    uids = read_dicom_series(series).meta["sop_instance_uids"]
    boxed = [z for z, uid in enumerate(uids) if uid in boxes]
    free = [z for z in range(len(uids)) if all(abs(z - b) >= 5 for b in boxed)]
    assert boxed and len(free) >= 20
    assert sidecar["slice_class_labels"] == {str(z): int(z in boxed) for z in sorted(boxed + free)}
    assert sidecar["labelled_slices"] == sorted(boxed + free) and sidecar["params"]["tumour_free"]["distance"] == 5
    mask = np.asarray(LoadImage(image_only=True)(str(out / "labels" / "original" / f"{sidecar_path.stem}.nii.gz"))).T
    assert not mask[free].any() and all(mask[z].any() for z in boxed)


def test_lidc_marks_count_every_reader_mark(source):
    """Every roi (contours and < 3 mm centroids) and every non-nodule of the XML is a mark, placed on its slice."""
    xml = next(source.glob("lidc-idri/dicom/*/*.xml"))
    series = next(p.parent for p in source.glob("lidc-idri/dicom/*/*/*/*.dcm"))
    volume = read_dicom_series(series)
    uids = volume.meta["sop_instance_uids"]
    result = lidc_consensus(xml, uids, _z_of_slices(volume), volume.array.shape[1:])
    text = xml.read_text()
    assert len(result.mark_positions) == text.count("<roi>") + text.count("<nonNodule>")
    on_series = sorted(float(uids.index(u)) for u in re.findall(r"<imageSOP_UID>\s*([\d.]+)\s*<", text) if u in uids)
    assert on_series and sorted(p for p in result.mark_positions if p in on_series) == on_series
    assert text.count("<roi>") > sum(1 for n in parse_lidc_xml(xml)[1] for _ in n.rois)  # centroids count too
