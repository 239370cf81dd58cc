"""Strict JSON for what leaves a process: NaN and infinities become null.

Python's json writes NaN, but JSON has no NaN: PostgreSQL's JSON type, Airflow's XCom API and any other
strict reader refuse it. A figure that could not be computed (an attack that does not apply to a batch, a
p-value of nothing) is null there.
"""

from __future__ import annotations

import math


def plain_numbers(value):
    """The same structure with every non-finite float as None (and dict keys as strings)."""
    if isinstance(value, dict):
        return {str(k): plain_numbers(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain_numbers(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
