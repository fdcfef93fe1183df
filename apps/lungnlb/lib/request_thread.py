"""One worker thread for the requests that do real work, so that the event loop stays free.

MONAI Label 0.8.5 declares its endpoints `async` and calls the app synchronously inside them: an
inference on a 300-slice volume (reading it, the model, writing the mask), a label save or a
next-sample request that scores images ran on uvicorn's event loop, and while it ran no other
request was even read (`/info` waited for the whole inference). The app's checked routes
(`lib.server`) hand that work to `RequestThread.run`, which the event loop awaits without blocking:
`/info`, `/datastore` and the other light endpoints keep answering.

Why one thread and not a pool: the requests handed over ran one after another on the event loop
before, in the order they arrived; on one worker thread they still do (label saves of the same
image keep their order, the datastore sees one writer as before), and the model work is queued on
the model thread (`lib.model_thread`) anyway.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class RequestThread:
    """Runs request work one call at a time on a dedicated thread, awaited from the event loop."""

    def __init__(self, name: str = "lungnlb-requests"):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` on the worker thread, in the caller's context (context variables
        set by the route are seen by the work); its exception is raised in the caller."""
        context = contextvars.copy_context()
        future = self._executor.submit(context.run, fn, *args, **kwargs)
        return await asyncio.wrap_future(future)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
