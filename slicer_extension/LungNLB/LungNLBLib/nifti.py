"""A minimal NIfTI-1 writer and reader (numpy + struct + gzip), for Pythons without nibabel (Slicer's).

Array convention (as in the rest of LungNLB): a volume is ``(Z, Y, X)`` = (slice, row, column) and a
slice ``(Y, X)``; the 4x4 ``affine`` maps voxel indices ``(i, j, k) = (x, y, z)`` to RAS millimetres
(NIfTI's world space, which is also Slicer's ``IJKToRAS``)::

    [R, A, S, 1]^T = affine @ [x, y, z, 1]^T

NIfTI stores voxels with i fastest, so the C-order bytes of a ``(Z, Y, X)`` array are exactly the file's
voxel block. The writer sets both sform and qform to the affine (qform from its rotation part when that is a
proper rotation times spacing); the reader prefers sform, then qform, then the pixel spacing alone.
"""

import gzip
import struct
from typing import Dict, NamedTuple, Tuple

import numpy as np

HEADER_SIZE = 348
VOX_OFFSET = 352  # header + 4-byte extension flag

# NIfTI datatype code <-> numpy dtype
_DTYPES: Dict[int, np.dtype] = {
    2: np.dtype(np.uint8),
    4: np.dtype(np.int16),
    8: np.dtype(np.int32),
    16: np.dtype(np.float32),
    64: np.dtype(np.float64),
    256: np.dtype(np.int8),
    512: np.dtype(np.uint16),
    768: np.dtype(np.uint32),
}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}

_NIFTI_UNITS_MM = 2
_XFORM_SCANNER = 1


class Volume(NamedTuple):
    """Voxels in ``(Z, Y, X)`` (or ``(Y, X)`` for a slice) and the 4x4 voxel-to-RAS affine."""

    array: np.ndarray
    affine: np.ndarray


def write_nifti_bytes(array: np.ndarray, affine: np.ndarray, compress: bool = True) -> bytes:
    """Encode a 2D ``(Y, X)`` or 3D ``(Z, Y, X)`` array and its 4x4 affine as NIfTI-1 (``.nii.gz`` if compress)."""
    array = np.asarray(array)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if array.ndim not in (2, 3):
        raise ValueError(f"NIfTI writer takes a (Y, X) slice or a (Z, Y, X) volume, got shape {array.shape}")
    if array.dtype.newbyteorder("=") not in _CODES:
        raise ValueError(f"unsupported voxel type {array.dtype}; use one of {sorted(str(d) for d in _CODES)}")
    affine = _check_affine(affine)
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    data = _header(array, affine) + b"\x00\x00\x00\x00" + array.tobytes(order="C")
    return gzip.compress(data, compresslevel=6) if compress else data


