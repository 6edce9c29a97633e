"""API keys: `Authorization: Bearer <key>`, configured as SHA-256 hashes.

The service never stores a key, only its hash and the tenant name it maps to. A
key sees only its tenant's jobs; another tenant's ids answer 404, exactly like
unknown ids, so an id leaks nothing. Admin keys see everything.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from service.errors import Forbidden, Unauthorized
from service.settings import GatewaySettings

ANONYMOUS = "anonymous"
KEY_PREFIX = "gcr_"


@dataclass(frozen=True)
class Principal:
    tenant: str
    admin: bool = False
    key_id: str = ANONYMOUS
    """A stable, non-secret id of the key (a prefix of its hash), for rate limits and logs."""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh random key and its hash (the hash goes into GCR_API_KEYS)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, hash_key(key)


def _lookup(table: dict[str, str], digest: str) -> str | None:
    # Compare every entry in constant time, so timing does not reveal a near miss.
    found = None
    for known, tenant in table.items():
        if hmac.compare_digest(known.lower(), digest):
            found = tenant
    return found


def authenticate(settings: GatewaySettings, authorization: str | None) -> Principal:
    if settings.auth_disabled:
        return Principal(ANONYMOUS, admin=True)
    if not settings.api_keys and not settings.admin_keys:
        raise Unauthorized(
            "no API keys are configured: set GCR_API_KEYS (see `gcr keys new`) or GCR_AUTH_DISABLED=true"
        )
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("missing API key: send `Authorization: Bearer <key>`")
    digest = hash_key(key.strip())
    admin = _lookup(settings.admin_keys, digest)
    if admin is not None:
        return Principal(admin, admin=True, key_id=digest[:16])
    tenant = _lookup(settings.api_keys, digest)
    if tenant is None:
        raise Unauthorized("unknown API key")
    return Principal(tenant, key_id=digest[:16])


def require_admin(caller: Principal) -> None:
    """Admin routes: a valid key that is not an admin's is authenticated but not allowed (403)."""
    if not caller.admin:
        raise Forbidden("this route needs an admin key (GCR_ADMIN_KEYS); this key is not one")
