"""`gcr eval` inputs and outputs without a stack: the prompts file, policies, the results file."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from service.evaluation.dataset import SOURCES_HINT, DatasetError, load_prompts
from service.evaluation.policies import PolicyError, build_policies, parse_policy_option
from service.evaluation.records import PolicyFolder, RecordsError, append_jsonl, cut_partial_line, read_jsonl

ROOT = Path(__file__).resolve().parents[2]


def write(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
    return buffer.getvalue()


# --- the prompts file ----------------------------------------------------------------


def test_reads_t2i_and_edit_items(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.png").write_bytes(png_bytes())
    inline = base64.b64encode(png_bytes()).decode()
    prompts = write(
        tmp_path / "p.jsonl",
        json.dumps({"id": "t1", "prompt": "a cat", "category": "animals"}),
        "",
        json.dumps({"id": 7, "prompt": "make it blue", "source_image": "src/a.png"}),
        json.dumps({"id": "e2", "prompt": "make it green", "source_image": inline}),
        json.dumps({"id": "e3", "prompt": "crop", "source_image": f"data:image/png;base64,{inline}"}),
    )

    items = load_prompts(prompts)

    assert [(i.id, i.mode) for i in items] == [("t1", "t2i"), ("7", "edit"), ("e2", "edit"), ("e3", "edit")]
    assert items[0].meta == {"category": "animals"} and items[0].source_image() is None
    assert items[1].source_ref == "src/a.png"  # relative to the JSONL file, recorded as written
    assert base64.b64decode(items[1].source_image() or "") == png_bytes()
    assert items[2].source_ref == "inline" and items[2].source_image() == inline


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "a cat"}', "missing `id`"),
        ('{"id": true, "prompt": "a cat"}', "missing `id`"),
        ('{"id": "a/b", "prompt": "a cat"}', "letters, digits"),
        ('{"id": "x"}', "missing or blank `prompt`"),
        ('{"id": "x", "prompt": "   "}', "missing or blank `prompt`"),
        ('{"id": "x", "prompt": "a", "mode": "video"}', "`mode` must be"),
        ('{"id": "x", "prompt": "a", "mode": "edit"}', "needs a `source_image`"),
        ('{"id": "x", "prompt": "a", "mode": "t2i", "source_image": "a.png"}', "takes no `source_image`"),
        ('{"id": "x", "prompt": "a", "source_image": "not base64!"}', "nor valid base64"),
        ('["id", "prompt"]', "not a JSON object"),
        ("{not json", "not valid JSON"),
    ],
)
def test_line_problems(tmp_path: Path, line: str, message: str) -> None:
    with pytest.raises(DatasetError) as caught:
        load_prompts(write(tmp_path / "p.jsonl", line))
    assert len(caught.value.problems) == 1
    assert "line 1" in caught.value.problems[0] and message in caught.value.problems[0]


def test_every_problem_is_reported_at_once_with_line_numbers(tmp_path: Path) -> None:
    prompts = write(
        tmp_path / "p.jsonl",
        '{"id": "a", "prompt": "one"}',
        '{"id": "b"}',
        '{"id": "a", "prompt": "two"}',
        '{"prompt": "three"}',
    )
    with pytest.raises(DatasetError) as caught:
        load_prompts(prompts)
    problems = caught.value.problems
    assert len(problems) == 3
    assert problems[0].startswith("line 2:")
    assert problems[1] == "line 3: duplicate id 'a' (first on line 1)"
    assert problems[2].startswith("line 4:")


def test_missing_source_file_says_how_to_make_it(tmp_path: Path) -> None:
    prompts = write(tmp_path / "p.jsonl", '{"id": "e", "prompt": "edit", "source_image": "sources/house.png"}')

    with pytest.raises(DatasetError) as caught:
        load_prompts(prompts)

    assert "sources/house.png" in caught.value.problems[0] and "does not exist" in caught.value.problems[0]
    assert caught.value.hint == SOURCES_HINT
    assert "python examples/make_edit_sources.py" in str(caught.value)


def test_empty_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no items"):
        load_prompts(write(tmp_path / "p.jsonl", "", "  "))


def test_bundled_t2i_prompts_are_valid() -> None:
    items = load_prompts(ROOT / "examples" / "prompts" / "t2i.jsonl")
    assert len(items) >= 10 and all(i.mode == "t2i" for i in items)


# --- policies --------------------------------------------------------------------------


def test_policy_option_and_default() -> None:
    assert parse_policy_option('paper={"max_rounds": 2}') == ("paper", {"max_rounds": 2})
    assert [p.name for p in build_policies()] == ["default"]
    policies = build_policies(['a={"max_rounds": 1}'], generation='{"seed": 42}')
    assert policies[0].loop == {"max_rounds": 1} and policies[0].generation == {"seed": 42}


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("paper", "expected NAME=JSON"),
        ("bad name={}", "policy name"),
        ("p=[1]", "expected a JSON object"),
        ("p={nope", "not valid JSON"),
        ('p={"max_rounds": 0}', "max_rounds"),
        ('p={"rounds": 2}', "rounds"),
    ],
)
def test_bad_policy_options(option: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        build_policies([option])


def test_bundled_policy_file_holds_the_paper_setting() -> None:
    policies = {p.name: p for p in build_policies(policy_file=ROOT / "examples/policies/paper_vs_multiround.json")}

    assert set(policies) == {"paper", "multiround", "best_of_4"}
    paper = policies["paper"]
    assert paper.loop["max_rounds"] == 2 and paper.loop["threshold"] == 0.0 and paper.loop["patience"] is None
    assert paper.loop["min_scores"] == {"text_faithfulness": 3.0, "physical_quality": 3.0}
    assert paper.loop["seed_policy"] == "fixed" and paper.generation == {"seed": 42}
    assert policies["best_of_4"].loop["candidates_per_round"] == 4


def test_policy_file_long_form_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "policies.json"
    path.write_text(
        json.dumps(
            {
                "generation": {"seed": 1, "steps": 10},
                "policies": {"a": {"max_rounds": 2}, "b": {"loop": {"max_rounds": 3}, "generation": {"seed": 2}}},
            }
        )
    )

    policies = build_policies(['c={"max_rounds": 4}'], path, generation='{"steps": 20}')

    assert [(p.name, p.loop, p.generation) for p in policies] == [
        ("a", {"max_rounds": 2}, {"seed": 1, "steps": 20}),
        ("b", {"max_rounds": 3}, {"seed": 2, "steps": 20}),
        ("c", {"max_rounds": 4}, {"steps": 20}),
    ]
    with pytest.raises(PolicyError, match="given twice"):
        build_policies(['a={"max_rounds": 4}'], path)


# --- the results file --------------------------------------------------------------------


def test_a_trailing_partial_line_is_ignored_then_cut(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    append_jsonl(path, {"id": "a"})
    append_jsonl(path, {"id": "b"})
    with path.open("ab") as handle:  # an interrupt in the middle of a write
        handle.write(b'{"id": "c", "st')

    assert [r["id"] for r in read_jsonl(path)] == ["a", "b"]
    assert cut_partial_line(path)
    append_jsonl(path, {"id": "c"})
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b", "c"]
    assert not cut_partial_line(path)


def test_a_corrupt_complete_line_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "results.jsonl", '{"id": "a"}', "garbage")
    with pytest.raises(RecordsError, match="line 2"):
        read_jsonl(path)


def test_a_folder_refuses_another_policy_under_the_same_name(tmp_path: Path) -> None:
    folder = PolicyFolder(tmp_path, "p")
    folder.prepare({"loop": {"max_rounds": 2}, "generation": {}})
    folder.prepare({"loop": {"max_rounds": 2}, "generation": {}})  # the same: resumable

    with pytest.raises(RecordsError, match="another --out"):
        folder.prepare({"loop": {"max_rounds": 3}, "generation": {}})
