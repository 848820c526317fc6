"""The browser page shows tool calls and the results sent back in its reasoning panel
(headless Debian chromium; the page's own event handler is fed the data channel's events)."""

from __future__ import annotations

import pytest
import pytest_asyncio
from server_helpers import FakeRuntime, start_server
from test_server_browser import CHROMIUM

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="Debian chromium (/usr/bin/chromium) is not installed"
    ),
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server():
    srv = await start_server(FakeRuntime())
    yield srv
    await srv.runner.cleanup()


async def test_tool_call_and_result_in_the_reasoning_panel(server) -> None:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(server.http)
            await page.evaluate(
                """() => {
                  onEvent({event: "thinking", text: "the user wants the weather"});
                  onEvent({event: "tool_call", call_id: "call_1", name: "get_weather",
                           arguments: '{"city":"Paris"}'});
                  onEvent({event: "turn", turn: 1, first_packet_s: null, breakdown: {},
                           interrupted: false, transcript: "weather?", answer: "", spoken: ""});
                  onEvent({event: "tool_result", call_id: "call_1", name: "get_weather",
                           output: '{"sky":"sunny"}'});
                  onEvent({event: "answer", text: "It is sunny in Paris."});
                }"""
            )
            panel = page.locator("#agent-thinking")
            lines = await page.locator("#agent-thinking .tool-line").all_text_contents()
            assert lines == [
                '→ get_weather({"city":"Paris"})',
                '← get_weather: {"sky":"sunny"}',
            ]
            assert await page.locator("#thinking-panel").get_attribute("open") is not None
            assert "sunny in Paris" in (await page.text_content("#agent-answer") or "")
            assert await panel.count() == 1
            assert not errors, errors
        finally:
            await browser.close()
