"""The LIDC nodule crops and VOIs (../shared/data/lidc-nodules): readers and `lungnlb prepare` on a
few real patients picked by listing the folders, against hand computations from the npz arrays."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lungnlb.cli import main
from lungnlb.commands.train import prepared_folder
from lungnlb.io import ImageReadError, read_crop_file, read_dicom_series, read_voi_file
from lungnlb.prepare import prepare

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
NODULES = DATA / "lidc-nodules"


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def _volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A prepared NIfTI in its stored type, back in (Z, Y, X) order, with its affine."""
    image = nib.load(path)
    return np.asarray(image.dataobj).T, image.affine


def _csv_rows() -> dict[tuple[str, int], dict[str, str]]:
    with (NODULES / "vois" / "nodules.csv").open(newline="") as stream:
        return {(row["patient_id"], int(row["nodule_id"])): row for row in csv.DictReader(stream)}


def _voi_numbers(path: Path) -> set[int]:
    with np.load(path) as data:
        return {int(key[len("img_R"):]) for key in data.files if key.startswith("img_R")}


@pytest.fixture(scope="module")
def crop_files() -> list[Path]:
    """The first three crop files with a two-reader consensus and the first without one."""
    assert NODULES.is_dir(), f"real data folder {NODULES} is missing (see ../shared/data/README.md)"
    files = sorted((NODULES / "crops").glob("*.npz"))
    agreed = lambda f: bool((_arrays(f)["masks"].sum(axis=1) >= 2).any())  # noqa: E731
    with_consensus = [f for f in files[:10] if agreed(f)][:3]
    without = next(f for f in files if not agreed(f))
    return with_consensus + [without]


@pytest.fixture(scope="module")
def voi_files() -> list[Path]:
    """The first two VOI files and the first whose nodules differ from nodules.csv."""
    files = sorted((NODULES / "vois").glob("*.npz"))
    rows = _csv_rows()
    differs = next(f for f in files if _voi_numbers(f) != {n for (p, n) in rows if p == f.stem})
    return files[:2] + [differs]


@pytest.fixture(scope="module")
def studies(crop_files, voi_files, tmp_path_factory) -> tuple[Path, object]:
    src = tmp_path_factory.mktemp("src")
    for path in crop_files:
        _link(path, src / "crops" / path.name)
    for path in voi_files:
        _link(path, src / "vois" / path.name)
    _link(NODULES / "vois" / "nodules.csv", src / "vois" / "nodules.csv")
    out = tmp_path_factory.mktemp("studies")
    return out, prepare(src, out, progress=False)


def _sidecars(out: Path, source: str) -> dict[str, dict]:
    found = {p.stem: json.loads(p.read_text()) for p in (out / "meta").glob("*.json")}
    return {image_id: sidecar for image_id, sidecar in found.items() if sidecar["source"] == source}


def test_crop_reader_stacks_each_nodule_in_slice_order(crop_files, tmp_path):
    arrays = _arrays(crop_files[2])
    order = np.random.default_rng(0).permutation(len(arrays["nodule"]))
    shuffled = tmp_path / crop_files[2].name
    np.savez(shuffled, **{key: value[order] for key, value in arrays.items()})
    for crop in read_crop_file(shuffled):
        rows = np.flatnonzero(arrays["nodule"] == crop.nodule)
        rows = rows[np.argsort(arrays["slice"][rows])]
        assert crop.patient == crop_files[2].stem and crop.slices == sorted(arrays["slice"][rows].tolist())
        assert np.array_equal(crop.image.array, arrays["image"][rows])
        assert np.array_equal(crop.readers, arrays["masks"][rows].transpose(1, 0, 2, 3))
        assert crop.image.intensity == "crops8bit" and crop.image.meta["spacing_known"] is False
    assert [c.nodule for c in read_crop_file(shuffled)] == np.unique(arrays["nodule"]).tolist()


