"""NIfTI and NRRD volumes or slices <-> `ImageData`, and the atomic NIfTI writer.

On disk the data array is in (X, Y[, Z]) order (column, row, slice) with an affine to RAS; in
memory `ImageData.array` is the transpose, (Z, Y, X) / (Y, X).
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np

from lungnlb.io.atomic import atomic_write
from lungnlb.io.image import ImageData, ImageReadError

LPS_SPACES = {"left-posterior-superior", "LPS"}
RAS_SPACES = {"right-anterior-superior", "RAS"}


def read_nifti(path: str | Path, intensity: str) -> ImageData:
    """A 2D or 3D NIfTI file -> `ImageData` with the file's affine (qform/sform as nibabel resolves it)."""
    path = Path(path)
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except Exception as error:
        raise ImageReadError(path, f"unreadable or corrupt NIfTI file ({type(error).__name__}: {error})") from error
    if data.ndim > 3 and all(n == 1 for n in data.shape[3:]):
        data = data.reshape(data.shape[:3])
    if data.ndim not in (2, 3):
        raise ImageReadError(path, f"wrong dimensionality: expected a 2D slice or 3D volume, got shape {data.shape}")
    array = np.asarray(data, dtype=np.float32)  # the array proxy has applied scl_slope/scl_inter
    return ImageData(array.T.copy(), image.affine, intensity, {"source_files": [str(path)]})


def read_nrrd(path: str | Path, intensity: str) -> ImageData:
    """A 2D or 3D NRRD file -> `ImageData`; an LPS space is converted to the RAS affine."""
    path = Path(path)
    try:
        data, header = nrrd.read(str(path), index_order="F")
    except Exception as error:
        raise ImageReadError(path, f"unreadable or corrupt NRRD file ({type(error).__name__}: {error})") from error
    if data.ndim not in (2, 3):
        raise ImageReadError(path, f"wrong dimensionality: expected a 2D slice or 3D volume, got shape {data.shape}")
    return ImageData(np.asarray(data, dtype=np.float32).T.copy(), _nrrd_affine(header, data.ndim), intensity, {"source_files": [str(path)]})


def _nrrd_affine(header: dict, ndim: int) -> np.ndarray:
    affine = np.eye(4)
    directions = header.get("space directions")
    if directions is not None:
        directions = np.asarray([d for d in directions if d is not None and not np.any(np.isnan(np.asarray(d, dtype=float)))], dtype=float)
        affine[: directions.shape[1], :ndim] = directions.T[:, :ndim]
    origin = header.get("space origin")
    if origin is not None:
        affine[: len(origin), 3] = np.asarray(origin, dtype=float)
    if header.get("space") in LPS_SPACES:
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    return affine


def nifti_image(array: np.ndarray, affine: np.ndarray, dtype: type = np.float32) -> nib.Nifti1Image:
    """``array`` ((Z, Y, X) or (Y, X), `ImageData` order) as an in-memory NIfTI image.

    The image holds the transpose (X, Y[, Z]) with ``affine`` as both qform and sform (code 1,
    scanner) and mm units, so MONAI's LoadImage, ITK and 3D Slicer place it identically.
    """
    image = nib.Nifti1Image(np.asarray(array, dtype=dtype).T, np.asarray(affine, dtype=np.float64))
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    return image


def nifti_bytes(array: np.ndarray, affine: np.ndarray, dtype: type = np.float32) -> bytes:
    """``nifti_image(array, affine, dtype).to_bytes()``, with the header built once per geometry.

    A server answers many requests on images of the same shape and affine, and building a NIfTI
    header (qform quaternion included) costs more than copying a slice mask. The voxels follow the
    header: the (X, Y[, Z]) array in Fortran order is the (Z, Y, X) array's bytes in C order.
    """
    data = np.ascontiguousarray(array, dtype=dtype)
    affine = np.ascontiguousarray(affine, dtype=np.float64)
    return _nifti_header_block(data.shape, data.dtype.str, affine.tobytes()) + data.tobytes()


@functools.lru_cache(maxsize=64)
def _nifti_header_block(shape: tuple[int, ...], dtype: str, affine: bytes) -> bytes:
    """Header and extension flag of `nifti_image` for this geometry, up to the voxel offset."""
    image = nifti_image(np.zeros(shape, dtype=dtype), np.frombuffer(affine).reshape(4, 4), np.dtype(dtype).type)
    content = image.to_bytes()
    return content[: len(content) - image.dataobj.nbytes]


def write_nifti(array: np.ndarray, affine: np.ndarray, path: str | Path, dtype: type = np.float32) -> Path:
    """Write ``array`` ((Z, Y, X) or (Y, X), `ImageData` order) as NIfTI at ``path``, atomically.

    The header is `nifti_image`'s; ``.nii.gz`` is gzip level 1 (nibabel's own default level).
    """
    path = Path(path)
    if array.ndim not in (2, 3):
        raise ValueError(f"{path}: write_nifti needs a 2D or 3D array, got shape {array.shape}")
    content = nifti_image(array, affine, dtype).to_bytes()
    if path.name.endswith(".gz"):
        content = gzip.compress(content, compresslevel=1, mtime=0)
    return atomic_write(path, lambda stream: stream.write(content))
