"""PNG/JPEG 8-bit slices (IQ-OTH/NCCD style) -> `ImageData` with intensity ``"windowed8bit"``.

These images were windowed to 0..255 by their publisher: they carry no HU and no geometry. The
affine is the standard axial orientation with 1 mm pixels (`axial_affine`), and
``meta["spacing_known"]`` is False.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from lungnlb.io.image import ImageData, ImageReadError, axial_affine

RASTER_SUFFIXES = {".png", ".jpg", ".jpeg"}


def read_raster(path: str | Path) -> ImageData:
    """An 8-bit greyscale (or grey-as-RGB) PNG/JPEG -> 2D float32 `ImageData` in 0..255."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            grey = np.asarray(image.convert("L"), dtype=np.float32)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ImageReadError(path, f"unreadable or corrupt image file ({type(error).__name__}: {error})") from error
    if mode not in ("L", "RGB", "RGBA", "P", "LA"):
        raise ImageReadError(path, f"unsupported image mode {mode!r}: expected 8-bit greyscale")
    meta = {"source_files": [str(path)], "spacing_known": False, "image_mode": mode}
    return ImageData(grey, axial_affine((1.0, 1.0)), "windowed8bit", meta)
