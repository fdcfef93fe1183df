"""A `LocalDatastore` that keeps label provenance and never loses an `original` label.

Rules:

* `original` labels (watershed / radiologist, written by `lungnlb prepare`) are never overwritten:
  a save with tag `original` for an image that has one is refused (409), and model output is never
  saved into the datastore by infer (it is kept as the image's latest *proposal* instead).
* Every `final` submission is kept as a version under `<studies>/.lungnlb/labels/<id>/`:
  `final_v<N>.nii.gz` and a record in `history.json` — who, when, which model (and model version)
  proposed the mask, and the Dice between that proposal and the submitted label (how much the
  annotator had to correct) and between the `original` label and the submission.
  The latest record is also the label's info (`GET /datastore/label/info?label=<id>&tag=final`).
* Uploads are checked before anything is written (see `lib.images`); files and the datastore JSON
  are written atomically (`lungnlb.io.atomic`; the datastore JSON through
  `lib.monailabel_private`, which holds every private MONAI Label member this needs). A rejected
  upload's temporary file is removed at once (MONAI Label only removes it after a success); a full
  disk answers 507 and leaves the stored files as they were.
* Unknown images and labels answer 404 (deleting, reading or updating their info); new ids and
  tags must be plain file names (`lib.images.check_new_image_id`, `check_tag`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag

from lib import monailabel_private, uploads
from lib.conf import AppConfig
from lib.errors import bad_request, conflict, insufficient_storage, not_found
from lib.images import (
    SIDECAR_INFO_KEYS,
    check_image_id,
    check_new_image_id,
    check_tag,
    header_size,
    load_image,
    load_mask,
    read_sidecar,
    study_intensity,
    write_image,
    write_mask,
)
from lungnlb.data.studies import write_sidecar
from lungnlb.io.atomic import atomic_write, atomic_write_text
from lungnlb.io.image import INTENSITY_KINDS
from lungnlb.overlap import dice

logger = logging.getLogger(__name__)
ORIGINAL = DefaultLabelTag.ORIGINAL.value
FINAL = DefaultLabelTag.FINAL.value
NIFTI_SUFFIXES = (".nii.gz", ".nii")


def atomic_copy(source: Path, destination: Path) -> None:
    """Copy `source` to `destination` so a reader sees the old file or the whole new one."""
    with source.open("rb") as stream:
        atomic_write(destination, lambda out: shutil.copyfileobj(stream, out))


def atomic_link_or_copy(source: Path, destination: Path) -> None:
    """Like `atomic_copy`, but a hard link when both lie on one file system (no data copied;
    MONAI Label only unlinks its result file after sending it, which leaves the link intact)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.parent / f".{destination.name}.{uuid.uuid4().hex}.part"
    try:
        os.link(source, tmp)
    except OSError:
        atomic_copy(source, destination)
        return
    try:
        os.replace(tmp, destination)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _commit_proposal(directory: Path, staged: Path, record: dict[str, Any]) -> None:
    """Put a staged proposal mask in place, then its record; drop a previous one in the other format."""
    os.replace(staged, directory / record["file"])
    atomic_write_text(directory / "proposal.json", json.dumps(record))
    for suffix in NIFTI_SUFFIXES:
        if "proposal" + suffix != record["file"]:
            (directory / f"proposal{suffix}").unlink(missing_ok=True)


def _log_failure(future: Future) -> None:
    if future.exception() is not None:
        logger.error("could not record a proposal: %s", future.exception())


def _suffix(filename: str) -> str:
    return next((s for s in NIFTI_SUFFIXES if filename.endswith(s)), "".join(Path(filename).suffixes))


def checked_slices(value: Any, depth: int) -> list[int]:
    """A label's `labelled_slices` (slice indices z the annotator reviewed) as sorted unique ints in
    [0, depth); 400 naming the problem otherwise."""
    if not isinstance(value, list) or not all(isinstance(z, int) and not isinstance(z, bool) for z in value):
        raise bad_request(f"labelled_slices must be a list of slice indices (integers), got {value!r}")
    outside = [z for z in value if not 0 <= z < depth]
    if outside:
        raise bad_request(f"labelled_slices {outside} lie outside the image's {depth} slice(s) (0..{depth - 1})")
    return sorted(set(value))


@contextmanager
def upload_guard(*uploads_of_request: str | os.PathLike | None):
    """Around the handling of an upload: on failure remove the request's own temporary files, and
    turn a full disk into 507 (every write is atomic, so nothing stored was changed)."""
    try:
        yield
    except BaseException as error:
        uploads.discard(*uploads_of_request)
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise insufficient_storage(f"the server's disk is full ({error.strerror}); nothing was saved") from error
        raise


def _info_object(info: Any, what: str) -> dict[str, Any]:
    if info is None:
        return {}
    if not isinstance(info, dict):
        raise bad_request(f"{what} must be a JSON object, got {type(info).__name__}")
    return info


