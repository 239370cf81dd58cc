"""Check parsed requests against the data snapshot: known users, items in their history, unique ids."""

from __future__ import annotations

import json
from pathlib import Path

from components._common import (
    batch_arguments,
    context,
    entry_point,
    parser,
    read_manifest,
    snapshot_dir,
    write_manifest,
)
from components.ingest import REQUESTS_FILE
from pipeline.data import read_snapshot
from pipeline.requests import check_against_snapshot, describe, read_received, write_received

VALID_FILE = "valid.jsonl"


def honored_request_ids(honored_log: Path) -> set[str]:
    if not honored_log.exists():
        return set()
    return {json.loads(line)["request_id"] for line in honored_log.read_text().splitlines() if line.strip()}


def main(argv: list[str] | None = None) -> dict:
    args = batch_arguments(parser("validate", __doc__)).parse_args(argv)
    settings, home = context(args)
    read_manifest(args.batch_dir / "ingest.json")
    snapshot = read_snapshot(snapshot_dir(args, home))
    received = read_received(args.batch_dir / REQUESTS_FILE)
    valid, rejected = check_against_snapshot(received, snapshot, honored_request_ids(home.honored_log))
    write_received(args.batch_dir / VALID_FILE, valid)
    print("\n".join(describe(rejected)) or "no rejected requests")
    return write_manifest(
        args.batch_dir / "validate.json",
        {
            "snapshot_hash": snapshot.manifest["content_hash"],
            "valid": len(valid),
            "rejected": [rejection.as_dict() for rejection in rejected],
        },
    )


if __name__ == "__main__":
    entry_point("validate", main)
