"""Light requests stay light: the request thread keeps the event loop free, and `/info`'s model
status never waits for the model thread (issue 15). The latency figures are in
`benchmarks/light_requests.py`; these tests check the mechanism."""

from __future__ import annotations

import asyncio
import contextvars
import threading

import pytest

from benchmarks.app_studies import tiny_checkpoint

flag: contextvars.ContextVar[str] = contextvars.ContextVar("flag", default="unset")


def test_the_event_loop_runs_while_the_request_thread_works():
    from lib.request_thread import RequestThread

    work = RequestThread()
    loop_ran = threading.Event()

    def blocking_request() -> bool:
        # blocks until a coroutine on the event loop has run: it never would if the loop ran this
        return loop_ran.wait(timeout=30)

    async def light_request() -> None:
        loop_ran.set()

    async def main() -> bool:
        heavy = asyncio.ensure_future(work.run(blocking_request))
        await asyncio.sleep(0)
        await light_request()
        return await heavy

    assert asyncio.run(main()) is True
    work.shutdown()


def test_request_thread_keeps_order_context_and_errors():
    from lib.request_thread import RequestThread

    work = RequestThread()
    seen: list[tuple[int, str, str]] = []

    def record(index: int) -> int:
        seen.append((index, flag.get(), threading.current_thread().name))
        return index

    def fail() -> None:
        raise ValueError("bad request data")

    async def main() -> list[int]:
        flag.set("set by the route")
        results = await asyncio.gather(*(work.run(record, i) for i in range(20)))
        with pytest.raises(ValueError, match="bad request data"):
            await work.run(fail)
        return list(results)

    assert asyncio.run(main()) == list(range(20))
    assert [index for index, _, _ in seen] == list(range(20))  # one thread: in the order handed over
    assert {value for _, value, _ in seen} == {"set by the route"}
    assert len({name for _, _, name in seen}) == 1 and seen[0][2] != threading.main_thread().name
    work.shutdown()


def test_model_status_does_not_load_the_model(tmp_path):
    from lib.conf import parse_conf
    from lib.model_store import ModelStore, file_version

    checkpoint = tiny_checkpoint(tmp_path / "ckpt" / "tiny")
    config = parse_conf(tmp_path, tmp_path / "studies", {"checkpoint": str(checkpoint), "model_dir": str(tmp_path / "model")})
    store = ModelStore(config)
    calls = []
    store.run = lambda fn, *args, **kwargs: calls.append(fn)  # the model thread must not be asked
    status = store.status()
    assert status["trained"] and status["version"] == file_version(checkpoint)
    assert calls == [] and store._loaded is None
