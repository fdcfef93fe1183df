"""What the app adds to MONAI Label's web server at start-up (`LungNLBApp.on_init_complete`).

MONAI Label 0.8.5 listens on 0.0.0.0 by default, allows every web origin with credentials, answers
500 to malformed `params` JSON and unknown images, keeps a rejected upload's temporary file, and
starts a training run without looking at its parameters. The app, once built inside the server:

* **refuses to start exposed without authentication** (`check_exposure`): a non-loopback
  `--host` needs MONAI Label's own authentication (`MONAI_LABEL_AUTH_ENABLE`); the supported way
  to expose the app is the authenticated TLS proxy (`scripts/serve_proxy.sh`) in front of a
  loopback server;
* **allows no foreign web origin** unless `MONAI_LABEL_CORS_ORIGINS` lists it: the CORS middleware
  gets exactly that list (MONAI Label turns an empty list into "*"), and `RequestGuard` answers 403
  to any request whose `Origin` is neither the server's own nor listed — a foreign page's form
  POST (which needs no CORS preflight) never reaches an endpoint;
* **limits request bodies** to `--conf max_upload_mb` (413, from `Content-Length` before the
  body is read);
* **maps MONAI Label's own errors to 4xx** with a message: malformed JSON (400), unknown image /
  label (404), a full disk (507);
* puts **checked routes in front of** MONAI Label's infer, image / label upload, training and
  dataset-download routes: they check what MONAI Label would only find out after writing the
  upload to a temporary file (the `params` JSON, the output kind, the training parameters, a
  training run already running), then call MONAI Label's own endpoint functions; the dataset ZIP
  is removed once it has been sent;
* **keeps the event loop free**: those routes, and next-sample and session creation, hand their
  work (which MONAI Label runs inside the event loop) to one request thread (`lib.request_thread`)
  and await it, so `/info` and `/datastore` answer while a volume's inference runs.

FastAPI allows middleware to be added only before the first request, and the app is built during
the server's start-up (after that point): `install_server_hooks` replaces the middleware list
through `lib.monailabel_private`, which has Starlette build the stack again for the next request.
"""

# no `from __future__ import annotations`: FastAPI reads the route functions' annotations at run time
import argparse
import errno
import ipaddress
import json
import logging
import os
import re
import sys
from typing import Any, List, Optional

from fastapi import BackgroundTasks, Depends, File, Form, HTTPException, Request, UploadFile
from fastapi.middleware import Middleware
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from fastapi.routing import APIRoute
from monailabel.config import settings
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.exception import (
    ImageNotFoundException,
    LabelNotFoundException,
    MONAILabelError,
    MONAILabelException,
)
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from lib import uploads
from lib.errors import bad_request, not_found
from lib.monailabel_private import infer_tasks, installed_middleware, replace_middleware, train_tasks
from lib.request_thread import RequestThread
from lib.trainers.guard import TrainerLock

logger = logging.getLogger(__name__)

EXPOSE_HELP = (
    "To serve other machines, keep the server on 127.0.0.1 and start the authenticated TLS proxy in front of it: "
    "`bash scripts/serve_proxy.sh` (users and roles in runs/proxy/users.tsv, see docs/app.md, section Security); "
    "or enable MONAI Label's own authentication (MONAI_LABEL_AUTH_ENABLE=true with a Keycloak realm at "
    "MONAI_LABEL_AUTH_REALM_URI)."
)


class ExposedWithoutAuthentication(RuntimeError):
    """The server was asked to listen on a non-loopback address with no authentication configured."""


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen_host(argv: list[str]) -> str | None:
    """The address `monailabel start_server` was told to listen on (its own default when not
    given), read with MONAI Label's own argument parser; None when `argv` is not that command."""
    if "start_server" not in argv:
        return None
    from monailabel.main import Main

    parser = argparse.ArgumentParser(add_help=False)
    Main.args_start_server(Main.__new__(Main), parser)
    args, _ = parser.parse_known_args(argv[argv.index("start_server") + 1 :])
    return args.host


