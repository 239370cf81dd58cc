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


def recover(ledger: Ledger, batch_id: str, home, settings) -> dict[str, str]:
    """Settle batches that died before the ledger heard their outcome, from the registry's record: a batch
    whose model was promoted is honored by that version; any other goes back to wait for this claim."""
    stuck = ledger.stuck_batches(other_than=batch_id)
    if not stuck:
        return {}
    from pipeline.registry import Registry

    registry, outcome = Registry(home, settings.mlflow), {}
    for other in stuck:
        version = registry.promoted_for_batch(other)
        if version is not None:
            count = ledger.honor(other, version)
            outcome[other] = f"{count} honored by version {version} (promoted before the run died)"
        else:
            count = ledger.release(other, "interrupted", f"batch {other} stopped before its gate decided")
            outcome[other] = f"{count} released for this batch (the run stopped before its gate)"
        print(f"recovered batch {other}: {outcome[other]}")
    return outcome


def main(argv: list[str] | None = None) -> dict:
    args = batch_arguments(parser("claim", __doc__)).parse_args(argv)
    settings, home = context(args)
    batch_id = args.batch_dir.name
    snapshot = load_snapshot(args, home, settings)
    ledger = Ledger(home.ledger_url(settings.ledger.url), actor=f"batch {batch_id}")
    recovered = recover(ledger, batch_id, home, settings)
    claimed, limit = ledger.claim(batch_id), settings.ledger.max_failed_nights
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
            # failed too many nights: the whole batch takes the DAG's retrain-from-scratch branch
            "needs_retrain": len(retrain := [r.request_id for r in claimed if r.failed_nights >= limit]),
            "needs_retrain_ids": retrain,
            "request_ids": [r.request_id for r in claimed],
            "snapshot_hash": snapshot.manifest["content_hash"],
            "recovered": recovered,
        },
    )


if __name__ == "__main__":
    entry_point("claim", main)
