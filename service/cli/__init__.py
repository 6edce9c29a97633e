"""The `gcr` command: its entry point is `service.cli.main:main`."""
