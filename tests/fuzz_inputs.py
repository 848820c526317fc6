"""Hypothesis strategies of hostile client input for the protocol fuzz tests
(``test_fuzz_protocols.py``): malformed, truncated, oversized, mistyped and out-of-order
messages for the Realtime API, the WebRTC data channel and ``/offer``, and Twilio Media Streams.

A fuzz case is a list of *ops*. An op is either ``Bad(text)``, a message that must be refused
with an error, or a valid step rendered against the connection's state when it runs
(``Silence``, ``Commit``, ...), whose outcome the runner knows from that state."""

from __future__ import annotations

import base64
import json
import string
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

# ---- building blocks -------------------------------------------------------------------------
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=16),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)
not_strings = json_values.filter(lambda v: not isinstance(v, str))
not_objects = json_values.filter(lambda v: not isinstance(v, dict))
B64 = string.ascii_letters + string.digits + "+/"


def _not_json(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return True
    return False


not_json = st.one_of(
    st.text(max_size=80),
    st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
    st.integers(2000, 20000).map(lambda n: "[" * n + "]" * n),  # nested past the parser's depth
    st.integers(2000, 20000).map(lambda n: '{"a":' * n + "1" + "}" * n),
).filter(_not_json)


def truncated(events: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[str]:
    """A valid message cut short (a prefix of a JSON object is never valid JSON)."""

    def cut(args: tuple[dict[str, Any], float]) -> str:
        text = json.dumps(args[0])
        return text[: max(1, int(args[1] * (len(text) - 1)))]

    return st.tuples(events, st.floats(0, 1)).map(cut).filter(_not_json)


invalid_base64 = st.one_of(
    st.text(min_size=1, max_size=40).filter(lambda t: any(c not in B64 + "=" for c in t)),
    st.text(alphabet=B64, min_size=1, max_size=40).filter(lambda t: len(t) % 4 == 1),
    st.text(alphabet=B64, min_size=2, max_size=40).map(lambda t: "=" + t),
)


def oversized(limit: int) -> st.SearchStrategy[str]:
    """A message over ``limit`` bytes: huge base64 audio, or junk."""
    return st.one_of(
        st.integers(limit, 2 * limit).map(
            lambda n: json.dumps(
                {"type": "input_audio_buffer.append", "audio": "AAAA" * (n // 4 + 1)}
            )
        ),
        st.tuples(
            st.text(alphabet=string.printable, min_size=1, max_size=8),
            st.integers(limit, 2 * limit),
        ).map(lambda a: (a[0] * (a[1] // len(a[0]) + 1))[: a[1] + 1]),
    )


# ---- ops -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Giant:
    """A message over the WebSocket's own cap (4x the limit): the server closes with 1009."""

    nbytes: int


@dataclass(frozen=True)
class Bad:
    """A message that must be answered with an error (and never crash the handler)."""

    text: str
    what: str = ""


@dataclass(frozen=True)
class Silence:
    """Valid: ``ms`` of silence in the connection's current input format."""

    ms: int


@dataclass(frozen=True)
class OddPcm:
    """An odd byte count: an error in 16-bit PCM, valid G.711 (silence) otherwise."""

    nbytes: int


@dataclass(frozen=True)
class Commit:
    """Valid once 100 ms are buffered; before that, ``input_audio_buffer_commit_empty``."""


@dataclass(frozen=True)
class Valid:
    """A well-formed event that must not be refused; ``input_format`` is the format it sets
    (``None``: unchanged)."""

    event: dict[str, Any]
    input_format: str | None = None
    clears: bool = False


# ---- the Realtime API (/v1/realtime) -----------------------------------------------------------
REALTIME_TYPES = (
    "session.update",
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "input_audio_buffer.clear",
    "conversation.item.create",
    "conversation.item.truncate",
    "conversation.item.delete",
    "response.create",
    "response.cancel",
)
FORMAT_NAMES = ("pcm16", "g711_ulaw", "g711_alaw", "audio/pcm", "audio/pcmu", "audio/pcma")
short_text = st.text(alphabet=string.ascii_letters + " .,?", min_size=1, max_size=30).filter(
    lambda t: t.strip()
)


def _event(kind: str, **body: Any) -> dict[str, Any]:
    return {"type": kind, **body}


valid_formats = st.sampled_from(FORMAT_NAMES).map(
    lambda n: n if not n.startswith("audio/") else {"type": n}
)
valid_turn_detection = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {"type": st.just("server_vad")},
        optional={
            "threshold": st.floats(0, 1),
            "silence_duration_ms": st.integers(200, 1500),
            "prefix_padding_ms": st.integers(0, 500),
            "create_response": st.just(False),
        },
    ),
)


@st.composite
def valid_session_update(draw: st.DrawFn) -> Valid:
    fmt = draw(st.none() | valid_formats)
    session: dict[str, Any] = {}
    if fmt is not None:
        session["input_audio_format"] = fmt
    if draw(st.booleans()):
        session["turn_detection"] = draw(valid_turn_detection)
    if draw(st.booleans()):
        session["voice"] = draw(st.sampled_from(["alloy", "verse", "shimmer"]))
    if draw(st.booleans()):
        session["speed"] = draw(st.floats(0.5, 2.0))
    if draw(st.booleans()):
        session["instructions"] = draw(short_text)
    name = fmt if isinstance(fmt, str) or fmt is None else fmt["type"]
    return Valid(_event("session.update", session=session), input_format=name)


valid_realtime_ops = st.one_of(
    st.integers(10, 60).map(Silence),
    st.just(Commit()),
    st.just(Valid(_event("input_audio_buffer.clear"), clears=True)),
    valid_session_update(),
    short_text.map(
        lambda t: Valid(
            _event(
                "conversation.item.create",
                item={
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "text", "text": t}],
                },
            )
        )
    ),
)

bad_formats = st.one_of(
    not_strings.filter(lambda v: not isinstance(v, dict)),
    st.text(max_size=12).filter(lambda t: t not in FORMAT_NAMES),
    st.fixed_dictionaries({"type": st.text(max_size=12).filter(lambda t: t not in FORMAT_NAMES)}),
    st.fixed_dictionaries(
        {
            "type": st.just("audio/pcm"),
            "rate": json_scalars.filter(lambda r: r not in (None, 24000)),
        }
    ),
)
bad_numbers = st.one_of(
    st.floats(allow_nan=True).filter(lambda x: not 0.25 <= x <= 4.0),
    st.booleans(),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=2),
)
bad_turn_detection = st.one_of(
    not_objects.filter(lambda v: v is not None),
    st.fixed_dictionaries(
        {"type": json_values.filter(lambda t: t not in ("server_vad", "semantic_vad"))}
    ),
    st.fixed_dictionaries(
        {
            "threshold": bad_numbers.filter(
                lambda x: isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 <= x <= 1
            )
        }
    ),
    st.fixed_dictionaries(
        {
            "silence_duration_ms": json_values.filter(
                lambda v: (
                    v is not None
                    and (
                        isinstance(v, bool)
                        or not isinstance(v, (int, float))
                        or not 0 <= v <= 10000
                    )
                )
            )
        }
    ),
    st.fixed_dictionaries(
        {"create_response": json_values.filter(lambda v: v is not None and not isinstance(v, bool))}
    ),
)
bad_modalities = json_values.filter(
    lambda v: (
        v is not None and not (isinstance(v, list) and v and all(m in ("audio", "text") for m in v))
    )
)
bad_sessions = st.one_of(
    st.fixed_dictionaries({"instructions": not_strings.filter(lambda v: v is not None)}),
    st.fixed_dictionaries({"input_audio_format": bad_formats}),
    st.fixed_dictionaries({"output_audio_format": bad_formats}),
    st.fixed_dictionaries(
        {"audio": not_objects.filter(lambda v: v not in (None, False, 0, "", []))}
    ),
    st.fixed_dictionaries(
        {"audio": st.fixed_dictionaries({"input": st.fixed_dictionaries({"format": bad_formats})})}
    ),
    st.fixed_dictionaries(
        {"audio": st.fixed_dictionaries({"output": st.fixed_dictionaries({"format": bad_formats})})}
    ),
    st.fixed_dictionaries(
        {
            "audio": st.fixed_dictionaries(
                {"input": json_values.filter(lambda v: v and not isinstance(v, dict))}
            )
        }
    ),
    st.fixed_dictionaries({"turn_detection": bad_turn_detection}),
    st.fixed_dictionaries({"voice": st.text(max_size=10).map(lambda t: "no-such-voice-" + t)}),
    st.fixed_dictionaries(
        {"voice": not_strings.filter(lambda v: v is not None and not isinstance(v, dict))}
    ),
    st.fixed_dictionaries({"speed": bad_numbers}),
    st.fixed_dictionaries({"output_modalities": bad_modalities}),
    st.fixed_dictionaries({"modalities": bad_modalities}),
)
bad_parts = st.one_of(
    not_objects,
    st.fixed_dictionaries(
        {
            "type": st.text(max_size=12).filter(
                lambda t: (
                    t
                    not in (
                        "input_text",
                        "text",
                        "output_text",
                        "input_audio",
                        "audio",
                        "output_audio",
                    )
                )
            ),
            "text": st.text(max_size=10),
        }
    ),
    st.fixed_dictionaries({"type": st.just("input_text"), "text": not_strings}),
    st.fixed_dictionaries({"type": st.just("input_audio"), "audio": invalid_base64}),
    st.fixed_dictionaries({"type": st.just("input_audio"), "audio": st.just("")}),
)
bad_items = st.one_of(
    not_objects,
    st.fixed_dictionaries(
        {"type": st.text(max_size=12).filter(lambda t: t != "message"), "role": st.just("user")}
    ),
    st.fixed_dictionaries(
        {"role": json_values.filter(lambda r: r not in ("user", "assistant", "system"))}
    ),
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "assistant"]),
            "content": st.one_of(
                not_objects.filter(lambda v: not isinstance(v, list)),
                st.just([]),
                st.lists(bad_parts, min_size=1, max_size=3),
            ),
        }
    ),
)
bad_known = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("input_audio_buffer.append")}, optional={"audio": not_strings}
    ),
    st.fixed_dictionaries({"type": st.just("input_audio_buffer.append"), "audio": invalid_base64}),
    st.fixed_dictionaries({"type": st.just("session.update")}, optional={"session": not_objects}),
    st.fixed_dictionaries({"type": st.just("session.update"), "session": bad_sessions}),
    st.fixed_dictionaries(
        {"type": st.just("conversation.item.create")}, optional={"item": bad_items}
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("conversation.item.truncate"),
            "item_id": json_values,
            "audio_end_ms": json_values,
        }
    ),
    st.fixed_dictionaries(
        {"type": st.just("conversation.item.delete")}, optional={"item_id": json_values}
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("response.create"),
            "response": not_objects.filter(lambda v: v is not None),
        }
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("response.create"),
            "response": st.fixed_dictionaries({"output_modalities": bad_modalities}),
        }
    ),
    st.fixed_dictionaries(
        {"type": st.just("response.cancel")}, optional={"response_id": json_values}
    ),
)
unknown_types = st.one_of(
    st.text(max_size=30).filter(lambda t: t not in REALTIME_TYPES),
    st.sampled_from(REALTIME_TYPES).map(lambda t: t.upper()),
    st.sampled_from(REALTIME_TYPES).flatmap(
        lambda t: st.text(min_size=1, max_size=4).map(lambda s: t + s)
    ),
    st.sampled_from(
        ["response.output_audio.delta", "session.created", "error", "transcription_session.update"]
    ),
)


