"""The loop policies an evaluation compares.

A policy is a name plus the `loop` object (and optionally a `generation` object)
every item is submitted with. Only the fields written are sent, so anything left
out takes the server's default. Sources, later ones overriding earlier ones:

1. a policy file (`--policies FILE.json`)::

       {"generation": {"seed": 42},
        "policies": {"paper": {"max_rounds": 2, "threshold": 0.0},
                     "wide": {"loop": {"candidates_per_round": 4}, "generation": {"steps": 30}}}}

   A policy's value is its `loop` object, or `{"loop": ..., "generation": ...}`;
   the top-level `generation` applies to every policy of the file;
2. `--policy NAME=JSON` options (the `loop` object), added after the file's;
3. `--generation JSON`, merged over every policy's generation.

With none given there is one policy, `default`: the server's defaults.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gcr.types import GenerationParams, LoopParams

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DEFAULT_POLICY = "default"


class PolicyError(ValueError):
    """A policy option or file is malformed."""


@dataclass(frozen=True)
class Policy:
    """One named policy: what is sent as `loop` and `generation` with every item."""

    name: str
    loop: dict[str, Any] = field(default_factory=dict)
    generation: dict[str, Any] = field(default_factory=dict)

    def spec(self) -> dict[str, Any]:
        """What is stored in the policy's folder, to refuse resuming with a different policy."""
        return {"loop": self.loop, "generation": self.generation}


def build_policies(
    options: tuple[str, ...] | list[str] = (),
    policy_file: Path | None = None,
    generation: str | None = None,
) -> list[Policy]:
    """All policies of one run, validated against the wire contract."""
    policies: dict[str, Policy] = {}
    if policy_file is not None:
        for policy in load_policy_file(policy_file):
            policies[policy.name] = policy
    for option in options:
        name, loop = parse_policy_option(option)
        if name in policies:
            raise PolicyError(f"policy {name!r} is given twice")
        policies[name] = Policy(name, loop)
    if not policies:
        policies[DEFAULT_POLICY] = Policy(DEFAULT_POLICY)
    overrides = _json_object(generation, "--generation") if generation else {}
    result = [Policy(p.name, p.loop, {**p.generation, **overrides}) for p in policies.values()]
    for policy in result:
        _validate(policy)
    return result


def parse_policy_option(text: str) -> tuple[str, dict[str, Any]]:
    """`NAME=JSON` → (name, loop object)."""
    name, sep, body = text.partition("=")
    if not sep:
        raise PolicyError(f"--policy {text!r}: expected NAME=JSON, e.g. paper='{{\"max_rounds\": 2}}'")
    _check_name(name.strip())
    return name.strip(), _json_object(body, f"--policy {name.strip()}")


def load_policy_file(path: Path) -> list[Policy]:
    """Read a policy file (format in the module docstring)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise PolicyError(f"{path}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("policies"), dict) or not data["policies"]:
        raise PolicyError(f'{path}: expected {{"policies": {{"NAME": {{...loop...}}, ...}}}}')
    unknown = sorted(set(data) - {"policies", "generation", "description"})
    if unknown:
        raise PolicyError(f"{path}: unknown top-level field(s) {unknown}")
    shared = data.get("generation") or {}
    if not isinstance(shared, dict):
        raise PolicyError(f"{path}: `generation` must be an object")
    policies = []
    for name, value in data["policies"].items():
        _check_name(name)
        if not isinstance(value, dict):
            raise PolicyError(f"{path}: policy {name!r} must be an object")
        # LoopParams has no `loop` field, so its presence marks the long form.
        if "loop" in value or "generation" in value:
            extra = sorted(set(value) - {"loop", "generation", "description"})
            if extra:
                raise PolicyError(f"{path}: policy {name!r} has unknown field(s) {extra}")
            loop, generation = value.get("loop") or {}, {**shared, **(value.get("generation") or {})}
        else:
            loop, generation = dict(value), dict(shared)
        policies.append(Policy(name, loop, generation))
    return policies


def _check_name(name: str) -> None:
    if not NAME_PATTERN.match(name):
        raise PolicyError(f"policy name {name!r}: use letters, digits, `_`, `.` and `-` (it names the output folder)")


def _json_object(text: str, where: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PolicyError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise PolicyError(f"{where}: expected a JSON object")
    return value


def _validate(policy: Policy) -> None:
    # Fail before submitting anything, with the gateway's own field rules.
    for label, model, value in (
        ("loop", LoopParams, policy.loop),
        ("generation", GenerationParams, policy.generation),
    ):
        try:
            model.model_validate(value)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or label}: {e['msg']}" for e in exc.errors())
            raise PolicyError(f"policy {policy.name!r}, {label}: {problems}") from None
