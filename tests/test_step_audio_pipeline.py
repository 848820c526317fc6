"""The Step-Audio backend plugged into the whole pipeline (VAD -> listening pre-fill -> engine
-> TTS) on CPU, through ``run_agent.py`` and the config/loader path a real checkpoint takes.
The tiny checkpoint's words mean nothing: the flow is what is tested."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from step_audio_fixtures import scripted, write_tiny_checkpoint

from realtime.audio import write_wav


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny-step-audio"), modify=scripted("Hi", " you")
    )


def test_run_agent_with_a_step_audio_checkpoint(tmp_path, checkpoint, say):
    cfg = tmp_path / "tiny.yaml"
    base = Path("configs/step-audio-r1.yaml").read_text()
    cfg.write_text(
        base.replace("device: cuda", "device: cpu").replace("dtype: bfloat16", "dtype: float32")
    )
    wav = tmp_path / "q.wav"
    write_wav(wav, say("What is the weather like today?"), 16000)
    out = tmp_path / "a.wav"
    r = subprocess.run(
        [
            sys.executable,
            "run_agent.py",
            "--config",
            str(cfg),
            "--model",
            str(checkpoint),
            "--file",
            str(wav),
            "--out",
            str(out),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    events = [json.loads(line) for line in r.stdout.splitlines()]
    kinds = [e["event"] for e in events]
    assert "speech_started" in kinds and "speech_stopped" in kinds
    answer = "".join(e["text"] for e in events if e["event"] == "answer")
    assert answer.strip() == "Hi you"  # the chain, stopped at <|EOT|>, think block split off
    turn = next(e for e in events if e["event"] == "turn")
    assert turn["first_packet_s"] is not None and turn["answer"] == "Hi you"
    assert out.exists() and out.stat().st_size > 4000  # the TTS spoke the answer


def test_missing_checkpoint_is_a_clear_error(tmp_path, say):
    wav = tmp_path / "q.wav"
    write_wav(wav, say("Hello there."), 16000)
    r = subprocess.run(
        [
            sys.executable,
            "run_agent.py",
            "--config",
            "step-audio-r1",
            "--model",
            str(tmp_path / "nope"),
            "--file",
            str(wav),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode != 0
    assert "nope" in r.stderr and "Traceback" not in r.stderr


async def test_two_callers_answered_at_once(checkpoint, say):
    """Two sessions of one Step-Audio runtime, fed at the same time: both get their answer,
    and no lane is left on the shared runner."""
    import asyncio

    from realtime.cli import feed_file
    from realtime.config import load_config
    from realtime.frames import AnswerText, EndFrame, TurnMetrics
    from realtime.runtime import Runtime

    overrides = {
        "engine.model": str(checkpoint),
        "engine.device": "cpu",
        "engine.dtype": "float32",
        "engine.max_batch": 4,  # a slot each, and a second one each to speak while thinking
    }
    runtime = await Runtime.create(load_config("step-audio-r1", overrides))
    try:

        async def caller(text: str) -> list:
            session = runtime.new_session(pace_output=False)
            await session.start()
            frames: list = []

            async def read() -> None:
                async for frame in session.frames():
                    frames.append(frame)
                    if isinstance(frame, EndFrame):
                        return

            reader = asyncio.create_task(read())
            await feed_file(session, say(text), 16000, False, tail_s=1.0)
            await session.end()
            await asyncio.wait_for(reader, 120)
            await session.close()
            return frames

        results = await asyncio.gather(caller("What is the weather like?"), caller("Hello there."))
        for frames in results:
            answer = "".join(f.text for f in frames if isinstance(f, AnswerText)).strip()
            assert answer == "Hi you", [
                type(f).__name__ + ":" + str(getattr(f, "text", getattr(f, "message", "")))
                for f in frames
            ]
            assert [f for f in frames if isinstance(f, TurnMetrics)]
        assert not runtime.engine.runner.lanes
    finally:
        await runtime.close()