def check_exposure(host: str | None, auth_enabled: bool) -> None:
    """Raise `ExposedWithoutAuthentication` for a non-loopback `host` without authentication."""
    if host is None or is_loopback(host) or auth_enabled:
        return
    message = f"refusing to listen on {host} without authentication: anyone who can reach it could read, " \
              f"change and delete the studies and replace the model. {EXPOSE_HELP}"
    logger.error(message)
    raise ExposedWithoutAuthentication(message)


def host_name(header: str) -> str:
    """The name in a Host header, lower case, without its port: "CT-Lab:8443" -> "ct-lab",
    "[::1]:8000" -> "::1"; "" when there is none."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.index("]")] if "]" in header else ""
    return header.partition(":")[0]


def allowed_host_names(configured: tuple[str, ...], listen: str | None) -> frozenset[str]:
    """Host names a request may carry besides the loopback ones: `--conf allowed_hosts` and the
    address the server was told to listen on (unless it is a wildcard address)."""
    names = {name.strip().strip("[]").lower() for name in configured}  # names or addresses, no ports
    if listen and listen.strip("[]") not in ("0.0.0.0", "::", ""):
        names.add(listen.strip().strip("[]").lower())
    return frozenset(name for name in names if name)


def host_allowed(header: str, allowed: frozenset[str]) -> bool:
    """Whether a request's Host header names this server: localhost or a loopback address, or one
    of `allowed` ("*" allows any)."""
    name = host_name(header)
    if not name:
        return False
    return "*" in allowed or name in allowed or is_loopback(name)


def cors_origins() -> list[str]:
    """The web origins allowed besides the server's own: `MONAI_LABEL_CORS_ORIGINS`, none by default."""
    return [str(origin).rstrip("/") for origin in settings.MONAI_LABEL_CORS_ORIGINS]


