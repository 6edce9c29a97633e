"""A fresh Python interpreter, for the tests that check what an import pulls in."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable


def modules_loaded_by(code: str, packages: Iterable[str]) -> list[str]:
    """The modules of `packages` (top-level names) a new interpreter holds after running `code`."""
    roots = sorted(packages)
    listing = f"sorted(m for m in sys.modules if m.split('.')[0] in {roots!r})"
    probe = f"{code}\nimport json, sys\nprint(json.dumps({listing}))\n"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60)
    loaded: list[str] = json.loads(result.stdout)
    return loaded
