"""Ingest benchmark: a log of N valid requests (real members of the snapshot) into a fresh ledger; prints JSON."""

from __future__ import annotations

import json
import tempfile
import time
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import numpy as np

from components._common import context, entry_point, parser
from pipeline.contracts import DeletionLogContract
from pipeline.data import read_snapshot
from pipeline.ledger import Ledger
from pipeline.requests import parse_lines


def main(argv: list[str] | None = None) -> dict:
    cli = parser("bench_ingest", __doc__)
    cli.add_argument("--requests", type=int, default=100_000)
    cli.add_argument("--ledger-url", default=None, help="default: a fresh SQLite file in a temporary folder")
    args = cli.parse_args(argv)
    settings, home = context(args)
    snapshot = read_snapshot(home.snapshot)
    users = np.random.default_rng(settings.seed).choice(snapshot.members, args.requests)
    now = datetime.now(UTC).isoformat()
    content = "".join(
        json.dumps({"request_id": f"bench-{n}", "user_id": int(u), "scope": "user", "received_at": now}) + "\n"
        for n, u in enumerate(users)
    ).encode()
    with tempfile.TemporaryDirectory() as folder:
        ledger = Ledger(args.ledger_url or f"sqlite:///{Path(folder) / 'ledger.db'}")
        started = time.perf_counter()
        counts = ledger.ingest(
            [("bench.jsonl", content)],
            partial(parse_lines, max_line_bytes=settings.ledger.max_line_bytes),
            DeletionLogContract(snapshot),
        )
        seconds = time.perf_counter() - started
        ledger.dispose()
    result = {
        "requests": args.requests,
        "bytes": len(content),
        "seconds": round(seconds, 2),
        "requests_per_second": round(args.requests / seconds),
        **counts.as_dict(),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    entry_point("bench_ingest", main)
