"""Keyed hashes of user ids: what leaves the ledger instead of a raw id (HMAC-SHA256, key from the environment).

The key comes from the environment variable LETHE_PII_KEY (an Airflow deployment fills it from a connection or
a secrets backend). Outside production a fixed development key is used so that a laptop run works; with
LETHE_MODE=production a missing key is an error, never a silent fallback.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Iterable

KEY_VARIABLE = "LETHE_PII_KEY"
MODE_VARIABLE = "LETHE_MODE"
DEVELOPMENT_KEY = b"lethe-development-key-not-for-production"

log = logging.getLogger(__name__)


class PiiKeyMissing(ValueError):
    """Production mode without a key: hashes made with a guessable key would not protect anyone."""


def pii_key() -> bytes:
    key = os.environ.get(KEY_VARIABLE, "")
    if key:
        return key.encode()
    if os.environ.get(MODE_VARIABLE, "").lower() == "production":
        raise PiiKeyMissing(
            f"{KEY_VARIABLE} is not set and {MODE_VARIABLE}=production: refusing to hash user ids with a known key"
        )
    log.debug(
        "%s is not set: using the development key (set %s=production to forbid this)", KEY_VARIABLE, MODE_VARIABLE
    )
    return DEVELOPMENT_KEY


def user_key(user_id: int, key: bytes | None = None) -> str:
    """The keyed hash that stands for a user everywhere outside the ledger (hex, 32 characters)."""
    digest = hmac.new(key if key is not None else pii_key(), str(int(user_id)).encode(), hashlib.sha256)
    return digest.hexdigest()[:32]


def user_keys(user_ids: Iterable[int]) -> dict[str, int]:
    """Keyed hash -> user id for a population (the data snapshot): how a batch finds its users again."""
    key = pii_key()
    return {user_key(user, key): int(user) for user in user_ids}
