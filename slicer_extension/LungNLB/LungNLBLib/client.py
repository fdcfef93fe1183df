"""HTTP client for a MONAI Label server (monailabel 0.8.5 REST API), standard library only.

Endpoints used (paths, parameters and bodies as the server's FastAPI routes define them):

    GET  /info/                                   app info: models, trainers, strategies
    POST /activelearning/{strategy}               JSON body = params; answers {} or the sample's info
    GET  /datastore/?output=all                   every image with its labels
    GET  /datastore/image?image=ID                the image file
    GET  /datastore/label?label=ID&tag=TAG        a label file
    PUT  /datastore/label?image=ID&tag=TAG        multipart: params (JSON text), label (file)
    POST /infer/{model}?image=ID                  multipart: params (JSON text), optional file / label;
                                                  answers multipart (params + image) or JSON
    POST /train/{model}                           JSON body = params; 429-style refusal when busy
    GET  /train/                                  the latest train task; 404 when there is none
    DELETE /train/                                stop training
"""

import json
import socket
import urllib.error
import urllib.parse
import urllib.request
from http.client import HTTPException
from typing import Any, Dict, NamedTuple, Optional, Tuple

from .errors import (
    InvalidResponseError,
    RequestRejectedError,
    ServerTimeoutError,
    ServerUnavailableError,
    format_detail,
    response_error,
)
from .multipart import FilePart, decode_multipart, encode_multipart, parse_header_parameters


class Response(NamedTuple):
    status: int
    content_type: str
    content_disposition: str
    body: bytes


class InferResult(NamedTuple):
    """What an infer call returns: the task's JSON params and, when the task made one, the result file."""

    params: Dict[str, Any]
    image: Optional[bytes]
    filename: Optional[str]


