"""A small LRU cache of decoded datastore images, so that repeated infer requests on the same
image skip decompressing and decoding its file.

An entry is keyed by the file's identity and state as `os.stat` reports it,

    (real path, inode, size, mtime_ns, ctime_ns, intensity)

so a file that is rewritten in place or replaced (`os.replace` gives a new inode) is read again,
never served stale. Only regular files are cached (a DICOM series folder's own stat does not
change when a slice in it does). Cached arrays are made read-only: a caller that tried to modify
the shared array would fail loudly instead of corrupting later requests. The cache holds at most
`max_bytes` of voxel data; the least recently used images are dropped first and an image larger
than the whole bound is not cached.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable

from lungnlb.io import ImageData

CacheKey = tuple[str, int, int, int, int, str | None]


def file_key(path: Path, intensity: str | None) -> CacheKey | None:
    """The cache key of a regular file in its current state, None for anything else."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    if not os.path.isfile(path):
        return None
    return (os.path.realpath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, intensity)


class ImageCache:
    """Thread-safe LRU cache of `ImageData` bounded by the total bytes of the cached arrays."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[CacheKey, ImageData] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, path: Path, intensity: str | None, load: Callable[[Path, str | None], ImageData]) -> ImageData:
        """The image at `path` read as `intensity`: from the cache while the file is unchanged,
        else `load(path, intensity)` (its errors propagate; nothing is cached then)."""
        key = file_key(path, intensity) if self.max_bytes > 0 else None
        if key is None:
            return load(path, intensity)
        with self._lock:
            image = self._entries.get(key)
            if image is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return image
            self.misses += 1
        image = load(path, intensity)
        image.array.setflags(write=False)
        self._put(key, image)
        return image

    def _put(self, key: CacheKey, image: ImageData) -> None:
        size = image.array.nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            stale = [k for k in self._entries if k[0] == key[0] and k[5] == key[5]]  # older states of the file
            for old in stale:
                self._bytes -= self._entries.pop(old).array.nbytes
            self._entries[key] = image
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= dropped.array.nbytes

    def __len__(self) -> int:
        return len(self._entries)
