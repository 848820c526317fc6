"""run_agent.py as a user runs it: exit codes and messages for bad input, JSON events."""

import json
import subprocess
import sys

import numpy as np
import pytest

from realtime.audio import write_wav


def run(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "run_agent.py", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "not found"),
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_text("hello, I am a text file " * 40), "cannot decode"),
    ],
)
def test_bad_input_files_get_a_clear_message(tmp_path, make, message):
    path = tmp_path / "in.wav"
    make(path)
    r = run("--file", str(path))
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


def test_bad_config_and_usage(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("vad:\n  silense_duration_ms: 3\n")
    r = run("--file", "x.wav", "--config", str(cfg))
    assert r.returncode == 2 and "silense_duration_ms" in r.stderr
    r = run("--mic", "--out", "x.wav")
    assert r.returncode == 2 and "--out goes with --file" in r.stderr


def test_mic_without_a_sound_card_says_so():
    r = run("--mic")
    assert r.returncode == 2, r.stderr
    assert "no" in r.stderr and "device" in r.stderr and "--file" in r.stderr
    assert "Traceback" not in r.stderr


def test_silence_file_says_no_speech_was_heard(tmp_path):
    path = tmp_path / "silence.wav"
    write_wav(path, np.zeros(16000 * 3, np.float32), 16000)
    r = run("--file", str(path), "--out", str(tmp_path / "o.wav"))
    assert r.returncode == 3, r.stderr
    assert "no speech was heard" in r.stderr


def test_json_events_for_a_spoken_question(tmp_path, say):
    path = tmp_path / "q.wav"
    write_wav(path, say("How many legs does a spider have?", rate=8000), 8000)  # telephone rate
    out = tmp_path / "answer.wav"
    r = run("--file", str(path), "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    kinds = {e["event"] for e in events}
    assert {"transcript", "answer", "turn"} <= kinds
    turn = next(e for e in events if e["event"] == "turn")
    b = turn["breakdown"]
    # the breakdown is in the order things happen (how fast is bench/pipeline_bench.py's to say)
    assert turn["first_packet_s"] > 0, turn
    assert b["first_token_s"] <= b["first_audio_ready_s"] <= turn["first_packet_s"], b
    assert "spider" in turn["transcript"].lower()
    assert out.exists() and out.stat().st_size > 16000
