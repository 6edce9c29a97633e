"""Refusing URLs that point inside the network (SSRF), after DNS resolution.

A callback URL is resolved by us, and every address it resolves to must be a
globally routable unicast address: loopback, private, link-local (cloud metadata at
169.254.169.254), shared (100.64/10), multicast, reserved and unspecified ranges
are refused, also when wrapped in IPv6 (mapped, 6to4, Teredo). The check runs at
submit time and again just before each delivery, since DNS can change in between.
What it cannot close is a name that changes between our check and the HTTP
client's own resolution a moment later (DNS rebinding with a zero TTL); a deployment
that must rule that out sends webhooks through an egress proxy.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

from service.errors import InvalidInput


def is_public(address: str) -> bool:
    """A globally routable unicast address, also behind IPv6 wrappings of IPv4."""
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        # ::ffff:a.b.c.d, 2002:AABB:CCDD:: (6to4) and Teredo carry an IPv4 address that is
        # what is really reached: judge that one.
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None:
            ip = embedded
    # is_global excludes private, loopback, link-local, shared (100.64/10, where some
    # clouds put their metadata service), reserved and unspecified ranges.
    return ip.is_global and not ip.is_multicast


async def check_public_url(url: str, *, field: str, allow_private: bool = False) -> None:
    """Raise `InvalidInput` unless `url` is http(s) and resolves only to public addresses."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput("URL must be http(s)://host/...", field=field)
    if allow_private:
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise InvalidInput(f"cannot resolve host {parts.hostname!r}: {exc}", field=field) from exc
    addresses = {info[4][0] for info in infos}
    refused = sorted(a for a in addresses if not is_public(str(a)))
    if refused:
        raise InvalidInput(
            f"host {parts.hostname!r} resolves to non-public address(es) {refused}; refused", field=field
        )
