"""The web page in a real browser: headless Debian chromium with a fake microphone that plays
a spoken question loads the page, talks over WebRTC, and shows the transcript; the agent's
audio arrives back."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
from server_helpers import QUESTION, RunningServer, speech, start_server, write_wav

from realtime.config import ServerConfig

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="Debian chromium (/usr/bin/chromium) is not installed"
    ),
]


def chromium_args(wav: Path) -> list[str]:
    return [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}%noloop",
        "--autoplay-policy=no-user-gesture-required",
    ]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(server_runtime: Any) -> Any:
    srv = await start_server(server_runtime, ServerConfig())
    yield srv
    await srv.runner.cleanup()


async def test_page_talks_and_shows_transcript(server: RunningServer, tmp_path: Path) -> None:
    from playwright.async_api import async_playwright

    rate = 48000
    # leading silence covers the WebRTC set-up: the fake microphone starts with getUserMedia
    wav = write_wav(
        tmp_path / "question.wav",
        np.concatenate(
            [
                np.zeros(int(2.5 * rate), np.int16),
                speech(QUESTION, rate),
                np.zeros(3 * rate, np.int16),
            ]
        ),
        rate,
    )
    async with async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=chromium_args(wav)
        )
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 860})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(server.http)
            for element in ("user-transcript", "agent-answer", "agent-thinking", "latency"):
                assert await page.locator(f"#{element}").count() == 1
            await page.click("#talk")
            await page.wait_for_function(
                "document.getElementById('user-transcript').textContent.toLowerCase()"
                ".includes('capital')",
                timeout=120_000,
            )
            await page.wait_for_function(
                "window.voiceAgent.events.some(e => e.event === 'turn')", timeout=120_000
            )
            await page.wait_for_function(
                "window.voiceAgent.audio.packets > 20 && window.voiceAgent.audio.speechMs > 200",
                timeout=30_000,
            )
            answer = await page.text_content("#agent-answer")
            assert answer and answer.strip() not in ("", "…")
            bars = await page.locator("#latency-chart rect").count()
            assert bars >= 1
            assert not errors, errors
            await page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        finally:
            await browser.close()
    await asyncio.sleep(0.2)


@pytest.mark.parametrize("how", ["fragment", "prompt"])
async def test_page_with_api_keys_uses_a_client_secret(tmp_path: Path, how: str) -> None:
    """With keys on, the page trades the key (from /#key=... or a prompt) for a client secret
    and connects with it; the key leaves the address bar. (On the stand-in pipeline: only the
    page's access handshake is under test, not a session.)"""
    from playwright.async_api import async_playwright
    from server_helpers import FakeRuntime

    key = "sk-browser-test"
    srv = await start_server(FakeRuntime(), ServerConfig(api_keys=[key]))
    wav = write_wav(tmp_path / "silence.wav", np.zeros(48000 * 3, np.int16), 48000)
    try:
        async with async_playwright() as p:
            browser = await p.chromium.launch(
                executable_path=str(CHROMIUM), headless=True, args=chromium_args(wav)
            )
            try:
                page = await browser.new_page()
                prompts: list[str] = []

                async def on_dialog(dialog: Any) -> None:
                    prompts.append(dialog.message)
                    await dialog.accept(key)

                page.on("dialog", on_dialog)
                url = f"{srv.http}/#key={key}" if how == "fragment" else srv.http
                await page.goto(url)
                await page.click("#talk")
                await page.wait_for_function(
                    "document.getElementById('status').textContent === 'Your turn'",
                    timeout=30_000,
                )
                assert key not in page.url
                assert len(prompts) == (1 if how == "prompt" else 0)
            finally:
                await browser.close()
    finally:
        await srv.runner.cleanup()
