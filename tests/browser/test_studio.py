"""The studio in a real browser (Debian's chromium driven by Playwright): act as a user, then
check what a person would see. CI runs these (it installs chromium); without chromium they
skip locally, never in CI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.gateway.auth import hash_key
from tests.browser.chromium import ARTIFACTS, BROWSER
from tests.stack import Stack
from workers.critics.standin_config import StandinConfig, StandinRule

pytestmark = BROWSER

FOX = "a red fox in fresh snow, telephoto"
pytest_plugins = ("tests.generator_fixtures",)


async def test_a_three_round_job_seen_live_and_complete(stack: Stack, browser: object) -> None:
    from playwright.async_api import Browser, expect

    assert isinstance(browser, Browser)
    await stack.configure_critic(StandinConfig(rules=[StandinRule(instruction="red fox", rounds=[0.42, 0.61, 0.83])]))
    await stack.start_worker(generator="sim:0.4")
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    await page.goto(f"{stack.url}/studio")
    await page.get_by_label("Instruction").fill(FOX)
    await page.get_by_label("Max rounds").fill("4")
    await page.get_by_label("Threshold (0–1)").fill("0.8")
    await page.get_by_role("button", name="Generate").click()
    await page.wait_for_url("**/studio/jobs/*")
    job_id = page.url.rsplit("/", 1)[-1]

    await expect(page.locator("#live .stage")).to_contain_text("Round", timeout=15_000)  # live, while it runs
    await expect(page.locator(".stop-reason")).to_have_text("accepted: the score reached the threshold", timeout=30_000)
    rounds = page.locator("article.round")
    await expect(rounds).to_have_count(3)
    sources = [await img.get_attribute("src") for img in await page.locator(".candidate img").all()]
    assert sources == [f"{stack.url}/jobs/{job_id}/images/{r}/0" for r in range(3)]
    assert "Round 3, candidate 1, overall 0.830" == await page.locator(".candidate img").nth(2).get_attribute("alt")
    await expect(page.locator("#job-title")).to_have_text(FOX)
    await expect(rounds.nth(0).locator(".prompt")).to_have_text(FOX)
    # the prompt a round used, as a reader sees it once the diff's deletions are struck out
    used = (
        "n => { const c = n.cloneNode(true); c.querySelectorAll('del').forEach(d => d.remove());"
        " return c.textContent.replace(/\\s+/g, ' ').trim(); }"
    )
    assert await rounds.nth(1).locator(".prompt").evaluate(used) == f"{FOX} [refined r0 c0]"
    assert await rounds.nth(2).locator(".prompt").evaluate(used) == f"{FOX} [refined r1 c0]"
    await expect(rounds.nth(2).locator(".prompt del")).to_have_text("r0")
    await expect(rounds.nth(1).locator(".prompt ins").first).to_be_visible()  # what the refinement changed
    await expect(page.locator("#best-score")).to_have_text("0.830")
    await expect(page.locator(".candidate.best .badge.best")).to_have_count(1)
    dims = rounds.nth(2).locator("table.dims tbody tr")
    justifications = [(await row.locator("td").nth(2).inner_text()).strip() for row in await dims.all()]
    assert len(justifications) >= 3 and all(justifications)
    await expect(page.locator("svg.chart")).to_have_attribute(
        "aria-label", "Overall score by round: round 1 0.420, round 2 0.610, round 3 0.830; threshold 0.8"
    )
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "studio-job.png"), full_page=True)

    # A second job, cancelled from its page while it runs.
    slow = await stack.submit("a slow heron", loop={"max_rounds": 20, "threshold": 1.0, "patience": None})
    await page.goto(f"{stack.url}/studio/jobs/{slow}")
    await page.get_by_role("button", name="Cancel job").click()
    await expect(page.locator("#summary .status")).to_have_text("cancelled", timeout=20_000)
    await page.goto(f"{stack.url}/studio")
    await expect(page.locator("#jobs tr")).to_have_count(2)
    await expect(page.locator("#jobs tr").first).to_contain_text("a slow heron")  # newest first


async def test_with_auth_on_the_key_stays_in_the_tab_and_images_load(
    redis_url: str, redis_prefix: str, standin_url: str, browser: object
) -> None:
    from playwright.async_api import Browser, expect

    assert isinstance(browser, Browser)
    key = "gcr_studio-test-key"
    settings = {"auth_disabled": False, "api_keys": {hash_key(key): "studio"}}
    async with Stack(redis_url, redis_prefix, standin_url, **settings) as stack:
        await stack.start_worker()
        page = await browser.new_page()
        await page.goto(f"{stack.url}/studio")
        await expect(page.locator("#jobs-error")).to_contain_text("401")
        await page.get_by_label("API key (kept in this tab only)").fill(key)
        await page.get_by_role("button", name="Use key").click()
        await page.get_by_label("Instruction").fill("a kite over the sea")
        await page.get_by_label("Max rounds").fill("1")
        await page.get_by_role("button", name="Generate").click()
        await page.wait_for_url("**/studio/jobs/*")
        assert key not in page.url
        image = page.locator(".candidate img").first
        await expect(image).to_have_attribute("src", __import__("re").compile(r"^blob:"), timeout=20_000)
        assert await image.evaluate("img => img.complete && img.naturalWidth > 0")
        assert await page.evaluate("sessionStorage.getItem('gcr-api-key')") == key


async def test_live_previews_show_while_denoising(stack: Stack, browser: object, tiny_cache_dir: Path) -> None:
    from playwright.async_api import Browser, expect

    assert isinstance(browser, Browser)
    await stack.start_worker(
        generator="tiny:sd", cache_dir=tiny_cache_dir, generator_device="cpu", preview_every_steps=1, max_batch=1
    )
    page = await browser.new_page()
    await page.goto(f"{stack.url}/studio")
    await page.get_by_label("Instruction").fill("a heron at dawn")
    await page.get_by_label("Max rounds").fill("2")
    await page.get_by_label("Threshold (0–1)").fill("1")
    # many small steps, so the page catches the job mid-denoise
    await page.route("**/generate", _with_steps)
    await page.get_by_role("button", name="Generate").click()
    await page.wait_for_url("**/studio/jobs/*")
    preview = page.locator(".live-preview img")
    await expect(preview).to_have_attribute(
        "src", __import__("re").compile(r"^data:image/jpeg;base64,"), timeout=30_000
    )
    assert "Live preview of round" in (await preview.get_attribute("alt") or "")
    await expect(page.locator(".stop-reason")).to_be_visible(timeout=60_000)


async def _with_steps(route: Any) -> None:
    """Add `generation.steps` to the studio's submit (the form leaves generation to the model)."""
    import json

    body = json.loads(route.request.post_data or "{}")
    body["generation"] = {"steps": 60}
    await route.continue_(post_data=json.dumps(body))


