"""Where the studio's browser tests find Debian's chromium, and how they are marked."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
# `pytestmark = BROWSER` in each module: CI installs chromium, so only a local run skips.
BROWSER = [
    pytest.mark.browser,
    pytest.mark.timeout(90),
    pytest.mark.skipif(
        not Path(CHROMIUM).exists() and not os.environ.get("CI"), reason="needs Debian's chromium (CI installs it)"
    ),
]
