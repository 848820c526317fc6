"""Talk to the agent through this machine's microphone and speakers (``run_agent.py --mic``).

PortAudio (through ``sounddevice``) calls back on its own threads: the input callback hands
20 ms blocks to the event loop, the output callback pulls from ``PlaybackBuffer``, which a
barge-in empties at once. The session paces its output in real time, so the buffer stays
a few frames deep.

With speakers, the microphone hears the agent too: acoustic echo cancellation
(``realtime.echo``, on by default: ``mic.echo_cancellation`` in the config) takes the played
answer out of the microphone signal, so that the agent does not barge in on itself while a
user speaking over it still does. Its reference is what the output callback hands to the
speakers, block by block. Without it, use headphones, or ``half_duplex=True`` (the microphone
is muted while the agent speaks, which also disables barge-in).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from realtime.audio import PIPELINE_RATE, StreamResampler
from realtime.config import MicConfig
from realtime.echo import EchoCanceller
from realtime.frames import EndFrame, Interruption, OutputAudio, frame_to_event

BLOCK_MS = 20
HINT = (
    "Connect a microphone and speakers (or headphones), or run on a file instead: "
    "run_agent.py --file question.wav --out answer.wav"
)


class NoAudioDeviceError(RuntimeError):
    """No usable input or output device: the message says which and what to do instead."""


@dataclass(frozen=True)
class Devices:
    input: int
    output: int
    input_rate: int
    output_rate: int


def find_devices(
    input_device: int | str | None = None, output_device: int | str | None = None
) -> Devices:
    """The input and output devices to use, or ``NoAudioDeviceError`` saying what is missing."""
    try:
        import sounddevice as sd
    except OSError as exc:  # the PortAudio library itself is missing
        raise NoAudioDeviceError(
            f"no audio device found: PortAudio is not available ({exc}). "
            f"Install libportaudio2. {HINT}"
        ) from None

    def pick(device: int | str | None, kind: str) -> dict[str, Any]:
        try:
            info = sd.query_devices(device, kind=kind)
        except (sd.PortAudioError, ValueError) as exc:
            wanted = "no default" if device is None else f"no device {device!r}"
            raise NoAudioDeviceError(
                f"no {kind} audio device found ({wanted}; PortAudio says: {exc}; devices: "
                f"{_all_devices(sd) or 'none'}). {HINT}"
            ) from None
        channels = info.get(f"max_{kind}_channels", 0)
        if channels < 1:
            raise NoAudioDeviceError(
                f"no {kind} audio device found: {info['name']!r} has no {kind} channels. {HINT}"
            )
        return dict(info)

    i, o = pick(input_device, "input"), pick(output_device, "output")
    return Devices(
        int(i["index"]), int(o["index"]), int(i["default_samplerate"]), int(o["default_samplerate"])
    )


def _all_devices(sd: Any) -> str:
    try:
        return ", ".join(d["name"] for d in sd.query_devices())
    except Exception:
        return ""


@dataclass
class PlaybackBuffer:
    """int16 mono samples queued for the speakers; written by the loop, read by PortAudio."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    data: bytearray = field(default_factory=bytearray)

    def write(self, pcm: np.ndarray) -> None:
        with self.lock:
            self.data.extend(np.asarray(pcm, dtype="<i2").tobytes())

    def clear(self) -> None:
        with self.lock:
            self.data.clear()

    def read_into(self, out: np.ndarray) -> None:
        need = out.shape[0] * 2
        with self.lock:
            take = min(need, len(self.data))
            chunk = bytes(self.data[:take])
            del self.data[:take]
        out[:, 0] = np.frombuffer(chunk + bytes(need - take), dtype="<i2")

    @property
    def playing(self) -> bool:
        return len(self.data) > 0


def print_event(event: dict[str, Any]) -> None:
    kind = event["event"]
    if kind == "transcript" and event["final"]:
        print(f"\nyou:   {event['text']}", flush=True)
    elif kind == "answer":
        print(event["text"], end="", flush=True)
    elif kind == "turn" and event["first_packet_s"] is not None:
        print(f"\n       (first sound after {event['first_packet_s']:.2f} s)", flush=True)
    elif kind == "interrupted":
        print(" [interrupted]", flush=True)
    elif kind == "error":
        print(f"\n[error] {event['code']}: {event['message']}", file=sys.stderr, flush=True)


