"""Progress bars that suit both a terminal and a log file (Airflow task logs, CI)."""

from __future__ import annotations

import sys
from collections.abc import Iterable

from tqdm.auto import tqdm


def progress(iterable: Iterable, desc: str, unit: str, enabled: bool = True) -> tqdm:
    """Live in a terminal; in a log, one line every 30 s instead of one per update."""
    interactive = sys.stderr.isatty()
    return tqdm(iterable, desc=desc, unit=unit, disable=not enabled, mininterval=0.2 if interactive else 30.0)
