"""HTTP errors raised from inside the app so that MONAI Label answers 4xx/5xx with a message.

MONAI Label 0.8.5 registers no exception handlers: anything but `fastapi.HTTPException` raised by a
task becomes a bare "500 Internal Server Error". Tasks therefore raise these instead.
"""

from __future__ import annotations

from fastapi import HTTPException


def bad_request(message: str) -> HTTPException:
    """400: the request itself is malformed (bad id, bad parameters, empty upload)."""
    return HTTPException(status_code=400, detail=message)


def not_found(message: str) -> HTTPException:
    """404: an image, label or strategy that does not exist."""
    return HTTPException(status_code=404, detail=message)


def conflict(message: str) -> HTTPException:
    """409: the request would overwrite something that must stay (an `original` label)."""
    return HTTPException(status_code=409, detail=message)


def too_large(message: str) -> HTTPException:
    """413: an upload or an image larger than the server's configured limits."""
    return HTTPException(status_code=413, detail=message)


def unprocessable(message: str) -> HTTPException:
    """422: a well-formed request whose content cannot be used (corrupt file, wrong dimensionality, non-CT)."""
    return HTTPException(status_code=422, detail=message)


def unavailable(message: str) -> HTTPException:
    """503: the server cannot do this now (no trained weights are present)."""
    return HTTPException(status_code=503, detail=message)


def insufficient_storage(message: str) -> HTTPException:
    """507: the disk is full; nothing was written (every write is atomic)."""
    return HTTPException(status_code=507, detail=message)
