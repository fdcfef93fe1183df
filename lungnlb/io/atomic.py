"""The one atomic write: a reader of ``path`` sees the old file or the new one, never half of one.

The content goes to a uniquely named temporary file beside ``path`` (created exclusively, 0666 minus
the umask, as a plain ``open`` would: ``mkstemp``'s 0600 would hide models and labels from other
users), is flushed and fsync'ed, then moved into place with ``os.replace``. On any error the
temporary file is removed and ``path`` is untouched.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(binary_stream)`` on a temporary file beside ``path``, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    handle = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda stream: stream.write(text.encode("utf-8")))
