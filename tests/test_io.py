"""lungnlb.io on the real files in ../shared/data (the test fails if the data folder is absent)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from lungnlb.io import (
    ImageReadError,
    lidc_consensus,
    read_dicom_series,
    read_image,
    read_npz_slices,
    read_voc_folder,
    to_model_input,
    write_nifti,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# Measured: the XML consensus masks equal the npz masks on all 22 matched slices of LIDC-IDRI-0001..0003
# (Dice 1.000 each, edge pixels excluded); the threshold leaves room for a single-pixel disagreement.
LIDC_XML_VS_NPZ_DICE = 0.99
# Measured: a matched npz slice and its DICOM slice differ by 0.020..0.070 on average inside the lung
# after `to_model_input` (per-scan normalisation of the npz pipeline vs one pooled fit).
NPZ_VS_HU_INPUT_DIFF = 0.10


@pytest.fixture(scope="module")
def data() -> Path:
    assert DATA.is_dir(), f"real data folder {DATA} is missing (see ../shared/data/README.md)"
    return DATA


def _series_folders(root: Path) -> list[Path]:
    return sorted({p.parent for p in root.rglob("*.dcm")})


@pytest.fixture(scope="module")
def lidc_series(data: Path) -> list[tuple[str, Path, Path]]:
    """(patient, series folder, reader XML) for every LIDC patient with DICOM."""
    found = []
    for patient in sorted((data / "lidc-idri" / "dicom").iterdir()):
        xml = sorted(patient.glob("*.xml"))
        for folder in _series_folders(patient):
            found.append((patient.name, folder, xml[0]))
    assert found, "no LIDC DICOM series found"
    return found


@pytest.fixture(scope="module")
def pet_ct_dx(data: Path) -> list[Path]:
    patients = sorted((data / "lung-pet-ct-dx").glob("*/annotations"))
    assert patients, "no Lung-PET-CT-Dx annotations found"
    return [p.parent for p in patients]


def _body_and_lung(hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Largest connected dense region filled = body; its air inside = lung."""
    dense = ndimage.binary_opening(hu > -500, iterations=2)
    labels, n = ndimage.label(dense)
    sizes = ndimage.sum(dense, labels, range(1, n + 1))
    body = ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))
    return body, body & (hu < -500)


def test_dicom_series_is_in_hounsfield_units(lidc_series, pet_ct_dx):
    folders = [folder for _, folder, _ in lidc_series] + _series_folders(pet_ct_dx[0] / "dicom")
    for folder in folders:
        volume = read_dicom_series(folder)
        assert volume.intensity == "hu" and volume.array.dtype == np.float32
        middle = volume.array[len(volume.array) // 2]
        body, lung = _body_and_lung(middle)
        outside = middle[~body & (middle > -1500)]  # air in the field of view
        assert -1050 < np.median(outside) < -950, folder
        assert -950 < np.median(middle[lung]) < -500, folder
        assert volume.array.min() < -900  # stored values would be >= 0 for the uint16 series


def test_single_dicom_file_is_a_2d_slice(lidc_series):
    _, folder, _ = lidc_series[0]
    path = sorted(folder.glob("*.dcm"))[0]
    image = read_image(path)
    assert image.array.ndim == 2 and image.intensity == "hu"
    assert image.meta["sop_instance_uids"] == [pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID]


def test_slices_are_ordered_by_position_not_file_name(pet_ct_dx, tmp_path):
    folder = _series_folders(pet_ct_dx[0] / "dicom")[0]
    files = sorted(folder.glob("*.dcm"))[20:26]
    positions = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files]
    rng = np.random.default_rng(0)
    names = [f"{n:02d}.dcm" for n in rng.permutation(len(files))]
    for source, name in zip(files, names):
        shutil.copy(source, tmp_path / name)
    volume = read_dicom_series(tmp_path)
    assert volume.meta["slice_positions"] == sorted(positions)
    by_z = dict(zip(positions, files))
    for k, z in enumerate(sorted(positions)):
        ds = pydicom.dcmread(by_z[z])
        expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert np.array_equal(volume.array[k], expected.astype(np.float32))


