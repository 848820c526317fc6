"""The responder hands the engine the turn's audio in as few jobs as it can, in order: frames
that arrive while a listen job waits in the engine's queue join that job; any other job (a
discarded turn, an answer) seals it, so audio after it is heard after it."""

import asyncio
import threading

import numpy as np

from realtime.engine.worker import EngineWorker
from realtime.frames import DiscardTurn, TurnAudio
from realtime.stages.responder import EngineLink, Responder


class Recording:
    """An engine session that records what it is asked, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, np.ndarray | None]] = []

    def listen(self, pcm: np.ndarray) -> None:
        self.calls.append(("listen", pcm.copy()))

    def discard(self) -> None:
        self.calls.append(("discard", None))


def frames(start: int, n: int) -> list[np.ndarray]:
    return [np.arange(start + 320 * i, start + 320 * (i + 1), dtype=np.int16) for i in range(n)]


async def test_frames_queued_behind_a_busy_engine_become_one_job_and_a_discard_splits_them():
    worker = EngineWorker()
    es = Recording()
    responder = Responder(None, EngineLink(worker, listens=True, interleaved=True, session=es))  # type: ignore[arg-type]
    gate = threading.Event()
    try:
        worker.submit(gate.wait)  # the engine is busy (a long pre-fill, say)
        first, second = frames(0, 50), frames(50 * 320, 30)
        for pcm in first:
            await responder.process(TurnAudio(pcm))
        await responder.process(DiscardTurn())
        for pcm in second:
            await responder.process(TurnAudio(pcm))
        gate.set()
        await worker.call(lambda: None)  # everything queued before has run
        kinds = [k for k, _ in es.calls]
        assert kinds == ["listen", "discard", "listen"], kinds
        np.testing.assert_array_equal(es.calls[0][1], np.concatenate(first))
        np.testing.assert_array_equal(es.calls[2][1], np.concatenate(second))

        # an idle engine: each frame is heard as it comes, and nothing is lost or repeated
        es.calls.clear()
        third = frames(0, 20)
        for pcm in third:
            await responder.process(TurnAudio(pcm))
            await asyncio.sleep(0.002)
        await worker.call(lambda: None)
        assert all(k == "listen" for k, _ in es.calls)
        np.testing.assert_array_equal(
            np.concatenate([p for _, p in es.calls]), np.concatenate(third)
        )
    finally:
        worker.close()
