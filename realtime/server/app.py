"""The aiohttp application: web page, WebRTC signalling, WebSocket APIs, health and metrics.

``serve(config, host, port)`` loads one ``Runtime`` (models shared by every session) and
serves until interrupted; ``create_app(runtime, server_config)`` builds the app around a
runtime that already exists (tests, embedding).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest

from realtime.config import AgentConfig, ServerConfig
from realtime.server import openai_realtime, twilio, webrtc
from realtime.server.auth import Access, check_bind
from realtime.server.bridge import WEB_DIR, AgentRuntime, ServerContext
from realtime.server.metrics import ServerMetrics

log = logging.getLogger(__name__)

CTX_KEY: web.AppKey[ServerContext] = web.AppKey("ctx", ServerContext)
ACCESS_KEY: web.AppKey[Access] = web.AppKey("access", Access)


def context(request: web.Request) -> ServerContext:
    return request.app[CTX_KEY]


async def _healthz(request: web.Request) -> web.Response:
    ctx = context(request)
    return web.json_response(
        {
            "status": "draining" if ctx.draining else "ok",
            "sessions": ctx.active,
            "max_sessions": ctx.config.max_sessions,
        },
        status=503 if ctx.draining else 200,
    )


def engine_stats(runtime: AgentRuntime) -> dict[str, int] | None:
    """The engine's ``capacity_stats()`` (sessions, lanes, cache slots and positions in use)."""
    stats = getattr(getattr(runtime, "engine", None), "capacity_stats", None)
    if not callable(stats):
        return None
    try:
        return dict(stats())
    except Exception:  # metrics must never fail a scrape
        log.debug("engine capacity_stats failed", exc_info=True)
        return None


async def _metrics(request: web.Request) -> web.Response:
    ctx = context(request)
    engine = getattr(ctx.runtime, "engine", None)
    body = ctx.metrics.render(getattr(engine, "counters", None), engine_stats(ctx.runtime))
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})


async def _index(request: web.Request) -> web.StreamResponse:
    index = context(request).web_dir / "index.html"
    if not index.is_file():
        raise web.HTTPNotFound(text="web/index.html is missing")
    return web.FileResponse(index)


async def _on_shutdown(app: web.Application) -> None:
    """Whatever is still open when the app stops (after a drain: nothing) is ended now."""
    ctx = app[CTX_KEY]
    if ctx.live:
        await ctx.drain(0.0)


def create_app(
    runtime: AgentRuntime, config: ServerConfig | None = None, web_dir: Path = WEB_DIR
) -> web.Application:
    config = config or ServerConfig()
    ctx = ServerContext(runtime=runtime, config=config, metrics=ServerMetrics(), web_dir=web_dir)
    # aiohttp's own limit sits above ours, so that a message a little too big gets a clear
    # error event from the handler (and the connection lives on) instead of a bare close.
    app = web.Application(client_max_size=config.max_message_bytes * 4)
    app[CTX_KEY] = ctx
    access = app[ACCESS_KEY] = Access.from_config(config, max_body_bytes=config.max_message_bytes)
    app.router.add_get("/", _index)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", access.require_key(_metrics, secrets_ok=False))
    app.router.add_post("/offer", access.require_key(webrtc.make_offer_handler(ctx)))
    app.router.add_get("/v1/realtime", access.require_key(openai_realtime.make_handler(ctx)))
    app.router.add_post(
        "/v1/realtime/client_secrets",
        access.require_key(access.create_client_secret, secrets_ok=False),
    )
    app.router.add_get("/twilio", access.require_twilio_signature(twilio.make_handler(ctx)))
    if web_dir.is_dir():
        app.router.add_static("/static/", web_dir)
    app.on_shutdown.append(_on_shutdown)
    return app


class PathAccessLogger(AbstractAccessLogger):
    """aiohttp's access log without query strings: a Twilio stream URL or a client's query
    may carry a caller's data (a phone number, a name), and logs hold none of it."""

    def log(self, request: BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            '%s "%s %s" %d %.3f s',
            request.remote,
            request.method,
            request.path,
            response.status,
            time,
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


def make_runner(app: web.Application) -> web.AppRunner:
    """The app's runner, with the access log that leaves query strings out."""
    return web.AppRunner(app, handle_signals=False, access_log_class=PathAccessLogger)


async def run_server(
    runtime: AgentRuntime, config: ServerConfig, host: str, port: int
) -> web.AppRunner:
    """Start serving on ``host:port`` and return the runner (``await runner.cleanup()``).

    Raises ``AccessConfigError`` for a non-loopback ``host`` without API keys."""
    check_bind(host, config)
    runner = make_runner(create_app(runtime, config))
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner


async def serve_forever(
    config: AgentConfig, host: str | None = None, port: int | None = None
) -> None:
    from realtime.runtime import Runtime  # the models load here, not at import

    host = host or config.server.host
    port = port or config.server.port
    check_bind(host, config.server)  # before the models load
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runtime = await Runtime.create(config)
    runner = await run_server(runtime, config.server, host, port)
    log.info("serving on http://%s:%d (page /, WebRTC /offer, /v1/realtime, /twilio)", host, port)
    print(f"Serving on http://{host}:{port}  (Ctrl-C or SIGTERM to stop)", flush=True)
    try:
        await stop.wait()
        print(
            f"Stopping: draining sessions (up to {config.server.shutdown_drain_s:g} s)", flush=True
        )
        # refuse new sessions, tell live ones, let answers in flight finish, close them all
        await runner.app[CTX_KEY].drain(config.server.shutdown_drain_s)
    finally:
        await runner.cleanup()
        close = getattr(runtime, "close", None)
        if close is not None:
            result = close()
            if asyncio.iscoroutine(result):
                await result
    print("Stopped", flush=True)


def serve(config: AgentConfig, host: str | None = None, port: int | None = None) -> None:
    """Blocking entry point of ``run_agent.py --serve``: serve until Ctrl-C or SIGTERM, which
    drain (``server.shutdown_drain_s``) and return normally (exit status 0)."""
    try:
        asyncio.run(serve_forever(config, host, port))
    except KeyboardInterrupt:
        pass
