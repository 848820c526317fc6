"""The components every session shares: recognizer, engine (on its worker thread), TTS head.

Models are loaded once, on threads, and warmed up so the first turn pays no one-off costs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from realtime.asr import WhisperRecognizer
from realtime.config import AgentConfig
from realtime.engine import build_engine
from realtime.engine.base import Engine
from realtime.engine.worker import EngineWorker
from realtime.session import Session, SessionOptions
from tts import load_tts
from tts.base import TTSHead

log = logging.getLogger(__name__)


@dataclass
class Stats:
    turns: int = 0
    first_packet_s: list[float] = field(default_factory=list)


class Runtime:
    def __init__(
        self,
        config: AgentConfig,
        asr: WhisperRecognizer | None,
        engine: Engine,
        worker: EngineWorker,
        tts: TTSHead,
        load_times: dict[str, float],
    ) -> None:
        self.config = config
        self.asr = asr
        self.asr_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asr")
        self.engine = engine
        self.worker = worker
        self.tts = tts
        self.load_times = load_times
        self.sessions: set[Session] = set()
        self.stats = Stats()

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
        rt = cls(config, asr, engine, worker, tts, times)
        if warmup:
            await rt.warmup()
        return rt

    async def warmup(self) -> None:
        import numpy as np

        t0 = time.monotonic()
        await self.worker.call(self.engine.warmup)
        await asyncio.get_running_loop().run_in_executor(None, self.tts.warmup)
        if self.asr is not None:
            silence = np.zeros(16000, np.float32)
            await asyncio.get_running_loop().run_in_executor(
                self.asr_executor, self.asr.transcribe, silence
            )
        self.load_times["warmup_s"] = time.monotonic() - t0

    def new_session(
        self,
        options: SessionOptions | None = None,
        pace_output: bool = True,
        session_id: str | None = None,
    ) -> Session:
        return Session(self, options, pace_output=pace_output, session_id=session_id)

    def on_turn_metrics(self, first_packet_s: float | None) -> None:
        self.stats.turns += 1
        if first_packet_s is not None:
            self.stats.first_packet_s.append(first_packet_s)

    async def close(self) -> None:
        for s in list(self.sessions):
            await s.close()
        await self.worker.call(self.engine.close)
        self.worker.close()
        self.asr_executor.shutdown(wait=False)
