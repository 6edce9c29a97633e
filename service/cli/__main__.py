"""`python -m service.cli`: the `gcr` command."""

from service.cli.main import main

main()
