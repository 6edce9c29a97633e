"""The `gcr` console script: the CLI lives with the server code and needs an extra."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from service.cli.main import main as cli
    except ImportError as exc:  # a base install: the SDK without the CLI's packages
        sys.exit(f"the gcr command needs its extra: pip install 'gcr[cli]' ({exc.name} is not installed)")
    cli()