def realtime_bad(limit: int) -> st.SearchStrategy[Bad]:
    """Realtime client messages that must each be answered with an ``error`` event."""
    events = st.one_of(
        bad_known,
        unknown_types.map(lambda t: {"type": t}),
        st.dictionaries(st.text(max_size=8).filter(lambda k: k != "type"), json_values, max_size=3),
        st.fixed_dictionaries({"type": not_strings}),
    )
    # extra keys never make a bad event good
    events = st.tuples(
        events,
        st.dictionaries(st.sampled_from(["foo", "x_extra", "event_id"]), json_values, max_size=2),
    ).map(lambda a: {**a[1], **a[0]})
    return st.one_of(
        events.map(lambda e: Bad(json.dumps(e), "event")),
        not_json.map(lambda t: Bad(t, "not_json")),
        truncated(
            bad_known | st.sampled_from([{"type": t, "event_id": "evt_1"} for t in REALTIME_TYPES])
        ).map(lambda t: Bad(t, "truncated")),
        not_objects.map(lambda v: Bad(json.dumps(v), "not_object")),
        oversized(limit).map(lambda t: Bad(t, "oversized")),
        st.just(Bad(json.dumps(_event("response.cancel")), "cancel_without_response")),
    )


def with_rare(
    cases: st.SearchStrategy[list[Any]], rare: st.SearchStrategy[Any], one_in: int
) -> st.SearchStrategy[list[Any]]:
    """One case in ``one_in`` gets a ``rare`` op somewhere: ops that end the connection (each
    costs a reconnect, and a real session takes a while to open)."""

    def insert(args: tuple[list[Any], int, int, Any]) -> list[Any]:
        case, dice, at, op = args
        # a middle value: hypothesis draws the ends of a range far more often than 1 in n
        return [*case[:at], op, *case[at:]] if dice == one_in // 2 else case

    return st.tuples(cases, st.integers(0, one_in - 1), st.integers(0, 12), rare).map(insert)


