"""Who may use the server: API keys, short-lived client secrets, Twilio's request signature.

- **API keys** come from ``server.api_keys`` and ``REALTIME_AGENT_API_KEYS`` (comma-separated).
  With keys, ``/v1/realtime``, ``POST /offer``, ``/metrics`` and
  ``POST /v1/realtime/client_secrets`` want ``Authorization: Bearer <key>``. Without keys the
  server is open, which ``check_bind`` allows on loopback only.
- **Client secrets** (``ek_...``), made by an authenticated ``POST /v1/realtime/client_secrets``
  as in OpenAI's Realtime API, stand in for a key on ``/v1/realtime`` and ``/offer`` until they
  expire (10 minutes unless asked otherwise), for browsers that must not hold a key: as the
  Bearer token, or as the WebSocket subprotocol ``openai-insecure-api-key.<secret>``.
- **Twilio**: with ``server.twilio_auth_token`` or ``TWILIO_AUTH_TOKEN``, ``/twilio`` wants a
  valid ``X-Twilio-Signature`` (HMAC-SHA1 of the URL under the auth token, base64).

Keys and secrets are compared with ``hmac.compare_digest`` and never logged; a log line names a
key by ``fingerprint`` at most.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from aiohttp import web

from realtime.config import ServerConfig

log = logging.getLogger(__name__)

ENV_API_KEYS = "REALTIME_AGENT_API_KEYS"
ENV_TWILIO_TOKEN = "TWILIO_AUTH_TOKEN"
SECRET_PREFIX = "ek_"
SUBPROTOCOL_PREFIX = "openai-insecure-api-key."
DEFAULT_SECRET_S = 600
MIN_SECRET_S, MAX_SECRET_S = 10, 7200  # OpenAI's bounds for expires_after.seconds

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# The request's principal, set by ``require_key``: the fingerprint of the API key used, or of the
# key that made the client secret used; None when the server has no keys.
PRINCIPAL: web.RequestKey[str | None] = web.RequestKey("principal", object)


def principal(request: web.Request) -> str | None:
    """Who is asking (``max_sessions_per_key`` counts by it): a key's fingerprint, or None."""
    value = request.get(PRINCIPAL)
    return value if isinstance(value, str) else None


class AccessConfigError(ValueError):
    """The server would be open to the network: a non-loopback host and no API key."""


def fingerprint(secret: str) -> str:
    """A short, non-reversible name for a key or secret, for logs."""
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()[:8]


def is_loopback(host: str) -> bool:
    if host.strip().lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def configured_keys(config: ServerConfig, environ: dict[str, str] | None = None) -> list[str]:
    env = os.environ if environ is None else environ
    keys = [k.strip() for k in config.api_keys] + env.get(ENV_API_KEYS, "").split(",")
    return list(dict.fromkeys(k.strip() for k in keys if k.strip()))


def configured_twilio_token(
    config: ServerConfig, environ: dict[str, str] | None = None
) -> str | None:
    env = os.environ if environ is None else environ
    return config.twilio_auth_token or env.get(ENV_TWILIO_TOKEN) or None


def check_bind(host: str, config: ServerConfig, environ: dict[str, str] | None = None) -> None:
    """Raise ``AccessConfigError`` unless ``host`` is loopback or API keys are configured."""
    if is_loopback(host) or configured_keys(config, environ):
        return
    raise AccessConfigError(
        f"refusing to serve on {host!r} without an API key: anyone who can reach it could use "
        f"the agent. Set server.api_keys in the config or {ENV_API_KEYS}=key1,key2 "
        "in the environment (or bind to 127.0.0.1)"
    )


