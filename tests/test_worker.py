import asyncio
import threading
import time

import pytest

from realtime.engine.worker import EngineWorker


async def test_jobs_run_on_the_worker_thread_and_stream_back():
    w = EngineWorker()
    try:
        name = await w.call(lambda: threading.current_thread().name)
        assert name == "engine" and name != threading.current_thread().name

        def gen():
            for i in range(5):
                yield i * i

        assert [x async for x in w.stream(gen)] == [0, 1, 4, 9, 16]
    finally:
        w.close()


async def test_errors_reach_the_caller():
    w = EngineWorker()
    try:
        with pytest.raises(ZeroDivisionError):
            await w.call(lambda: 1 / 0)

        def bad():
            yield 1
            raise ValueError("boom")

        with pytest.raises(ValueError, match="boom"):
            async for _ in w.stream(bad):
                pass
    finally:
        w.close()


async def test_a_slow_model_step_does_not_block_the_event_loop():
    w = EngineWorker()
    try:
        job = asyncio.ensure_future(w.call(lambda: time.sleep(0.5)))
        t0 = time.monotonic()
        ticks = 0
        while not job.done():
            await asyncio.sleep(0.01)
            ticks += 1
        # the loop kept ticking every ~10 ms while the worker slept for 0.5 s
        assert ticks >= 20, ticks
        assert time.monotonic() - t0 >= 0.45
    finally:
        w.close()