def realtime_cases(limit: int) -> st.SearchStrategy[list[Any]]:
    """Sequences of ops: mostly bad messages, with valid steps in between (out of order)."""
    op = st.one_of(
        realtime_bad(limit),
        realtime_bad(limit),
        realtime_bad(limit),
        valid_realtime_ops,
        st.integers(0, 4).map(lambda k: OddPcm(2 * k + 1)),
    )
    return st.lists(op, min_size=1, max_size=12)


# ---- the WebRTC data channel -------------------------------------------------------------------
def datachannel_bad(limit: int) -> st.SearchStrategy[Any]:
    """Data-channel messages that must each get ``{"event": "error", "code": "bad_command"}``:
    the Realtime events and junk above, bytes, and mistyped commands."""
    return st.one_of(
        realtime_bad(limit).map(lambda b: b.text),
        st.binary(max_size=64),
        st.fixed_dictionaries({"type": st.just("text")}, optional={"text": not_strings}).map(
            json.dumps
        ),
        st.fixed_dictionaries(
            {"type": st.just("text"), "text": st.text(alphabet=" \t\n", max_size=5)}
        ).map(json.dumps),
        st.fixed_dictionaries(
            {"type": json_values.filter(lambda t: t not in ("text", "cancel"))}
        ).map(json.dumps),
    )