class ProvenanceDatastore(monailabel_private.AtomicDatastoreFile, LocalDatastore):
    """LocalDatastore with checked uploads, protected `original` labels and versioned `final` labels."""

    def __init__(self, config: AppConfig, **kwargs: Any):
        self.config = config
        # proposal records are written off the request path, one at a time, in request order
        self._proposal_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lungnlb-proposals")
        for staged in (config.state_dir / "labels").glob("*/.proposal*.staged"):  # left by a server killed mid-write
            staged.unlink(missing_ok=True)
        super().__init__(str(config.studies), **kwargs)

    # ---- provenance files -------------------------------------------------------------------
    def _label_dir(self, image_id: str) -> Path:
        return self.config.state_dir / "labels" / image_id

    def history(self, image_id: str) -> list[dict[str, Any]]:
        """All `final` submissions for an image, oldest first."""
        path = self._label_dir(image_id) / "history.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []

    def record_proposal(self, image_id: str, mask_file: Path, model: str, model_version: str | None) -> None:
        """Remember the latest model proposal for an image (the mask infer returned, `.nii` or
        `.nii.gz` as written: `proposal<suffix>`, named in `proposal.json`).

        The mask is hard-linked (or copied) to a staging name now, before MONAI Label deletes its
        result file; putting it in place and writing the record (an atomic JSON write, the larger
        part of the work) happen on the proposal thread, off the request. `_proposal` waits for it.
        """
        directory = self._label_dir(image_id)
        name = "proposal" + _suffix(mask_file.name)
        staged = directory / f".{name}.{uuid.uuid4().hex}.staged"
        atomic_link_or_copy(mask_file, staged)
        record = {"model": model, "model_version": model_version, "ts": time.time(), "file": name}
        self._proposal_writer.submit(_commit_proposal, directory, staged, record).add_done_callback(_log_failure)

    def flush_proposals(self) -> None:
        """Wait until every proposal recorded so far is written (the writer runs them in order)."""
        self._proposal_writer.submit(lambda: None).result()

    def _proposal(self, image_id: str) -> tuple[dict[str, Any] | None, Path | None]:
        self.flush_proposals()
        directory = self._label_dir(image_id)
        meta = directory / "proposal.json"
        if not meta.is_file():
            return None, None
        record = json.loads(meta.read_text(encoding="utf-8"))
        return record, directory / record.get("file", "proposal.nii.gz")

    # ---- overrides --------------------------------------------------------------------------
    def get_image_info(self, image_id: str) -> dict[str, Any]:
        """MONAI Label's image info plus the study sidecar's fields (`intensity`, `source`, `case`,
        `labelled_slices`, ...; see `SIDECAR_INFO_KEYS`), so a client can pass `intensity` back.

        Also what `/activelearning/<strategy>` merges into its answer. Sidecar values are read
        fresh on every call and never written into the datastore JSON."""
        if image_id not in self.list_images():
            raise not_found(f"image id {str(image_id)[:140]!r} is not in the datastore")
        info = super().get_image_info(image_id)
        sidecar = read_sidecar(self.config, image_id)
        return {**info, **{key: sidecar[key] for key in SIDECAR_INFO_KEYS if key in sidecar}}

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        """Check the upload (readable 2D/3D CT image), store it as NIfTI under a safe, new id."""
        with upload_guard(image_filename):
            source = Path(image_filename)
            image_info = _info_object(image_info, "the upload's params")
            image_id = check_new_image_id(image_id or Path(image_filename).name.removesuffix(_suffix(image_filename)))
            if image_id in self.list_images():
                raise conflict(f"image id {image_id!r} already exists; remove it first or choose another id")
            intensity = image_info.get("intensity")
            if intensity is not None and intensity not in INTENSITY_KINDS:
                raise bad_request(f"intensity {intensity!r} is not one of {', '.join(INTENSITY_KINDS)}")
            image = load_image(source, intensity, self.config.max_image_size)
            sidecar = {"intensity": image.intensity, "source": image_info.get("source", "upload")}
            with tempfile.TemporaryDirectory() as tmp:
                stored = source if _suffix(source.name) in NIFTI_SUFFIXES else write_image(Path(tmp) / "image.nii.gz", image)
                write_sidecar(self.config.studies, image_id, sidecar)
                return super().add_image(image_id, str(stored), image_info)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        """Check and save a label; `original` is write-once, `final` is versioned with provenance."""
        with upload_guard(label_filename):
            tags = self._tags(image_id)
            check_tag(label_tag)
            if label_tag == ORIGINAL and ORIGINAL in tags:
                raise conflict(f"image {image_id!r} already has an original label; original labels are never overwritten")
            info = dict(_info_object(label_info, "the label's params"))
            image = load_image(Path(self.get_image_uri(image_id)), study_intensity(self.config, image_id))
            mask = load_mask(Path(label_filename), image)
            if "labelled_slices" in info:
                info["labelled_slices"] = checked_slices(info["labelled_slices"], 1 if mask.ndim == 2 else mask.shape[0])
            with tempfile.TemporaryDirectory() as tmp:
                label_file = write_mask(Path(tmp) / f"{image_id}.nii.gz", mask, image)
                if label_tag == FINAL:
                    info["provenance"] = self._version_final(image_id, label_file, mask, image, info)
                return self._store_label(image_id, label_file, label_tag, info)

    def _tags(self, image_id: str) -> set[str]:
        """The label tags of an image; 400 for an id that could not name one, 404 when unknown."""
        if not isinstance(image_id, str) or image_id not in self.list_images():
            check_image_id(image_id)
            raise not_found(f"image id {image_id[:140]!r} is not in the datastore")
        return set(self.get_labels_by_image_id(image_id))

    def remove_image(self, image_id: str) -> None:
        """404 for an unknown image; an image with an `original` label keeps it (409)."""
        if ORIGINAL in self._tags(image_id):
            raise conflict(f"image {image_id!r} has an original label, which is never removed")
        super().remove_image(image_id)

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        self._tags(image_id)
        super().update_image_info(image_id, _info_object(info, "image info"))

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        """404 for an unknown label; `labelled_slices` checked as at submission."""
        if not isinstance(label_tag, str) or label_tag not in self._tags(label_id):
            raise not_found(f"image {label_id!r} has no label tagged {str(label_tag)[:80]!r}")
        info = dict(_info_object(info, "label info"))
        if "labelled_slices" in info:
            size = header_size(Path(self.get_image_uri(label_id)))
            info["labelled_slices"] = checked_slices(info["labelled_slices"], size[2] if size else 1)
        super().update_label_info(label_id, label_tag, info)

    def _version_final(self, image_id: str, label_file: Path, mask, image, info: dict[str, Any]) -> dict[str, Any]:
        """Keep this submission as the next version and return its provenance record."""
        directory = self._label_dir(image_id)
        history = self.history(image_id)
        version = len(history) + 1
        proposal, proposal_file = self._proposal(image_id)
        record: dict[str, Any] = {
            "version": version,
            "user": info.get("user") or info.get("client_id") or "anonymous",
            "ts": time.time(),
            "proposed_by": info.get("model") or (proposal or {}).get("model"),
            "proposal_model_version": (proposal or {}).get("model_version"),
            "dice_proposal_vs_final": None,
            "dice_original_vs_final": None,
            "labelled_slices": info.get("labelled_slices"),
            "file": f"final_v{version}.nii.gz",
        }
        if proposal_file is not None and proposal_file.is_file():
            record["dice_proposal_vs_final"] = dice(load_mask(proposal_file, image), mask)
        original_uri = self.get_label_uri(image_id, ORIGINAL)
        if original_uri:
            record["dice_original_vs_final"] = dice(load_mask(Path(original_uri), image), mask)
        atomic_copy(label_file, directory / record["file"])
        atomic_write_text(directory / "history.json", json.dumps([*history, record], indent=2))
        return {**record, "versions": version}

    def _store_label(self, image_id: str, label_file: Path, tag: str, info: dict) -> str:
        """LocalDatastore.save_label, but the label file and the datastore JSON are replaced atomically
        (and a previous label of the tag in another format is removed)."""
        destination = monailabel_private.label_file(self, image_id, tag, ".nii.gz")
        with monailabel_private.datastore_lock(self):
            stale = self.get_label_uri(image_id, tag)
            atomic_copy(label_file, destination)
            if stale and Path(stale) != Path(os.path.realpath(destination)):
                Path(stale).unlink(missing_ok=True)
            info.update({"ts": int(time.time()), "name": destination.name})
            monailabel_private.set_label_entry(self, image_id, tag, info, ".nii.gz")
            monailabel_private.write_datastore_file(self, lock=False)
        return image_id

    def remove_label(self, label_id: str, label_tag: str) -> None:
        """Removing an `original` label is refused like overwriting it; an unknown label is 404."""
        tags = self._tags(label_id)
        if label_tag == ORIGINAL:
            raise conflict("original labels are never removed or overwritten")
        if not isinstance(label_tag, str) or label_tag not in tags:
            raise not_found(f"image {label_id!r} has no label tagged {str(label_tag)[:80]!r}")
        super().remove_label(label_id, label_tag)

    def provenance_summary(self) -> dict[str, Any]:
        """Counts and mean correction effort over the latest `final` submission of every image."""
        provenance = (self.get_label_info(image_id, FINAL).get("provenance") for image_id in self.get_labeled_images())
        records = [record for record in provenance if record]
        dices = [r["dice_proposal_vs_final"] for r in records if r.get("dice_proposal_vs_final") is not None]
        return {
            "final_labels_with_provenance": len(records),
            "submissions": sum(r.get("versions", 1) for r in records),
            "mean_dice_proposal_vs_final": sum(dices) / len(dices) if dices else None,
        }