async def test_ten_rounds_of_four_candidates_render(stack: Stack, browser: object) -> None:
    from playwright.async_api import Browser, expect

    assert isinstance(browser, Browser)
    await stack.start_worker(max_batch=4)
    loop = {"max_rounds": 10, "candidates_per_round": 4, "threshold": 1.0, "patience": None}
    job_id = await stack.submit("forty pictures", loop=loop)
    assert len((await stack.wait(job_id)).rounds) == 10
    page = await browser.new_page()
    await page.goto(f"{stack.url}/studio/jobs/{job_id}")
    await expect(page.locator("article.round")).to_have_count(10, timeout=20_000)
    images = page.locator(".candidate img")
    await expect(images).to_have_count(40)
    # expect() rather than wait_for_function: the studio's CSP (no 'unsafe-eval') refuses
    # the string predicate Playwright would evaluate in the page
    for index in range(40):
        await expect(images.nth(index)).to_have_js_property("complete", True, timeout=20_000)
    next_frame = (
        "() => new Promise(done => { const t = performance.now();"
        " requestAnimationFrame(() => done(performance.now() - t)); })"
    )
    busy_ms = await page.evaluate(next_frame)
    assert busy_ms < 1000  # the page answers: the next frame comes within a second


async def test_a_quiet_job_is_followed_through_keepalives(
    redis_url: str, redis_prefix: str, standin_url: str, browser: object
) -> None:
    """Critiques longer than the keep-alive: the page skips the keep-alives and shows the end."""
    from playwright.async_api import Browser, expect

    assert isinstance(browser, Browser)
    async with Stack(redis_url, redis_prefix, standin_url, sse_keepalive_s=0.2) as quiet:
        await quiet.configure_critic(
            StandinConfig(latency_s=1.5, rules=[StandinRule(instruction="heron", rounds=[0.5, 0.9])])
        )
        await quiet.start_worker()
        job_id = await quiet.submit("a grey heron", loop={"max_rounds": 2, "threshold": 0.8})
        page = await browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        await page.goto(f"{quiet.url}/studio/jobs/{job_id}")
        await expect(page.locator(".stop-reason")).to_have_text(
            "accepted: the score reached the threshold", timeout=30_000
        )
        await expect(page.locator("article.round")).to_have_count(2)
        assert errors == []
