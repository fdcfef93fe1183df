"""Labels waiting for the server: saved on local disk before upload, deleted only once the server confirms.

Layout of the store folder, one submission per pair (the JSON is written last and marks it complete)::

    <folder>/<key>.nii.gz     the label file exactly as it will be uploaded
    <folder>/<key>.json       {"image_id", "tag", "params", "created", "label_file", "server_url"}

``server_url`` is the server the label was meant for: a label is only ever sent there (an image id
means nothing on another server). Records written before it existed have an empty ``server_url``.

Every write is atomic (temporary file in the same folder, then ``os.replace``), so a crash leaves either
the previous state or the complete new one.
"""

import json
import os
import tempfile
import time
import urllib.parse
from typing import Any, Callable, Dict, List, NamedTuple, Optional


class PendingSubmission(NamedTuple):
    key: str
    image_id: str
    tag: str
    params: Dict[str, Any]
    created: float
    label_path: str
    server_url: str = ""


class PendingStore:
    """Labels not yet confirmed by the server, oldest first."""

    def __init__(self, folder: str):
        self.folder = os.path.abspath(folder)
        os.makedirs(self.folder, exist_ok=True)

    def save(
        self,
        image_id: str,
        label: bytes,
        params: Optional[Dict[str, Any]] = None,
        tag: str = "final",
        server_url: str = "",
    ) -> PendingSubmission:
        if not image_id:
            raise ValueError("a pending label needs the image id it belongs to")
        if not label:
            raise ValueError(f"refusing to keep an empty label file for image {image_id!r}")
        created = time.time()
        key = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(created))}-{os.urandom(4).hex()}-" + urllib.parse.quote(
            image_id, safe=""
        )[:120]
        label_path = os.path.join(self.folder, key + ".nii.gz")
        record = {
            "image_id": image_id,
            "tag": tag,
            "params": dict(params or {}),
            "created": created,
            "label_file": os.path.basename(label_path),
            "server_url": server_url,
        }
        _atomic_write(label_path, label)
        _atomic_write(os.path.join(self.folder, key + ".json"), json.dumps(record, indent=1).encode("utf-8"))
        return PendingSubmission(key, image_id, tag, record["params"], created, label_path, server_url)

    def list(self) -> List[PendingSubmission]:
        entries = []
        for name in sorted(os.listdir(self.folder)):
            if not name.endswith(".json"):
                continue
            path = os.path.join(self.folder, name)
            with open(path, encoding="utf-8") as handle:
                record = json.load(handle)
            label_path = os.path.join(self.folder, record["label_file"])
            if not os.path.isfile(label_path):
                raise FileNotFoundError(f"pending submission {path} names a label file that is missing: {label_path}")
            entries.append(
                PendingSubmission(
                    name[: -len(".json")],
                    record["image_id"],
                    record["tag"],
                    record["params"],
                    record["created"],
                    label_path,
                    record.get("server_url", ""),
                )
            )
        return sorted(entries, key=lambda entry: entry.created)

    def read_label(self, entry: PendingSubmission) -> bytes:
        with open(entry.label_path, "rb") as handle:
            return handle.read()

    def remove(self, entry: PendingSubmission) -> None:
        """Forget a submission (call only after the server confirmed it): record first, then the label."""
        os.remove(os.path.join(self.folder, entry.key + ".json"))
        os.remove(entry.label_path)

    def discard(self, entry: PendingSubmission) -> None:
        """Drop a label the annotator no longer wants sent (the same removal as after a confirmation)."""
        self.remove(entry)

    def submit(self, entry: PendingSubmission, upload: Callable[[PendingSubmission, bytes], Dict[str, Any]]) -> Dict[str, Any]:
        """Upload one entry with ``upload(entry, label_bytes)``; remove it only if that returns without raising."""
        confirmation = upload(entry, self.read_label(entry))
        self.remove(entry)
        return confirmation


def _atomic_write(path: str, data: bytes) -> None:
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
