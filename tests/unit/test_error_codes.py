"""One table of error codes (gcr.errors.CODES): the gateway's exceptions take their status
and retryability from it, and the SDK raises its class for each. This walks every
exception class the server defines, so a code added on one side only fails here."""

from __future__ import annotations

import pytest

from gcr import errors as sdk
from service import errors as server
from service.gateway.app import HTTP_CODES


def server_classes() -> list[type[server.GcrError]]:
    found, todo = [], [server.GcrError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return [cls for cls in found if cls.__module__ == server.__name__]


@pytest.mark.parametrize("cls", server_classes(), ids=lambda cls: cls.__name__)
def test_every_server_error_answers_as_the_table_says(cls: type[server.GcrError]) -> None:
    if cls is server.JobFailed:  # carries the code of the job it waited for
        assert cls.status_code == 502
        return
    assert cls.code in sdk.CODES, f"{cls.__name__}: code {cls.code!r} is not in gcr.errors.CODES"
    entry = sdk.CODES[cls.code]
    assert (cls.status_code, cls.retryable) == (entry.status, entry.retryable)


@pytest.mark.parametrize("code", sorted(sdk.CODES))
def test_the_sdk_raises_the_tables_class_for_every_code(code: str) -> None:
    entry = sdk.CODES[code]
    raised = sdk.from_body(entry.status, {"error": {"code": code, "message": "m", "retryable": entry.retryable}})
    assert type(raised) is entry.exception and raised.status == entry.status and raised.code == code


def test_every_code_in_the_table_is_answered_by_someone() -> None:
    """No dead rows: each code is a server exception's, the generic HTTP errors' (app.py),
    or a job's own code (what JobFailed passes on)."""
    used = {cls.code for cls in server_classes()} | set(HTTP_CODES.values())
    assert set(sdk.CODES) - used == set()


def test_a_new_server_error_without_a_row_is_refused() -> None:
    with pytest.raises(KeyError, match="not_in_the_table"):

        class _Unlisted(server.GcrError):
            code = "not_in_the_table"
