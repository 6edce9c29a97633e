"""Configuration of the stand-in critic: which scores it gives, and which faults it plays.

Example (JSON, the body of `POST /standin/config`)::

    {"default": 0.5,
     "rules": [{"instruction": "red cat", "rounds": [0.4, [0.6, 0.9], 0.95]},
               {"instruction": "sign", "rounds": [{"overall": 0.8, "scores": {"text_rendering": 2}}],
                "refine": false}],
     "latency_s": 0.2, "max_concurrency": 8,
     "faults": [{"kind": "status", "status": 503, "times": 2}]}

Round 0 of "red cat" scores 0.4; round 1 scores 0.6 for candidate 0 and 0.9 for
candidate 1 (candidate index modulo the list); round 2 and later score 0.95.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from gcr.types import TEXT_RENDERING, known_dimensions


def _coerce_entry(value: Any) -> Any:
    # A plain number is shorthand for {"overall": number}.
    if isinstance(value, int | float) and not isinstance(value, bool):
        return {"overall": value}
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScoreEntry(_Strict):
    """The scores of one answer.

    Every judged dimension not named in `scores` gets `1 + 3 * overall`, so with no
    `scores` the parsed overall equals `overall` (up to the 4 decimals written).
    Text rendering is N/A unless named in `scores`. `scores` may lie outside [1,4]
    to exercise clamping.
    """

    overall: float = Field(default=0.5, ge=0, le=1)
    scores: Annotated[dict[str, float], AfterValidator(known_dimensions)] = Field(default_factory=dict)

    def dimension_score(self, key: str) -> float | None:
        if key in self.scores:
            return self.scores[key]
        if key == TEXT_RENDERING:
            return None
        return 1.0 + 3.0 * self.overall


ScoreSpec = Annotated[ScoreEntry, BeforeValidator(_coerce_entry)]


class StandinRule(_Strict):
    """Scores for requests whose instruction contains `instruction`, by round (and candidate)."""

    instruction: str
    rounds: list[ScoreSpec | Annotated[list[ScoreSpec], Field(min_length=1)]] = Field(min_length=1)
    refine: bool = Field(default=True, description="False: the answer has no `## Refined Request:` section.")

    def entry(self, round_index: int, candidate: int) -> ScoreEntry:
        chosen = self.rounds[min(max(round_index, 0), len(self.rounds) - 1)]
        if isinstance(chosen, list):
            return chosen[candidate % len(chosen)]
        return chosen


class Fault(_Strict):
    """A failure served to the first `times` matching requests, then normal answers."""

    kind: Literal["status", "garbage", "timeout"]
    status: int = Field(default=500, ge=400, le=599)
    times: int = Field(default=1, ge=0)
    instruction: str | None = Field(default=None, description="Only requests whose instruction contains this.")
    timeout_s: float = Field(default=30.0, ge=0, description="`timeout`: how long the answer is held back.")

    def matches(self, instruction: str) -> bool:
        return self.instruction is None or self.instruction in instruction


class StandinConfig(_Strict):
    """Everything the stand-in critic answers; replaceable at run time."""

    model: str = "gcr-standin-critic"
    default: ScoreSpec = Field(default_factory=lambda: ScoreEntry(overall=0.5))
    rules: list[StandinRule] = Field(default_factory=list)
    latency_s: float = Field(default=0.0, ge=0, description="Sleep per request: the reward model's decode time.")
    max_concurrency: int | None = Field(
        default=None,
        ge=1,
        description="A throughput ceiling: at most this many critiques are answered at once (each taking "
        "`latency_s`); the others wait in line, as requests do past vLLM's batch knee, and `/metrics` counts "
        "them as vLLM does (`vllm:num_requests_waiting`). None: no ceiling.",
    )
    faults: list[Fault] = Field(default_factory=list)

    def entry(self, instruction: str, round_index: int, candidate: int) -> tuple[ScoreEntry, bool]:
        """The scores for this request and whether the answer carries a refined request."""
        for rule in self.rules:
            if rule.instruction in instruction:
                return rule.entry(round_index, candidate), rule.refine
        return self.default, True


def load_standin_config(path: Path) -> StandinConfig:
    """Read a config file: JSON, or YAML when the name ends in .yaml/.yml (needs pyyaml)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml  # only the dev extra ships it; JSON needs nothing

        return StandinConfig.model_validate(yaml.safe_load(text) or {})
    return StandinConfig.model_validate(json.loads(text) if text.strip() else {})
