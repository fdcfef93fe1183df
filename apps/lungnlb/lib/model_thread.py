"""One long-lived thread for all of the app's model work (loading, forward passes, scoring).

Why one thread: PyTorch's CPU kernels run on OpenMP (libgomp), which keeps a team of worker
threads for each thread that starts parallel regions. Once libgomp manages more threads than the
machine has CPUs it stops spin-waiting between regions, and each of the hundred-odd parallel
regions of a forward pass then pays a sleep and a wake-up. The server reaches the model from
several threads (MONAI Label runs infer requests on its event-loop thread, scoring and
active-learning requests on a thread pool, and the model was loaded on whichever thread asked
first); every thread that runs parallel regions keeps its own team, and on a small machine every
forward pass would then be throttled (`benchmarks/model_thread.py`). Running all model work on one
thread keeps one team, and queues concurrent requests instead of oversubscribing the cores.

`run(fn, *args)` executes `fn(*args)` on the model thread and returns its result or re-raises its
exception in the caller; a call made on the model thread itself runs inline (no deadlock).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class ModelThread:
    """Runs callables one at a time on a single dedicated thread."""

    def __init__(self, name: str = "lungnlb-model"):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._ident = self._executor.submit(threading.get_ident).result()

    def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` on the model thread (inline when called from it)."""
        if threading.get_ident() == self._ident:
            return fn(*args, **kwargs)
        return self._executor.submit(fn, *args, **kwargs).result()

    @property
    def ident(self) -> int:
        """Thread identifier of the model thread."""
        return self._ident
