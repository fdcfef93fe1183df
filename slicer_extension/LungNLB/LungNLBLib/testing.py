"""A small in-process stand-in for a MONAI Label server with the LungNLB app, for tests without a real server.

It answers the routes the module uses (``/info/``, ``/activelearning``, ``/datastore``, ``/infer``,
``/train``) with the same shapes as monailabel 0.8.5 and the LungNLB app, on made-up but deterministic
results: ``lung_nlb_seg`` calls a voxel tumour when it is above ``threshold`` (its slice probability is the
fraction of such voxels, clipped), ``lung_watershed`` fills the requested box (or a 3x3 square around each
foreground click, minus the background clicks). It records every request (``requests``) and every label
it was given (``labels``), and can demand HTTP basic auth like the TLS proxy in front of an exposed server.

Standard library + numpy only, so it runs under Slicer's Python (the module's self-test) and in pytest.
"""

import base64
import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .multipart import FilePart, decode_multipart, encode_multipart
from .nifti import read_nifti_bytes, write_nifti_bytes


class FakeImage:
    def __init__(self, array: np.ndarray, affine: np.ndarray, original: Optional[np.ndarray] = None):
        self.array = np.asarray(array)
        self.affine = np.asarray(affine, dtype=np.float64)
        self.original = original


class FakeServer:
    """``with FakeServer(images) as server: server.url``; ``images``: ``{image_id: FakeImage}``."""

    def __init__(
        self,
        images: Dict[str, FakeImage],
        threshold: float = 100.0,
        credentials: Optional[Tuple[str, str]] = None,
        model_version: str = "fake-1",
    ):
        self.images = dict(images)
        self.threshold = threshold
        self.credentials = credentials
        self.model_version = model_version
        self.requests: List[Dict[str, Any]] = []
        self.labels: Dict[Tuple[str, str], Dict[str, Any]] = {}
        self.train_state: Optional[Dict[str, Any]] = None
        self.infer_delay = threading.Event()  # set = answer infer requests at once; clear = hold them
        self.infer_delay.set()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return "http://127.0.0.1:{}".format(self._server.server_address[1])

    def __enter__(self) -> "FakeServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.infer_delay.set()
        self._server.shutdown()
        self._server.server_close()

    def info(self) -> Dict[str, Any]:
        return {
            "name": "LungNLB (fake)",
            "labels": ["tumour"],
            "models": {
                "lung_nlb_seg": {"type": "segmentation", "labels": {"tumour": 1}, "dimension": 3, "description": "fake", "config": {}},
                "lung_watershed": {"type": "deepgrow", "labels": {"tumour": 1}, "dimension": 2, "description": "fake", "config": {}},
            },
            "trainers": {"lung_nlb_seg": {"description": "fake", "config": {"max_epochs": 5}}},
            "strategies": {"disagreement": {"description": "fake"}, "random": {"description": "fake"}},
            "train_stats": {},
        }

    def next_image(self, client: str) -> Dict[str, Any]:
        for image_id, image in sorted(self.images.items()):
            if (image_id, "final") not in self.labels:
                return {"id": image_id, "labels": {"original": {}} if image.original is not None else {}, "client": client}
        return {}

    def segment(self, array: np.ndarray) -> Tuple[np.ndarray, List[float]]:
        volume = array if array.ndim == 3 else array[np.newaxis]
        mask = volume > self.threshold
        probabilities = [float(min(1.0, 10.0 * m.mean())) for m in mask]
        return mask.reshape(array.shape).astype(np.uint8), probabilities

    def watershed(self, image: FakeImage, params: Dict[str, Any]) -> np.ndarray:
        volume = image.array if image.array.ndim == 3 else image.array[np.newaxis]
        z = int(params.get("slice", 0))
        mask = np.zeros(volume.shape, dtype=np.uint8)
        if params.get("box"):
            x0, y0, x1, y1 = (int(v) for v in params["box"])
            mask[z, y0 : y1 + 1, x0 : x1 + 1] = 1
        for point in params.get("foreground", []):
            x, y = int(point[0]), int(point[1])
            mask[z, max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2] = 1
        for point in params.get("background", []):
            mask[z, int(point[1]), int(point[0])] = 0
        return mask.reshape(image.array.shape)


