"""What a newcomer's screenshots showed wrong in the studio, and the refine-by-editing view,
checked in a real browser (Debian's chromium through Playwright) against a real gateway."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from itertools import combinations, pairwise
from typing import Any

from service.jobs.connection import connect
from service.jobs.keys import Keys
from tests.browser.chromium import ARTIFACTS, BROWSER
from tests.stack import Stack
from workers.critics.standin_config import StandinConfig, StandinRule

pytestmark = BROWSER

Box = tuple[float, float, float, float]  # x, y, width, height


def overlaps(a: Box, b: Box) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def crosses(segment: tuple[tuple[float, float], tuple[float, float]], box: Box) -> bool:
    """Whether a straight segment passes through a box (sampled finely enough for a chart)."""
    (x1, y1), (x2, y2) = segment
    return any(
        box[0] <= x1 + (x2 - x1) * t <= box[0] + box[2] and box[1] <= y1 + (y2 - y1) * t <= box[1] + box[3]
        for t in (n / 400 for n in range(401))
    )


async def rewrite_rounds(stack: Stack, job_id: str, change: Callable[[int, dict[str, Any]], None]) -> None:
    """Rewrite a job's stored rounds in place (as another version of the worker wrote them)."""
    client = connect(stack.settings.redis_url)
    try:
        key = Keys(stack.settings.redis_prefix).rounds(job_id)
        for index, raw in enumerate(await client.lrange(key, 0, -1)):
            stored = json.loads(raw)
            change(index, stored)
            await client.lset(key, index, json.dumps(stored))
    finally:
        await client.aclose()


async def finished_job(stack: Stack, scores: list[float], threshold: float) -> str:
    """A job that ran its rounds on the worker, scored `scores` by the stand-in critic."""
    await stack.configure_critic(StandinConfig(rules=[StandinRule(instruction="red fox", rounds=scores)]))
    await stack.start_worker()
    job_id = await stack.submit(
        "a red fox in fresh snow", loop={"max_rounds": len(scores), "threshold": threshold, "patience": None}
    )
    assert len((await stack.wait(job_id)).rounds) == len(scores)
    return job_id


async def test_a_job_without_a_preview_yet_says_so_never_null(stack: Stack, browser: object) -> None:
    from playwright.async_api import Browser, expect

    assert isinstance(browser, Browser)
    await stack.register_idle_worker()  # the jobs stay queued: no preview can have come
    page = await browser.new_page()
    for previews, expected in ((True, "waiting for the first preview"), (False, "this job did not ask for previews")):
        job_id = await stack.submit("a heron at dawn", previews=previews)
        await page.goto(f"{stack.url}/studio/jobs/{job_id}")
        live = page.locator("#live")
        await expect(live.locator(".stage")).to_have_text("queued")
        await expect(live.locator(".live-placeholder")).to_contain_text(expected)
        assert "null" not in await live.inner_text()


async def test_the_chart_has_a_y_axis_and_no_line_crosses_the_threshold_label(stack: Stack, browser: object) -> None:
    from playwright.async_api import Browser, expect

    assert isinstance(browser, Browser)
    # The last point sits just above the threshold, where the label used to be drawn.
    job_id = await finished_job(stack, [0.42, 0.61, 0.83], threshold=0.8)
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    await page.goto(f"{stack.url}/studio/jobs/{job_id}")
    chart = page.locator("svg.chart")
    line = chart.locator("polyline")  # the scores
    await expect(line).to_have_count(1, timeout=15_000)

    label = chart.locator("text", has_text="threshold")
    await expect(label).to_have_text("threshold 0.8")
    bbox = "n => { const b = n.getBBox(); return [b.x, b.y, b.width, b.height]; }"
    box: Box = tuple(await label.evaluate(bbox))
    points = [tuple(map(float, p.split(","))) for p in (await line.get_attribute("points") or "").split()]
    segments: list[Any] = list(pairwise(points))
    ends = "n => ['x1', 'y1', 'x2', 'y2'].map(a => Number(n.getAttribute(a)))"
    for axis_or_rule in await chart.locator("line").all():
        x1, y1, x2, y2 = await axis_or_rule.evaluate(ends)
        segments.append(((x1, y1), (x2, y2)))
    crossing = [s for s in segments if crosses(s, box)]
    assert not crossing, f"the threshold label {box} is crossed by {crossing}"
    for marker in await chart.locator("circle, rect").all():
        assert not overlaps(box, tuple(await marker.evaluate(bbox))), "a point covers the threshold label"

    await expect(chart.locator(".y-axis")).to_have_count(1)
    assert await chart.locator(".y-tick").all_text_contents() == ["0", "0.25", "0.5", "0.75", "1"]
    await expect(chart.locator(".y-title")).to_have_text("overall score (0–1)")
    # the ticks stand where their values are: 0 at the bottom, 1 at the top, evenly apart
    ys = [float(await tick.get_attribute("y") or "nan") for tick in await chart.locator(".y-tick").all()]
    assert ys == sorted(ys, reverse=True) and len({round(a - b, 6) for a, b in pairwise(ys)}) == 1
    assert len(segments) >= 8  # the axes and the rules were checked too


