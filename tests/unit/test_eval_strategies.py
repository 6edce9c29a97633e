"""Refine strategies as `gcr eval` policies: the documented comparison parses and validates."""

from __future__ import annotations

import re
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


def documented_command() -> list[str]:
    """The command of docs/evaluation.md's "Compare refine strategies", as a shell splits it."""
    text = (ROOT / "docs" / "evaluation.md").read_text()
    section = text.split("## Compare refine strategies", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```\n(.*?)```", section, flags=re.S)
    assert block is not None, "the section shows the command"
    return shlex.split(block.group(1).replace("\\\n", " "))


def test_the_documented_comparison_parses_with_the_shipped_prompts(monkeypatch: pytest.MonkeyPatch) -> None:
    argv = documented_command()
    assert argv[:2] == ["gcr", "eval"]
    monkeypatch.chdir(ROOT)  # the prompts path is relative to the repository, as the docs run it
    context = eval_command.make_context("eval", argv[2:])
    params = context.params

    assert params["prompts"] == Path("examples/prompts/t2i.jsonl")
    assert list(params["policy_options"]) == STRATEGIES  # exactly the syntax above
    policies = build_policies(params["policy_options"], params["policies_file"], params["generation"])
    assert [p.name for p in policies] == ["rewrite", "edit", "auto"]
    assert all(p.generation == {"seed": 42} for p in policies)
