"""The docs tell the truth: every setting is documented, the loop's defaults match the
code, every link resolves, and the README stays a front page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
PAGES = sorted([ROOT / "README.md", ROOT / "bench" / "README.md", *(ROOT / "docs").glob("*.md")])
LINK = re.compile(r"(?<!\!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    found = set()
    for heading in re.findall(r"^#{1,6} (.+)$", page.read_text(), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug)
    return found


def test_every_setting_is_documented_and_nothing_else() -> None:
    table = (ROOT / "docs" / "configuration.md").read_text()
    documented = set(re.findall(r"^\| `(GCR_[A-Z_]+)` \|", table, flags=re.MULTILINE))
    actual = {f"GCR_{name.upper()}" for name in Settings.model_fields}
    assert documented == actual


def test_each_setting_is_documented_under_its_role() -> None:
    """The three tables of docs/configuration.md are the three role classes."""
    from service.settings import GatewaySettings, SharedSettings, WorkerSettings

    text = (ROOT / "docs" / "configuration.md").read_text()
    shared = set(SharedSettings.model_fields)
    for heading, role, own in (
        ("### Shared", SharedSettings, shared),
        ("### Gateway", GatewaySettings, set(GatewaySettings.model_fields) - shared),
        ("### Worker", WorkerSettings, set(WorkerSettings.model_fields) - shared),
    ):
        section = text[text.index(heading) :].split("\n### ")[0].split("\n## ")[0]
        listed = {name.lower() for name in re.findall(r"^\| `GCR_([A-Z0-9_]+)` \|", section, flags=re.M)}
        assert listed == own, f"{role.__name__}: {listed ^ own}"


def test_ci_runs_the_readme_test_command() -> None:
    assert "./scripts/test" in README and "./scripts/demo" in README
    assert "./scripts/test" in (ROOT / ".ci" / "run").read_text()


def test_loop_defaults_in_the_docs_match_the_code() -> None:
    from gcr.types import LoopParams

    loop = (ROOT / "docs" / "loop.md").read_text()
    defaults = LoopParams()
    for field in ("max_rounds", "threshold", "candidates_per_round", "patience", "seed_policy", "refine_from"):
        value = getattr(defaults, field)
        assert re.search(rf"\| `{field}` \| `?{value}`? \|", loop), field


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves(page: Path) -> None:
    broken = []
    for match in LINK.finditer(page.read_text()):
        target = match.group(1) or match.group(2)
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        where = (page.parent / path).resolve() if path else page
        if not where.exists():
            broken.append(target)
        elif anchor and where.suffix == ".md" and anchor not in anchors(where):
            broken.append(target)
    assert broken == []


def test_the_readme_is_a_front_page() -> None:
    assert len(README.splitlines()) < 300
    for page in (ROOT / "docs").glob("*.md"):
        assert f"(docs/{page.name})" in README, f"the README does not link {page.name}"
