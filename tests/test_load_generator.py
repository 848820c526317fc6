"""bench/load.py, the load generator: loopback only, and what it measures on a real server
(the model-free FakeRuntime behind the real /v1/realtime handler, so the figures are known)."""

from __future__ import annotations

import argparse

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
    )
    try:
        result = await run_level(args, f"{server.ws}/v1/realtime", clips, 3)
    finally:
        await server.runner.cleanup()
    assert result["rejected"] == 1  # three callers, room for two
    assert result["turns"] == 4 and result["answered"] == 4 and result["errors"] == 0, result
    # The fake answers as soon as its VAD has heard 400 ms of silence: the first packet comes
    # just after that, counted from the true end of speech.
    fp = result["first_packet_s"]
    assert 0.38 < fp["p50"] <= fp["p95"] <= fp["p99"] < 1.5, fp