def test_nifti_geometry_matches_dicom_in_monai_and_itk(pet_ct_dx, tmp_path):
    import itk
    from monai.transforms import LoadImage

    folder = _series_folders(pet_ct_dx[0] / "dicom")[0]
    volume = read_dicom_series(folder)
    path = write_nifti(volume.array, volume.affine, tmp_path / "ct.nii.gz")
    first = pydicom.dcmread(volume.meta["source_files"][0], stop_before_pixels=True)
    last = pydicom.dcmread(volume.meta["source_files"][-1], stop_before_pixels=True)
    image = itk.imread(str(path))  # ITK (and Slicer) report LPS
    assert np.allclose(np.array(itk.origin(image)), np.array(first.ImagePositionPatient, dtype=float), atol=1e-3)
    far = image.TransformIndexToPhysicalPoint([0, 0, volume.array.shape[0] - 1])
    assert np.allclose(np.array(far), np.array(last.ImagePositionPatient, dtype=float), atol=1e-2)
    loaded = LoadImage(image_only=True)(str(path))
    assert tuple(loaded.shape) == volume.array.shape[::-1]
    assert np.allclose(np.asarray(loaded.affine), volume.affine, atol=1e-4)
    assert np.array_equal(np.asarray(loaded)[:, :, 3].T, volume.array[3])


def test_2d_nifti_and_nrrd_round_trip(tmp_path):
    import nrrd

    slice2d = np.arange(12, dtype=np.float32).reshape(3, 4) - 1000
    affine = np.diag([-0.7, -0.7, 2.5, 1.0])
    affine[:3, 3] = [10, 20, -30]
    back = read_image(write_nifti(slice2d, affine, tmp_path / "s.nii.gz"))
    assert back.array.shape == (3, 4) and np.array_equal(back.array, slice2d)
    assert np.allclose(back.affine, affine) and back.spacing == pytest.approx((0.7, 0.7))
    volume = np.arange(24, dtype=np.int16).reshape(2, 3, 4) - 1024
    header = {"space": "left-posterior-superior", "space directions": np.diag([0.5, 0.6, 2.0]), "space origin": [1.0, 2.0, 3.0]}
    nrrd.write(str(tmp_path / "v.nrrd"), volume.T, header)
    read = read_image(tmp_path / "v.nrrd")
    assert np.array_equal(read.array, volume) and read.intensity == "hu"
    assert np.allclose(read.affine[:3, 3], [-1.0, -2.0, 3.0]) and read.spacing == pytest.approx((2.0, 0.6, 0.5))


def test_jpeg_is_windowed_8bit_without_geometry(data):
    path = sorted((data / "iq-othnccd" / "malignant").glob("*.jpg"))[0]
    image = read_image(path)
    assert image.intensity == "windowed8bit" and image.array.ndim == 2
    assert image.meta["spacing_known"] is False and 0 <= image.array.min() and image.array.max() <= 255


def _matched_npz_slices(folder: Path, npz: Path, volume) -> list[tuple[int, int]]:
    """(npz index, volume z) pairs whose lung pixels correlate > 0.98 (same slice of the same scan)."""
    pairs = []
    for s in read_npz_slices(npz):
        lung = s.image.array != 0
        r = [np.corrcoef(volume.array[z][lung], s.image.array[lung])[0, 1] for z in range(len(volume.array))]
        if max(r) > 0.98:
            pairs.append((s.image.meta["npz_index"], int(np.argmax(r))))
    return pairs


def test_lidc_xml_masks_agree_with_npz_masks(data, lidc_series):
    matched = 0
    for patient, folder, xml in lidc_series:
        volume = read_dicom_series(folder)
        z_positions = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in volume.meta["source_files"]]
        marked = lidc_consensus(xml, volume.meta["sop_instance_uids"], z_positions, volume.array.shape[1:], consensus=1)
        # the npz pipeline kept the voxels of at least half the readers who marked the nodule
        half = {max(1, math.ceil(len(n.readers) / 2)) for n in marked.nodules}
        assert len(half) == 1, "one nodule (one threshold) per series here"
        masks = lidc_consensus(xml, volume.meta["sop_instance_uids"], z_positions, volume.array.shape[1:], consensus=half.pop())
        assert masks.readers >= 1 and all(n.malignancy for n in masks.nodules)
        npz = read_npz_slices(data / "lidc-idri" / "slices" / f"{patient}.npz")
        for index, z in _matched_npz_slices(folder, data / "lidc-idri" / "slices" / f"{patient}.npz", volume):
            reference = npz[index].mask
            labels, _ = ndimage.label(masks.mask[z])
            ids = np.unique(labels[reference & masks.mask[z]])
            ours = np.isin(labels, ids[ids > 0])  # the same nodule (npz files hold one nodule per slice)
            dice = 2 * (ours & reference).sum() / (ours.sum() + reference.sum())
            assert dice >= LIDC_XML_VS_NPZ_DICE, (patient, index, z, dice)
            matched += 1
    assert matched >= 10


