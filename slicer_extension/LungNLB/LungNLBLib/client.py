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

import base64
import ipaddress
import json
import os
import socket
import ssl
import threading
import urllib.error
import urllib.parse
import urllib.request
from http.client import HTTPException
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

from .errors import (
    AuthenticationError,
    InvalidResponseError,
    RequestCancelled,
    TLSError,
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


CHUNK = 1 << 20  # bytes read between two looks at the cancel flag and two progress reports


class Credentials(NamedTuple):
    """How to log in: HTTP basic auth (``username`` + ``password``) or a bearer ``token``; empty means none."""

    username: str = ""
    password: str = ""
    token: str = ""

    def header(self) -> Optional[str]:
        if self.token:
            return "Bearer " + self.token
        if self.username:
            pair = f"{self.username}:{self.password}".encode("utf-8")
            return "Basic " + base64.b64encode(pair).decode("ascii")
        return None


class MonaiLabelClient:
    """Talks to one MONAI Label server; every failure is raised as a ``LungNLBLib.errors.ClientError``.

    ``timeout`` (seconds) bounds quick calls (info, datastore, submit); ``infer_timeout`` bounds inference.
    ``credentials`` are sent only over https or to this machine (a password in clear over the network
    would be readable by anyone on the path). ``ca_bundle``: a PEM file of the CA(s) that signed an
    https server's certificate (an organisation's internal CA); the system's CAs otherwise. Certificates
    are always verified. Redirects are followed only within the same scheme, host and port: the request
    (with its credentials) never goes to another server or from https to http. ``cancel``: an Event that stops a running request between two chunks (the
    worker thread then raises RequestCancelled); ``progress(done_bytes, total_bytes_or_None)`` is called
    while an answer downloads.
    """

    def __init__(
        self,
        server_url: str,
        timeout: float = 30.0,
        infer_timeout: float = 600.0,
        client_id: str = "",
        credentials: Optional[Credentials] = None,
        ca_bundle: str = "",
    ):
        parsed = urllib.parse.urlparse(server_url.strip())
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"server URL must look like http://host:port, got {server_url!r}")
        if timeout <= 0 or infer_timeout <= 0:
            raise ValueError(f"timeouts must be positive, got {timeout} and {infer_timeout}")
        self.credentials = credentials or Credentials()
        if self.credentials.header() and parsed.scheme != "https" and not _is_loopback(parsed.hostname or ""):
            raise ValueError(
                f"credentials would travel unencrypted to {parsed.hostname}; use an https:// server URL"
            )
        if ca_bundle and not os.path.isfile(ca_bundle):
            raise ValueError(f"the CA bundle {ca_bundle!r} is not a file")
        self.server_url = server_url.strip().rstrip("/")
        self.timeout = timeout
        self.infer_timeout = infer_timeout
        self.client_id = client_id
        self.ca_bundle = ca_bundle
        self._ssl = ssl.create_default_context(cafile=ca_bundle or None) if parsed.scheme == "https" else None
        handlers = [_SameOriginRedirects()] + ([urllib.request.HTTPSHandler(context=self._ssl)] if self._ssl else [])
        self._opener = urllib.request.build_opener(*handlers)
        self.cancel = threading.Event()
        self.progress: Optional[Callable[[int, Optional[int]], None]] = None

    def copy(self) -> "MonaiLabelClient":
        """The same server and settings with its own cancel flag (for a second request in parallel, e.g. a poll)."""
        return MonaiLabelClient(
            self.server_url, self.timeout, self.infer_timeout, self.client_id, self.credentials, self.ca_bundle
        )

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
        authorization = self.credentials.header()
        if authorization:
            headers["Authorization"] = authorization
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        limit = timeout if timeout is not None else self.timeout
        cancel, progress = self.cancel, self.progress  # this request's own, even if a later task replaces them
        if cancel.is_set():
            raise RequestCancelled(f"{method} {path} was cancelled")
        try:
            with self._opener.open(request, timeout=limit) as reply:
                headers = reply.headers
                return Response(
                    reply.status,
                    headers.get("Content-Type", ""),
                    headers.get("Content-Disposition", ""),
                    _read_body(reply, method, path, cancel, progress),
                )
        except urllib.error.HTTPError as error:
            body = _read_quietly(error)
            detail = _error_detail(body, error.reason)
            if error.code in (401, 407):
                raise AuthenticationError(
                    f"the server at {self.server_url} refused the login (HTTP {error.code}: {detail}); "
                    + ("check the user name and password or the token in Server settings"
                       if authorization else "it needs a user name and password or a token (Server settings)")
                ) from None
            raise response_error(error.code, detail, method, url) from None
        except urllib.error.URLError as error:
            if isinstance(error.reason, socket.timeout):
                raise _timeout(method, url, limit) from None
            if isinstance(error.reason, ssl.SSLCertVerificationError):
                raise TLSError(
                    f"cannot verify the TLS certificate of {self.server_url} ({error.reason.verify_message}); "
                    + (f"the CA bundle {self.ca_bundle} did not sign it" if self.ca_bundle
                       else "if your organisation signs its servers with its own CA, set its CA bundle in Server settings")
                ) from None
            if isinstance(error.reason, ssl.SSLError):
                raise TLSError(f"the TLS handshake with {self.server_url} failed ({error.reason}); is it an https server?") from None
            raise ServerUnavailableError(
                f"cannot reach the MONAI Label server at {self.server_url} ({_reason(error.reason)}); is it running?"
            ) from None
        except ssl.SSLError as error:
            raise TLSError(f"the TLS connection to {self.server_url} failed during {method} {path} ({error})") from None
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


def _origin(url: str) -> Tuple[str, str, Optional[int]]:
    parsed = urllib.parse.urlparse(url)
    default = {"http": 80, "https": 443}.get(parsed.scheme)
    return parsed.scheme, (parsed.hostname or "").lower(), parsed.port or default


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to the same scheme, host and port (urllib would follow it anywhere, with the
    Authorization header, also from https to http)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        target = urllib.parse.urljoin(req.full_url, newurl)
        if _origin(target) != _origin(req.full_url):
            raise ServerUnavailableError(
                f"the server at {req.full_url} redirected to {target} (HTTP {code}), another server or scheme: not "
                "followed, so that nothing (a login, an image) goes where it was not meant to; if that address is "
                "the right one, set it as the server URL"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _segment(name: str) -> str:
    if not name or "/" in name:
        raise ValueError(f"invalid model or strategy name {name!r}")
    return urllib.parse.quote(name, safe="")


def _read_body(
    reply: Any, method: str, path: str, cancel: threading.Event, progress: Optional[Callable[[int, Optional[int]], None]]
) -> bytes:
    """The answer's body in chunks: cancel is honoured and progress reported between two chunks."""
    length = reply.headers.get("Content-Length")
    total = int(length) if length and length.isdigit() else None
    chunks, done = [], 0
    while True:
        if cancel.is_set():
            raise RequestCancelled(f"{method} {path} was cancelled")
        chunk = reply.read(CHUNK)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        done += len(chunk)
        if progress is not None:
            progress(done, total)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _reason(reason: object) -> str:
    """What failed, in words: refused connection and unknown host are the usual two."""
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused: nothing listens at that address and port"
    if isinstance(reason, socket.gaierror):
        return f"unknown host: {reason}"
    return str(reason)


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