async def _reply(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """ASGI middleware: a Host that is not this server's 400, foreign web origins 403, bodies over
    the limit 413 (see the module docstring)."""

    def __init__(self, app, max_body_bytes: int, allowed_origins: list[str], allowed_hosts: frozenset[str] = frozenset()):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.allowed_origins = set(allowed_origins)
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        host = headers.get("host", "")
        if not host_allowed(host, self.allowed_hosts):
            # a page whose DNS name was rebound to this machine reaches the server with its own name
            return await _reply(send, 400, f"Host {host[:200]!r} is not a name of this server: it answers to "
                                           f"localhost, 127.0.0.1 and [::1]{self._configured_hosts()}; list other "
                                           "names with --conf allowed_hosts (scripts/serve_proxy.sh passes its "
                                           "PROXY_HOSTNAMES)")
        origin = headers.get("origin")
        if origin is not None and not self._same_or_allowed(origin, headers.get("host", "")):
            return await _reply(send, 403, f"cross-origin request from {origin[:200]} refused: this server allows "
                                           "no other web origin unless MONAI_LABEL_CORS_ORIGINS lists it")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return await _reply(send, 413, f"request body of {int(length)} bytes is larger than this server accepts "
                                           f"({self.max_body_bytes} bytes; --conf max_upload_mb)")
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise HTTPException(413, f"request body larger than this server accepts ({self.max_body_bytes} bytes)")
            return message

        return await self.app(scope, counted, send)

    def _configured_hosts(self) -> str:
        return "".join(f", {name}" for name in sorted(self.allowed_hosts))

    def _same_or_allowed(self, origin: str, host: str) -> bool:
        if origin.rstrip("/") in self.allowed_origins:
            return True
        scheme, _, netloc = origin.partition("://")
        return scheme in ("http", "https") and bool(host) and netloc.lower() == host.lower()


# ---- exception handlers --------------------------------------------------------------------
async def _json_error(request: Request, error: json.JSONDecodeError) -> JSONResponse:
    return JSONResponse({"detail": f"malformed JSON in the request's params / info: {error}"}, status_code=400)


async def _not_found(request: Request, error: MONAILabelException) -> JSONResponse:
    return JSONResponse({"detail": str(error.msg)}, status_code=404)


async def _monailabel_error(request: Request, error: MONAILabelException) -> JSONResponse:
    status = 400 if error.error == MONAILabelError.INVALID_INPUT else 500
    return JSONResponse({"detail": str(error.msg)}, status_code=status)


async def _os_error(request: Request, error: OSError) -> JSONResponse:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return JSONResponse({"detail": f"the server's disk is full ({error.strerror}); nothing was saved"},
                            status_code=507)
    logger.exception("request failed", exc_info=error)
    return JSONResponse({"detail": f"server error: {error.strerror or error}"}, status_code=500)


# ---- checked routes ------------------------------------------------------------------------
def _params_object(text: str | None, what: str = "params") -> dict[str, Any]:
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as error:
        raise bad_request(f"{what} is not valid JSON: {error}") from error
    if not isinstance(value, dict):
        raise bad_request(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _routes(app) -> list[APIRoute]:
    from monailabel.endpoints import activelearning as activelearning_endpoints
    from monailabel.endpoints import datastore as datastore_endpoints
    from monailabel.endpoints import infer as infer_endpoints
    from monailabel.endpoints import session as session_endpoints
    from monailabel.endpoints import train as train_endpoints
    from monailabel.endpoints.infer import ResultType

    user_role = RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)
    annotator_role = RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR)
    admin_role = RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN)
    work = RequestThread()  # the event loop awaits the work below instead of running it (lib.request_thread)

    async def infer(
        background_tasks: BackgroundTasks,
        model: str,
        image: str = "",
        session_id: str = "",
        params: str = Form("{}"),
        file: UploadFile = File(None),
        label: UploadFile = File(None),
        output: Optional[ResultType] = None,
        user: User = Depends(user_role),
    ):
        parsed = _params_object(params)
        task = infer_tasks(app).get(model)
        if task is None:
            raise not_found(f"no model {model!r}; available: {sorted(infer_tasks(app))}")
        if output in (ResultType.image, ResultType.dicom_seg) and getattr(task, "json_only", False):
            raise bad_request(f"{model} answers JSON only: ask for output=json")
        if output == ResultType.dicom_seg:
            raise bad_request("output=dicom_seg needs a DICOMweb datastore; this server stores NIfTI files")
        if not file and not image and not session_id and not parsed.get("image"):
            raise bad_request("no image given: pass image=<datastore id>, upload a file, or give a session_id")
        if session_id and (not re.fullmatch(r"[A-Za-z0-9-]{1,64}", session_id) or app.sessions() is None
                           or app.sessions().get_session(session_id) is None):
            raise not_found(f"no session {session_id[:80]!r} (expired or never created)")
        token = uploads.request_has_upload.set(bool(file or label))
        try:
            return await work.run(infer_endpoints.run_inference, background_tasks, model, image, session_id, params,
                                  file, label, output)
        finally:
            uploads.request_has_upload.reset(token)

    async def add_image(
        background_tasks: BackgroundTasks,
        image: Optional[str] = None,
        params: str = Form("{}"),
        file: UploadFile = File(...),
        user: User = Depends(annotator_role),
    ):
        _params_object(params)
        return await work.run(datastore_endpoints.add_image, background_tasks, image, params, file, user.username)

    async def save_label(
        background_tasks: BackgroundTasks,
        image: str,
        params: str = Form("{}"),
        tag: str = "final",
        label: UploadFile = File(...),
        user: User = Depends(annotator_role),
    ):
        _params_object(params)
        return await work.run(datastore_endpoints.save_label, background_tasks, image, params, tag, label, user.username)

    async def train(
        model: str,
        params: Optional[dict] = None,
        run_sync: Optional[bool] = False,
        enqueue: Optional[bool] = False,
        user: User = Depends(admin_role),
    ):
        task = train_tasks(app).get(model)
        if task is None:
            raise not_found(f"no trainer {model!r}; available: {sorted(train_tasks(app))}")
        task.check_request(params or {})
        if TrainerLock(app.app_config.state_dir).is_held():
            running = TrainerLock(app.app_config.state_dir).record() or {}
            raise HTTPException(409, f"a training run is already running (pid {running.get('pid')}, run "
                                     f"{running.get('run_id')}); one run at a time")
        # a thread of the pool: run_sync waits for the whole run, which must block neither the event loop
        # nor the request thread
        return await run_in_threadpool(train_endpoints.run_model, model, params, run_sync, enqueue)

    async def next_sample(strategy: str, params: Optional[dict] = None, user: User = Depends(user_role)):
        return await work.run(activelearning_endpoints.sample, strategy, params, user.username)

    async def create_session(
        background_tasks: BackgroundTasks,
        uncompress: bool = False,
        expiry: int = 0,
        files: List[UploadFile] = File(...),
        user: User = Depends(user_role),
    ):
        return await work.run(session_endpoints.create_session, background_tasks, uncompress, expiry, files)

    async def dataset(limit_cases: Optional[int] = None, user: User = Depends(admin_role)):
        try:
            path = await work.run(app.datastore().get_dataset_archive, limit_cases)
        except AssertionError as error:  # MONAI Label's "nothing to include"
            raise not_found(f"no dataset to download: {error}") from error
        return FileResponse(path, media_type="application/zip", filename="dataset.zip",
                            background=BackgroundTask(os.remove, path))

    return [
        APIRoute("/infer/{model}", infer, methods=["POST"], summary="Run inference (checked by LungNLB)"),
        APIRoute("/datastore/image", add_image, methods=["PUT"], summary="Upload a new image (checked by LungNLB)"),
        APIRoute("/datastore/", add_image, methods=["PUT"], include_in_schema=False),
        APIRoute("/datastore/label", save_label, methods=["PUT"], summary="Save a label (checked by LungNLB)"),
        APIRoute("/train/{model}", train, methods=["POST"], summary="Start training (checked by LungNLB)"),
        APIRoute("/datastore/dataset", dataset, methods=["GET"], summary="Download the dataset as ZIP (admin)"),
        APIRoute("/activelearning/{strategy}", next_sample, methods=["POST"], summary="Next sample to annotate"),
        APIRoute("/session/", create_session, methods=["PUT"], summary="Create a session with an image"),
    ]


