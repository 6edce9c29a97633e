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
        "http://[::127.0.0.1]/hook",  # IPv4-compatible (::/96) wrapping loopback
        "http://[::10.0.0.1]/hook",  # IPv4-compatible wrapping a private address
        "http://[64:ff9b::7f00:1]/hook",  # NAT64 well-known prefix wrapping 127.0.0.1
        "http://[64:ff9b::a9fe:a9fe]/hook",  # NAT64 wrapping the metadata service
        "http://[64:ff9b:1::a9fe:a9fe]/hook",  # local-use NAT64: the IPv4 position is the operator's
        "http://[64:ff9b:1:a9fe:a9:fe00::]/hook",  # the same, cut at /48
        "http://192.88.99.1/hook",  # 6to4 relay anycast
        "http://[2002:c058:6301::]/hook",  # 6to4 wrapping the relay anycast
        "http://[2001:0:5db8:d822::80ff:fffe]/hook",  # Teredo, client 127.0.0.1
        "http://[2001:0:a9fe:a9fe::f7f7:f7f7]/hook",  # Teredo, server in link-local
    ],
)
async def test_private_targets_are_refused(url: str) -> None:
    with pytest.raises(InvalidInput) as info:
        await check_public_url(url, field="callback_url")
    assert info.value.field == "callback_url"


async def test_refusal_names_the_setting_that_allows_private_targets() -> None:
    with pytest.raises(InvalidInput) as info:
        await check_public_url("http://127.0.0.1/hook", field="callback_url")
    assert "GCR_WEBHOOK_ALLOW_PRIVATE" in info.value.message


@pytest.mark.parametrize("url", ["ftp://example.com/x", "file:///etc/passwd", "http:///nohost"])
async def test_only_http_urls_with_a_host(url: str) -> None:
    with pytest.raises(InvalidInput):
        await check_public_url(url, field="callback_url")


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:99999/",
        "http://127.0.0.1:0/",
        "http://host:abc/",
        "http://[::1/",
        "http://[::1]:65536/",
        "http://example.com:-1/",
    ],
)
@pytest.mark.parametrize("allow_private", [False, True])
async def test_malformed_urls_are_invalid_input(url: str, allow_private: bool) -> None:
    with pytest.raises(InvalidInput) as info:
        await check_public_url(url, field="callback_url", allow_private=allow_private)
    assert info.value.field == "callback_url"
    assert "malformed URL" in info.value.message


async def test_allow_private_is_explicit() -> None:
    await check_public_url("http://127.0.0.1:9/hook", field="callback_url", allow_private=True)


def test_public_addresses_pass() -> None:
    assert is_public("93.184.216.34") and is_public("2606:2800:220:1:248:1893:25c8:1946")
    assert not is_public("172.16.5.4") and not is_public("fe80::1%eth0")


@pytest.mark.parametrize(
    "address",
    [
        "::ffff:93.184.216.34",  # mapped
        "64:ff9b::5db8:d822",  # NAT64 of 93.184.216.34
        "2002:5db8:d822::1",  # 6to4 of 93.184.216.34
        "2001:0:5db8:d822::f7f7:f7f7",  # Teredo: server 93.184.216.34, client 8.8.8.8
    ],
)
def test_wrapped_public_ipv4_passes(address: str) -> None:
    assert is_public(address)


@pytest.mark.parametrize(
    "address",
    ["::127.0.0.1", "::10.0.0.1", "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "64:ff9b:1::5db8:d822", "192.88.99.1"],
)
def test_embedded_and_relay_addresses_are_not_public(address: str) -> None:
    assert not is_public(address)
