"""SSRF refusal: the code under test resolves names itself; no traffic leaves the machine."""

from __future__ import annotations

import pytest

from service.errors import InvalidInput
from service.netguard import check_public_url, is_public


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/hook",
        "http://10.0.0.1/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://localhost:8080/hook",  # a hostname resolving to loopback
        "http://[::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://192.168.1.20/hook",
        "http://0.0.0.0/hook",
        "http://100.100.100.200/latest/meta-data",  # shared address space: a cloud metadata service
        "http://[2002:7f00:1::]/hook",  # 6to4 wrapping 127.0.0.1
        "http://[fd00::1]/hook",
    ],
)
async def test_private_targets_are_refused(url: str) -> None:
    with pytest.raises(InvalidInput) as info:
        await check_public_url(url, field="callback_url")
    assert info.value.field == "callback_url"


@pytest.mark.parametrize("url", ["ftp://example.com/x", "file:///etc/passwd", "http:///nohost"])
async def test_only_http_urls_with_a_host(url: str) -> None:
    with pytest.raises(InvalidInput):
        await check_public_url(url, field="callback_url")


async def test_allow_private_is_explicit() -> None:
    await check_public_url("http://127.0.0.1:9/hook", field="callback_url", allow_private=True)


def test_public_addresses_pass() -> None:
    assert is_public("93.184.216.34") and is_public("2606:2800:220:1:248:1893:25c8:1946")
    assert not is_public("172.16.5.4") and not is_public("fe80::1%eth0")
