"""Logging set-up: JSON lines (the default for servers) or plain text, with the job id.

The worker sets `current_job` in each job's task; every record logged inside that
task carries `job_id`, whichever module logs it.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from typing import Any

from pythonjsonlogger import json as jsonlogger

current_job: contextvars.ContextVar[str | None] = contextvars.ContextVar("gcr_job", default=None)


class _JobFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.job_id = current_job.get()
        return True


class JsonFormatter(jsonlogger.JsonFormatter):
    """One JSON object per line (python-json-logger): ts, time, level, logger, message, and
    job_id inside a job; exception with a traceback."""

    def __init__(self) -> None:
        super().__init__(
            "{created}{asctime}{levelname}{name}{message}",
            style="{",
            rename_fields={
                "created": "ts",
                "asctime": "time",
                "levelname": "level",
                "name": "logger",
                "exc_info": "exception",
            },
            json_ensure_ascii=False,
        )
        self.converter = time.gmtime
        self.default_time_format, self.default_msec_format = "%Y-%m-%dT%H:%M:%S", ""

    def process_log_record(self, log_record: dict[str, Any]) -> dict[str, Any]:
        log_record["ts"] = round(log_record["ts"], 3)
        log_record["level"] = log_record["level"].lower()
        if not log_record.get("job_id"):
            log_record.pop("job_id", None)
        return log_record


def configure(fmt: str = "json", level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_JobFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(job_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request at INFO; that is noise next to our own lines.
    logging.getLogger("httpx").setLevel(logging.WARNING)
