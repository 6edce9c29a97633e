"""Put the `gcr` package into gcr-sdk's regular wheels.

It lives at the top of the repository (../gcr), or at the top of an unpacked sdist
(gcr/). Editable wheels get nothing here: `dev-mode-dirs` puts the repository on
sys.path, so the code a developer edits is the code that runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class CustomBuildHook(BuildHookInterface):  # type: ignore[misc]  # hatchling ships no types
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel" or version != "standard":
            return
        root = Path(self.root)
        package = root / "gcr" if (root / "gcr").is_dir() else root.parent / "gcr"
        build_data["force_include"][str(package)] = "gcr"
