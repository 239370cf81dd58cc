"""Ids as Lethe keeps them: integers, whatever a team's data uses.

A team's user and item ids are often strings (UUIDs, SKUs). Every step past the loader (tokens, tensors, the
ledger's keyed hash, the contracts) takes integers, so a string id becomes one stable integer, the same in the
data and in every deletion request that names it. Without pandas or numpy: the request parser imports this.
"""

from __future__ import annotations

import hashlib
import re
from numbers import Integral

ID_LIMIT = 2**62  # integer ids below this are kept as they are; string ids map at or above it
_DIGITS = re.compile(r"(0|[1-9][0-9]*)")


def canonical_id(value: object) -> int:
    """An integer id (or a string of its digits) as it is, in [0, 2^62); any other string as ID_LIMIT + 62 bits of its
    BLAKE2b digest: stable across runs and machines, and in a range no integer id uses. Raises ValueError for
    anything else (booleans, floats, empty strings, integers out of range)."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        raise ValueError(f"an id must be an integer or a string, got {value!r}")
    if isinstance(value, Integral):
        if not 0 <= int(value) < ID_LIMIT:
            raise ValueError(f"id {value} is outside [0, 2^62)")
        return int(value)
    if isinstance(value, str) and value.strip():
        text = value.strip()
        if _DIGITS.fullmatch(text) and int(text) < ID_LIMIT:
            return int(text)
        return ID_LIMIT + (int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 2)
    raise ValueError(f"an id must be an integer or a non-empty string, got {value!r}")


def request_id_value(value: object) -> object:
    """A deletion request's user or item id: an integer as it is (an unknown one is quarantined later as not in the
    data), a string as `canonical_id` makes it, anything else refused."""
    if isinstance(value, str):
        return canonical_id(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"an id must be an integer or a string, got {type(value).__name__}")
    return value
