"""Claim this batch's requests in the ledger, atomically: everything validated or waiting for a retry.

The ledger knows users only by keyed hash; the claim finds them again in the data snapshot (without what is
honored already) and writes the batch's requests for the split. A request that repeats one already honored is
answered by the ledger's claim (honored, reason `already_honored`); a claimed request the batch cannot act on
(its user is not in the snapshot, or none of its items is left to forget) is quarantined with that reason,
and the rest of the batch goes on: one bad request never stops the others.
"""

from __future__ import annotations

import json

from components._common import (
    batch_arguments,
    context,
    entry_point,
    erase_honored,
    load_snapshot,
    open_ledger,
    parser,
    snapshot_dir,
    write_manifest,
)
from pipeline.ledger import Ledger, LedgerRequest
from pipeline.pii import user_keys
from pipeline.requests import CLAIMED_FILE, DeletionRequest, Received, read_received, write_received


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


def unusable_requests(claimed: list[LedgerRequest], users: dict[str, int], snapshot) -> dict[str, tuple[str, list]]:
    """reason -> (message, request ids) for claimed requests there is nothing in the snapshot to forget for."""
    missing = [r.key for r in claimed if r.user_key not in users]
    interactions = snapshot.interactions
    empty = []
    for request in claimed:
        if request.scope == "interactions" and request.user_key in users:
            held = set(interactions.item_id[interactions.user_id == users[request.user_key]].tolist())
            if not held & set(request.item_ids or ()):
                empty.append(request.key)
    found = {}
    if missing:
        found["not_in_snapshot"] = ("the user is not in the data snapshot this batch reads", missing)
    if empty:
        found["nothing_to_forget"] = ("none of the listed items is in the user's data any more", empty)
    return found


def main(argv: list[str] | None = None) -> dict:
    args = batch_arguments(parser("claim", __doc__)).parse_args(argv)
    settings, home = context(args)
    batch_id = args.batch_dir.name
    ledger = open_ledger(settings, home, f"batch {batch_id}")
    recovered = recover(ledger, batch_id, home, settings)
    # what any night honored leaves Lethe's stores now, if a crash kept its own gate from erasing it
    erased = erase_honored(ledger, home, snapshot_dir(args, home))
    snapshot = load_snapshot(args, home, settings)  # after recovery: what it honored is gone from the data too
    claimed, limit = ledger.claim(batch_id), settings.ledger.max_failed_nights
    users = user_keys(snapshot.interactions.user_id.unique())
    unusable = unusable_requests(claimed, users, snapshot)
    for reason, (message, ids) in unusable.items():
        ledger.quarantine_claimed(batch_id, ids, reason, message)
        print(f"quarantined at claim ({reason}): {json.dumps(ids[:20])}: {message}")
    dropped = {key for _, keys in unusable.values() for key in keys}
    claimed = [r for r in claimed if r.key not in dropped]
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
            "erased": erased,
            "already_honored": ledger.answered(batch_id),
            "quarantined": [
                {"request_ids": ids, "reason": reason, "message": message}
                for reason, (message, ids) in unusable.items()
            ],
        },
    )


if __name__ == "__main__":
    entry_point("claim", main)
