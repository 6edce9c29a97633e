"""The studio's browser tests share one fixture: Debian's chromium, launched through Playwright."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.browser.chromium import CHROMIUM


@pytest.fixture
async def browser() -> AsyncIterator[object]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        await launched.close()
