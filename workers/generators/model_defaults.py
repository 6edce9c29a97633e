"""Per-model generation defaults, as data (`data/model_defaults.json`).

A job that leaves a generation value unset gets, in order: the model folder's own
`gcr_defaults.json`, then this table's entry for the model, then the pipeline's
signature defaults (and the backend's per-class step count). The table is what the
model authors publish (each entry names its source): FLUX.1-schnell is distilled
for 4 steps at guidance 0 and at most 256 text tokens, and running it at the
pipeline's generic 28 steps, guidance 3.5 and 512 tokens costs about 7 times the
compute for no better image.

A model is known by its hub id (any case), or by a local folder that is a hub
snapshot (`.../models--ORG--NAME/snapshots/REV`), is named after the repository
(`/models/FLUX.1-schnell`), or whose `gcr_defaults.json` says `"defaults_of":
"ORG/NAME"`. No torch and no weights here: `gcr model-defaults` answers instantly.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

TABLE = Path(__file__).with_name("data") / "model_defaults.json"
FOLDER_FILE = "gcr_defaults.json"
_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)")


@dataclass(frozen=True)
class ModelDefaults:
    """What a known model gets for each value a request leaves unset (None: not set here)."""

    model: str
    steps: int | None = None
    guidance_scale: float | None = None
    true_cfg_scale: float | None = None
    negative_prompt: str | None = None
    max_sequence_length: int | None = None
    width: int | None = None
    height: int | None = None
    source: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@cache
def _table() -> dict[str, ModelDefaults]:
    raw = json.loads(TABLE.read_text())["models"]
    return {model.lower(): ModelDefaults(model=model, **values) for model, values in raw.items()}


def known_models() -> list[str]:
    return sorted(entry.model for entry in _table().values())


def lookup(model: str) -> ModelDefaults | None:
    """The table's entry for a hub id or local folder, or None for an unknown model."""
    table = _table()
    for candidate in _names(model):
        entry = table.get(candidate.lower())
        if entry is not None:
            return entry
    return None


def _names(model: str) -> list[str]:
    """Hub ids `model` may stand for, most specific first."""
    names = [model.strip().rstrip("/")]
    path = Path(model)
    folder_file = path / FOLDER_FILE
    if folder_file.is_file():
        try:
            declared = json.loads(folder_file.read_text()).get("defaults_of")
        except (ValueError, AttributeError):
            declared = None
        if isinstance(declared, str):
            names.insert(0, declared)
    snapshot = _SNAPSHOT.search(model)
    if snapshot:
        names.append(f"{snapshot['org']}/{snapshot['name']}")
    if path.name:
        folder = path.name.lower()
        names.extend(entry.model for entry in _table().values() if entry.model.split("/")[-1].lower() == folder)
    return names


def job_defaults(model: str) -> dict[str, Any]:
    """What `gcr model-defaults` prints: the table's entry overlaid with the folder's own file.

    `known` is False when neither says anything: the pipeline's defaults then apply."""
    entry = lookup(model)
    values: dict[str, Any] = {
        "model": model,
        "known": entry is not None,
        "defaults_of": entry.model if entry else None,
        **{name: None for name in ("width", "height", "steps", "guidance_scale", "true_cfg_scale")},
        "negative_prompt": None,
        "max_sequence_length": None,
        "source": "",
    }
    if entry is not None:
        values.update({k: v for k, v in entry.as_dict().items() if k != "model"})
    folder_file = Path(model) / FOLDER_FILE
    if folder_file.is_file():
        own = json.loads(folder_file.read_text())
        for name in ("width", "height", "steps", "guidance_scale"):
            if own.get(name) is not None:
                values[name] = own[name]
        values["known"] = True
        values["source"] = f"{folder_file}" + (f"; {values['source']}" if values["source"] else "")
    return values
