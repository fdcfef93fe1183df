"""The annotation workflow without Slicer: arrays and affines in, arrays and probability tables out.

The Slicer module converts nodes to ``Volume`` s (``(Z, Y, X)`` array + voxel-to-RAS affine) and back;
everything else happens here, so the same loop runs under Slicer's Python and in the project's tests:

    connect -> next sample -> segment a slice / the volume -> watershed from a box or clicks
    -> edit -> submit (kept locally until the server confirms) -> train -> segment with the new weights
"""

import urllib.parse
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from .client import MonaiLabelClient
from .errors import ClientError, InvalidResponseError
from .geometry import as_volume, extract_slice
from .multipart import FilePart
from .nifti import Volume, read_nifti_bytes, write_nifti_bytes
from .pending import PendingStore, PendingSubmission
from .probability import SliceProbability, probability_table

SEGMENTATION_MODEL = "lung_nlb_seg"
WATERSHED_MODEL = "lung_watershed"
DEFAULT_STRATEGY = "disagreement"


class ServerSummary(NamedTuple):
    name: str
    models: List[str]  # infer tasks available now (lung_nlb_seg is listed only once weights exist)
    trainers: List[str]
    strategies: List[str]
    train_status: Optional[Dict[str, Any]]
    info: Dict[str, Any]


class Sample(NamedTuple):
    image_id: str
    image: Volume
    original_label: Optional[Volume]  # the `original` (watershed or radiologist) label, if the image has one
    info: Dict[str, Any]  # the server's image info (and, for a picked sample, the strategy's fields)


class SampleFiles(NamedTuple):
    """A sample as the server sent it, not decoded: the Slicer module hands the files to Slicer's readers."""

    image_id: str
    image_data: bytes
    image_filename: str
    label_data: Optional[bytes]  # the `original` label file, None when the image has none
    info: Dict[str, Any]


class Segmentation(NamedTuple):
    mask: np.ndarray  # bool, (Y, X) for one slice or the image's own shape for the whole image
    rows: List[SliceProbability]  # tumour probability per slice (z in the image's indexing)
    params: Dict[str, Any]  # the server's result JSON (model_version, threshold, ...)


class SubmissionPending(ClientError):
    """The label could not be submitted; it is kept in the local pending store (``entry``)."""

    def __init__(self, entry: PendingSubmission, cause: ClientError):
        self.entry = entry
        self.cause = cause
        super().__init__(f"{cause}. The label is kept locally in {entry.label_path} and will be sent again.")


