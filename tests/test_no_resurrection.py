"""No resurrection: once the ledger holds a request as honored, no later load of training data contains it."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pipeline.train
from components import prepare, train
from components._common import load_snapshot
from pipeline.contracts import DeletionLogContract
from pipeline.data import read_snapshot
from pipeline.ledger import Ledger
from pipeline.requests import DeletionRequest, parse_lines
from pipeline.settings import Home, load_settings
from tests.conftest import write_params


def honor(home: Home, settings, snapshot, requests: list[dict]) -> None:
    ledger = Ledger(home.ledger_url(settings.ledger.url))
    content = b"".join(json.dumps(r).encode() + b"\n" for r in requests)
    counts = ledger.ingest(
        [("deletions.jsonl", content)],
        lambda uri, data: parse_lines(uri, data, 65536),
        DeletionLogContract(snapshot),
    )
    assert counts.validated == len(requests), counts.quarantine
    ledger.claim("night-1")
    assert ledger.honor("night-1", "2") == len(requests)


def test_a_retrain_after_a_deletion_never_sees_what_was_forgotten(tmp_path, monkeypatch):
    params = write_params(tmp_path / "params.yaml", **{"train.epochs": 1})  # what it is fitted on is the point
    settings, home = load_settings(params), Home(tmp_path / "home")
    common = ["--params", str(params), "--home", str(home.root)]
    prepare.main(common)
    snapshot = read_snapshot(home.snapshot)
    gone, partly = (int(u) for u in snapshot.members[:2])
    partly_train = snapshot.interactions[(snapshot.interactions.user_id == partly)]
    forgotten_items = sorted(int(i) for i in partly_train.item_id[:3])
    now = datetime.now(UTC).isoformat()
    honor(
        home,
        settings,
        snapshot,
        [
            {"request_id": "all-of-it", "user_id": gone, "scope": "user", "received_at": now},
            {"request_id": "three-items", "user_id": partly, "scope": "interactions", "item_ids": forgotten_items,
             "received_at": now},
        ],
    )  # fmt: skip

    def absent(frame) -> bool:
        pairs = set(zip(frame.user_id, frame.item_id, strict=True))
        return gone not in set(frame.user_id) and not any((partly, i) in pairs for i in forgotten_items)

    # the snapshot as the DVC prepare stage writes it from the raw data
    prepare.main([*common, "--out", str(tmp_path / "fresh")])
    fresh = read_snapshot(tmp_path / "fresh")
    assert absent(fresh.interactions) and partly in set(fresh.interactions.user_id)
    # the snapshot every training and batch step reads, even one written before the deletion
    assert absent(load_snapshot(type("Args", (), {"snapshot": None})(), home, settings).interactions)

    # base training (and so a retrain from scratch): capture exactly what the model is fitted on
    seen = {}
    real = pipeline.train.train_base  # components.train imports it when it runs

    def spy(snapshot, settings, **options):
        seen["sequences"] = snapshot.sequences(("train",), snapshot.members)
        seen["items"] = snapshot.item_to_token()
        return real(snapshot, settings, **options)

    monkeypatch.setattr(pipeline.train, "train_base", spy)
    train.main([*common, "--out", str(tmp_path / "model")])
    assert gone not in seen["sequences"]
    tokens = {seen["items"][i] for i in forgotten_items if i in seen["items"]}
    assert tokens and not tokens & set(seen["sequences"][partly])
    assert len(seen["sequences"][partly]) > 0
    assert (tmp_path / "model" / "train.json").exists()


def test_without_honored_requests_nothing_is_excluded(tmp_path):
    params = write_params(tmp_path / "params.yaml")
    settings, home = load_settings(params), Home(tmp_path / "home")
    prepare.main(["--params", str(params), "--home", str(home.root)])
    snapshot = read_snapshot(home.snapshot)
    request = DeletionRequest(
        request_id="x", user_id=int(snapshot.members[0]), scope="user", received_at=datetime.now(UTC)
    )
    ledger = Ledger(home.ledger_url(settings.ledger.url))
    ledger.ingest([("a.jsonl", (request.model_dump_json() + "\n").encode())], lambda u, d: parse_lines(u, d, 65536),
                  lambda received: (received, []))  # fmt: skip
    ledger.claim("night")  # claimed but not honored (the gate has not passed): still training data
    loaded = load_snapshot(type("Args", (), {"snapshot": None})(), home, settings)
    assert len(loaded.interactions) == len(snapshot.interactions)
