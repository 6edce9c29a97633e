"""Refusing URLs that point inside the network (SSRF), after DNS resolution.

A callback URL is parsed the way the HTTP client that will fetch it parses it (so
the host we judge is the host it connects to), then resolved by us, and every
address it resolves to must be a globally routable unicast address: loopback,
private, link-local (cloud metadata at 169.254.169.254), shared (100.64/10),
multicast, reserved and unspecified ranges are refused, also when an IPv6 address
carries an IPv4 one (mapped, compatible, NAT64, 6to4, Teredo), and so is the 6to4
relay anycast range. The check runs at submit time and again just before each
delivery, since DNS can change in between. What it cannot close is a name that
changes between our check and the HTTP client's own resolution a moment later (DNS
rebinding with a zero TTL); a deployment that must rule that out sends webhooks
through an egress proxy.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import httpx

from service.errors import InvalidInput

ALLOW_PRIVATE_SETTING = "GCR_WEBHOOK_ALLOW_PRIVATE"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated, but still routed by some stacks
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # well-known prefix; the IPv4 is the last 32 bits
# The local-use NAT64 prefix may be cut at /48, /56, /64 or /96, so where its IPv4 address
# sits is known only to the operator: nothing under it can be judged, so all of it is refused.
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
# 6to4 relay anycast (deprecated by RFC 7526): whichever relay answers forwards into 2002::/16,
# which may wrap any IPv4 address.
_SIXTOFOUR_RELAY = ipaddress.IPv4Network("192.88.99.0/24")


def _reached(ip: IPAddress) -> list[IPAddress]:
    """The addresses a packet to `ip` really reaches: the IPv4 ones an IPv6 address carries."""
    if isinstance(ip, ipaddress.IPv4Address):
        return [ip]
    if ip.ipv4_mapped is not None:
        return [ip.ipv4_mapped]
    if ip in _IPV4_COMPATIBLE or ip in _NAT64:
        # `::` and `::1` unwrap to 0.0.0.0 and 0.0.0.1, which are refused like themselves.
        return [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]
    if ip.sixtofour is not None:
        return [ip.sixtofour]
    if ip.teredo is not None:
        return list(ip.teredo)  # (server, client): both take part in reaching the client
    return [ip]


def is_public(address: str) -> bool:
    """A globally routable unicast address, also behind IPv6 wrappings of IPv4."""
    ip: IPAddress = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip in _NAT64_LOCAL:
        return False
    # is_global excludes private, loopback, link-local, shared (100.64/10, where some
    # clouds put their metadata service), reserved and unspecified ranges.
    return all(inner.is_global and not inner.is_multicast and inner not in _SIXTOFOUR_RELAY for inner in _reached(ip))


def _host_and_port(url: str, field: str) -> tuple[str, int]:
    """Host (IDNA-encoded, IPv6 without brackets) and port of an http(s) URL, as httpx reads them."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as exc:  # IDNA errors are ValueErrors
        raise InvalidInput(f"malformed URL: {exc}", field=field) from exc
    if parsed.scheme not in ("http", "https") or not parsed.raw_host:
        raise InvalidInput("URL must be http(s)://host/...", field=field)
    port = parsed.port if parsed.port is not None else (443 if parsed.scheme == "https" else 80)
    if not 1 <= port <= 65535:
        raise InvalidInput(f"malformed URL: port {port} is not in 1-65535", field=field)
    try:
        host = parsed.raw_host.decode("ascii")
    except UnicodeDecodeError as exc:
        raise InvalidInput("malformed URL: host is not ASCII after IDNA encoding", field=field) from exc
    return host, port


async def check_public_url(url: str, *, field: str, allow_private: bool = False) -> None:
    """Raise `InvalidInput` unless `url` is a well-formed http(s) URL that resolves only to
    public addresses (any address with `allow_private`)."""
    host, port = _host_and_port(url, field)
    if allow_private:
        return
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise InvalidInput(f"cannot resolve host {host!r}: {exc}", field=field) from exc
    addresses = {str(info[4][0]) for info in infos}
    refused = sorted(a for a in addresses if not is_public(a))
    if refused:
        raise InvalidInput(
            f"host {host!r} resolves to non-public address(es) {refused}; refused "
            f"(set {ALLOW_PRIVATE_SETTING}=true to allow private and loopback targets)",
            field=field,
        )