class AnnotationSession:
    """One annotator's session with a MONAI Label server running the LungNLB app."""

    def __init__(self, client: MonaiLabelClient, annotator: str, pending_folder: str):
        if not annotator.strip():
            raise ValueError("annotator name is empty: labels are submitted with the annotator's name")
        self.client = client
        self.annotator = annotator.strip()
        self.pending = PendingStore(pending_folder)

    def connect(self) -> ServerSummary:
        info = self.client.info()
        strategies = info.get("strategies", {})
        return ServerSummary(
            name=str(info.get("name", "")),
            models=sorted(info.get("models", {})),
            trainers=sorted(info.get("trainers", {})),
            strategies=list(strategies),
            train_status=self.client.train_status(),
            info=info,
        )

    # -- images ---------------------------------------------------------------------------------------------

    @property
    def server_url(self) -> str:
        return self.client.server_url

    def pick_sample(self, strategy: str = DEFAULT_STRATEGY) -> Optional[Dict[str, Any]]:
        """The image info the strategy picks next (with ``id``), None when nothing is left to label."""
        picked = self.client.next_sample(strategy, {"client_id": self.annotator})
        if picked is None:
            return None
        if "id" not in picked:
            raise InvalidResponseError(f"the active-learning answer has no image id: {sorted(picked)}")
        return picked

    def next_sample(self, strategy: str = DEFAULT_STRATEGY) -> Optional[Sample]:
        """The image the strategy picks next with its `original` label, or None when nothing is left."""
        picked = self.pick_sample(strategy)
        return None if picked is None else self.load_sample(str(picked["id"]), picked)

    def download_sample(self, image_id: str, info: Optional[Dict[str, Any]] = None) -> SampleFiles:
        """The image file and its `original` label file (None when it has none), as downloaded."""
        data, filename = self.client.download_image(image_id)
        if not data:
            raise InvalidResponseError(f"the server sent an empty file for image {image_id}")
        labels = (info or {}).get("labels", {})
        original = None
        if not labels or "original" in labels:
            try:
                original = self.client.download_label(image_id, "original") or None
            except ClientError as error:
                if getattr(error, "status", None) != 404:
                    raise
        return SampleFiles(image_id, data, filename, original, dict(info or {}))

    def load_sample(self, image_id: str, info: Optional[Dict[str, Any]] = None) -> Sample:
        files = self.download_sample(image_id, info)
        image = _read_result(files.image_data, files.image_filename, f"image {image_id}")
        original = _read_result(files.label_data, "label", f"label of {image_id}") if files.label_data else None
        return Sample(image_id, image, original, files.info)

    # -- inference ------------------------------------------------------------------------------------------

    def segment_slice(self, sample: Sample, z: int) -> Segmentation:
        """Send only slice ``z`` (a 2D NIfTI with its own geometry); the mask comes back for that slice."""
        piece = extract_slice(sample.image, z)
        result = self.client.infer(SEGMENTATION_MODEL, params=self._intensity(sample), file=_nifti_part(piece, "slice"))
        mask = as_volume(_read_result(result.image, result.filename, "segmentation").array)[0] > 0
        rows = probability_table(result.params.get("slice_probabilities", [])[:1], first_slice=z)
        return Segmentation(mask, rows, result.params)

    def segment_volume(self, sample: Sample) -> Segmentation:
        """Segment the whole image on the server (by its id); one probability row per slice."""
        result = self.client.infer(SEGMENTATION_MODEL, image_id=sample.image_id, params=self._intensity(sample))
        mask = _read_result(result.image, result.filename, "segmentation").array > 0
        mask = mask.reshape(sample.image.array.shape) if mask.size == sample.image.array.size else mask
        if mask.shape != sample.image.array.shape:
            raise InvalidResponseError(f"the mask's shape {mask.shape} is not the image's {sample.image.array.shape}")
        rows = probability_table(result.params.get("slice_probabilities", []), mask)
        return Segmentation(mask, rows, result.params)

    def attention_slice(self, sample: Sample, z: int) -> np.ndarray:
        """The mean non-local-block attention heat map ``(Y, X)`` of slice ``z`` (only that slice is sent)."""
        piece = extract_slice(sample.image, z)
        params = dict(self._intensity(sample), attention=True, slice=0)
        result = self.client.infer(SEGMENTATION_MODEL, params=params, file=_nifti_part(piece, "slice"))
        return as_volume(_read_result(result.image, result.filename, "attention map").array)[0].astype(np.float32)

    def watershed_box(self, sample: Sample, box: Sequence[int], z: int) -> np.ndarray:
        """Watershed mask ``(Y, X)`` of slice ``z`` from an inclusive pixel box ``[x_min, y_min, x_max, y_max]``."""
        if len(box) != 4:
            raise ValueError(f"a box is [x_min, y_min, x_max, y_max], got {list(box)}")
        return self._watershed(sample, {"box": [int(v) for v in box], "slice": int(z)}, z)

    def watershed_points(
        self, sample: Sample, foreground: Sequence[Sequence[int]], background: Sequence[Sequence[int]], z: int
    ) -> np.ndarray:
        """Watershed mask ``(Y, X)`` of slice ``z`` from pixel clicks ``[[x, y], ...]`` inside / outside the nodule."""
        if not foreground:
            raise ValueError("place at least one point inside the nodule")
        params = {
            "foreground": [[int(x), int(y)] for x, y in foreground],
            "background": [[int(x), int(y)] for x, y in background],
            "slice": int(z),
        }
        return self._watershed(sample, params, z)

    def _watershed(self, sample: Sample, params: Dict[str, Any], z: int) -> np.ndarray:
        result = self.client.infer(WATERSHED_MODEL, image_id=sample.image_id, params=params)
        mask = as_volume(_read_result(result.image, result.filename, "watershed mask").array)
        return mask[z if mask.shape[0] > 1 else 0] > 0

    @staticmethod
    def _intensity(sample: Sample) -> Dict[str, Any]:
        """The image's intensity kind when the server's image info records it (an upload has no sidecar)."""
        meta = sample.info.get("meta")
        intensity = sample.info.get("intensity") or (meta.get("intensity") if isinstance(meta, dict) else None)
        return {"intensity": intensity} if intensity else {}

    # -- submission and training ----------------------------------------------------------------------------

    def submit(self, sample: Sample, mask: np.ndarray, labelled_slices: Optional[Sequence[int]] = None) -> Dict[str, Any]:
        """Save the label locally, upload it as the `final` label with the annotator's name, then forget the copy.

        ``labelled_slices``: the slices the annotator reviewed (default: every slice). On failure the
        local copy stays and SubmissionPending (a ClientError) says where it is.
        """
        mask = np.asarray(mask)
        if mask.size != sample.image.array.size:
            raise ValueError(f"mask of shape {mask.shape} does not fit image {sample.image_id} of shape {sample.image.array.shape}")
        mask = mask.reshape(sample.image.array.shape)
        depth = as_volume(mask).shape[0]
        slices = sorted({int(z) for z in (labelled_slices if labelled_slices is not None else range(depth))})
        if any(not 0 <= z < depth for z in slices):
            raise ValueError(f"labelled slices {slices} are outside the image's {depth} slices")
        params = {"user": self.annotator, "client": "LungNLB 3D Slicer", "labelled_slices": slices}
        label = write_nifti_bytes((mask > 0).astype(np.uint8), sample.image.affine)
        entry = self.pending.save(sample.image_id, label, params, tag="final", server_url=self.server_url)
        return self._upload(entry)

    def pending_here(self) -> List[PendingSubmission]:
        """Labels kept locally that were meant for this session's server."""
        return [entry for entry in self.pending.list() if same_server(entry.server_url, self.server_url)]

    def pending_elsewhere(self) -> List[PendingSubmission]:
        """Labels kept locally for other servers (or, from older versions, for a server not recorded)."""
        return [entry for entry in self.pending.list() if not same_server(entry.server_url, self.server_url)]

    def submit_pending(self) -> Tuple[List[Dict[str, Any]], List[str]]:
        """Retry every label kept locally for this server: (confirmations, error messages of those still pending).

        Labels meant for another server are left alone: an image id names a different image (or none)
        on another server. Switch back to that server to send them, or discard them.
        """
        done, errors = [], []
        for entry in self.pending_here():
            try:
                done.append(self._upload(entry))
            except SubmissionPending as error:
                errors.append(f"{entry.image_id}: {error.cause}")
        return done, errors

    def _upload(self, entry: PendingSubmission) -> Dict[str, Any]:
        def upload(item: PendingSubmission, data: bytes) -> Dict[str, Any]:
            return self.client.save_label(item.image_id, data, tag=item.tag, params=item.params)

        try:
            return self.pending.submit(entry, upload)
        except ClientError as error:
            raise SubmissionPending(entry, error) from None

    def start_training(self, params: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        return self.client.train_start(SEGMENTATION_MODEL, params)

    def training_status(self) -> Optional[Dict[str, Any]]:
        return self.client.train_status()

    def stop_training(self) -> Dict[str, Any]:
        return self.client.train_stop()


def same_server(a: str, b: str) -> bool:
    """Whether two server URLs name the same server (case of scheme and host, trailing slash ignored)."""
    if not a or not b:
        return False

    def norm(url: str) -> str:
        parts = urllib.parse.urlsplit(url.strip().rstrip("/"))
        return urllib.parse.urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path, "", ""))

    return norm(a) == norm(b)


