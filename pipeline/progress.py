"""Progress bars that suit both a terminal and a log file (Airflow task logs, CI)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from tqdm.auto import tqdm


def progress(iterable: Iterable | None, desc: str, unit: str, enabled: bool = True, total: int | None = None) -> tqdm:
    """Live in a terminal; in a log, one line every 30 s instead of one per update. Without an iterable, a bar of
    `total` units that the caller moves with `update`."""
    interactive = sys.stderr.isatty()
    return tqdm(
        iterable, desc=desc, unit=unit, total=total, disable=not enabled, mininterval=0.2 if interactive else 30.0
    )


class RowLog:
    """What a long run has finished, one JSON line per unit as it finishes, so that a rerun resumes where the last
    one stopped. Every line carries the run's fingerprint (a hash of what decides its figures: params, base
    weights); a file written under another fingerprint is refused, never mixed into one result."""

    def __init__(self, path: Path, identity: dict) -> None:
        self.path = Path(path)
        self.fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
        self.done: dict[str, dict] = {}
        for number, record in self.records(self.path):
            if record.get("fingerprint") != self.fingerprint:
                raise ValueError(
                    f"{self.path}:{number}: written by a run with other params or another base model; move the "
                    "file away (or use another --out) to start afresh, or rerun with the params it was written with"
                )
            self.done[record["key"]] = record["value"]

    @staticmethod
    def records(path: Path) -> Iterator[tuple[int, dict]]:
        """The file's whole lines as (line number, record); a line cut short when a sitting was killed is skipped
        (its unit runs again)."""
        lines = Path(path).read_text().splitlines() if Path(path).exists() else []
        for number, line in enumerate(lines, start=1):
            try:
                yield number, json.loads(line)
            except ValueError:
                continue

    def add(self, key: str, value: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps({"key": key, "fingerprint": self.fingerprint, "value": value}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.done[key] = value
