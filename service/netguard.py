"""Refusing URLs that point inside the network (SSRF), after DNS resolution.

A callback URL is resolved by us, and every address it resolves to must be a
public unicast address: loopback, private, link-local (cloud metadata at
169.254.169.254), multicast, reserved and unspecified ranges are refused. The
check runs at submit time and again just before each delivery, since DNS can
change in between.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

from service.errors import InvalidInput


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not (
        ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
        or ip.is_reserved or ip.is_unspecified
    )


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
