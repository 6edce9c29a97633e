"""The README tells the truth about configuration and the two commands."""

from __future__ import annotations

import re
from pathlib import Path

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_every_setting_is_documented_and_nothing_else() -> None:
    documented = set(re.findall(r"^\| `(GCR_[A-Z_]+)` \|", README, flags=re.MULTILINE))
    actual = {f"GCR_{name.upper()}" for name in Settings.model_fields}
    assert documented == actual


def test_ci_runs_the_readme_test_command() -> None:
    assert "./scripts/test" in README and "./scripts/demo" in README
    assert "./scripts/test" in (ROOT / ".ci" / "run").read_text()


def test_loop_defaults_in_the_readme_match_the_code() -> None:
    from gcr.types import LoopParams

    defaults = LoopParams()
    for field in ("max_rounds", "threshold", "candidates_per_round", "patience", "seed_policy", "refine_from"):
        value = getattr(defaults, field)
        assert re.search(rf"\| `{field}` \| `?{value}`? \|", README), field
