"""Answer text into the streaming TTS head, its audio on in output-sized frames."""

from __future__ import annotations

import logging

from realtime.audio import to_int16
from realtime.context import SessionContext
from realtime.frames import (
    AnswerText,
    CancelResponse,
    ErrorFrame,
    Frame,
    OutputAudio,
)
from realtime.stages.base import Stage
from tts.base import TTSHead, TTSStream

log = logging.getLogger(__name__)


class Speaker(Stage):
    """Streams answer text into the TTS head and its audio on in output-sized frames. A
    text-only session (``speak=False``) passes the text on untouched."""

    def __init__(self, ctx: SessionContext, tts: TTSHead) -> None:
        super().__init__()
        self.ctx = ctx
        self.tts = tts
        self._streams: dict[int, TTSStream] = {}
        self._ends: dict[int, AnswerText] = {}  # answers' end frames, sent after their audio

    async def process(self, frame: Frame) -> None:
        if isinstance(frame, CancelResponse):
            stream = self._streams.pop(frame.response_id, None)
            if stream is not None:
                stream.cancel()
        elif isinstance(frame, AnswerText) and self.ctx.options.speak:
            stream = self._streams.get(frame.response_id)
            if stream is None:
                opts = self.ctx.options
                stream = self.tts.open_stream(
                    opts.voice, opts.speaking_rate, output_rate=opts.output_sample_rate
                )  # resampled to the transport's rate on the TTS thread
                self._streams[frame.response_id] = stream
                self.ctx.spawn(self._pump(frame.response_id, stream))
            if frame.end:
                stream.finish()
                self._ends[frame.response_id] = frame
                return  # re-sent by _pump after the last audio
            stream.push_text(frame.text)
        await self.push(frame)

    async def _pump(self, rid: int, stream: TTSStream) -> None:
        frame_s = self.ctx.config.audio.output_frame_ms / 1000
        end: AnswerText | None = None
        try:
            async for chunk in stream.chunks():
                if stream.cancelled:
                    return
                n = max(1, int(chunk.sample_rate * frame_s))
                for i in range(0, len(chunk.pcm), n):
                    if stream.cancelled:
                        return
                    text = chunk.text if i == 0 else ""
                    pcm = to_int16(chunk.pcm[i : i + n])
                    await self.push(OutputAudio(rid, pcm, chunk.sample_rate, text))
        except Exception as exc:
            log.exception("TTS failed")
            if not stream.cancelled:
                msg = f"speech synthesis failed: {exc}"
                await self.push(ErrorFrame("tts_error", msg, response_id=rid))
        finally:  # a cancelled answer leaves nothing behind either
            self._streams.pop(rid, None)
            end = self._ends.pop(rid, None)
        if not stream.cancelled:
            await self.push(end or AnswerText(rid, "", end=True))
