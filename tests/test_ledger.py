"""The ledger on SQLite and on the PostgreSQL server at 127.0.0.1:5432: intake, claims, outcomes, history."""

from __future__ import annotations

import hashlib
import hmac
import json
import multiprocessing
from datetime import UTC, datetime
from functools import partial

import pytest
import sqlalchemy as sa

from pipeline.contracts import DeletionLogContract
from pipeline.ledger import STATES, Ledger
from pipeline.pii import DEVELOPMENT_KEY, PiiKeyMissing, user_key
from pipeline.requests import parse_lines
from tests.e2e import postgres_schema_url, require_postgres

parse_file = partial(parse_lines, max_line_bytes=65536)


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    require_postgres()  # skips with the reason outside CI; fails in CI
    return postgres_schema_url()


def line(request_id, user_id, scope="user", items=None, received_at="2026-01-01T00:00:00Z") -> bytes:
    payload = {"request_id": request_id, "user_id": user_id, "scope": scope, "received_at": received_at}
    if items is not None:
        payload["item_ids"] = items
    return json.dumps(payload).encode() + b"\n"


def accept_all(received):
    return received, []


def test_a_new_ledger_is_migrated_to_the_newest_schema(ledger_url):
    ledger = Ledger(ledger_url)
    assert ledger.schema_version() == Ledger.newest_schema_version() == "0003"
    Ledger(ledger_url).migrate()  # a second start is a no-op, not an error
    assert ledger.counts() == dict.fromkeys(STATES, 0)


def test_a_ledger_of_the_first_schema_is_upgraded_with_its_rows(ledger_url):
    from alembic import command

    engine = sa.create_engine(ledger_url)
    with engine.begin() as connection:  # a ledger as the first release left it, holding one honored request
        command.upgrade(Ledger._alembic(None, connection), "0001")
        now = datetime.now(UTC)
        connection.execute(
            sa.text(
                "INSERT INTO requests (key, request_id, user_key, scope, state, model_version, failed_nights, "
                "created_at, updated_at, received_at) VALUES ('old', 'old', :user, 'user', 'honored', '2', 0, :now, "
                ":now, :now)"
            ),
            {"user": user_key(1), "now": now},
        )
        for from_state, to_state in ((None, "received"), ("received", "validated"), ("in_batch", "honored")):
            connection.execute(
                sa.text(
                    "INSERT INTO events (request_key, from_state, to_state, at, actor) "
                    "VALUES ('old', :a, :b, :now, 'me')"
                ),
                {"a": from_state, "b": to_state, "now": now},
            )
    ledger = Ledger(ledger_url)
    assert ledger.schema_version() == "0003"
    assert ledger.verify()["ok"] and ledger.verify()["events_checked"] == 3  # the old events were chained
    ledger.ingest([("log.jsonl", line("again", 1))], parse_file, accept_all)
    assert ledger.claim("night") == [] and ledger.answered("night")[0]["original"] == "old"
    assert ledger.verify()["ok"] and ledger.verify()["events_checked"] == 6


def test_ingesting_the_same_file_twice_changes_nothing(ledger_url):
    ledger = Ledger(ledger_url)
    content = line("a", 1) + b"{broken\n" + line("b", 2)
    first = ledger.ingest([("log.jsonl", content)], parse_file, accept_all)
    assert (first.received, first.validated, first.quarantined) == (3, 2, 1)
    counts, histories = ledger.counts(), ledger.history("a")
    again = ledger.ingest([("renamed.jsonl", content)], parse_file, accept_all)
    assert again.files_skipped == ["renamed.jsonl"] and again.received == 0 and again.duplicates == 3
    assert ledger.counts() == counts and ledger.history("a") == histories


def test_a_request_id_reused_for_a_different_request_is_quarantined(ledger_url):
    ledger = Ledger(ledger_url)
    ledger.ingest([("one.jsonl", line("a", 1))], parse_file, accept_all)
    same = ledger.ingest([("two.jsonl", line("a", 1) + b"\n")], parse_file, accept_all)
    assert same.duplicates == 1 and same.received == 0
    other = ledger.ingest([("three.jsonl", line("a", 2))], parse_file, accept_all)
    assert other.quarantined == 1
    entries = ledger.history("a")["entries"]
    assert [e["state"] for e in entries] == ["validated", "quarantined"]
    assert entries[1]["reason"] == "duplicate_request_id" and "already used" in entries[1]["message"]


