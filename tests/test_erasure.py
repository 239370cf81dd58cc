"""Erasure on the real snapshot: honored rows leave the snapshot and every batch table, nothing else moves, the
snapshot's hash changes and says why, and a second erasure finds nothing."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.contracts import DeletionLogContract
from pipeline.data import read_snapshot, write_snapshot
from pipeline.erasure import erase, snapshot_hashes
from pipeline.pii import user_key
from pipeline.requests import CLAIMED_FILE, DeletionRequest, Received, read_received, write_received
from pipeline.splits import build_split
from tests.e2e import scan_for_rows, stored_files


@pytest.fixture
def stores(tmp_path: Path, snapshot):
    """A home with the snapshot and two batch folders, and who is honored: two whole users and one interaction
    request; a third user is claimed but not honored (a rejected batch, to be retried)."""
    home = tmp_path / "home"
    write_snapshot(snapshot, home / "data" / "snapshot")
    members = np.random.default_rng(3).permutation(snapshot.members)
    gone, pending, partly = [int(u) for u in members[:2]], int(members[2]), int(members[3])
    history = snapshot.interactions[snapshot.interactions.user_id == partly].item_id.tolist()
    items = [int(i) for i in history[:2]]
    requests = [DeletionRequest(request_id=f"r{n}", user_id=u, scope="user", received_at="2026-12-01T00:00:00Z")
                for n, u in enumerate([*gone, pending])]  # fmt: skip
    requests.append(DeletionRequest(request_id="r-items", user_id=partly, scope="interactions", item_ids=items,
                                    received_at="2026-12-01T00:00:00Z"))  # fmt: skip
    for batch, claimed in (("one", requests[:2] + requests[3:]), ("two", requests[2:3])):
        folder = home / "batches" / batch
        folder.mkdir(parents=True)
        build_split(snapshot, claimed).to_parquet(folder / "split.parquet", index=False)
        write_received(folder / CLAIMED_FILE, [Received(r, "ledger", 0) for r in claimed])
    honored = ({user_key(u) for u in gone}, {user_key(partly): set(items)})
    frame = snapshot.interactions
    is_gone = frame.user_id.isin(gone) | ((frame.user_id == partly) & frame.item_id.isin(items))
    return home, honored, frame[is_gone], frame[~is_gone], pending


def test_honored_rows_leave_every_store_and_the_rest_stays_as_it_was(stores, snapshot):
    home, honored, forgotten, retained, pending = stores
    assert scan_for_rows(stored_files(home), forgotten, retained)  # the scan finds them before the erasure
    before = read_snapshot(home / "data" / "snapshot")
    record = erase([home], honored)
    assert scan_for_rows(stored_files(home), forgotten, retained) == []
    after = read_snapshot(home / "data" / "snapshot")
    pd.testing.assert_frame_equal(after.interactions, retained.reset_index(drop=True))  # row for row, in order
    pd.testing.assert_frame_equal(after.items, before.items)  # the vocabulary stays
    assert (after.interactions.user_id == pending).any()  # not honored yet: kept, so its batch can be retried
    manifest = after.manifest
    assert manifest["content_hash"] != snapshot.manifest["content_hash"]
    assert [e["rows"] for e in manifest["erasures"]] == [len(forgotten)]
    counts = manifest["counts"]  # what the manifest says is there is what is there
    assert counts["interactions"] == len(retained) == counts["train"] + counts["val"] + counts["test"]
    assert counts["users"] == retained.user_id.nunique() == snapshot.manifest["counts"]["users"] - 2
    assert counts["items"] == snapshot.manifest["counts"]["items"]
    assert snapshot_hashes(manifest) == {manifest["content_hash"], snapshot.manifest["content_hash"]}

    one = pd.read_parquet(home / "batches" / "one" / "split.parquet")
    assert len(one) == len(snapshot.interactions) - len(forgotten)
    assert [r.request_id for r in map(lambda e: e.request, read_received(home / "batches/one" / CLAIMED_FILE))] == []
    two = home / "batches" / "two"
    assert [e.request.request_id for e in read_received(two / CLAIMED_FILE)] == ["r2"]  # the pending one stays
    assert (pd.read_parquet(two / "split.parquet").role == "forget").sum() > 0
    assert record["rows"] == 2 * len(forgotten) + len(forgotten)  # the snapshot and both batches' tables

    again = erase([home], honored)  # idempotent: nothing left to find, nothing rewritten
    assert again["rows"] == 0 and again["claimed"] == {}
    assert read_snapshot(home / "data" / "snapshot").manifest == manifest


def test_a_repeat_of_an_erased_request_is_still_a_valid_request(stores, snapshot):
    """After the erasure the person is not in the snapshot any more; a repeat of their request must still pass
    intake (the claim answers it as already honored) instead of being quarantined as an unknown user."""
    home, honored, forgotten, _, _ = stores
    erase([home], honored)
    after = read_snapshot(home / "data" / "snapshot")
    user = next(int(u) for u in forgotten.user_id.unique() if user_key(u) in honored[0])
    partly = next(int(u) for u in forgotten.user_id.unique() if user_key(u) in honored[1])
    items = sorted(honored[1][user_key(partly)])
    repeat = [DeletionRequest(request_id="again", user_id=user, scope="user", received_at="2026-12-02T00:00:00Z"),
              DeletionRequest(request_id="again-items", user_id=partly, scope="interactions", item_ids=items,
                              received_at="2026-12-02T00:00:00Z")]  # fmt: skip
    entries = [Received(r, "log", n) for n, r in enumerate(repeat, start=1)]
    valid, rejected = DeletionLogContract(after, honored=honored)(entries)
    assert [e.request.request_id for e in valid] == ["again", "again-items"] and rejected == []
    valid, rejected = DeletionLogContract(after)(entries)  # without the ledger's record neither would be known
    assert valid == [] and len(rejected) == 2


def test_the_scan_reads_tables_by_content_and_timestamps_in_any_text(stores, tmp_path):
    """The scan's own test: a forgotten row hidden in a file without a suffix (as in DVC's cache) and a
    timestamp in a JSON file are both found."""
    home, honored, forgotten, retained, _ = stores
    erase([home], honored)
    forgotten.head(1).to_parquet(home / "0a1b2c3d")
    stamp = int(forgotten.timestamp[~forgotten.timestamp.isin(retained.timestamp)].iloc[0])
    (home / "note.json").write_text(json.dumps({"t": stamp}))
    found = scan_for_rows(stored_files(home), forgotten, retained)
    assert any(hit.startswith("0a1b2c3d: (user, item) row") for hit in found), found
    assert any(hit.startswith("note.json:") and str(stamp) in hit for hit in found), found
