"""Signed deletion receipts and `lethe ledger verify`, through the command line, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from functools import partial

import pytest
import sqlalchemy as sa

from components import cli
from pipeline.ledger import Ledger
from pipeline.receipts import request_hash
from pipeline.requests import parse_lines
from tests.e2e import postgres_schema_url, require_postgres
from tests.test_ledger import accept_all, line

EVIDENCE = {
    "model_version": "2",
    "gate": {"alpha": 0.05, "power": 0.8, "max_ndcg_drop": 0.05},
    "tests": {"item_rank": {"auc": 0.51, "p_value": 0.62, "p_holm": 1.0, "z": 0.5, "mde": 0.56,
                            "n_forgotten": 340, "n_reference": 2900}},
}  # fmt: skip


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request, tmp_path, monkeypatch) -> str:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ledger.db'}"
    else:
        require_postgres()
        url = postgres_schema_url()
    monkeypatch.setenv("LETHE_LEDGER_URL", url)  # what `lethe` opens, as a deployment sets it
    return url


def lethe(*args: str) -> int:
    """`lethe` in this process (the ledger comes from LETHE_LEDGER_URL); its exit code."""
    try:
        cli.main(list(args))
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


@pytest.fixture
def honored(ledger_url, tmp_path, monkeypatch) -> Ledger:
    ledger = Ledger(ledger_url)
    parse = partial(parse_lines, max_line_bytes=65536)
    ledger.ingest([("log.jsonl", line("a", 1) + line("b", 2))], parse, accept_all)
    ledger.claim("night-1")
    ledger.honor("night-1", "2", lambda user: {**EVIDENCE, "user": {"z": 0.3, "positions": 40}})
    ledger.ingest([("again.jsonl", line("a-again", 1))], parse, accept_all)
    ledger.claim("night-2")  # a repeat: answered at claim as already honored, by version 2
    assert lethe("receipt", "--keygen", str(tmp_path / "keys")) == 0
    monkeypatch.setenv("LETHE_RECEIPT_KEY_FILE", str(tmp_path / "keys" / "receipt_key.pem"))
    return ledger


def test_a_receipt_verifies_and_one_altered_byte_fails(honored, tmp_path, capsys):
    receipt = tmp_path / "a.json"
    assert lethe("receipt", "a", "--out", str(receipt)) == 0
    payload = json.loads(receipt.read_text())["payload"]
    assert payload["model"]["version"] == "2" and payload["evidence"]["tests"]["item_rank"]["p_value"] == 0.62
    assert payload["request"]["hashed_id"] == request_hash("a") and len(request_hash("a")) == 32  # keyed, not raw
    assert (tmp_path / "a.html").read_text().count("Deletion receipt") == 2
    public = str(tmp_path / "keys" / "receipt_key.pub.pem")
    assert lethe("receipt", "--verify", str(receipt), "--public-key", public) == 0

    text = receipt.read_text()
    at = text.index('"p_value": 0.62') + len('"p_value": 0.6')
    altered = tmp_path / "altered.json"
    altered.write_text(text[:at] + "3" + text[at + 1 :])  # one byte: 0.62 -> 0.63
    capsys.readouterr()
    assert lethe("receipt", "--verify", str(altered), "--public-key", public) == 1
    assert "signature does not match" in capsys.readouterr().err


def test_a_repeat_gets_the_original_evidence_and_a_tampered_ledger_fails_the_receipt(
    honored, ledger_url, tmp_path, capsys
):
    receipt = tmp_path / "again.json"
    assert lethe("receipt", "a-again", "--out", str(receipt)) == 0
    payload = json.loads(receipt.read_text())["payload"]
    assert payload["request"]["answered_as"] == "already_honored" and payload["request"]["answered_by"]
    assert payload["evidence"]["tests"]["item_rank"]["n_forgotten"] == 340
    assert lethe("ledger", "verify") == 0

    engine = sa.create_engine(ledger_url)
    with engine.begin() as connection:  # someone rewrites who honored request "b"
        connection.execute(
            sa.text("UPDATE events SET actor = 'mallory' WHERE request_key = 'b' AND to_state = 'honored'")
        )
    engine.dispose()
    capsys.readouterr()
    assert lethe("ledger", "verify") == 1
    out = json.loads(capsys.readouterr().out)
    assert out["first_broken_event"]["request_key"] == "b"
    assert lethe("receipt", "--verify", str(receipt)) == 1
    assert "chain is broken" in capsys.readouterr().err


def test_no_receipt_for_a_request_not_honored(ledger_url, tmp_path, monkeypatch, capsys):
    Ledger(ledger_url).ingest([("log.jsonl", line("c", 3))], partial(parse_lines, max_line_bytes=65536), accept_all)
    lethe("receipt", "--keygen", str(tmp_path / "keys"))
    monkeypatch.setenv("LETHE_RECEIPT_KEY_FILE", str(tmp_path / "keys" / "receipt_key.pem"))
    assert lethe("receipt", "c") == 1
    assert "is validated, not honored" in capsys.readouterr().err