def test_prepare_writes_one_image_per_nodule_with_consensus_and_reader_tags(studies, crop_files):
    out, summary = studies
    sidecars = _sidecars(out, "lidc-crops")
    assert summary.written["lidc-crops"] == len(sidecars) and not summary.skipped
    for path in crop_files:
        arrays = _arrays(path)
        nodules = np.unique(arrays["nodule"])
        ids = sorted(i for i, s in sidecars.items() if s["case"] == path.stem)
        assert ids == [f"{path.stem}_crop_n{n:02d}" for n in nodules]  # one image per nodule
        for image_id, nodule in zip(ids, nodules):
            rows = np.flatnonzero(arrays["nodule"] == nodule)
            rows = rows[np.argsort(arrays["slice"][rows])]
            masks = arrays["masks"][rows]  # (n, 4, H, W)
            image, affine = _volume(out / f"{image_id}.nii.gz")
            assert image.dtype == np.uint8 and np.array_equal(image, arrays["image"][rows])
            assert np.allclose(np.linalg.norm(affine[:3, :3], axis=0), 1.0)  # nominal 1 mm
            consensus = masks.sum(axis=1) >= 2
            reference, _ = _volume(out / "labels" / "original" / f"{image_id}.nii.gz")
            assert np.array_equal(reference, consensus)
            marking = [r for r in range(masks.shape[1]) if masks[:, r].any()]
            sidecar = sidecars[image_id]
            assert sidecar["reader_tags"] == [f"reader{r + 1}" for r in marking]
            for r in range(masks.shape[1]):
                tag_file = out / "labels" / f"reader{r + 1}" / f"{image_id}.nii.gz"
                assert tag_file.is_file() == (r in marking)
                if r in marking:
                    reader, _ = _volume(tag_file)
                    assert reader.dtype == np.uint8 and np.array_equal(reader, masks[:, r])
            positive = {str(z): 1 for z in range(len(rows)) if consensus[z].any()}
            assert sidecar["slice_class_labels"] == positive and sidecar["labelled_slices"] == list(range(len(rows)))
            assert sidecar["class_label"] == (1 if positive else None)
            assert (sidecar["intensity"], sidecar["label_method"], sidecar["crop"], sidecar["spacing_known"]) == (
                "crops8bit", "radiologist", True, False)
            assert sidecar["nodule"] == int(nodule) and sidecar["params"]["consensus"] == 2
            assert sidecar["crop_slices"] == arrays["slice"][rows].tolist()
            assert "10.7937/K9/TCIA.2015.LO9QL9SX" in sidecar["attribution"]


def _references(out: Path, path: Path) -> dict[int, np.ndarray]:
    return {int(f.name.split("_crop_n")[1][:2]): _volume(f)[0] for f in (out / "labels" / "original").glob(f"{path.stem}_crop_n*")}


def test_consensus_option_and_rerun(crop_files, tmp_path, capsys):
    path = crop_files[2]
    src = tmp_path / "src"
    _link(path, src / path.name)
    arrays = _arrays(path)
    nodules = np.unique(arrays["nodule"]).tolist()
    votes = {n: arrays["masks"][np.flatnonzero(arrays["nodule"] == n)].sum(axis=1) for n in nodules}  # slices in file order
    assert main(["prepare", str(src), str(tmp_path / "out"), "--consensus", "3"]) == 0
    assert f"lidc-crops: {len(nodules)} written" in capsys.readouterr().out
    assert all(np.array_equal(mask, votes[n] >= 3) for n, mask in _references(tmp_path / "out", path).items())
    assert any((votes[n] >= 3).any() and ((votes[n] >= 3) != (votes[n] >= 2)).any() for n in nodules)
    sidecar = json.loads((tmp_path / "out" / "meta" / f"{path.stem}_crop_n00.json").read_text())
    assert sidecar["params"]["consensus"] == 3
    again = prepare(src, tmp_path / "out", consensus=3, progress=False)
    assert sum(again.written.values()) == 0 and again.up_to_date["lidc-crops"] == len(nodules)
    union = prepare(src, tmp_path / "out", consensus=1, progress=False)  # the fingerprint covers the option
    assert union.written["lidc-crops"] == len(nodules)
    assert all(np.array_equal(mask, votes[n] >= 1) for n, mask in _references(tmp_path / "out", path).items())
    with pytest.raises(ValueError, match="whole number of readers"):
        prepare(src, tmp_path / "other", consensus=0.5, progress=False)
    assert main(["prepare", str(src), str(tmp_path / "other"), "--consensus", "0"]) == 2


