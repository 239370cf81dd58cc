"""Claim this batch's requests in the ledger, atomically: everything validated or waiting for a retry.

The ledger knows users only by keyed hash; the claim finds them again in the data snapshot and writes the
batch's requests for the split. A claimed user who is no longer in the snapshot stops the batch with the
request ids named, rather than being dropped.
"""

from __future__ import annotations

import json

from components._common import batch_arguments, context, entry_point, load_snapshot, parser, write_manifest
from pipeline.ledger import Ledger
from pipeline.pii import user_keys
from pipeline.requests import DeletionRequest, Received, read_received, write_received

CLAIMED_FILE = "claimed.jsonl"


def read_claimed(batch_dir) -> list[DeletionRequest]:
    return [entry.request for entry in read_received(batch_dir / CLAIMED_FILE)]


def main(argv: list[str] | None = None) -> dict:
    args = batch_arguments(parser("claim", __doc__)).parse_args(argv)
    settings, home = context(args)
    batch_id = args.batch_dir.name
    snapshot = load_snapshot(args, home, settings)
    ledger = Ledger(home.ledger_url(settings.ledger.url), actor=f"batch {batch_id}")
    claimed = ledger.claim(batch_id)
    users = user_keys(snapshot.interactions.user_id.unique())
    missing = [r.request_id for r in claimed if r.user_key not in users]
    if missing:
        raise ValueError(f"claimed requests whose user is not in the data snapshot: {json.dumps(missing[:20])}")
    write_received(
        args.batch_dir / CLAIMED_FILE,
        [
            Received(
                DeletionRequest(
                    request_id=r.request_id,
                    user_id=users[r.user_key],
                    scope=r.scope,
                    item_ids=list(r.item_ids) if r.item_ids else None,
                    received_at=r.received_at,
                ),
                source="ledger",
                line=0,
            )
            for r in claimed
        ],
    )
    return write_manifest(
        args.batch_dir / "claim.json",
        {
            "claimed": len(claimed),
            "retries": sum(r.failed_nights > 0 for r in claimed),
            "request_ids": [r.request_id for r in claimed],
            "snapshot_hash": snapshot.manifest["content_hash"],
        },
    )


if __name__ == "__main__":
    entry_point("claim", main)
