"""The components every session shares: recognizer, engine (on its worker thread), TTS head.

Models are loaded once, on threads, and warmed up so the first turn pays no one-off costs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from realtime.asr import WhisperRecognizer
from realtime.config import AgentConfig
from realtime.engine import build_engine
from realtime.engine.base import Engine
from realtime.engine.worker import EngineWorker
from realtime.session import Session, SessionOptions, SharedModels
from tts import load_tts
from tts.base import TTSHead

log = logging.getLogger(__name__)


class Runtime(SharedModels):
    def __init__(
        self,
        config: AgentConfig,
        asr: WhisperRecognizer | None,
        engine: Engine,
        worker: EngineWorker,
        tts: TTSHead,
        load_times: dict[str, float],
    ) -> None:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asr")
        super().__init__(config, asr, executor, engine, worker, tts)
        self.load_times = load_times
        self.sessions: set[Session] = set()

    @classmethod
    async def create(cls, config: AgentConfig, warmup: bool = True) -> Runtime:
        """Load every model (in parallel threads) and warm them up."""
        times: dict[str, float] = {}
        worker = EngineWorker()

        def timed(name: str, fn: Any) -> Any:
            t0 = time.monotonic()
            out = fn()
            times[name] = time.monotonic() - t0
            return out

        loop = asyncio.get_running_loop()
        asr_f = loop.run_in_executor(
            None,
            lambda: (
                None
                if config.asr.backend == "none"
                else timed("asr_load_s", lambda: WhisperRecognizer(config.asr))
            ),
        )
        tts_f = loop.run_in_executor(
            None,
            lambda: timed(
                "tts_load_s", lambda: load_tts(config.tts, chunk_ms=config.audio.output_frame_ms)
            ),
        )
        try:
            engine = await worker.call(
                lambda: timed("engine_load_s", lambda: build_engine(config.engine))
            )
            asr, tts = await asr_f, await tts_f
        except BaseException:
            worker.close()
            raise
        worker.between = getattr(engine, "between_jobs", None)
        rt = cls(config, asr, engine, worker, tts, times)
        if warmup:
            await rt.warmup()
        return rt

    async def warmup(self) -> None:
        t0 = time.monotonic()
        loop = asyncio.get_running_loop()
        await self.worker.call(self.engine.warmup)
        await loop.run_in_executor(None, self.tts.warmup)
        if self.asr is not None:
            silence = np.zeros(16000, np.float32)
            await loop.run_in_executor(self.asr_executor, self.asr.transcribe, silence)
        self.load_times["warmup_s"] = time.monotonic() - t0

    def new_session(
        self,
        options: SessionOptions | None = None,
        pace_output: bool = True,
        session_id: str | None = None,
    ) -> Session:
        """A new conversation (start it with ``await session.start()``); closed with the
        runtime if it is still open then."""
        session = Session(self, options, pace_output=pace_output, session_id=session_id)
        self.sessions.add(session)
        session.on_close = self.sessions.discard
        return session

    async def close(self) -> None:
        for s in list(self.sessions):
            await s.close()
        self.sessions.clear()
        await self.worker.call(self.engine.close)
        self.worker.close()
        self.asr_executor.shutdown(wait=False)
