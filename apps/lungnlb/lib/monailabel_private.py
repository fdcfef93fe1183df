"""The one place the app touches private members of MONAI Label (and of the Starlette app it serves).

Checked against monailabel 0.8.5 (with the FastAPI / Starlette versions it pins). MONAI Label offers
no public way to do any of these; on an upgrade, check each name below against the new release.

MONAILabelApp
  `_infers`, `_trainers`, `_strategies`   the task dicts MONAI Label keeps after its settings switched
                                          some off (`MONAI_LABEL_TASKS_TRAIN`, `..._STRATEGY`): the app
                                          answers 404 naming the available ones, and finds the task to
                                          check a request against, before MONAI Label would answer 500.
                                          Only `info()` lists them, and it builds every task's info.
                                          -> `infer_tasks`, `train_tasks`, `strategies`

LocalDatastore (ProvenanceDatastore writes labels and the datastore JSON atomically, which MONAI
Label's `save_label` and `_update_datastore_file` do not: a reader could see half a file)
  `_datastore.label_path(tag)`, `_filename`  where a label of a tag is stored -> `label_file`
  `_lock_file`                          the lock MONAI Label holds while it changes files and the
                                        datastore JSON together -> `datastore_lock`
  `_datastore.objects[id].labels[tag]`  the label's entry, set without MONAI Label's non-atomic copy
                                        -> `set_label_entry`
  `_update_datastore_file`              overridden (`AtomicDatastoreFile`) so that MONAI Label's own
                                        writes of the datastore JSON (add_image, update_*_info,
                                        refresh) are atomic too; it reads `_datastore.model_dump`,
                                        `_datastore_config_path`, sets `_ignore_event_config` (the file
                                        watcher skips this write) and `_config_ts` (the next reload
                                        check does not read it back) -> `write_datastore_file`

Starlette (`monailabel.app.app`)
  `user_middleware`, `middleware_stack`  middleware can be added only before the first request
                                        (`add_middleware` raises after), and the app is built after
                                        that point: the list is replaced and the stack dropped, to be
                                        built again by Starlette on the next request
                                        -> `installed_middleware`, `replace_middleware`
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from filelock import FileLock
from monailabel.datastore.local import DataModel

from lungnlb.io.atomic import atomic_write_text


# ---- MONAILabelApp -------------------------------------------------------------------------
def infer_tasks(app) -> dict[str, Any]:
    """The app's infer tasks by model name."""
    return app._infers


def train_tasks(app) -> dict[str, Any]:
    """The app's train tasks by model name (empty when MONAI Label's settings switch training off)."""
    return app._trainers


def strategies(app) -> dict[str, Any]:
    """The app's active-learning strategies by name (empty when switched off)."""
    return app._strategies


# ---- LocalDatastore ------------------------------------------------------------------------
def label_file(datastore, image_id: str, tag: str, ext: str) -> Path:
    """Where the label of `image_id` under `tag` with suffix `ext` is stored (it may not exist)."""
    return Path(datastore._datastore.label_path(tag)) / datastore._filename(image_id, ext)


def datastore_lock(datastore) -> FileLock:
    """The datastore's own file lock (as MONAI Label takes it around its writes)."""
    return FileLock(datastore._lock_file)


def set_label_entry(datastore, image_id: str, tag: str, info: dict[str, Any], ext: str) -> None:
    """Record a label file already in place as the image's label under `tag` (in memory; see
    `write_datastore_file`)."""
    datastore._datastore.objects[image_id].labels[tag] = DataModel(info=info, ext=ext)


def write_datastore_file(datastore, lock: bool = True) -> None:
    """Write the datastore JSON atomically, under the datastore's lock unless the caller holds it."""
    text = json.dumps(datastore._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)

    def write() -> None:
        datastore._ignore_event_config = True
        atomic_write_text(datastore._datastore_config_path, text)
        datastore._config_ts = os.stat(datastore._datastore_config_path).st_mtime

    if lock:
        with datastore_lock(datastore):
            write()
    else:
        write()


class AtomicDatastoreFile:
    """Mixin before `LocalDatastore`: every write of the datastore JSON goes through `write_datastore_file`."""

    def _update_datastore_file(self, lock: bool = True) -> None:
        write_datastore_file(self, lock)


# ---- Starlette -----------------------------------------------------------------------------
def installed_middleware(fastapi_app) -> list:
    """The middleware the app serves (outermost first)."""
    return list(fastapi_app.user_middleware)


def replace_middleware(fastapi_app, middleware: list) -> None:
    """Serve `middleware` (outermost first) from the next request on, after the app has started."""
    fastapi_app.user_middleware = middleware
    fastapi_app.middleware_stack = None