# ---- WebRTC offers (POST /offer) ---------------------------------------------------------------
def offer_bad(limit: int, real_sdp: str) -> st.SearchStrategy[bytes]:
    """``/offer`` bodies that must each get a 4xx: broken JSON and broken SDP, including a real
    offer with its audio section mangled."""
    lines = real_sdp.split("\r\n")
    audio_at = next(i for i, line in enumerate(lines) if line.startswith("m=audio"))

    def mangle_audio(args: tuple[str, int]) -> str:
        out = list(lines)
        out[audio_at] = "m=audio " + args[0]
        return "\r\n".join(out[: len(out) - args[1]])

    bad_m_line = st.one_of(
        st.text(alphabet=string.ascii_letters + "/ ", max_size=20),
        st.just("9 UDP/TLS/RTP/SAVPF"),  # no formats
        st.just("9 RTP/AVP banana"),
    )
    sdps = st.one_of(
        st.text(max_size=60).filter(lambda t: not t.lstrip().startswith("v=0")),
        st.text(max_size=60).map(lambda t: "v=0\r\n" + t.replace("m=audio", "")),
        st.lists(st.text(alphabet=string.printable, max_size=30), max_size=8).map(
            lambda ls: "v=0\r\nm=audio\r\n" + "\r\n".join(ls)
        ),
        st.tuples(bad_m_line, st.integers(0, 3)).map(mangle_audio),
    )
    return st.one_of(
        not_json.map(lambda t: t.encode("utf-8", "surrogatepass")),
        st.binary(max_size=40).filter(lambda b: _not_json_bytes(b)),
        not_objects.map(lambda v: json.dumps(v).encode()),
        st.fixed_dictionaries({"type": st.just("offer")}, optional={"sdp": not_strings}).map(
            lambda d: json.dumps(d).encode()
        ),
        st.fixed_dictionaries(
            {"sdp": st.just(real_sdp), "type": json_values.filter(lambda t: t != "offer")}
        ).map(lambda d: json.dumps(d).encode()),
        sdps.map(lambda s: json.dumps({"sdp": s, "type": "offer"}).encode()),
        st.integers(limit, 2 * limit).map(
            lambda n: json.dumps({"sdp": "v=0" + "x" * n, "type": "offer"}).encode()
        ),
    )


def _not_json_bytes(b: bytes) -> bool:
    try:
        json.loads(b)
    except (ValueError, RecursionError):
        return True
    return False