def test_a_request_walks_through_its_states_and_every_change_is_an_event(ledger_url):
    ledger = Ledger(ledger_url, actor="test")
    ledger.ingest([("log.jsonl", line("a", 1) + line("b", 2, "interactions", [5, 6]))], parse_file, accept_all)
    assert {r.request_id for r in ledger.claim("night-1")} == {"a", "b"}
    assert ledger.claim("night-1-again") == []  # nothing is taken twice
    assert ledger.fail("night-1", "gate_rejected", "NDCG fell", max_failed_nights=2) == {
        "needs_retrain": 0,
        "pending_retry": 2,
    }
    assert len(ledger.claim("night-2")) == 2
    assert ledger.fail("night-2", "gate_rejected", "NDCG fell", max_failed_nights=2)["needs_retrain"] == 2
    fallback = ledger.claim("retrain-1")  # the nightly takes them; the DAG routes the batch to a retrain
    assert len(fallback) == 2 and all(r.failed_nights == 2 for r in fallback)
    assert ledger.honor("retrain-1", "7") == 2
    counts = ledger.counts()
    assert counts["honored"] == 2 and sum(counts.values()) == 2
    entry = ledger.history("a")["entries"][0]
    assert entry["state"] == "honored" and entry["model_version"] == "7" and entry["batch_id"] == "retrain-1"
    assert [(e["from_state"], e["to_state"]) for e in entry["events"]] == [
        (None, "received"),
        ("received", "validated"),
        ("validated", "in_batch"),
        ("in_batch", "pending_retry"),
        ("pending_retry", "in_batch"),
        ("in_batch", "needs_retrain"),
        ("needs_retrain", "in_batch"),
        ("in_batch", "honored"),
    ]
    assert all(e["actor"] == "test" and e["at"].endswith("+00:00") for e in entry["events"])
    users, items = ledger.honored()
    assert users == {user_key(1)} and items == {user_key(2): {5, 6}}


def test_raw_user_ids_never_enter_the_ledger(ledger_url, monkeypatch):
    monkeypatch.setenv("LETHE_PII_KEY", "a-test-key")
    ledger = Ledger(ledger_url)
    ledger.ingest(
        [("log.jsonl", line("r-1", 424242) + line("r-2", 737373, "interactions", [1]))], parse_file, accept_all
    )
    with ledger.engine.connect() as connection:
        dump = json.dumps([list(map(str, row)) for row in connection.execute(sa.text("SELECT * FROM requests"))])
        dump += json.dumps([list(map(str, row)) for row in connection.execute(sa.text("SELECT * FROM events"))])
    assert "424242" not in dump and "737373" not in dump
    # the ledger hashed with the configured key, computed here independently of pipeline.pii, and not with the
    # development key: a ledger that ignored LETHE_PII_KEY would store the latter
    configured = hmac.new(b"a-test-key", b"424242", hashlib.sha256).hexdigest()[:32]
    development = hmac.new(DEVELOPMENT_KEY, b"424242", hashlib.sha256).hexdigest()[:32]
    assert configured in dump and development not in dump


def test_production_mode_without_a_key_is_an_error(monkeypatch):
    monkeypatch.delenv("LETHE_PII_KEY", raising=False)
    monkeypatch.setenv("LETHE_MODE", "production")
    with pytest.raises(PiiKeyMissing, match="LETHE_PII_KEY is not set"):
        user_key(1)


def _claim_in_process(url: str, batch: str, queue, barrier) -> None:
    ledger = Ledger(url, actor=batch)
    barrier.wait()  # every process is connected and migrated: now they claim at the same moment
    queue.put((batch, [r.key for r in ledger.claim(batch)]))


