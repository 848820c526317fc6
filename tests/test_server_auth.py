"""Access: API keys on /v1/realtime, /offer and /metrics, client secrets that expire, Twilio's
request signature on /twilio, and no serving beyond loopback without a key.

On the stand-in pipeline (``FakeRuntime``): access is checked before any session exists, so
nothing here depends on what a session does."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from openai import AsyncOpenAI
from server_helpers import FakeRuntime, start_server

from realtime.config import ServerConfig
from realtime.server.app import ACCESS_KEY, CTX_KEY, run_server
from realtime.server.auth import AccessConfigError

KEY = "sk-test-0123456789"
TWILIO_TOKEN = "twilio-token-abc"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _no_env_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REALTIME_AGENT_API_KEYS", raising=False)
    monkeypatch.delenv("TWILIO_AUTH_TOKEN", raising=False)


@pytest.fixture
async def server() -> Any:
    srv = await start_server(FakeRuntime(), ServerConfig(api_keys=[KEY]))
    yield srv
    await srv.runner.cleanup()


async def ws_status(url: str, headers: dict[str, str] | None = None, **kw: Any) -> int:
    """The HTTP status of a WebSocket upgrade (101 when it opened)."""
    async with aiohttp.ClientSession() as http:
        try:
            async with http.ws_connect(url, headers=headers or {}, **kw) as ws:
                await ws.close()
                return 101
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status


async def session_created(server: Any, api_key: str) -> str:
    client = AsyncOpenAI(api_key=api_key, websocket_base_url=f"{server.ws}/v1")
    async with client.realtime.connect(model="m") as conn:
        event = await conn.recv()
        return event.type


async def make_secret(server: Any, key: str = KEY, body: Any = None) -> aiohttp.ClientResponse:
    async with aiohttp.ClientSession() as http:
        resp = await http.post(
            f"{server.http}/v1/realtime/client_secrets",
            headers={"Authorization": f"Bearer {key}"},
            json=body if body is not None else {},
        )
        await resp.read()
        return resp


# ---- API keys ----------------------------------------------------------------------------------
async def test_realtime_without_or_with_a_wrong_key_is_401(server: Any) -> None:
    url = f"{server.ws}/v1/realtime"
    assert await ws_status(url) == 401
    assert await ws_status(url, {"Authorization": "Bearer wrong"}) == 401
    assert await ws_status(url, {"Authorization": f"Bearer {KEY}x"}) == 401
    assert await ws_status(url, {"Authorization": f"Basic {KEY}"}) == 401
    assert server.app[CTX_KEY].active == 0  # no session was opened


async def test_401_has_a_json_error_body(server: Any) -> None:
    async with aiohttp.ClientSession() as http:
        resp = await http.get(
            f"{server.http}/v1/realtime", headers={"Authorization": "Bearer nope"}
        )
        assert resp.status == 401
        body = await resp.json()
        assert body["error"]["code"] == "invalid_api_key"
        assert "nope" not in await resp.text()


async def test_right_key_gets_session_created(server: Any) -> None:
    assert await session_created(server, KEY) == "session.created"


async def test_offer_needs_a_key(server: Any) -> None:
    async with aiohttp.ClientSession() as http:
        resp = await http.post(f"{server.http}/offer", json={"sdp": "x", "type": "offer"})
        assert resp.status == 401
        assert "error" in await resp.json()
        # with the key, the (bogus) offer reaches the handler: 400, not 401
        resp = await http.post(
            f"{server.http}/offer",
            json={"sdp": "x", "type": "offer"},
            headers={"Authorization": f"Bearer {KEY}"},
        )
        assert resp.status == 400


async def test_metrics_needs_the_key_healthz_does_not(server: Any) -> None:
    async with aiohttp.ClientSession() as http:
        assert (await http.get(f"{server.http}/healthz")).status == 200
        assert (await http.get(f"{server.http}/metrics")).status == 401
        auth = {"Authorization": f"Bearer {KEY}"}
        assert (await http.get(f"{server.http}/metrics", headers=auth)).status == 200


async def test_env_keys_count_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REALTIME_AGENT_API_KEYS", " a-key , other-key ")
    srv = await start_server(FakeRuntime(), ServerConfig())
    try:
        url = f"{srv.ws}/v1/realtime"
        assert await ws_status(url) == 401
        assert await ws_status(url, {"Authorization": "Bearer other-key"}) == 101
    finally:
        await srv.runner.cleanup()


async def test_no_keys_on_loopback_stays_open() -> None:
    srv = await start_server(FakeRuntime(), ServerConfig())
    try:
        assert await ws_status(f"{srv.ws}/v1/realtime") == 101
    finally:
        await srv.runner.cleanup()


# ---- client secrets ----------------------------------------------------------------------------
async def test_client_secret_works_as_bearer_and_subprotocol(server: Any) -> None:
    resp = await make_secret(server)
    assert resp.status == 200
    body = await resp.json()
    secret = body["value"]
    assert secret.startswith("ek_") and secret != KEY
    assert abs(body["expires_at"] - (time.time() + 600)) < 5  # 10 minutes by default
    assert await session_created(server, secret) == "session.created"
    url = f"{server.ws}/v1/realtime"
    protocols = ("realtime", f"openai-insecure-api-key.{secret}")
    assert await ws_status(url, protocols=protocols) == 101
    wrong = ("realtime", "openai-insecure-api-key.ek_wrong")
    assert await ws_status(url, protocols=wrong) == 401


async def test_client_secrets_need_the_key_not_a_secret(server: Any) -> None:
    assert (await make_secret(server, key="wrong")).status == 401
    secret = (await (await make_secret(server)).json())["value"]
    assert (await make_secret(server, key=secret)).status == 401  # a secret makes no secrets


async def test_expired_client_secret_is_401(server: Any) -> None:
    clock = [time.time()]
    server.app[ACCESS_KEY].secrets.clock = lambda: clock[0]
    resp = await make_secret(
        server, body={"expires_after": {"anchor": "created_at", "seconds": 10}}
    )
    body = await resp.json()
    assert body["expires_at"] == int(clock[0] + 10)
    url = f"{server.ws}/v1/realtime"
    auth = {"Authorization": f"Bearer {body['value']}"}
    clock[0] += 9
    assert await ws_status(url, auth) == 101
    clock[0] += 2
    assert await ws_status(url, auth) == 401


async def test_client_secret_expiry_bounds(server: Any) -> None:
    for seconds in (1, 7201, "60"):
        body = {"expires_after": {"anchor": "created_at", "seconds": seconds}}
        assert (await make_secret(server, body=body)).status == 400


async def test_offer_accepts_a_client_secret(server: Any) -> None:
    secret = (await (await make_secret(server)).json())["value"]
    async with aiohttp.ClientSession() as http:
        resp = await http.post(
            f"{server.http}/offer",
            json={"sdp": "x", "type": "offer"},
            headers={"Authorization": f"Bearer {secret}"},
        )
        assert resp.status == 400  # past the access check, to the offer's own validation


# ---- Twilio ------------------------------------------------------------------------------------
def _twilio_sig(token: str, url: str) -> str:
    """Twilio's documented scheme, written out here independently of realtime.server.auth."""
    mac = hmac.new(token.encode("utf-8"), url.encode("utf-8"), hashlib.sha1)
    return base64.b64encode(mac.digest()).decode()