# ---- Twilio Media Streams (/twilio) ------------------------------------------------------------
@dataclass(frozen=True)
class TwilioStart:
    """Valid ``start``; ``fatal``: an unsupported media format (error, then the stream closes)."""

    fatal_format: dict[str, Any] | None = None


@dataclass(frozen=True)
class TwilioMedia:
    """Valid 20 ms of mu-law silence: an error (``media_before_start``) before ``start``."""


@dataclass(frozen=True)
class TwilioStop:
    """``stop``: the stream ends and the server closes the socket."""


SID = "MZfuzz"
TWILIO_EVENTS = ("connected", "start", "media", "mark", "dtmf", "stop")


def twilio_bad(limit: int) -> st.SearchStrategy[Bad]:
    messages = st.one_of(
        st.fixed_dictionaries(
            {"event": st.text(max_size=12).filter(lambda e: e not in TWILIO_EVENTS)}
        ),
        st.fixed_dictionaries({"event": not_strings}),
        st.dictionaries(
            st.text(max_size=8).filter(lambda k: k != "event"), json_values, max_size=3
        ),
        st.fixed_dictionaries({"event": st.just("start")}, optional={"start": not_objects}),
        st.fixed_dictionaries(
            {
                "event": st.just("start"),
                "start": st.fixed_dictionaries(
                    {"mediaFormat": not_objects.filter(lambda v: v not in (None, False, 0, "", []))}
                ),
            }
        ),
        st.fixed_dictionaries(
            {"event": st.just("media"), "streamSid": st.just(SID)}, optional={"media": not_objects}
        ),
        st.fixed_dictionaries(
            {
                "event": st.just("media"),
                "media": st.fixed_dictionaries({}, optional={"payload": not_strings}),
            }
        ),
        st.fixed_dictionaries(
            {"event": st.just("media"), "media": st.fixed_dictionaries({"payload": invalid_base64})}
        ),
        st.fixed_dictionaries(
            {
                "event": st.just("dtmf"),
                "dtmf": not_objects.filter(lambda v: v not in (None, False, 0, "", [])),
            }
        ),
        st.fixed_dictionaries(
            {"event": st.just("mark"), "mark": not_objects.filter(lambda v: v is not None)}
        ),
    )
    return st.one_of(
        messages.map(lambda m: Bad(json.dumps(m), "message")),
        not_json.map(lambda t: Bad(t, "not_json")),
        truncated(st.sampled_from([{"event": e, "streamSid": SID} for e in TWILIO_EVENTS])).map(
            lambda t: Bad(t, "truncated")
        ),
        not_objects.map(lambda v: Bad(json.dumps(v), "not_object")),
        oversized(limit).map(lambda t: Bad(t, "oversized")),
    )


bad_media_formats = st.one_of(
    st.fixed_dictionaries(
        {"encoding": st.text(max_size=12).filter(lambda e: e != "audio/x-mulaw")}
    ),
    st.fixed_dictionaries({"sampleRate": json_values.filter(lambda r: r != 8000)}),
    st.fixed_dictionaries({"channels": json_values.filter(lambda c: c != 1)}),
)


def twilio_cases(limit: int) -> st.SearchStrategy[list[Any]]:
    op = st.one_of(
        twilio_bad(limit),
        twilio_bad(limit),
        twilio_bad(limit),
        st.just(TwilioStart()),
        st.just(TwilioMedia()),
        st.just(TwilioMedia()),
        st.text(max_size=10).map(
            lambda n: Valid({"event": "mark", "streamSid": SID, "mark": {"name": n}})
        ),
        st.sampled_from("0123456789*#").map(
            lambda d: Valid({"event": "dtmf", "dtmf": {"digit": d}})
        ),
    )
    ending = st.one_of(
        bad_media_formats.map(lambda f: TwilioStart(fatal_format=f)),
        st.just(TwilioStop()),
        st.integers(4 * limit + 1, 5 * limit).map(Giant),
    )
    return with_rare(st.lists(op, min_size=1, max_size=12), ending, 40)


def silence_b64(fmt: str, ms: int) -> str:
    """``ms`` of silence in a Realtime input format, base64."""
    if fmt in ("pcm16", "audio/pcm"):
        data = bytes(2 * 24 * ms)
    elif fmt in ("g711_ulaw", "audio/pcmu"):
        data = b"\xff" * (8 * ms)
    else:
        data = b"\xd5" * (8 * ms)
    return base64.b64encode(data).decode("ascii")
