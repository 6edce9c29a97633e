"""JSON log lines carry the job id of the task that logs them."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from service import logs


async def test_json_lines_with_job_id(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("json")

    async def job(job_id: str) -> None:
        logs.current_job.set(job_id)
        logging.getLogger("gcr.test").info("working on it")

    await asyncio.gather(job("job-a"), job("job-b"))
    logging.getLogger("gcr.test").warning("outside any job")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(line.get("job_id"), line["message"]) for line in lines] == [
        ("job-a", "working on it"),
        ("job-b", "working on it"),
        (None, "outside any job"),
    ]
    assert lines[2]["level"] == "warning" and lines[0]["logger"] == "gcr.test"
    logging.getLogger().handlers.clear()