@pytest.fixture
async def twilio_server() -> Any:
    srv = await start_server(FakeRuntime(), ServerConfig(twilio_auth_token=TWILIO_TOKEN))
    yield srv
    await srv.runner.cleanup()


async def test_twilio_signature(twilio_server: Any) -> None:
    base = f"{twilio_server.ws}/twilio?call=CA1"
    assert await ws_status(base) == 403  # no signature
    good = _twilio_sig(TWILIO_TOKEN, base)
    assert await ws_status(base, {"X-Twilio-Signature": good}) == 101
    # the URL Twilio signed when a TLS proxy sits in front (the server sees ws://)
    wss = "wss://" + base.split("://", 1)[1]
    assert await ws_status(base, {"X-Twilio-Signature": _twilio_sig(TWILIO_TOKEN, wss)}) == 101
    altered = good[:-2] + ("A=" if good[-2] != "A" else "B=")
    assert await ws_status(base, {"X-Twilio-Signature": altered}) == 403
    other = f"{twilio_server.ws}/twilio?call=CA2"
    assert await ws_status(other, {"X-Twilio-Signature": good}) == 403  # replayed elsewhere
    wrong_token = _twilio_sig("another-token", base)
    assert await ws_status(base, {"X-Twilio-Signature": wrong_token}) == 403


async def test_twilio_open_without_a_token() -> None:
    srv = await start_server(FakeRuntime(), ServerConfig())
    try:
        assert await ws_status(f"{srv.ws}/twilio") == 101
    finally:
        await srv.runner.cleanup()


# ---- binding -----------------------------------------------------------------------------------
async def test_run_server_refuses_public_host_without_keys() -> None:
    with pytest.raises(AccessConfigError, match="REALTIME_AGENT_API_KEYS"):
        await run_server(FakeRuntime(), ServerConfig(), "0.0.0.0", 0)
    runner = await run_server(FakeRuntime(), ServerConfig(api_keys=[KEY]), "0.0.0.0", 0)
    await runner.cleanup()
    runner = await run_server(FakeRuntime(), ServerConfig(), "127.0.0.1", 0)
    await runner.cleanup()


def test_cli_refuses_public_host_without_keys() -> None:
    env = {k: v for k, v in os.environ.items() if k != "REALTIME_AGENT_API_KEYS"}
    env["PYTHONPATH"] = str(ROOT)
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run_agent.py"), "--serve", "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "without an API key" in proc.stderr
    assert "REALTIME_AGENT_API_KEYS" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - t0 < 30  # refused before any model loads


def test_config_keys_from_yaml() -> None:
    from realtime.config import ConfigError, load_config
    from realtime.server.auth import is_loopback

    cfg = load_config("embedded", {"server.api_keys": ["k1"], "server.twilio_auth_token": "t"})
    assert cfg.server.api_keys == ["k1"] and cfg.server.twilio_auth_token == "t"
    with pytest.raises(ConfigError, match="api_keys"):
        load_config("embedded", {"server.api_keys": "k1"})
    with pytest.raises(ConfigError, match=r"api_keys\[0\]"):
        load_config("embedded", {"server.api_keys": [1]})
    assert all(map(is_loopback, ["127.0.0.1", "127.9.0.1", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.168.1.2", "example.com", ""]))
