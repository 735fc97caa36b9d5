"""API keys: sha256 digest → key record, checked before the request body is read.

Only digests are configured, so the proxy never holds a client's secret. The lookup is by digest
(a timing difference there reveals nothing about any secret) and the match is confirmed with
hmac.compare_digest. Keys never appear in logs: callers only ever see the key's name.
"""

from __future__ import annotations

import hashlib
import hmac

from teraproxy.config import AuthConfig, KeyConfig
from teraproxy.errors import AuthError

_DUMMY = b"\x00" * 32


class KeyTable:
    __slots__ = ("_by_digest", "enabled")

    def __init__(self, auth: AuthConfig) -> None:
        self.enabled = auth.enabled
        self._by_digest = {k.sha256: k for k in auth.keys}

    def check(self, header: str | None) -> KeyConfig | None:
        """The key record for an Authorization header; None when auth is off. Raises AuthError."""
        if not self.enabled:
            return None
        if not header:
            raise AuthError("Missing API key: send `Authorization: Bearer <key>`.", code="missing_api_key")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthError("Malformed Authorization header: expected `Bearer <key>`.")
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        key = self._by_digest.get(digest)
        if not hmac.compare_digest(key.sha256 if key else _DUMMY, digest) or key is None:
            raise AuthError("Incorrect API key provided.")
        return key

    @staticmethod
    def may_use(key: KeyConfig | None, model: str) -> bool:
        """Callers answer a model the key may not use exactly like one that does not exist."""
        return key is None or key.may_use(model)


def hash_key(token: str) -> str:
    """The hex digest to put in the config for a bearer token."""
    return hashlib.sha256(token.encode()).hexdigest()