async def test_the_source_field_shows_in_edit_mode_only_and_overlaps_nothing(stack: Stack, browser: object) -> None:
    from playwright.async_api import Browser, expect

    assert isinstance(browser, Browser)
    await stack.register_idle_worker()
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    await page.goto(f"{stack.url}/studio")
    source = page.get_by_label("Source image")
    await expect(page.get_by_label("Mode", exact=True)).to_have_value("t2i")
    await expect(source).to_be_hidden()

    await page.get_by_label("Mode", exact=True).select_option("edit")
    await expect(source).to_be_visible()
    ARTIFACTS.mkdir(exist_ok=True)
    for width in (1280, 760, 420):
        await page.set_viewport_size({"width": width, "height": 900})
        form_box = await page.locator("#submit-form").bounding_box()
        assert form_box is not None
        boxes = {}
        for control in await page.locator("#submit-form input, #submit-form select, #submit-form textarea").all():
            if await control.is_visible():
                found = await control.bounding_box()
                assert found is not None
                boxes[await control.get_attribute("id")] = (found["x"], found["y"], found["width"], found["height"])
        assert {"source", "model", "strategy", "max_rounds"} <= set(boxes) and len(boxes) == 10
        assert "size" not in boxes, "an edit's size follows its source"
        for (a, box_a), (b, box_b) in combinations(boxes.items(), 2):
            assert not overlaps(box_a, box_b), f"at {width}px, {a} overlaps {b}: {box_a} {box_b}"
        right = form_box["x"] + form_box["width"] + 0.5
        for name, (x, _y, w, _h) in boxes.items():
            assert form_box["x"] <= x and x + w <= right, f"{name} spills out of the form at {width}px"
        await page.screenshot(path=str(ARTIFACTS / f"studio-form-{width}.png"), full_page=True)

    await page.get_by_label("Mode", exact=True).select_option("t2i")
    await expect(source).to_be_hidden()


async def test_the_favicon_is_a_real_icon(stack: Stack, browser: object) -> None:
    from playwright.async_api import Browser

    assert isinstance(browser, Browser)
    page = await browser.new_page()
    icon = f"{stack.url}/favicon.ico"  # where browsers ask for it, link or none
    answer = await page.request.get(icon)
    assert answer.status == 200 and answer.headers["content-type"] == "image/x-icon"
    assert (await answer.body()).startswith(b"\x00\x00\x01\x00")  # an ICO header
    await page.goto(f"{stack.url}/studio")
    assert await page.locator("link[rel=icon]").evaluate("link => link.href") == icon
    decode = "async url => { const img = new Image(); img.src = url; await img.decode(); return img.naturalWidth; }"
    assert await page.evaluate(decode, icon) >= 16  # the browser draws it