class MonaiLabelClient:
    """Talks to one MONAI Label server; every failure is raised as a ``LungNLBLib.errors.ClientError``.

    ``timeout`` (seconds) bounds quick calls (info, datastore, submit); ``infer_timeout`` bounds inference.
    """

    def __init__(self, server_url: str, timeout: float = 30.0, infer_timeout: float = 600.0, client_id: str = ""):
        parsed = urllib.parse.urlparse(server_url.strip())
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"server URL must look like http://host:port, got {server_url!r}")
        if timeout <= 0 or infer_timeout <= 0:
            raise ValueError(f"timeouts must be positive, got {timeout} and {infer_timeout}")
        self.server_url = server_url.strip().rstrip("/")
        self.timeout = timeout
        self.infer_timeout = infer_timeout
        self.client_id = client_id

    # -- app and active learning ---------------------------------------------------------------------------

    def info(self) -> Dict[str, Any]:
        """The app's info: ``name``, ``models``, ``trainers``, ``strategies``, ``labels``, ``datastore``."""
        return self._json(self._request("GET", "/info/"))

    def next_sample(self, strategy: str, params: Optional[Dict[str, Any]] = None) -> Optional[Dict[str, Any]]:
        """The image the strategy picks next (its info, with ``id``), or None when nothing is left to label."""
        body = dict(params or {})
        if self.client_id:
            body.setdefault("client_id", self.client_id)
        result = self._json(self._request("POST", f"/activelearning/{_segment(strategy)}", json_body=body))
        return result if result else None

    # -- datastore ------------------------------------------------------------------------------------------

    def datastore(self) -> Dict[str, Any]:
        """Every image in the datastore with its labels (``output=all``)."""
        return self._json(self._request("GET", "/datastore/", query={"output": "all"}))

    def download_image(self, image_id: str) -> Tuple[bytes, str]:
        """The image file's bytes and its file name (which tells its format, e.g. ``.nii.gz``)."""
        response = self._request("GET", "/datastore/image", query={"image": image_id})
        return response.body, _filename_of(response, f"{image_id}.nii.gz")

    def download_label(self, image_id: str, tag: str = "original") -> bytes:
        """A label file's bytes; RequestRejectedError (404) when the image has no label with that tag."""
        return self._request("GET", "/datastore/label", query={"label": image_id, "tag": tag}).body

    def save_label(
        self,
        image_id: str,
        label: bytes,
        tag: str = "final",
        params: Optional[Dict[str, Any]] = None,
        filename: str = "label.nii.gz",
    ) -> Dict[str, Any]:
        """Upload a label for an image (``PUT /datastore/label``); returns the server's confirmation."""
        if not label:
            raise ValueError("label file is empty")
        fields = {"params": json.dumps(params or {})}
        files = {"label": FilePart(filename, label)}
        response = self._request(
            "PUT", "/datastore/label", query={"image": image_id, "tag": tag}, multipart=(fields, files)
        )
        return self._json(response)

    # -- inference ------------------------------------------------------------------------------------------

    def infer(
        self,
        model: str,
        image_id: str = "",
        params: Optional[Dict[str, Any]] = None,
        file: Optional[FilePart] = None,
        label: Optional[FilePart] = None,
    ) -> InferResult:
        """Run an infer task on a datastore image (``image_id``) or on an uploaded ``file``."""
        if not image_id and file is None:
            raise ValueError("infer needs an image id or an image file to upload")
        fields = {"params": json.dumps(params or {})}
        files: Dict[str, FilePart] = {}
        if file is not None:
            files["file"] = file
        if label is not None:
            files["label"] = label
        query = {"image": image_id} if image_id else {}
        response = self._request(
            "POST", f"/infer/{_segment(model)}", query=query, multipart=(fields, files), timeout=self.infer_timeout
        )
        return _infer_result(response)

    # -- training -------------------------------------------------------------------------------------------

    def train_start(self, model: str, params: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Start training ``model`` in the background; RequestRejectedError when a training is already running."""
        return self._json(self._request("POST", f"/train/{_segment(model)}", json_body=dict(params or {})))

    def train_status(self, check_if_running: bool = False) -> Optional[Dict[str, Any]]:
        """The latest train task (``status``: RUNNING / DONE / ERROR, ``details``), None when there is none."""
        query = {"check_if_running": "true"} if check_if_running else {}
        try:
            return self._json(self._request("GET", "/train/", query=query))
        except RequestRejectedError as error:
            if error.status == 404:
                return None
            raise

    def train_stop(self) -> Dict[str, Any]:
        return self._json(self._request("DELETE", "/train/"))

    # -- transport ------------------------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        query: Optional[Dict[str, str]] = None,
        json_body: Optional[Dict[str, Any]] = None,
        multipart: Optional[Tuple[Dict[str, str], Dict[str, FilePart]]] = None,
        timeout: Optional[float] = None,
    ) -> Response:
        url = self.server_url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        headers = {"Accept": "application/json, multipart/form-data, */*"}
        data = None
        if json_body is not None:
            data = json.dumps(json_body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        elif multipart is not None:
            data, headers["Content-Type"] = encode_multipart(*multipart)
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        limit = timeout if timeout is not None else self.timeout
        try:
            with urllib.request.urlopen(request, timeout=limit) as reply:
                headers = reply.headers
                return Response(
                    reply.status,
                    headers.get("Content-Type", ""),
                    headers.get("Content-Disposition", ""),
                    reply.read(),
                )
        except urllib.error.HTTPError as error:
            body = _read_quietly(error)
            raise response_error(error.code, _error_detail(body, error.reason), method, url) from None
        except urllib.error.URLError as error:
            if isinstance(error.reason, socket.timeout):
                raise _timeout(method, url, limit) from None
            raise ServerUnavailableError(
                f"cannot reach the MONAI Label server at {self.server_url} ({error.reason}); is it running?"
            ) from None
        except socket.timeout:
            raise _timeout(method, url, limit) from None
        except (ConnectionError, HTTPException) as error:
            raise ServerUnavailableError(
                f"the MONAI Label server at {self.server_url} dropped the connection during {method} {path} "
                f"({error.__class__.__name__}: {error})"
            ) from None

    @staticmethod
    def _json(response: Response) -> Any:
        try:
            return json.loads(response.body.decode("utf-8")) if response.body else {}
        except ValueError:
            raise InvalidResponseError(
                f"expected JSON from the server, got {response.content_type or 'no content type'} "
                f"({len(response.body)} bytes)"
            ) from None


def _segment(name: str) -> str:
    if not name or "/" in name:
        raise ValueError(f"invalid model or strategy name {name!r}")
    return urllib.parse.quote(name, safe="")


def _timeout(method: str, url: str, limit: float) -> ServerTimeoutError:
    return ServerTimeoutError(f"the server did not answer {method} {url} within {limit:g} s")


def _read_quietly(error: urllib.error.HTTPError) -> bytes:
    try:
        return error.read() or b""
    except (OSError, HTTPException):
        return b""


def _error_detail(body: bytes, reason: object) -> str:
    text = body.decode("utf-8", errors="replace").strip()
    try:
        return format_detail(json.loads(text), fallback=str(reason))
    except ValueError:
        return text[:500] or str(reason)


def _filename_of(response: Response, fallback: str) -> str:
    """The file name a download announces in its Content-Disposition header (no directories), else fallback."""
    _, params = parse_header_parameters(response.content_disposition)
    name = params.get("filename", "").replace("\\", "/").rsplit("/", 1)[-1]
    return name or fallback


def _infer_result(response: Response) -> InferResult:
    if response.content_type.lower().startswith("multipart/"):
        try:
            parts = decode_multipart(response.body, response.content_type)
        except ValueError as error:
            raise InvalidResponseError(f"cannot decode the server's multipart answer: {error}") from None
        params: Dict[str, Any] = {}
        image: Optional[bytes] = None
        filename: Optional[str] = None
        for part in parts:
            if part.name == "params":
                params = json.loads(part.text() or "{}")
            elif part.filename is not None or part.name == "image":
                image, filename = part.content, part.filename
        return InferResult(params if isinstance(params, dict) else {"result": params}, image, filename)
    if "json" in response.content_type.lower():
        payload = MonaiLabelClient._json(response)
        return InferResult(payload if isinstance(payload, dict) else {"result": payload}, None, None)
    return InferResult({}, response.body, None)