def test_voi_geometry_matches_spacing_and_dicom(voi_files):
    rows = _csv_rows()
    checked = 0
    for path in voi_files:
        arrays = _arrays(path)
        for voi in read_voi_file(path):
            spacing = arrays[f"spacing_R{voi.nodule}"]
            assert voi.image.spacing == pytest.approx(tuple(spacing.tolist()), rel=1e-5)
            assert np.array_equal(voi.image.array, arrays[f"img_R{voi.nodule}"]) and voi.image.intensity == "hu"
    # (column, row, slice) -> RAS: VOI voxels equal the DICOM HU where the two affines put them
    for patient in sorted((DATA / "lidc-idri" / "dicom").iterdir()):
        voi_path = NODULES / "vois" / f"{patient.name}.npz"
        if not voi_path.is_file():
            continue
        for folder in sorted({f.parent for f in patient.rglob("*.dcm")}):
            volume = read_dicom_series(folder)
            to_dicom = np.linalg.inv(volume.affine)
            for voi in read_voi_file(voi_path):
                if rows.get((patient.name, voi.nodule), {}).get("seriesuid") != volume.meta["series_instance_uid"]:
                    continue
                k, r, c = (axis.ravel() for axis in np.indices(voi.image.array.shape))
                index = np.rint(to_dicom @ voi.image.affine @ np.stack([c, r, k, np.ones_like(k)]))[:3].astype(int)
                inside = (index[2] >= 0) & (index[2] < len(volume.array))
                if not inside.any():
                    continue  # the DICOM here is a few slices only
                dicom = volume.array[index[2, inside], index[1, inside], index[0, inside]]
                assert np.array_equal(dicom, voi.image.array[k[inside], r[inside], c[inside]])
                checked += 1
    assert checked >= 1


def test_prepare_vois_with_ratings_trusting_the_arrays(studies, voi_files):
    out, _ = studies
    sidecars = _sidecars(out, "lidc-vois")
    rows = _csv_rows()
    for path in voi_files:
        arrays = _arrays(path)
        numbers = sorted(_voi_numbers(path))
        ids = sorted(i for i, s in sidecars.items() if s["case"] == path.stem)
        assert ids == sorted(f"{path.stem}_voi_R{n}" for n in numbers)  # the arrays decide
        for n in numbers:
            image_id = f"{path.stem}_voi_R{n}"
            image, affine = _volume(out / f"{image_id}.nii.gz")
            assert image.dtype == np.int16 and np.array_equal(image, arrays[f"img_R{n}"])
            assert np.allclose(affine, arrays[f"affine_R{n}"], atol=1e-4)
            mask, _ = _volume(out / "labels" / "original" / f"{image_id}.nii.gz")
            assert np.array_equal(mask, arrays[f"mask_R{n}"] > 0)
            sidecar = sidecars[image_id]
            assert sidecar["labelled_slices"] == list(range(len(mask))) and sidecar["crop"] is True
            assert sidecar["slice_class_labels"] == {str(z): 1 for z in range(len(mask)) if mask[z].any()}
            row = rows.get((path.stem, n))
            if row is None:
                assert sidecar["ratings"] is None
                continue
            ratings = sidecar["ratings"]
            assert ratings["Malignancy_value"] == int(row["Malignancy_value"]) == sidecar["malignancy"]
            assert ratings["diameter_mm"] == pytest.approx(float(row["diameter_mm"]))
            assert ratings["seriesuid"] == row["seriesuid"] and ratings["Texture"] == row["Texture"]


def test_voi_without_ratings_csv(voi_files, tmp_path):
    _link(voi_files[0], tmp_path / "src" / voi_files[0].name)
    prepare(tmp_path / "src", tmp_path / "out", progress=False)
    sidecars = _sidecars(tmp_path / "out", "lidc-vois")
    assert sidecars and all(s["ratings"] is None and s["malignancy"] is None for s in sidecars.values())


def _broken(folder: Path, name: str, arrays: dict[str, np.ndarray]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / name, **arrays)
    return folder / name