def twilio_signature(token: str, url: str, params: dict[str, str] | None = None) -> str:
    """Twilio's ``X-Twilio-Signature``: base64 HMAC-SHA1 of the URL followed by the POST
    parameters (sorted by name, each name then value), keyed by the auth token."""
    data = url + "".join(k + v for k, v in sorted((params or {}).items()))
    digest = hmac.new(token.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


@dataclass
class SecretStore:
    """Client secrets in memory, each with its expiry (``clock()`` seconds, epoch) and the
    fingerprint of the key that made it (its sessions count against that key's limit)."""

    clock: Callable[[], float] = time.time
    _expiry: dict[str, float] = field(default_factory=dict)
    _owner: dict[str, str | None] = field(default_factory=dict)

    def create(self, seconds: int = DEFAULT_SECRET_S, owner: str | None = None) -> tuple[str, int]:
        now = self.clock()
        self._purge(now)
        value = SECRET_PREFIX + secrets.token_urlsafe(24)
        expires_at = int(now + seconds)
        self._expiry[value] = expires_at
        self._owner[value] = owner
        return value, expires_at

    def valid(self, token: str) -> bool:
        return self.owner(token) is not False

    def owner(self, token: str) -> str | None | bool:
        """The owner of a live secret ``token`` (``None`` if unknown), or ``False`` if
        ``token`` is no live secret."""
        now = self.clock()
        self._purge(now)
        found: str | None | bool = False
        for value in list(self._expiry):  # constant time per comparison, no lookup by token
            if hmac.compare_digest(value.encode(), token.encode()):
                found = self._owner.get(value)
        return found

    def _purge(self, now: float) -> None:
        for value, expires_at in list(self._expiry.items()):
            if expires_at <= now:
                del self._expiry[value]
                self._owner.pop(value, None)


def _error(status: int, code: str, message: str) -> web.Response:
    body = {"error": {"type": "invalid_request_error", "code": code, "message": message}}
    return web.json_response(body, status=status)


def _too_large(limit: int) -> web.Response:
    return _error(413, "message_too_large", f"the body is larger than max_message_bytes ({limit})")


def bearer_token(request: web.Request) -> str | None:
    """The Bearer token, else a secret carried as the ``openai-insecure-api-key.`` subprotocol."""
    auth = request.headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    for proto in request.headers.get("Sec-WebSocket-Protocol", "").split(","):
        proto = proto.strip()
        if proto.startswith(SUBPROTOCOL_PREFIX) and len(proto) > len(SUBPROTOCOL_PREFIX):
            return proto[len(SUBPROTOCOL_PREFIX) :]
    return None


class Access:
    """The server's access policy, built once per app; ``require_*`` wrap route handlers."""

    def __init__(
        self,
        keys: Iterable[str] = (),
        twilio_token: str | None = None,
        clock: Callable[[], float] = time.time,
        max_body_bytes: int = 1 << 20,
    ) -> None:
        self._keys = [k.encode() for k in keys]
        self.twilio_token = twilio_token
        self.secrets = SecretStore(clock=clock)
        self.max_body_bytes = max_body_bytes

    @classmethod
    def from_config(
        cls,
        config: ServerConfig,
        environ: dict[str, str] | None = None,
        max_body_bytes: int = 1 << 20,
    ) -> Access:
        keys = configured_keys(config, environ)
        access = cls(keys, configured_twilio_token(config, environ), max_body_bytes=max_body_bytes)
        if keys:
            log.info("API keys required (%s)", ", ".join(fingerprint(k) for k in keys))
        if access.twilio_token:
            log.info("Twilio signatures required on /twilio")
        return access

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def is_key(self, token: str) -> bool:
        found = False
        for key in self._keys:
            found |= hmac.compare_digest(key, token.encode())
        return found

    def allows(self, request: web.Request, secrets_ok: bool) -> bool:
        return self.identify(request, secrets_ok) is not False

    def identify(self, request: web.Request, secrets_ok: bool) -> str | None | bool:
        """``False`` if the request may not pass; else its principal: the fingerprint of its
        key (or of the key that made its client secret), ``None`` when there are no keys."""
        if not self.enabled:
            return None
        token = bearer_token(request)
        if token is None:
            return False
        if self.is_key(token):
            return fingerprint(token)
        if not secrets_ok:
            return False
        owner = self.secrets.owner(token)
        return owner if owner is not False else False

    def require_key(self, handler: Handler, secrets_ok: bool = True) -> Handler:
        """``handler`` behind the API key (or a live client secret when ``secrets_ok``)."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            who = self.identify(request, secrets_ok)
            if who is False:
                log.warning(
                    "unauthorized %s %s from %s", request.method, request.path, request.remote
                )
                what = "an API key or a client secret" if secrets_ok else "an API key"
                return _error(
                    401,
                    "invalid_api_key",
                    f"missing or invalid credentials: send {what} as "
                    "'Authorization: Bearer <token>'",
                )
            request[PRINCIPAL] = who if isinstance(who, str) else None
            return await handler(request)

        return guarded

    def signature_ok(self, request: web.Request) -> bool:
        """``X-Twilio-Signature`` matches the request's URL. Behind a TLS proxy the server sees
        http:// where Twilio signed wss://, so the URL is tried under each scheme (host, path
        and query, what a replay would change, stay as received and signed)."""
        token = self.twilio_token
        if not token:
            return True
        given = request.headers.get("X-Twilio-Signature", "").encode()
        if not given:
            return False
        url = request.url
        ok = False
        for scheme in ("wss", "ws", "https", "http"):
            expected = twilio_signature(token, str(url.with_scheme(scheme)))
            ok |= hmac.compare_digest(expected.encode(), given)
        return ok

    def require_twilio_signature(self, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            if not self.signature_ok(request):
                log.warning(
                    "bad or missing X-Twilio-Signature on %s from %s", request.path, request.remote
                )
                return _error(403, "invalid_signature", "missing or invalid X-Twilio-Signature")
            return await handler(request)

        return guarded

    async def create_client_secret(self, request: web.Request) -> web.Response:
        """``POST /v1/realtime/client_secrets`` (behind ``require_key(secrets_ok=False)``)."""
        seconds = DEFAULT_SECRET_S
        if request.can_read_body:
            limit = self.max_body_bytes
            if (request.content_length or 0) > limit:
                return _too_large(limit)
            try:
                raw = await request.read()
            except web.HTTPRequestEntityTooLarge:
                return _too_large(limit)
            if len(raw) > limit:
                return _too_large(limit)
            try:
                body = json.loads(raw.decode() or "{}")
            except ValueError:
                return _error(400, "invalid_json", "the body is not valid JSON")
            after = body.get("expires_after") if isinstance(body, dict) else None
            if isinstance(after, dict):
                if after.get("anchor", "created_at") != "created_at":
                    return _error(400, "invalid_value", "expires_after.anchor must be created_at")
                seconds = after.get("seconds", DEFAULT_SECRET_S)
                if (
                    isinstance(seconds, bool)
                    or not isinstance(seconds, int)
                    or not MIN_SECRET_S <= seconds <= MAX_SECRET_S
                ):
                    return _error(
                        400,
                        "invalid_value",
                        f"expires_after.seconds must be an integer from {MIN_SECRET_S} "
                        f"to {MAX_SECRET_S}",
                    )
        value, expires_at = self.secrets.create(seconds, owner=principal(request))
        log.info("client secret %s made, expires at %d", fingerprint(value), expires_at)
        return web.json_response({"value": value, "expires_at": expires_at})
