"""The gateway never imports the worker's code (it may run where torch is not installed)."""

from __future__ import annotations

import subprocess
import sys


def test_the_gateway_app_imports_nothing_from_workers() -> None:
    code = (
        "import sys\n"
        "from service.gateway.app import create_app\n"
        "from service.settings import Settings\n"
        "create_app(Settings())\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('workers', 'torch', 'diffusers')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert result.stdout.strip() == "[]"