def read_nifti_bytes(data: bytes) -> Volume:
    """Decode NIfTI-1 bytes (gzipped or not) into a Volume; scl_slope/scl_inter are applied when set."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < HEADER_SIZE:
        raise ValueError(f"not a NIfTI-1 file: {len(data)} bytes, shorter than the 348-byte header")
    endian = _endianness(data)
    dim = struct.unpack(endian + "8h", data[40:56])
    datatype = struct.unpack(endian + "h", data[70:72])[0]
    if not 1 <= dim[0] <= 7:
        raise ValueError(f"NIfTI header has invalid dim[0] = {dim[0]}")
    shape_xyz = [d for d in dim[1 : 1 + dim[0]]]
    while len(shape_xyz) > 3 and shape_xyz[-1] == 1:
        shape_xyz.pop()
    if len(shape_xyz) > 3:
        raise ValueError(f"only 2D and 3D NIfTI images are supported, got dims {shape_xyz}")
    if datatype not in _DTYPES:
        raise ValueError(f"unsupported NIfTI datatype code {datatype}")
    dtype = _DTYPES[datatype].newbyteorder(endian)
    vox_offset = int(struct.unpack(endian + "f", data[108:112])[0])
    count = int(np.prod(shape_xyz))
    if vox_offset + count * dtype.itemsize > len(data):
        raise ValueError("NIfTI voxel data is truncated")
    voxels = np.frombuffer(data, dtype=dtype, count=count, offset=vox_offset)
    array = voxels.reshape(tuple(reversed(shape_xyz))).astype(dtype.newbyteorder("="))
    slope, intercept = struct.unpack(endian + "2f", data[112:120])
    if slope not in (0.0, 1.0) or intercept != 0.0:
        array = array.astype(np.float32) * np.float32(slope or 1.0) + np.float32(intercept)
    return Volume(array=array, affine=_read_affine(data, endian))


def _check_affine(affine: np.ndarray) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {affine.shape}")
    if not np.allclose(affine[3], [0, 0, 0, 1]):
        raise ValueError(f"affine's last row must be [0, 0, 0, 1], got {affine[3].tolist()}")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError("affine is singular (a zero spacing or collinear axes)")
    return affine


def _header(array: np.ndarray, affine: np.ndarray) -> bytes:
    shape_xyz = tuple(reversed(array.shape))
    dim = (len(shape_xyz),) + shape_xyz + (1,) * (7 - len(shape_xyz))
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    quaternion, offset, qfac = _affine_to_quaternion(affine, spacing)
    pixdim = (qfac,) + tuple(float(s) for s in spacing) + (1.0,) * 4
    header = bytearray(HEADER_SIZE)
    struct.pack_into("<i", header, 0, HEADER_SIZE)
    struct.pack_into("<8h", header, 40, *dim)
    struct.pack_into("<hh", header, 70, _CODES[array.dtype.newbyteorder("=")], array.dtype.itemsize * 8)
    struct.pack_into("<8f", header, 76, *pixdim)
    struct.pack_into("<f", header, 108, float(VOX_OFFSET))
    struct.pack_into("<2f", header, 112, 1.0, 0.0)
    header[123] = _NIFTI_UNITS_MM
    struct.pack_into("<hh", header, 252, _XFORM_SCANNER, _XFORM_SCANNER)
    struct.pack_into("<6f", header, 256, *quaternion, *offset)
    struct.pack_into("<12f", header, 280, *affine[:3, :].reshape(-1).tolist())
    header[344:348] = b"n+1\x00"
    return bytes(header)


def _affine_to_quaternion(
    affine: np.ndarray, spacing: np.ndarray
) -> Tuple[Tuple[float, float, float], Tuple[float, float, float], float]:
    """NIfTI qform (b, c, d), offset and qfac for the affine; sform stays the exact affine either way."""
    rotation = affine[:3, :3] / spacing
    qfac = 1.0
    if np.linalg.det(rotation) < 0:
        rotation[:, 2] *= -1
        qfac = -1.0
    # nearest proper rotation (the affine may be slightly sheared)
    u, _, vt = np.linalg.svd(rotation)
    rotation = u @ vt
    trace = np.trace(rotation)
    if trace > 0:
        s = 2.0 * np.sqrt(1.0 + trace)
        a = s / 4.0
        b = (rotation[2, 1] - rotation[1, 2]) / s
        c = (rotation[0, 2] - rotation[2, 0]) / s
        d = (rotation[1, 0] - rotation[0, 1]) / s
    else:
        index = int(np.argmax(np.diag(rotation)))
        i, j, k = index, (index + 1) % 3, (index + 2) % 3
        s = 2.0 * np.sqrt(1.0 + rotation[i, i] - rotation[j, j] - rotation[k, k])
        vector = [0.0, 0.0, 0.0]
        vector[i] = s / 4.0
        vector[j] = (rotation[j, i] + rotation[i, j]) / s
        vector[k] = (rotation[k, i] + rotation[i, k]) / s
        a = (rotation[k, j] - rotation[j, k]) / s
        b, c, d = vector
    if a < 0:
        b, c, d = -b, -c, -d
    offset = tuple(float(v) for v in affine[:3, 3])
    return (float(b), float(c), float(d)), offset, qfac  # type: ignore[return-value]


def _endianness(data: bytes) -> str:
    for endian in ("<", ">"):
        if struct.unpack(endian + "i", data[:4])[0] == HEADER_SIZE:
            if data[344:347] not in (b"n+1", b"ni1"):
                raise ValueError(f"not a NIfTI-1 file: magic {data[344:348]!r}")
            return endian
    raise ValueError("not a NIfTI-1 file: sizeof_hdr is not 348")


def _read_affine(data: bytes, endian: str) -> np.ndarray:
    qform_code, sform_code = struct.unpack(endian + "hh", data[252:256])
    pixdim = struct.unpack(endian + "8f", data[76:108])
    spacing = np.array([p if p > 0 else 1.0 for p in pixdim[1:4]], dtype=np.float64)
    affine = np.eye(4)
    if sform_code > 0:
        affine[:3, :] = np.array(struct.unpack(endian + "12f", data[280:328]), dtype=np.float64).reshape(3, 4)
    elif qform_code > 0:
        b, c, d, x, y, z = struct.unpack(endian + "6f", data[256:280])
        a = np.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d)))
        rotation = np.array(
            [
                [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b],
            ]
        )
        qfac = -1.0 if pixdim[0] < 0 else 1.0
        affine[:3, :3] = rotation * (spacing * np.array([1.0, 1.0, qfac]))
        affine[:3, 3] = (x, y, z)
    else:
        affine[:3, :3] = np.diag(spacing)
    return affine