async def test_edit_rounds_show_action_model_reason_and_the_image_they_edited(stack: Stack, browser: object) -> None:
    from playwright.async_api import Browser, expect

    assert isinstance(browser, Browser)
    job_id = await finished_job(stack, [0.42, 0.61, 0.83], threshold=0.9)
    # Round 1 as an old worker wrote it (no action fields), rounds 2 and 3 as the edit strategy does.
    edits = {
        0: None,
        1: {"action": "edit", "model": "qwen-image-edit", "edited_from": {"round": 0, "candidate": 0},
            "reason": "auto: best 0.42 ≥ edit_above 0.4", "prompt": "make the snow fresher"},
        2: {"action": "edit", "model": "qwen-image-edit", "edited_from": {"round": 1, "candidate": 0},
            "reason": "auto: best 0.61 ≥ edit_above 0.4", "prompt": "sharpen the fox's fur"},
    }  # fmt: skip

    def as_written(index: int, stored: dict[str, Any]) -> None:
        for name in ("action", "model", "edited_from", "reason"):
            stored.pop(name, None)
        stored.update(edits[index] or {})

    await rewrite_rounds(stack, job_id, as_written)

    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    await page.goto(f"{stack.url}/studio/jobs/{job_id}")
    rounds = page.locator("article.round")
    await expect(rounds).to_have_count(3, timeout=15_000)
    await expect(rounds.nth(0).locator(".action .badge")).to_have_text("generate")  # an old round
    await expect(rounds.nth(0).locator(".edited-from")).to_have_count(0)
    for n in (1, 2):
        action = rounds.nth(n).locator(".action")
        await expect(action.locator(".badge")).to_have_text("edit")
        await expect(action.locator(".model")).to_have_text("qwen-image-edit")
        await expect(action.locator(".reason")).to_have_text(f"why: {edits[n]['reason']}")  # type: ignore[index]
        await expect(rounds.nth(n).locator(".prompt-label")).to_have_text("Edit instruction")
    # an instruction is not diffed against the prompt of a generate round
    await expect(rounds.nth(1).locator(".prompt")).to_have_text("make the snow fresher")
    await expect(rounds.nth(1).locator(".prompt ins, .prompt del")).to_have_count(0)

    link = rounds.nth(2).locator("a.edited-from")
    await expect(link).to_have_text("↳ edited from round 2, candidate 1")  # 1-based, as the headings
    await expect(link).to_have_attribute("href", "#round-2-candidate-1")
    thumb = link.locator("img.edited-from-thumb")
    await expect(thumb).to_have_js_property("complete", True)
    assert await thumb.evaluate("img => img.naturalWidth") > 0
    target = page.locator("#round-2-candidate-1")
    await expect(target.locator("img")).to_have_attribute("alt", re.compile(r"^Round 2, candidate 1,"))
    await expect(target).not_to_have_class(re.compile(r"\bhighlight\b"))
    await link.hover()
    await expect(target).to_have_class(re.compile(r"\bhighlight\b"))
    await expect(page.locator(".candidate.highlight")).to_have_count(1)
    await rounds.nth(1).locator("a.edited-from").click()
    await expect(page.locator("#round-1-candidate-1")).to_have_class(re.compile(r"\bhighlight\b"))
    await expect(page.locator(".candidate.highlight")).to_have_count(1)

    await expect(page.locator("svg.chart")).to_have_attribute(
        "aria-label", "Overall score by round: round 1 0.420, round 2 0.610 (edit), round 3 0.830 (edit); threshold 0.9"
    )
    await expect(page.locator("svg.chart rect")).to_have_count(2)  # edit rounds' points are squares
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "studio-edit-rounds.png"), full_page=True)


