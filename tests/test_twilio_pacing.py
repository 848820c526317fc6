"""/twilio paces the answer in real time, a little ahead (``telephony.playout_lead_ms``), so
that a backchannel spoken over it cuts nothing and an interruption has only the lead to clear.

The client plays Twilio's part as Twilio does it (bench/twilio_caller.py): it streams the
caller's audio in real time, plays the agent's ``media`` in real time from a play-out buffer,
echoes each ``mark`` once the audio before it has played, and on ``clear`` empties the buffer.
The session behind it is the real one."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
import pytest_asyncio
from server_helpers import RunningServer, speech, start_server
from test_telephony import _engine_prompt, _the_session

from bench.twilio_caller import FRAME_S, Twilio, ahead_s, audio_s, call, spy
from realtime.config import ServerConfig
from realtime.frames import SpeechStarted, SpeechStopped, Transcript

pytestmark = pytest.mark.asyncio(loop_scope="module")

ASK = "Tell me about the city of Paris."
WATCH_S = 4.0  # seconds of an answer watched for its pace


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(server_runtime: Any) -> Any:
    if getattr(server_runtime, "config", None) is None:
        pytest.skip("needs the real Session (SERVER_TESTS_FAKE_RUNTIME is set)")
    srv = await start_server(server_runtime, ServerConfig())
    yield srv
    await srv.runner.cleanup()


async def ask(twilio: Twilio) -> None:
    """Ask the question; return once the answer's first audio has arrived."""
    await twilio.say(speech(ASK, 8000))
    await twilio.wait_for(lambda: twilio.events("media"), 120)


async def closed(runtime: Any) -> None:
    async with asyncio.timeout(20):
        while runtime.sessions:
            await asyncio.sleep(0.05)


async def test_media_runs_at_most_the_lead_ahead_of_real_time(
    server: RunningServer, server_runtime: Any
) -> None:
    lead = server_runtime.config.telephony.playout_lead_ms / 1000
    async with call(server.ws) as twilio:
        await _the_session(server_runtime)
        await ask(twilio)
        await asyncio.sleep(WATCH_S)  # then hang up: the rest of the answer goes the same way
        end = twilio.end_mark()
    await closed(server_runtime)
    media = twilio.events("media")
    sent, ahead = audio_s(media), ahead_s(media)
    # (a loaded machine may synthesise slower than real time: the answer then comes in bursts)
    assert end is None and sent > 5 * lead, f"{sent:.2f} s of answer tell little"
    # never more than the lead (and the frame just sent) ahead; slack for a loaded machine
    # (unpaced, the answer's audio comes as fast as it is synthesised: seconds ahead)
    assert max(ahead) <= lead + FRAME_S + 0.15, f"{max(ahead):.3f} s ahead, lead {lead} s"
    # the lead fills at once: its frames come together with the first one
    assert max(ahead[: int(lead / FRAME_S) + 1]) >= lead - 0.05, ahead[:20]


async def test_a_backchannel_over_the_answer_cuts_nothing(
    server: RunningServer, server_runtime: Any
) -> None:
    async with call(server.ws) as twilio:
        session = await _the_session(server_runtime)
        seen = spy(session)
        await ask(twilio)
        answered_at = time.monotonic()
        await asyncio.sleep(0.5)
        assert twilio.end_mark() is None, "the answer ended before the backchannel"
        await twilio.say(speech("Okay.", 8000, pad_s=0.0))
        await twilio.wait_for(twilio.end_mark, 120)
        end = twilio.end_mark()
        ended_at = twilio.events("mark")[-1].t
        await twilio.wait_for(lambda: not twilio.pending, 10)  # played to its end
        await session.wait_idle()
        await twilio.stop()
    await closed(server_runtime)
    started = [t for t, f in seen if isinstance(f, SpeechStarted) and t > answered_at]
    assert started, "the backchannel was not heard as speech"
    judged = [t for t, f in seen if isinstance(f, Transcript) and f.final and t > started[0]]
    assert judged and judged[0] < ended_at, "judged only once the answer had all gone out"
    assert "interrupt" not in [f for _, f in seen]
    assert not twilio.events("clear")
    # every bit of the answer reached the caller: the -end mark's ms, in 20 ms frames
    assert end is not None
    answer_ms = int(end.split(":")[1].split("-")[0])
    assert audio_s(twilio.events("media")) * 1000 >= answer_ms
    entry = session.history[-1]
    assert not entry.interrupted and entry.spoken == entry.answer.strip()
    assert len(session.history) == 1  # the backchannel was not a turn


async def test_an_interruption_clears_and_truncates_at_the_heard_word(
    server: RunningServer, server_runtime: Any
) -> None:
    async with call(server.ws) as twilio:
        session = await _the_session(server_runtime)
        seen = spy(session)
        await ask(twilio)
        answered_at = time.monotonic()
        # the caller listens until the first piece boundary has played, then talks over it
        await twilio.wait_for(lambda: twilio.echoed, 60)
        assert twilio.end_mark() is None, "the answer ended before the interruption"
        await twilio.say(speech("Wait, stop. Tell me about Rome instead.", 8000, 0.0))
        await twilio.wait_for(lambda: twilio.events("clear"), 30)
        (clear,) = twilio.events("clear")
        rid = int(twilio.echoed[0][1].split(":")[0])

        def turn_ended() -> bool:  # the interrupting words are a turn, and are answered
            cuts = [t for t, f in seen if f == "interrupt"]
            return bool(cuts) and any(isinstance(f, SpeechStopped) and t > cuts[0] for t, f in seen)

        await twilio.wait_for(turn_ended, 30)
        await session.wait_idle()
        prompt = await _engine_prompt(session)
        await twilio.stop()
    await closed(server_runtime)
    started = next(t for t, f in seen if isinstance(f, SpeechStarted) and t > answered_at)
    cut = next(t for t, f in seen if f == "interrupt")
    # cleared once judged an interruption (not at the first speech: the earliest judgement is a
    # partial transcript, about 250 ms into the speech), and at once (slack for a loaded machine)
    assert started + 0.15 < cut <= clear.t < cut + 0.5
    # nothing more of that answer: no media from the clear until the caller's turn ended
    # (then the interrupting words are answered, at once if a speculative answer is ready)
    ended = next(t for t, f in seen if isinstance(f, SpeechStopped) and t > cut)
    assert ended > clear.t + 1  # a window long enough to tell
    late = [r for r in twilio.events("media") if clear.t < r.t <= ended]
    assert not late, f"{len(late)} media messages after the clear"
    # what the caller heard: the marks Twilio played before the clear
    played = [name for t, name in twilio.echoed if t < clear.t and name.startswith(f"{rid}:")]
    ms = int(played[-1].split(":")[1])
    assert twilio.played_at_clear is not None and twilio.played_at_clear * 1000 >= ms
    entry = next(e for e in session.history if e.response and e.response.id == rid)
    pieces = entry.response.pieces
    words = [p.text.strip() for p in pieces if p.offset_s * 1000 < ms]
    assert words and len(words) < len(pieces)  # cut between two pieces
    assert entry.interrupted and entry.spoken == " ".join(words)
    assert json.dumps(entry.spoken + " ...")[1:-1] in prompt, prompt
    assert json.dumps(entry.answer.strip())[1:-1] not in prompt
