"""The server's own folder for temporary files: uploads, result masks, dataset archives.

MONAI Label's endpoints write every upload, result and archive into `tempfile`'s folder and name
them only by that folder. At start-up the server points `tempfile` at a private folder of its own
(`lungnlb-server-<pid>-<random>` in the system temporary folder, mode 0700), so that

* an absolute image path counts as an upload only when it lies in that folder, never because some
  other program left a file in `/tmp` (see `lib.images.resolve_image`);
* a request that fails can remove exactly its own upload (`discard`): MONAI Label only deletes
  uploads and results after a successful response;
* folders left by servers that no longer run (killed, crashed) are removed when the next one starts.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
from contextvars import ContextVar
from pathlib import Path

PREFIX = "lungnlb-server-"
_folder: Path | None = None
_lock = threading.Lock()
# set by the server's infer route while it handles a request that carried a file: only then may the
# request's image lie in the private folder, and only then is it this request's to remove
request_has_upload: ContextVar[bool] = ContextVar("lungnlb_request_has_upload", default=False)


def server_temp_dir() -> Path | None:
    """The private folder of this server process, None before `use_private_temp_dir`."""
    return _folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(base: Path) -> list[Path]:
    """Remove the private folders of servers whose process is gone; returns what was removed."""
    removed = []
    for folder in base.glob(f"{PREFIX}*"):
        match = re.match(rf"{PREFIX}(\d+)-", folder.name)
        if match and folder.is_dir() and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def use_private_temp_dir() -> Path:
    """Create this process's private folder (once) and make it `tempfile`'s folder."""
    global _folder
    with _lock:
        current = Path(tempfile.gettempdir())
        if _folder is None and current.name.startswith(f"{PREFIX}{os.getpid()}-") and current.is_dir():
            _folder = current.resolve()  # made by an earlier app instance of this process (its modules are loaded afresh)
        if _folder is None or not _folder.is_dir():
            base = Path(tempfile.gettempdir()) if _folder is None else _folder.parent
            remove_stale(base)
            _folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=base)).resolve()
        tempfile.tempdir = str(_folder)
        return _folder


def is_upload(path: str | os.PathLike) -> bool:
    """Whether `path` lies in this server's private folder (written by the server itself)."""
    return _folder is not None and Path(os.path.realpath(path)).is_relative_to(_folder)


def discard(*paths: str | os.PathLike | None) -> None:
    """Remove those of `paths` that are this server's own temporary files (others are never touched)."""
    for path in paths:
        if path and is_upload(path):
            Path(path).unlink(missing_ok=True)