FINISHED_TRAIN_STATES = ("DONE", "ERROR", "STOPPED")


def training_active(status: Optional[Dict[str, Any]]) -> bool:
    """Whether the latest train task is still queued or running (MONAI Label: SUBMITTED -> RUNNING -> DONE/ERROR)."""
    return bool(status) and str(status.get("status", "")).upper() not in FINISHED_TRAIN_STATES


def describe_training(status: Optional[Dict[str, Any]]) -> str:
    """One line for the panel: the latest train task's state and its last log line."""
    if not status:
        return "no training has run on this server yet"
    state = str(status.get("status", "unknown"))
    details = status.get("details") or []
    last = str(details[-1]).strip() if isinstance(details, list) and details else ""
    return f"{state}: {last}" if last else state


def _nifti_part(volume: Volume, stem: str) -> FilePart:
    return FilePart(f"{stem}.nii.gz", write_nifti_bytes(volume.array, volume.affine), "application/gzip")


def _read_result(data: Optional[bytes], filename: Optional[str], what: str) -> Volume:
    if not data:
        raise InvalidResponseError(f"the server sent no {what} file")
    name = (filename or "").lower()
    if name and not name.endswith((".nii", ".nii.gz")) and data[:2] != b"\x1f\x8b":
        raise InvalidResponseError(f"the {what} came as {filename}; this client reads NIfTI only")
    try:
        return read_nifti_bytes(data)
    except ValueError as error:
        raise InvalidResponseError(f"cannot read the {what} the server sent: {error}") from None
