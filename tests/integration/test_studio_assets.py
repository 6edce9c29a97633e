"""/docs and /studio load nothing from outside the gateway (they work offline)."""

from __future__ import annotations

import re

import httpx

from tests.stack import Stack

ASSET = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']|url\(["']?([^)"']+)""")


async def test_docs_and_studio_reference_only_the_gateway(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url) as http:
        pages = ["/docs", "/redoc", "/studio", "/studio/jobs/AAAAAAAAAAAAAAAAAAAAAA"]
        referenced: set[str] = set()
        for page in pages:
            answer = await http.get(page)
            assert answer.status_code == 200, page
            referenced |= {a or b for a, b in ASSET.findall(answer.text)}
        assert referenced, "the pages load scripts and styles"
        for url in sorted(referenced):
            assert url.startswith("/") and not url.startswith("//"), f"{url} is not served by the gateway"
            assert (await http.get(url)).status_code == 200, url
        for name in ("studio.js", "index.js", "job.js", "studio.css"):
            text = (await http.get(f"/studio/static/{name}")).text
            # the SVG namespace is a name, not a download
            assert set(re.findall(r"https?://[^\"'\s)]+", text)) <= {"http://www.w3.org/2000/svg"}, name


async def test_studio_answers_carry_csp_nosniff_and_no_framing(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url) as http:
        for path in ("/studio", "/studio/jobs/AAAAAAAAAAAAAAAAAAAAAA", "/studio/static/studio.js"):
            answer = await http.get(path)
            assert answer.status_code == 200, path
            policy = answer.headers.get("content-security-policy", "")
            directives = dict(d.strip().partition(" ")[::2] for d in policy.split(";") if d.strip())
            assert directives.get("frame-ancestors") == "'none'", path
            assert directives.get("script-src") == "'self'" and directives.get("default-src") == "'none'", path
            assert answer.headers.get("x-content-type-options") == "nosniff", path