async def test_a_cut_prompt_and_an_unjudged_round_say_so(stack: Stack, browser: object) -> None:
    from playwright.async_api import Browser, expect

    assert isinstance(browser, Browser)
    job_id = await finished_job(stack, [0.42, 0.61], threshold=0.9)
    # Round 2 as a worker writes it when its refinement was longer than CLIP reads and its
    # critique then failed for good: the prompt it read, the cut, the image unjudged.

    def cut_and_unjudged(index: int, stored: dict[str, Any]) -> None:
        if index != 1:
            return
        stored["prompt"] = "a red fox in fresh snow at dawn"
        stored["prompt_fit"] = {"encoder": "CLIPTokenizer", "limit": 77, "tokens": 95, "cut": True,
                                "dropped": "with long blue shadows"}  # fmt: skip
        stored.update({"chosen": None, "overall": None, "delta": None})
        error = {"code": "critique_unparseable", "message": "no score (after one re-ask)", "retryable": False}
        stored["candidates"][0].update({"critique": None, "overall": None, "error": error})

    await rewrite_rounds(stack, job_id, cut_and_unjudged)

    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    await page.goto(f"{stack.url}/studio/jobs/{job_id}")
    rounds = page.locator("article.round")
    await expect(rounds).to_have_count(2, timeout=15_000)
    cut = rounds.nth(1).locator(".prompt-cut")
    shortened = "Shortened to the 77 tokens the generator's CLIPTokenizer reads (the text had 95)"
    await expect(cut).to_contain_text(shortened)
    await expect(cut.locator("del")).to_have_text("with long blue shadows")
    await expect(rounds.nth(0).locator(".prompt-cut")).to_have_count(0)
    second = rounds.nth(1).locator(".candidate")
    await expect(second.locator(".error")).to_have_text("critique_unparseable: no score (after one re-ask)")
    await expect(second.locator("img")).to_have_js_property("complete", True)
    assert await second.locator("img").evaluate("img => img.naturalWidth") > 0  # the unjudged image is shown
    # One point, round 1's: an unjudged round is not plotted as a 0.
    await expect(page.locator("svg.chart circle")).to_have_count(1)
    await expect(page.locator("svg.chart")).to_have_attribute(
        "aria-label", "Overall score by round: round 1 0.420, round 2 –; threshold 0.9"
    )


async def test_the_new_job_form_sets_model_size_and_strategy(stack: Stack, browser: object) -> None:
    from playwright.async_api import Browser, expect

    assert isinstance(browser, Browser)
    await stack.start_worker()
    page = await browser.new_page()
    await page.goto(f"{stack.url}/studio")
    model = stack.settings.generator or ""
    await expect(page.locator(f"#model option[value='{model}']")).to_have_count(1)  # from GET /v1/models
    await page.fill("#prompt", "a kingfisher on a reed")
    await page.select_option("#model", model)
    await page.select_option("#size", "64x64")
    await page.select_option("#strategy", "auto")
    await page.click("button.primary")
    await page.wait_for_url(re.compile(r"/studio/jobs/"))
    job = await stack.client.get(page.url.rsplit("/", 1)[1])
    assert job.spec.model == model and job.spec.loop.strategy == "auto"
    assert (job.spec.generation.width, job.spec.generation.height) == (64, 64)
    # The key field shows its whole placeholder.
    fits = await page.goto(f"{stack.url}/studio") and await page.eval_on_selector(
        "#api-key",
        """e => { const c = document.createElement("canvas").getContext("2d"); const st = getComputedStyle(e);
                  c.font = `${st.fontSize} ${st.fontFamily}`;
                  return c.measureText(e.placeholder).width <= e.clientWidth - parseFloat(st.paddingLeft)
                         - parseFloat(st.paddingRight); }""",
    )
    assert fits


async def test_a_job_page_says_it_is_loading_and_its_score_header_fits_one_line(stack: Stack, browser: object) -> None:
    import asyncio

    from playwright.async_api import Browser, Route, expect

    assert isinstance(browser, Browser)
    job_id = await finished_job(stack, [0.42, 0.61], threshold=0.9)
    page = await browser.new_page(viewport={"width": 720, "height": 900})  # a laptop's half screen
    release = asyncio.Event()

    async def slow(route: Route) -> None:
        await release.wait()
        await route.continue_()

    await page.route(lambda url: url.endswith(f"/jobs/{job_id}") and "/studio/" not in url, slow)  # the API only
    await page.goto(f"{stack.url}/studio/jobs/{job_id}", wait_until="domcontentloaded")
    await expect(page.locator("#summary")).to_contain_text("Loading the job")
    release.set()
    await expect(page.locator("#summary .status")).to_have_text("succeeded")
    await expect(page.locator("#summary")).not_to_contain_text("Loading")
    lines = await page.eval_on_selector(
        ".dims th:nth-child(2)",
        "th => { const r = document.createRange(); r.selectNodeContents(th); return r.getClientRects().length; }",
    )
    assert lines == 1, "the 'score (1–4)' header wraps"
