"""Refine strategies as `gcr eval` policies: the documented comparison parses and validates."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from gcr.types import LoopParams
from service.evaluation.cli import eval_command
from service.evaluation.policies import PolicyError, build_policies

ROOT = Path(__file__).resolve().parents[2]
STRATEGIES = [
    """rewrite={"strategy":"rewrite"}""",
    """edit={"strategy":"edit"}""",
    """auto={"strategy":"auto"}""",
]


def test_strategy_policies_validate() -> None:
    policies = build_policies(STRATEGIES)

    assert [(p.name, p.loop) for p in policies] == [
        ("rewrite", {"strategy": "rewrite"}),
        ("edit", {"strategy": "edit"}),
        ("auto", {"strategy": "auto"}),
    ]
    assert [LoopParams.model_validate(p.loop).strategy for p in policies] == ["rewrite", "edit", "auto"]
    tuned = build_policies(['auto={"strategy": "auto", "edit_above": 0.6, "edit_model": "qwen-image-edit"}'])
    assert LoopParams.model_validate(tuned[0].loop).edit_above == 0.6


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ('repaint={"strategy": "repaint"}', "strategy"),
        ('auto={"strategy": "auto", "edit_above": 1.5}', "edit_above"),
    ],
)
def test_a_bad_strategy_policy_is_refused_before_anything_is_sent(option: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        build_policies([option])


def documented_command(page: str) -> list[str]:
    """The strategy comparison `page` shows (the code block running `gcr eval` with the three
    strategies), as a shell splits it."""
    fenced = (ROOT / page).read_text().split("```")[1::2]  # every code block, its language line first
    blocks = [block.split("\n", 1)[1] for block in fenced]
    [block] = [b for b in blocks if "gcr eval" in b and '"strategy":"edit"' in b]
    return shlex.split(block.replace("\\\n", " "))


@pytest.mark.parametrize("page", ["docs/evaluation.md", "README.md"])
def test_the_documented_comparison_parses_with_the_shipped_prompts(page: str, monkeypatch: pytest.MonkeyPatch) -> None:
    argv = documented_command(page)
    assert argv[:2] == ["gcr", "eval"]
    monkeypatch.chdir(ROOT)  # the prompts path is relative to the repository, as the docs run it
    context = eval_command.make_context("eval", argv[2:])
    params = context.params

    assert params["prompts"] == Path("examples/prompts/t2i.jsonl")
    assert list(params["policy_options"]) == STRATEGIES  # exactly the syntax above
    policies = build_policies(params["policy_options"], params["policies_file"], params["generation"])
    assert [p.name for p in policies] == ["rewrite", "edit", "auto"]
    assert all(p.generation == {"seed": 42} for p in policies)
