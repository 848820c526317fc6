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


def _slow(tag: str, n: int, log: list[str], step_s: float = 0.005):
    def gen():
        for i in range(n):
            time.sleep(step_s)  # one decoding step
            log.append(f"{tag}{i}")
            yield None if i % 2 else f"{tag}{i}"  # None: a step that produced no token

    return gen


async def test_shared_streams_take_turns_and_jobs_run_between_steps():
    w = EngineWorker()
    log: list[str] = []
    try:
        a = w.stream(_slow("a", 200, log), exclusive=False)  # ~1 s of steps
        first = await a.__anext__()  # A is answering
        b = asyncio.ensure_future(_collect(w.stream(_slow("b", 6, log), exclusive=False)))
        job = await w.call(lambda: log.append("job") or len(log))
        rest = [x async for x in a]
        got_b = await b
        assert first == "a0" and rest[-1] == "a198" and "a1" not in rest  # None is skipped
        assert got_b == ["b0", "b2", "b4"]
        # the second answer and the job ran while the first was still being written
        assert log.index("b5") < log.index("a199") and job < log.index("a199")
    finally:
        w.close()


async def test_an_exclusive_stream_runs_to_its_end_first():
    w = EngineWorker()
    log: list[str] = []
    try:
        a = w.stream(_slow("a", 20, log), exclusive=True)
        await a.__anext__()
        await w.call(lambda: log.append("job"))
        await _collect(a)
        assert log.index("job") > log.index("a19")
    finally:
        w.close()


async def _collect(stream):
    return [x async for x in stream]


def test_a_stream_whose_loop_has_closed_does_not_stop_the_worker():
    w = EngineWorker()
    log: list[str] = []
    try:

        async def start_and_leave() -> None:
            stream = w.stream(_slow("a", 200, log), exclusive=False)  # ~1 s of steps
            await stream.__anext__()  # the loop ends right after: nobody takes the rest

        asyncio.run(start_and_leave())
        assert asyncio.run(w.call(lambda: "alive")) == "alive"
        assert len(log) < 200  # the orphaned answer stopped early
    finally:
        w.close()


async def test_a_backlog_of_jobs_drains_between_two_steps_not_one_job_a_step():
    """Forty callers' audio jobs queued while an answer is written: the quick ones all run
    before the answer's next few steps (one job a step let the backlog outlast the answer);
    slow ones still let a step through every JOB_BUDGET_S."""
    w = EngineWorker()
    log: list[str] = []
    try:
        a = w.stream(_slow("a", 100, log, step_s=0.01), exclusive=False)
        await a.__anext__()
        quick = [w.submit(lambda i=i: log.append(f"q{i}")) for i in range(40)]
        await asyncio.gather(*(asyncio.wrap_future(f) for f in quick))
        steps_before_last = sum(1 for x in log[: log.index("q39")] if x.startswith("a"))
        steps_before_first = sum(1 for x in log[: log.index("q0")] if x.startswith("a"))
        assert steps_before_last - steps_before_first <= 2, log[:60]

        slow = [w.submit(lambda i=i: time.sleep(0.015) or log.append(f"s{i}")) for i in range(6)]
        await asyncio.gather(*(asyncio.wrap_future(f) for f in slow))
        jobs = "".join("a" if x.startswith("a") else "j" for x in log if x[0] in "as")
        run = max(len(r) for r in jobs.strip("a").split("a") if r)
        assert run <= 2, jobs  # 15 ms jobs: at most two before the next step (20 ms budget)
        await _collect(a)
    finally:
        w.close()


async def test_the_between_hook_runs_after_jobs_on_the_worker_and_survives_its_failures():
    """The engine runs its queued pre-fill pieces in the hook (``between_jobs``): after the
    jobs that queued them, on the worker thread, and a failing hook takes nothing down."""
    w = EngineWorker()
    seen: list[tuple[str, int]] = []
    done = 0

    def hook() -> None:
        seen.append((threading.current_thread().name, done))
        if len(seen) == 1:
            raise RuntimeError("the hook fails once")

    def job() -> int:
        nonlocal done
        done += 1
        return done

    async def hook_ran(times: int) -> None:
        for _ in range(200):
            if len(seen) >= times:
                return
            await asyncio.sleep(0.01)

    w.between = hook
    try:
        assert await w.call(job) == 1
        await hook_ran(1)
        assert seen == [("engine", 1)]  # after the job, on the worker thread; it failed
        assert await w.call(job) == 2  # the worker goes on
        await hook_ran(2)
        assert seen == [("engine", 1), ("engine", 2)]
    finally:
        w.close()
