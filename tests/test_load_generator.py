"""bench/load.py, the load generator: loopback only, and what it measures on a real server
(the model-free FakeRuntime behind the real /v1/realtime handler, so the figures are known)."""

from __future__ import annotations

import argparse
import base64

import pytest
from server_helpers import FakeRuntime, start_server

from bench.load import check_loopback, make_clips, run_level
from realtime.config import ServerConfig


@pytest.mark.parametrize(
    "url", ["ws://127.0.0.1:8080/v1/realtime", "ws://localhost:1/x", "ws://[::1]:9/"]
)
def test_loopback_targets_are_accepted(url):
    assert check_loopback(url)


@pytest.mark.parametrize("url", ["ws://8.8.8.8:8080/v1/realtime", "ws://10.0.0.1/", "ws:///nohost"])
def test_other_targets_are_refused(url):
    with pytest.raises(ValueError, match="loopback only|no host"):
        check_loopback(url)


async def test_first_packets_are_timed_from_the_end_of_speech_and_rejections_counted():
    clips = make_clips(["espeak:en-us@175"], ["What is the capital of France?"])
    server = await start_server(FakeRuntime(), ServerConfig(max_sessions=2))
    args = argparse.Namespace(
        duration=60.0,
        api_key="",
        barge_in=0.0,
        turns=2,
        pause_min=0.2,
        pause_max=0.4,
        answer_timeout=10.0,
        trace=False,
        context_words=0,
    )
    try:
        result = await run_level(args, f"{server.ws}/v1/realtime", clips, 3)
    finally:
        await server.runner.cleanup()
    assert result["rejected"] == 1  # three callers, room for two
    assert result["turns"] == 4 and result["answered"] == 4 and result["errors"] == 0, result
    records = result["turn_records"]  # each turn on its own, for the tails
    assert sorted(r["turn"] for r in records) == [0, 0, 1, 1]  # the two callers let in
    assert len({r["caller"] for r in records}) == 2
    assert max(r["first_packet_s"] for r in records) == round(result["first_packet_s"]["max"], 3)
    # the fake hands out each answer whole at once: played at the caller, nothing starves
    assert result["completed_answers"] == 4 and result["starved_answers"] == 0, result
    assert result["answer_audio_s_p50"] > 0.2, result
    # The fake answers as soon as its VAD has heard 400 ms of silence: the first packet comes
    # just after that, counted from the true end of speech.
    fp = result["first_packet_s"]
    assert 0.38 < fp["p50"] <= fp["p95"] <= fp["p99"] < 1.5, fp


def test_the_callers_player_counts_gaps_in_the_answer_audio():
    """Audio played from the first packet at real-time pace: a chunk that comes after the audio
    before it has run out (by more than a frame) is a gap the caller heard."""
    from bench.load import RATE, Caller, Turn

    def chunk(seconds: float) -> str:
        return base64.b64encode(bytes(2 * int(RATE * seconds))).decode()

    turn = Turn("q", False)
    turn.play_end = 10.0  # the first packet arrived at t = 10 s
    Caller._play(turn, 10.0, chunk(0.5))  # plays until 10.5
    Caller._play(turn, 10.2, chunk(0.5))  # early: queued, plays until 11.0
    Caller._play(turn, 11.01, chunk(0.2))  # 10 ms late: within a frame
    assert turn.underruns == 0 and abs(turn.audio_s - 1.2) < 1e-9
    Caller._play(turn, 11.5, chunk(0.2))  # 0.29 s after the audio ran out at 11.21
    assert turn.underruns == 1 and abs(turn.max_gap_s - 0.29) < 1e-6
    assert abs(turn.play_end - 11.7) < 1e-9