def test_lidc_consensus_reader_count_shrinks_the_mask(lidc_series):
    _, folder, xml = lidc_series[0]
    volume = read_dicom_series(folder)
    z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in volume.meta["source_files"]]
    loose = lidc_consensus(xml, volume.meta["sop_instance_uids"], z, volume.array.shape[1:], consensus=1).mask
    strict = lidc_consensus(xml, volume.meta["sop_instance_uids"], z, volume.array.shape[1:], consensus=4).mask
    assert strict.sum() < loose.sum() and not (strict & ~loose).any()
    with pytest.raises(ValueError, match="whole number of readers"):  # the fraction of earlier versions
        lidc_consensus(xml, volume.meta["sop_instance_uids"], z, volume.array.shape[1:], consensus=0.5)
    wrong_uids = ["none"] * len(z)  # the z-position fallback alone finds the same contours
    assert np.array_equal(lidc_consensus(xml, wrong_uids, z, volume.array.shape[1:]).mask,
                          lidc_consensus(xml, volume.meta["sop_instance_uids"], z, volume.array.shape[1:]).mask)


def test_voc_boxes_lie_over_denser_tissue_than_surrounding_lung(pet_ct_dx):
    checked = 0
    for patient in pet_ct_dx:
        boxes = read_voc_folder(patient / "annotations")
        for folder in _series_folders(patient / "dicom"):
            volume = read_dicom_series(folder)
            for z, uid in enumerate(volume.meta["sop_instance_uids"]):
                for obj in boxes[uid].objects if uid in boxes else []:
                    x0, y0, x1, y1 = obj.box
                    inside = np.zeros(volume.array.shape[1:], dtype=bool)
                    inside[y0 : y1 + 1, x0 : x1 + 1] = True
                    ring = ndimage.binary_dilation(inside, iterations=15) & ~inside
                    lung = ring & (volume.array[z] < -500)
                    assert volume.array[z][inside].mean() > np.median(volume.array[z][lung]) + 300, (folder.name, z)
                    checked += 1
    assert checked == sum(len(a.objects) for p in pet_ct_dx for a in read_voc_folder(p / "annotations").values())


def test_to_model_input_ranges_and_window():
    hu = np.array([-2000, -1350, -600, 150, 3000], dtype=np.float32)
    assert np.allclose(to_model_input(hu, "hu"), [0, 0, 0.5, 1, 1])
    assert np.allclose(to_model_input(hu, "hu", window=(40, 400)), [0, 0, 0, 0.775, 1])
    assert np.allclose(to_model_input(np.array([0, 51, 255.0]), "windowed8bit"), [0, 0.2, 1])
    with pytest.raises(ValueError, match="unknown intensity"):
        to_model_input(hu, "raw")


def test_npz_and_dicom_give_comparable_model_inputs(data, lidc_series):
    for patient, folder, _ in lidc_series:
        volume = read_dicom_series(folder)
        npz = read_npz_slices(data / "lidc-idri" / "slices" / f"{patient}.npz")
        for index, z in _matched_npz_slices(folder, data / "lidc-idri" / "slices" / f"{patient}.npz", volume)[:2]:
            lung = npz[index].image.array != 0
            ours = to_model_input(npz[index].image.array, "normalized")
            reference = to_model_input(volume.array[z], "hu")
            assert np.abs(ours - reference)[lung].mean() < NPZ_VS_HU_INPUT_DIFF, (patient, index)


# ---- bad inputs: made in tmp from real files ----


@pytest.fixture()
def real_slice(lidc_series) -> Path:
    return sorted(lidc_series[0][1].glob("*.dcm"))[0]


def test_truncated_dicom_raises(real_slice, tmp_path):
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(real_slice.read_bytes()[:2000])
    with pytest.raises(ImageReadError, match="broken.dcm") as error:
        read_image(broken)
    assert "corrupt" in str(error.value) or "pixel" in str(error.value)