def install_server_hooks(app) -> None:
    """Install the guard, CORS list, exception handlers and checked routes on MONAI Label's app.

    Idempotent: a second call (a new app in the same process, as in the tests) replaces them."""
    from monailabel.app import app as fastapi_app

    origins = cors_origins()
    # by name: MONAI Label loads the app's modules afresh for every app instance, so an earlier
    # instance's RequestGuard is another class object
    middleware = [m for m in installed_middleware(fastapi_app)
                  if getattr(m.cls, "__name__", "") not in (CORSMiddleware.__name__, RequestGuard.__name__)]
    middleware.insert(0, Middleware(CORSMiddleware, allow_origins=origins, allow_credentials=True,
                                    allow_methods=["*"], allow_headers=["*"]))
    middleware.insert(0, Middleware(RequestGuard, max_body_bytes=int(app.app_config.max_upload_mb * (1 << 20)),
                                    allowed_origins=origins,
                                    allowed_hosts=allowed_host_names(app.app_config.allowed_hosts, listen_host(sys.argv))))
    fastapi_app.add_exception_handler(json.JSONDecodeError, _json_error)
    fastapi_app.add_exception_handler(ImageNotFoundException, _not_found)
    fastapi_app.add_exception_handler(LabelNotFoundException, _not_found)
    fastapi_app.add_exception_handler(MONAILabelException, _monailabel_error)
    fastapi_app.add_exception_handler(OSError, _os_error)
    routes = [route for route in fastapi_app.router.routes if not getattr(route, "lungnlb", False)]
    checked = _routes(app)
    for route in checked:
        route.lungnlb = True
    fastapi_app.router.routes[:] = checked + routes
    replace_middleware(fastapi_app, middleware)
    logger.info(f"LungNLB request checks installed; allowed web origins besides the server's own: {origins or 'none'}")
