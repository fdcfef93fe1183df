"""Errors of the MONAI Label client, each with a message an annotator can act on."""

from typing import Optional


class ClientError(Exception):
    """Base class: any failure to talk to the MONAI Label server."""


class ServerUnavailableError(ClientError):
    """Nothing answers at the server URL (refused, unknown host, connection dropped)."""


class AuthenticationError(ClientError):
    """The server (or the TLS proxy in front of it) refused the credentials: HTTP 401 or 407."""


class TLSError(ServerUnavailableError):
    """The TLS connection failed: the certificate cannot be verified with the CA bundle, or the handshake failed."""


class RequestCancelled(ClientError):
    """The annotator cancelled the request; the server may still finish it, its answer is not used."""


class ServerTimeoutError(ClientError):
    """The server did not answer within the client's timeout."""


class ServerResponseError(ClientError):
    """The server answered with an HTTP error status; ``detail`` is the server's own message."""

    def __init__(self, status: int, detail: str, method: str, url: str):
        self.status = status
        self.detail = detail
        self.method = method
        self.url = url
        super().__init__(f"{method} {url} failed with HTTP {status}: {detail}")


class RequestRejectedError(ServerResponseError):
    """HTTP 4xx: the request was wrong (unknown image or model, bad parameters, training already running)."""


class ServerFailureError(ServerResponseError):
    """HTTP 5xx: the server failed while handling a valid request."""


class InvalidResponseError(ClientError):
    """The server answered 2xx but with a body this client cannot use."""


def response_error(status: int, detail: str, method: str, url: str) -> ServerResponseError:
    """The ServerResponseError subclass that fits an HTTP status."""
    kind = RequestRejectedError if 400 <= status < 500 else ServerFailureError
    return kind(status, detail, method, url)


def format_detail(payload: object, fallback: Optional[str] = None) -> str:
    """Readable text of a FastAPI error body: ``{"detail": "..."}`` or a list of validation errors."""
    detail = payload.get("detail", payload) if isinstance(payload, dict) else payload
    if isinstance(detail, list):
        messages = []
        for item in detail:
            if isinstance(item, dict):
                where = ".".join(str(part) for part in item.get("loc", []))
                messages.append(f"{where}: {item.get('msg', item)}" if where else str(item.get("msg", item)))
            else:
                messages.append(str(item))
        return "; ".join(messages)
    if detail in (None, "", {}):
        return fallback or "no details given"
    return str(detail)