def test_empty_files_raise(tmp_path):
    for name in ("empty.dcm", "empty.jpg", "empty.nii.gz"):
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(ImageReadError, match=f"{name}: empty file"):
            read_image(tmp_path / name)


def test_non_ct_and_missing_pixels_raise(real_slice, tmp_path):
    ds = pydicom.dcmread(real_slice)
    ds.Modality = "MR"
    ds.save_as(tmp_path / "mr.dcm")
    with pytest.raises(ImageReadError, match="mr.dcm: modality is 'MR', not CT"):
        read_image(tmp_path / "mr.dcm")
    ds = pydicom.dcmread(real_slice)
    del ds.PixelData
    ds.save_as(tmp_path / "nopixels.dcm")
    with pytest.raises(ImageReadError, match="nopixels.dcm: missing pixel data"):
        read_image(tmp_path / "nopixels.dcm")


def test_folder_skips_bad_files_and_counts_them(lidc_series, tmp_path):
    files = sorted(lidc_series[0][1].glob("*.dcm"))[:4]
    for f in files:
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "zz_truncated.dcm").write_bytes(files[0].read_bytes()[:500])
    ds = pydicom.dcmread(files[0])
    ds.Modality = "PT"
    ds.save_as(tmp_path / "zz_pet.dcm")
    volume = read_dicom_series(tmp_path)
    assert volume.array.shape[0] == 4 and volume.meta["skipped_files"] == 2
    assert any("zz_pet.dcm" in reason for reason in volume.meta["skipped_reasons"])


def test_mixed_series_and_unreadable_folder_raise(lidc_series, tmp_path):
    for _, folder, _ in lidc_series[:2]:
        f = sorted(folder.glob("*.dcm"))[0]
        shutil.copy(f, tmp_path / f"{folder.name[-6:]}.dcm")
    with pytest.raises(ImageReadError, match="mixed series"):
        read_dicom_series(tmp_path)
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.dcm").write_bytes(b"not a dicom file at all")
    with pytest.raises(ImageReadError, match="no readable CT slice"):
        read_dicom_series(only_bad)


def test_corrupt_jpeg_npz_and_4d_nifti_raise(data, tmp_path):
    jpeg = sorted((data / "iq-othnccd" / "normal").glob("*.jpg"))[0]
    (tmp_path / "cut.jpg").write_bytes(jpeg.read_bytes()[:300])
    with pytest.raises(ImageReadError, match="cut.jpg: unreadable or corrupt"):
        read_image(tmp_path / "cut.jpg")
    npz = sorted((data / "lidc-idri" / "slices").glob("*.npz"))[0]
    (tmp_path / "cut.npz").write_bytes(npz.read_bytes()[:1000])
    with pytest.raises(ImageReadError, match="cut.npz"):
        read_npz_slices(tmp_path / "cut.npz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3, 2), np.float32), np.eye(4)), tmp_path / "t.nii.gz")
    with pytest.raises(ImageReadError, match="wrong dimensionality"):
        read_image(tmp_path / "t.nii.gz")
    with pytest.raises(FileNotFoundError):
        read_image(tmp_path / "absent.nii.gz")


def test_nifti_bytes_equal_nibabels_encoding_and_read_back(tmp_path):
    from lungnlb.io.volume import nifti_bytes, nifti_image

    rng = np.random.default_rng(3)
    affine = np.array([[0.7, 0.01, 0, -180], [0, 0.6, 0, -170], [0, 0, 2.5, 40], [0, 0, 0, 1]])
    for array, dtype in [(rng.random((512, 512)) > 0.9, np.uint8), (rng.random((5, 64, 48)), np.float32),
                         (rng.random((5, 64, 48)) > 0.5, np.uint8)]:  # same geometry twice: cached header
        encoded = nifti_bytes(array, affine, dtype)
        assert encoded == nifti_image(array, affine, dtype).to_bytes()
        path = tmp_path / "result.nii"
        path.write_bytes(encoded)
        image = nib.load(str(path))
        np.testing.assert_array_equal(np.asarray(image.dataobj).T, array.astype(dtype))
        np.testing.assert_allclose(image.affine, affine, atol=1e-6)
