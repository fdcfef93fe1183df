"""One training run at a time, and none that outlives its server.

* `TrainerLock` — `<studies>/.lungnlb/trainer.lock`. The process that runs a training run holds an
  exclusive `flock` on it for as long as the run lasts; the kernel drops the lock when that process
  ends, however it ends, so "the lock cannot be taken" means "a run is running now" — in this
  server, in its training subprocess, or left over from an earlier server. The file also holds the
  run's record (pid, server pid, run id, start); a run that finishes empties it, so a record found
  in an unlocked file is a run that was killed before it finished.
* `watch_server` — MONAI Label runs an asynchronous training run as a child process of the server.
  A daemon thread in that child ends it (and any processes it started) as soon as its parent is
  gone: a server killed with SIGKILL cannot stop its children itself.
* `stop_training_with_server` — on SIGTERM / SIGINT the server stops its running training task
  (MONAI Label's own `AsyncTask.stop`) before its usual shutdown, which would otherwise wait for it.
* `reclaim_at_startup` — what a starting server does with a lock it finds held or a record of an
  unfinished run: stop the leftover run, and say so (log and `/info` warnings).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from lib.errors import conflict

logger = logging.getLogger(__name__)
TASK_MODULE = "monailabel.interfaces.utils.app"  # what MONAI Label runs as a background task's process


class TrainerLock:
    """The training lock file of one studies folder (see the module docstring)."""

    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / "trainer.lock"

    def record(self) -> dict[str, Any] | None:
        """The record in the file: the running run's, or an unfinished one's; None when empty."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            return json.loads(text) if text.strip() else None
        except json.JSONDecodeError:
            return {"record": text[:200]}

    def _open(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return open(self.path, "a+", encoding="utf-8")

    def is_held(self) -> bool:
        """Whether some process holds the lock now (a run is running)."""
        if not self.path.is_file():  # asking must not create the file (it lives in the studies folder)
            return False
        with self._open() as stream:
            try:
                fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(stream, fcntl.LOCK_UN)
            return False

    @contextmanager
    def hold(self, record: dict[str, Any]) -> Iterator[None]:
        """Hold the lock for one run; 409 when another run holds it. The record is written into
        the file and removed when the run ends (also when it fails)."""
        stream = self._open()
        try:
            try:
                fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                running = self.record() or {}
                raise conflict(f"a training run is already running (pid {running.get('pid')}, "
                               f"run {running.get('run_id')}); one run at a time: wait for it or stop it "
                               "(DELETE /train/)") from None
            stream.seek(0)
            stream.truncate()
            stream.write(json.dumps(record))
            stream.flush()
            try:
                yield
            finally:
                stream.seek(0)
                stream.truncate()
                stream.flush()
                fcntl.flock(stream, fcntl.LOCK_UN)
        finally:
            stream.close()

    def update(self, **fields: Any) -> None:
        """Add fields to the record of the run this process holds the lock for."""
        record = {**(self.record() or {}), **fields}
        with open(self.path, "r+", encoding="utf-8") as stream:  # no new lock: the holder writes
            stream.seek(0)
            stream.truncate()
            stream.write(json.dumps(record))


def is_task_subprocess() -> bool:
    """Whether this process is a background task MONAI Label started (a child of the server)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec is not None and spec.name == TASK_MODULE


def _end_process_tree(code: int) -> None:
    try:
        import psutil

        for child in psutil.Process().children(recursive=True):
            child.kill()
    except Exception:  # noqa: BLE001 - ending this process matters more than its children's cleanup
        pass
    os._exit(code)


def watch_server(interval_s: float = 1.0) -> threading.Thread:
    """End this process (and its children) once its parent, the server, is gone."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                logger.error("the server (pid %d) is gone: this training run stops with it", parent)
                _end_process_tree(75)

    thread = threading.Thread(target=watch, name="lungnlb-server-watch", daemon=True)
    thread.start()
    return thread


def stop_training_with_server() -> bool:
    """Chain a handler in front of the server's SIGTERM / SIGINT handlers that stops a running
    training task first. Only possible on the main thread; returns whether it was installed."""
    if threading.current_thread() is not threading.main_thread():
        return False

    def stop_training() -> None:
        from monailabel.utils.async_tasks.task import AsyncTask

        try:
            if AsyncTask.stop("train"):
                logger.info("stopped the running training task: the server is shutting down")
        except Exception as error:  # noqa: BLE001 - shutting down must go on
            logger.warning("could not stop the training task: %s", error)

    for signum in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(signum)

        def handler(number, frame, previous=previous):
            stop_training()
            if callable(previous):
                previous(number, frame)
            else:
                signal.signal(number, signal.SIG_DFL)
                os.kill(os.getpid(), number)

        signal.signal(signum, handler)
    return True


def lock_holders(path: Path) -> list[int]:
    """The pids holding a `flock` on ``path`` (Linux's /proc/locks, matched by device and inode;
    waiters excluded); empty where /proc/locks cannot be read."""
    try:
        status = path.stat()
        lines = Path("/proc/locks").read_text(encoding="ascii").splitlines()
    except OSError:
        return []
    key = f"{os.major(status.st_dev):02x}:{os.minor(status.st_dev):02x}:{status.st_ino}"
    return [int(fields[4]) for fields in (line.split() for line in lines)
            if len(fields) > 5 and "->" not in fields and fields[1] == "FLOCK" and fields[5] == key]


def _is_training_task(pid: int) -> bool:
    """Whether ``pid`` is a MONAI Label background task (what runs an app's training), so a reused
    pid or an unrelated process is never signalled."""
    try:
        import psutil

        return TASK_MODULE in " ".join(psutil.Process(pid).cmdline())
    except Exception:  # noqa: BLE001 - gone, or not ours to inspect: not a task to stop
        return False


def _released(lock: TrainerLock, wait_s: float) -> bool:
    """Whether the lock is free within ``wait_s`` seconds."""
    deadline = time.monotonic() + wait_s
    while lock.is_held() and time.monotonic() < deadline:
        time.sleep(0.2)
    return not lock.is_held()


def _stop(pids: list[int], lock: TrainerLock, wait_s: float) -> bool:
    """SIGTERM ``pids``; if the lock is still held after ``wait_s``, SIGKILL them and their
    children; whether the lock is free at the end."""
    import psutil

    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    if _released(lock, wait_s):
        return True
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            for child in process.children(recursive=True):
                child.kill()
            process.kill()
    return _released(lock, 5.0)


def reclaim_at_startup(lock: TrainerLock, wait_s: float = 15.0) -> list[str]:
    """Stop a training run left by an earlier server and report unfinished runs (messages returned).

    The process signalled is the one holding the lock (not only the pid in the record, which may
    be a reused pid), and only if it is a MONAI Label task; SIGTERM first, SIGKILL after ``wait_s``."""
    messages = []
    if lock.is_held():
        record = lock.record() or {}
        holders = [pid for pid in lock_holders(lock.path) or [record.get("pid")]
                   if isinstance(pid, int) and pid != os.getpid() and _is_training_task(pid)]
        stopped = bool(holders) and _stop(holders, lock, wait_s)
        outcome = "it was stopped" if stopped else "it could not be stopped: stop it by hand"
        messages.append(f"a training run left by an earlier server was still running (pid "
                        f"{', '.join(map(str, holders)) or record.get('pid')}, run {record.get('run_id')}, "
                        f"started {record.get('started')}); {outcome}")
    else:
        record = lock.record()
        if record:
            messages.append(f"training run {record.get('run_id')} (pid {record.get('pid')}, started "
                            f"{record.get('started')}) ended without finishing (killed or crashed); "
                            "the model in use is the last one published before it")
            lock.path.write_text("", encoding="utf-8")
    for message in messages:
        logger.warning(message)
    return messages
