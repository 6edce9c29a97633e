"""`gcr eval`: run a prompt set through the service under one or more loop policies.

Roles, one module each:

- `dataset`  — read and validate the prompts JSONL (`EvalItem`).
- `policies` — the named loop policies to compare (`Policy`), from options or a file.
- `records`  — the output folder: append-only `results.jsonl`, the runs log, images.
- `runner`   — submit items with bounded concurrency and record each finished one.
- `summary`  — pure functions from result lines to the numbers in `summary.json`.
- `report`   — read the folder, write `summary.json` and the plots, the table.
- `progress` — the terminal progress bar.
- `plot`     — `summary.png`, `score_vs_compute.png` (matplotlib, Agg, imported only when plotting).
- `cli`      — the `gcr eval` command (`eval_command`).
"""
