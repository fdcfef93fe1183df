"""Server requests off the GUI thread: a worker thread runs the request, the GUI polls for the outcome.

Slicer's scene and widgets may only be touched from the GUI thread, so a task's ``work`` must not touch
them: it talks to the server and returns plain data; the GUI applies the result once ``done()``.
Cancel sets the client's cancel flag (the transfer stops at the next chunk) and the outcome becomes
RequestCancelled at once, whether or not the server is still computing.
"""

import threading
from typing import Any, Callable, Optional, Tuple

from .client import MonaiLabelClient
from .errors import RequestCancelled


class BackgroundTask:
    """``work()`` on a daemon thread; ``client`` (optional) gets this task's cancel flag and progress hook."""

    def __init__(self, what: str, work: Callable[[], Any], client: Optional[MonaiLabelClient] = None):
        self.what = what
        self._work = work
        self._client = client
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._result: Any = None
        self._error: Optional[BaseException] = None
        self.progress: Tuple[int, Optional[int]] = (0, None)  # bytes received, bytes expected (None: unknown)
        if client is not None:
            client.cancel = self._cancel
            client.progress = self._on_progress
        self._thread = threading.Thread(target=self._run, name=f"LungNLB {what}", daemon=True)

    def start(self) -> "BackgroundTask":
        self._thread.start()
        return self

    def _on_progress(self, done: int, total: Optional[int]) -> None:
        self.progress = (done, total)

    def _run(self) -> None:
        try:
            self._result = self._work()
        except BaseException as error:  # handed to the GUI thread, which shows it
            self._error = error
        finally:
            self._done.set()

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def done(self) -> bool:
        """Finished, failed or cancelled: the GUI may take the outcome now."""
        return self._done.is_set() or self._cancel.is_set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        return self._done.wait(timeout)

    def outcome(self) -> Any:
        """The work's return value; its exception re-raised; RequestCancelled once cancelled."""
        if self._cancel.is_set():
            raise RequestCancelled(f"{self.what} was cancelled; the server may still finish it, its answer is not used")
        if not self._done.is_set():
            raise RuntimeError(f"{self.what} is still running")
        if self._error is not None:
            raise self._error
        return self._result