def test_bad_files_are_errors_naming_the_file(crop_files, voi_files, tmp_path):
    crop, voi = _arrays(crop_files[0]), _arrays(voi_files[0])
    n = next(int(k[len("img_R"):]) for k in voi if k.startswith("img_R"))
    src = tmp_path / "src"
    no_masks = _broken(src, "LIDC-IDRI-9001.npz", {k: v for k, v in crop.items() if k != "masks"})
    short_masks = _broken(src, "LIDC-IDRI-9002.npz", crop | {"masks": crop["masks"][:-1]})
    no_voi_mask = _broken(src, "LIDC-IDRI-9003.npz", {k: v for k, v in voi.items() if k != f"mask_R{n}"})
    bad_spacing = _broken(src, "LIDC-IDRI-9004.npz", voi | {f"spacing_R{n}": voi[f"spacing_R{n}"] * 2})
    unknown = _broken(src, "unknown.npz", {"volume": np.zeros(3)})
    (src / "corrupt.npz").write_bytes(b"PK\x03\x04 not a zip")
    expected = {no_masks: "lacks ['masks']", short_masks: "inconsistent shapes", no_voi_mask: f"nodule {n} lacks ['mask_R{n}']",
                bad_spacing: "differs from spacing"}
    for path, problem in expected.items():
        reader = read_crop_file if "9001" in path.name or "9002" in path.name else read_voi_file
        with pytest.raises(ImageReadError, match=re.escape(problem)) as error:
            reader(path)
        assert str(path) in str(error.value)
    _link(crop_files[0], src / crop_files[0].name)
    summary = prepare(src, tmp_path / "out", progress=False)
    assert summary.written["lidc-crops"] >= 1 and len(summary.skipped) == len(expected) + 2
    for path, problem in [*expected.items(), (unknown, "npz of no known layout"), (src / "corrupt.npz", "unreadable or corrupt")]:
        assert any(line.startswith(str(path)) and problem in line for line in summary.skipped), (path, summary.skipped)


def test_prepared_folder_follows_the_consensus(crop_files, tmp_path):
    """`lungnlb evaluate --data SRC` prepares SRC through `prepared_folder`; a cache made with another
    consensus is brought up to date, a prepared folder is used as it is."""
    _link(crop_files[0], tmp_path / "src" / crop_files[0].name)
    cache = tmp_path / "cache"
    consensus = lambda: {json.loads(p.read_text())["params"]["consensus"] for p in (cache / "meta").glob("*.json")}  # noqa: E731
    assert prepared_folder(tmp_path / "src", cache, consensus=3) == cache and consensus() == {3}
    assert prepared_folder(tmp_path / "src", cache) == cache and consensus() == {2}
    assert prepared_folder(cache, tmp_path / "unused") == cache and not (tmp_path / "unused").exists()


def test_reader_targets_are_the_readers_share_whose_half_is_the_reference(studies, crop_files):
    """Soft training masks of the crops: n readers of a pixel -> min(n / 4, 1) under the 2-reader
    consensus, so >= 0.5 is the reference; slices only one reader outlined load, below 0.5, and a
    patch of one is no lesion."""
    from lungnlb.data.studies import read_records
    from lungnlb.training.augment import patch_transforms
    from lungnlb.training.dataset import SliceDataset, load_slices

    out, _ = studies
    records = [r for r in read_records(out) if r["source"] == "lidc-crops"]
    soft = load_slices(out, None, records=records, reader_targets=True)
    hard = load_slices(out, None, records=records)
    assert len(soft) == len(hard) and {s.mask.dtype for s in soft} == {np.dtype(np.float32)}
    single_reader = []
    for path in crop_files:
        arrays = _arrays(path)
        for sample in (s for s in soft if s.case == path.stem):
            nodule = int(sample.image_id.rsplit("_n", 1)[1])
            rows = np.flatnonzero(arrays["nodule"] == nodule)
            row = rows[np.argsort(arrays["slice"][rows])][sample.z]
            outlined = arrays["masks"][row].sum(axis=0)
            assert np.array_equal(sample.mask, np.minimum(outlined / 4.0, 1.0).astype(np.float32))
            assert np.array_equal(sample.mask >= 0.5, outlined >= 2)
            if outlined.max() == 1:
                single_reader.append(sample)
    assert single_reader, "the crop without a consensus has slices one reader outlined"
    item = SliceDataset(single_reader[:1], patch_transforms(0, 16, air=0.0, pos_fraction=0.99, augment=False),
                        patches=True)[0]
    assert float(item["mask"].max()) == 0.25 and float(item["label"]) == 0.0
    with pytest.raises(ValueError, match="native-resolution"):
        load_slices(out, (32, 32), records=records[:1], reader_targets=True)