@pytest.mark.parametrize("claimers", [2, 4])
def test_concurrent_claims_never_share_a_request(ledger_url, claimers):
    ledger = Ledger(ledger_url)
    content = b"".join(line(f"r{i}", i) for i in range(3000))
    ledger.ingest([("big.jsonl", content)], parse_file, accept_all)
    context = multiprocessing.get_context("spawn")
    queue, barrier = context.Queue(), context.Barrier(claimers)
    processes = [
        context.Process(target=_claim_in_process, args=(ledger_url, f"batch-{n}", queue, barrier))
        for n in range(claimers)
    ]
    for process in processes:
        process.start()
    results = dict(queue.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    taken = [key for keys in results.values() for key in keys]
    assert len(taken) == len(set(taken)) == 3000, {batch: len(keys) for batch, keys in results.items()}
    counts = ledger.counts()
    assert counts["in_batch"] == 3000 and counts["validated"] == 0
    for batch, keys in results.items():
        assert {r.key for r in ledger.batch(batch)} == set(keys)


def test_referential_checks_quarantine_with_a_reason(ledger_url, snapshot):
    ledger = Ledger(ledger_url)
    member = int(snapshot.members[0])
    history = sorted(snapshot.interactions[snapshot.interactions.user_id == member].item_id)
    content = (
        line("ok", member)
        + line("ghost", 10**9)
        + line("items", member, "interactions", [history[0], 10**9])
        + line("later", member, received_at="2999-01-01T00:00:00Z")
    )
    counts = ledger.ingest([("log.jsonl", content)], parse_file, DeletionLogContract(snapshot))
    assert (counts.validated, counts.quarantined) == (1, 3)
    reasons = {rid: ledger.history(rid)["entries"][0]["reason"] for rid in ("ghost", "items", "later")}
    assert reasons == {"ghost": "unknown_user", "items": "unknown_items", "later": "future_timestamp"}


def test_an_unreachable_database_is_a_one_line_error(capsys, monkeypatch, tmp_path):
    from components import cli

    monkeypatch.setenv("LETHE_LEDGER_URL", "postgresql+psycopg2://postgres@127.0.0.1:1/test")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--home", str(tmp_path), "ledger", "status"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert error.count("\n") == 1 and "ledger database" in error and "is unavailable" in error


def test_received_at_is_kept_in_utc(ledger_url):
    ledger = Ledger(ledger_url)
    ledger.ingest([("log.jsonl", line("tz", 1, received_at="2026-03-01T12:00:00+02:00"))], parse_file, accept_all)
    received = ledger.history("tz")["entries"][0]["received_at"]
    assert datetime.fromisoformat(received) == datetime(2026, 3, 1, 10, 0, tzinfo=UTC)


def test_an_interrupted_batch_is_released_without_counting_a_failed_night(ledger_url):
    ledger = Ledger(ledger_url)
    ledger.ingest([("log.jsonl", line("a", 1) + line("b", 2))], parse_file, accept_all)
    ledger.claim("died")
    assert ledger.stuck_batches(other_than="tonight") == ["died"]
    assert ledger.stuck_batches(other_than="died") == []
    assert ledger.release("died", "interrupted", "stopped before its gate") == 2
    assert ledger.stuck_batches(other_than="tonight") == []
    claimed = ledger.claim("tonight")
    assert {r.request_id for r in claimed} == {"a", "b"} and all(r.failed_nights == 0 for r in claimed)
    assert ledger.history("a")["entries"][0]["events"][-2]["reason"] == "interrupted"


def test_a_corrected_resubmission_with_a_new_id_goes_through(ledger_url, snapshot):
    ledger = Ledger(ledger_url)
    member = int(snapshot.members[0])
    check = DeletionLogContract(snapshot)
    wrong = ledger.ingest([("monday.jsonl", line("req-7", member + 10**9))], parse_file, check)
    assert wrong.quarantined == 1 and ledger.history("req-7")["entries"][0]["reason"] == "unknown_user"
    fixed = ledger.ingest([("tuesday.jsonl", line("req-7-fixed", member))], parse_file, check)
    assert fixed.validated == 1 and [r.request_id for r in ledger.claim("night")] == ["req-7-fixed"]
    assert ledger.history("req-7")["entries"][0]["state"] == "quarantined"  # the record of the bad one stays


def test_a_repeat_of_an_honored_request_is_answered_at_claim_and_never_claimed(ledger_url):
    """People ask twice: a user honored at user scope, or interactions already forgotten, asked for again under a
    new id. The claim answers the repeat (honored by the original's version, linked to it) and claims the rest."""
    ledger = Ledger(ledger_url, actor="test")
    ledger.ingest([("monday.jsonl", line("a", 1) + line("b", 2, "interactions", [5, 6]))], parse_file, accept_all)
    ledger.claim("night-1")
    assert ledger.honor("night-1", "2") == 2
    tuesday = (
        line("a-again", 1)  # the same person
        + line("a-items", 1, "interactions", [9])  # items of a person forgotten whole
        + line("b-again", 2, "interactions", [6])  # interactions already forgotten
        + line("b-more", 2, "interactions", [6, 7])  # one of them new: a real request
        + line("c", 3)
    )
    ledger.ingest([("tuesday.jsonl", tuesday)], parse_file, accept_all)
    claimed = ledger.claim("night-2")
    assert sorted(r.request_id for r in claimed) == ["b-more", "c"]
    answered = {entry["request_id"]: entry for entry in ledger.answered("night-2")}
    assert answered == {
        "a-again": {"request_id": "a-again", "original": "a", "model_version": "2"},
        "a-items": {"request_id": "a-items", "original": "a", "model_version": "2"},
        "b-again": {"request_id": "b-again", "original": "b", "model_version": "2"},
    }
    entry = ledger.history("a-again")["entries"][0]
    assert entry["state"] == "honored" and entry["reason"] == "already_honored" and entry["original_key"] == "a"
    assert [(e["from_state"], e["to_state"], e["reason"]) for e in entry["events"]][-1] == (
        "validated",
        "honored",
        "already_honored",
    )
    assert ledger.counts()["in_batch"] == 2 and ledger.stuck_batches(other_than="night-2") == []


def test_a_claimed_request_the_batch_cannot_act_on_is_quarantined_and_the_rest_go_on(ledger_url):
    ledger = Ledger(ledger_url)
    ledger.ingest([("log.jsonl", line("gone", 1) + line("fine", 2))], parse_file, accept_all)
    ledger.claim("night")
    assert ledger.quarantine_claimed("night", ["gone"], "not_in_snapshot", "the user is not in the snapshot") == 1
    assert ledger.honor("night", "3") == 1
    assert ledger.history("gone")["entries"][0]["state"] == "quarantined"
    assert ledger.history("fine")["entries"][0]["state"] == "honored"
    assert ledger.history("gone")["entries"][0]["events"][-1]["reason"] == "not_in_snapshot"


def test_an_event_edited_behind_the_ledgers_back_is_named(ledger_url):
    ledger = Ledger(ledger_url)
    ledger.ingest([("log.jsonl", line("a", 1) + line("b", 2))], parse_file, accept_all)
    ledger.claim("night")
    evidence = {"item_rank": {"p_value": 0.4, "z": float("nan")}, "model_version": "2"}
    assert ledger.honor("night", "2", evidence=lambda user: {**evidence, "user_z": 0.1}) == 2
    clean = ledger.verify()
    assert clean["ok"] and clean["events_checked"] == 8 and clean["head"]
    honored = ledger.honoring_event("a")
    assert honored["evidence"]["item_rank"] == {"p_value": 0.4, "z": None} and honored["model_version"] == "2"
    engine = sa.create_engine(ledger_url)
    with engine.begin() as connection:  # someone moves the honoring version of request "b" by hand
        target = connection.execute(
            sa.text("SELECT id FROM events WHERE request_key = 'b' AND to_state = 'honored'")
        ).scalar_one()
        connection.execute(sa.text("UPDATE events SET model_version = '9' WHERE id = :id"), {"id": target})
    broken = ledger.verify()
    assert not broken["ok"] and broken["first_broken_event"]["event_id"] == target
    assert (
        broken["first_broken_event"]["request_key"] == "b"
        and "does not match its hash" in broken["first_broken_event"]["problem"]
    )
    with engine.begin() as connection:  # put it back
        connection.execute(sa.text("UPDATE events SET model_version = '2' WHERE id = :id"), {"id": target})
    assert ledger.verify()["ok"]
    with engine.begin() as connection:  # delete an earlier event: the next one no longer links
        first = connection.execute(sa.text("SELECT min(id) FROM events")).scalar_one()
        connection.execute(sa.text("DELETE FROM events WHERE id = :id"), {"id": first})
    assert ledger.verify()["first_broken_event"]["problem"].startswith("does not link")
    engine.dispose()


def test_a_request_state_changed_by_hand_is_named(ledger_url):
    ledger = Ledger(ledger_url)
    ledger.ingest([("log.jsonl", line("a", 1))], parse_file, accept_all)
    engine = sa.create_engine(ledger_url)
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE requests SET state = 'honored' WHERE key = 'a'"))
    engine.dispose()
    result = ledger.verify()
    assert not result["ok"] and result["first_broken_event"] is None
    assert result["first_inconsistent_request"]["request_key"] == "a"