async def run_mic(
    runtime: Any,
    options: Any = None,
    *,
    input_device: int | str | None = None,
    output_device: int | str | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = print_event,
    half_duplex: bool = False,
    stop: asyncio.Event | None = None,
    echo_cancellation: bool | None = None,
) -> None:
    """Converse through the microphone until ``stop`` is set or the task is cancelled (Ctrl-C).

    ``echo_cancellation``: None takes the config's ``mic.echo_cancellation``.
    Raises ``NoAudioDeviceError`` before anything starts when there is no input or output.
    """
    devices = find_devices(input_device, output_device)
    import sounddevice as sd

    config = getattr(runtime, "config", None)  # a stand-in runtime may have none
    mic_cfg = config.mic if config is not None else MicConfig()
    if echo_cancellation is None:
        echo_cancellation = mic_cfg.echo_cancellation
    aec = EchoCanceller(mic_cfg.noise_suppression) if echo_cancellation else None
    input_rate = PIPELINE_RATE if aec is not None else devices.input_rate  # what feed() gets

    loop = asyncio.get_running_loop()
    blocks: asyncio.Queue[np.ndarray] = asyncio.Queue(maxsize=500)
    playback = PlaybackBuffer()
    session = runtime.new_session(options, pace_output=True)
    with contextlib.suppress(Exception):
        session.update(output_sample_rate=devices.output_rate)
    await session.start()

    def on_input(indata: np.ndarray, frames: int, time: Any, status: Any) -> None:
        block = indata[:, 0].copy()
        if aec is not None:  # here, in the device's order of play and capture, not the loop's
            block = aec.process(block, devices.input_rate)
        with contextlib.suppress(RuntimeError):  # the loop is closing
            loop.call_soon_threadsafe(_offer, block)

    def _offer(block: np.ndarray) -> None:
        with contextlib.suppress(asyncio.QueueFull):  # drop rather than fall behind
            blocks.put_nowait(block)

    def on_output(outdata: np.ndarray, frames: int, time: Any, status: Any) -> None:
        playback.read_into(outdata)
        if aec is not None:  # the reference: what the speakers play now (silence too)
            aec.played(outdata[:, 0], devices.output_rate)

    async def feed() -> None:
        while True:
            block = await blocks.get()
            if half_duplex and playback.playing:
                block = np.zeros_like(block)
            if block.size:
                await session.push_audio(block, input_rate)

    async def pump() -> None:
        resample = StreamResampler(devices.output_rate, dtype=np.int16)
        async for frame in session.frames():
            if isinstance(frame, OutputAudio):
                playback.write(resample(frame.pcm, frame.sample_rate))
                continue
            if isinstance(frame, Interruption):
                playback.clear()
            event = frame_to_event(frame)
            if event is not None and on_event is not None:
                on_event(event)
            if isinstance(frame, EndFrame):
                return

    try:
        instream = sd.InputStream(
            device=devices.input,
            channels=1,
            dtype="int16",
            samplerate=devices.input_rate,
            blocksize=devices.input_rate * BLOCK_MS // 1000,
            callback=on_input,
        )
        outstream = sd.OutputStream(
            device=devices.output,
            channels=1,
            dtype="int16",
            samplerate=devices.output_rate,
            blocksize=devices.output_rate * BLOCK_MS // 1000,
            callback=on_output,
        )
    except sd.PortAudioError as exc:
        await session.close()
        raise NoAudioDeviceError(f"could not open the audio devices: {exc}. {HINT}") from None
    tasks = [asyncio.ensure_future(feed()), asyncio.ensure_future(pump())]
    waiter = asyncio.ensure_future(stop.wait()) if stop is not None else None
    try:
        with instream, outstream:
            await asyncio.wait(
                [*tasks, *([waiter] if waiter else [])], return_when=asyncio.FIRST_COMPLETED
            )
            for t in tasks:
                if t.done() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
    finally:
        for t in [*tasks, *([waiter] if waiter else [])]:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await session.close()