def _handler(server: FakeServer) -> type:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # keep test output clean
            pass

        def _reply(self, status: int, body: bytes, content_type: str = "application/json", headers: Optional[Dict[str, str]] = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, payload: Any, status: int = 200) -> None:
            self._reply(status, json.dumps(payload).encode("utf-8"))

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _authorised(self) -> bool:
            if server.credentials is None:
                return True
            expected = "Basic " + base64.b64encode("{}:{}".format(*server.credentials).encode()).decode()
            if self.headers.get("Authorization") == expected:
                return True
            self._reply(401, b'{"detail": "login required"}', headers={"WWW-Authenticate": 'Basic realm="lungnlb"'})
            return False

        def _route(self, method: str) -> None:
            parsed = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(parsed.query))
            body = self._body()
            if not self._authorised():
                return
            record: Dict[str, Any] = {"method": method, "path": parsed.path, "query": query}
            server.requests.append(record)
            path = parsed.path
            if method == "GET" and path == "/info/":
                return self._json(server.info())
            if method == "POST" and path.startswith("/activelearning/"):
                params = json.loads(body or b"{}")
                record["params"] = params
                return self._json(server.next_image(str(params.get("client_id", ""))))
            if method == "GET" and path == "/datastore/image":
                image = server.images.get(query.get("image", ""))
                if image is None:
                    return self._json({"detail": "no such image"}, 404)
                data = write_nifti_bytes(image.array, image.affine)
                name = query["image"] + ".nii.gz"
                return self._reply(200, data, "application/gzip", {"Content-Disposition": 'attachment; filename="{}"'.format(name)})
            if method == "GET" and path == "/datastore/label":
                image = server.images.get(query.get("label", ""))
                if image is None or image.original is None or query.get("tag") != "original":
                    return self._json({"detail": "no such label"}, 404)
                return self._reply(200, write_nifti_bytes(image.original.astype(np.uint8), image.affine), "application/gzip")
            if method == "PUT" and path == "/datastore/label":
                parts = {part.name: part for part in decode_multipart(body, self.headers["Content-Type"])}
                label = read_nifti_bytes(parts["label"].content)
                params = json.loads(parts["params"].text()) if "params" in parts else {}
                server.labels[(query["image"], query.get("tag", "final"))] = {"array": label.array, "affine": label.affine, "params": params}
                record["params"] = params
                return self._json({"image": query["image"], "label": query["image"], "tag": query.get("tag", "final")})
            if method == "POST" and path.startswith("/infer/"):
                return self._infer(path.rsplit("/", 1)[-1], query, body, record)
            if method == "POST" and path.startswith("/train/"):
                if server.train_state and server.train_state["status"] == "RUNNING":
                    return self._json({"detail": "training is already running"}, 429)
                record["params"] = json.loads(body or b"{}")
                server.train_state = {"id": "train-1", "status": "RUNNING", "details": ["epoch 1/5"]}
                return self._json(server.train_state)
            if method == "GET" and path == "/train/":
                return self._json(server.train_state) if server.train_state else self._json({"detail": "no training"}, 404)
            if method == "DELETE" and path == "/train/":
                if server.train_state:
                    server.train_state = dict(server.train_state, status="STOPPED")
                return self._json(server.train_state or {})
            return self._json({"detail": "not found: {} {}".format(method, path)}, 404)

        def _infer(self, model: str, query: Dict[str, str], body: bytes, record: Dict[str, Any]) -> None:
            parts = {part.name: part for part in decode_multipart(body, self.headers["Content-Type"])}
            params = json.loads(parts["params"].text()) if "params" in parts else {}
            record["params"] = params
            if "file" in parts:
                uploaded = read_nifti_bytes(parts["file"].content)
                image = FakeImage(uploaded.array, uploaded.affine)
                record["upload"] = uploaded
            else:
                image = server.images.get(query.get("image", ""))
                if image is None:
                    return self._json({"detail": "no such image"}, 404)
            server.infer_delay.wait(30)
            if model == "lung_nlb_seg":
                mask, probabilities = server.segment(image.array)
                result = {"model_version": server.model_version, "slice_probabilities": probabilities, "threshold": 0.5}
            elif model == "lung_watershed":
                mask = server.watershed(image, params)
                result = {"slice": params.get("slice"), "method": "box" if params.get("box") else "points"}
            else:
                return self._json({"detail": "no model " + model}, 404)
            data, content_type = encode_multipart(
                {"params": json.dumps(result)}, {"image": FilePart("result.nii.gz", write_nifti_bytes(mask, image.affine))}
            )
            return self._reply(200, data, content_type)

        def do_GET(self) -> None:
            self._route("GET")

        def do_POST(self) -> None:
            self._route("POST")

        def do_PUT(self) -> None:
            self._route("PUT")

        def do_DELETE(self) -> None:
            self._route("DELETE")

    return Handler
