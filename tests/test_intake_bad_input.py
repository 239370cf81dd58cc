"""Bad deletion logs, one test each: every line ends validated or quarantined with a reason (or the whole source
is refused with a clear error), and afterwards received = honored + quarantined + pending + in batch.

Each case ingests its files into a fresh SQLite ledger, checked against the real (tiny) MovieLens snapshot,
then runs one batch that honors whatever was validated, and checks the books against the lines submitted.
"""

from __future__ import annotations

import json
from functools import partial

import pytest

from pipeline.contracts import DeletionLogContract
from pipeline.ledger import Ledger
from pipeline.requests import parse_lines

MAX_LINE = 65536


def request(request_id, user_id, scope="user", items=None, received_at="2026-01-01T00:00:00Z", **extra) -> dict:
    payload = {"request_id": request_id, "user_id": user_id, "scope": scope, "received_at": received_at, **extra}
    if items is not None:
        payload["item_ids"] = items
    return payload


def jsonl(*payloads) -> bytes:
    return b"".join(json.dumps(p).encode() + b"\n" for p in payloads)


def submitted_lines(files: list[bytes]) -> int:
    """Lines that hold anything, counted independently of the parser (what the books must account for)."""
    return sum(1 for content in files for raw in content.splitlines() if raw.strip())


def cases(member: int, other: int, items: list[int]) -> dict[str, tuple[list[bytes], dict]]:
    """name -> (files, expected): expected holds `validated` and the count per quarantine reason."""
    ok = request("ok", member)
    return {
        "malformed_json": ([b'{"request_id": "a", "user_id": \n'], {"validated": 0, "malformed_json": 1}),
        "truncated_json": ([jsonl(ok)[:-10] + b"\n"], {"validated": 0, "malformed_json": 1}),
        "not_an_object": ([b"[1, 2, 3]\n"], {"validated": 0, "not_an_object": 1}),
        # a string id is a team's id (data.source file): the digits of an integer id name that integer's person
        "user_id_a_string_of_its_digits": ([jsonl(request("a", str(member)))], {"validated": 1}),
        "user_id_a_string_no_data_holds": ([jsonl(request("a", "9b1deb4d-3b7d"))], {"validated": 0, "unknown_user": 1}),
        "user_id_a_list": ([jsonl(request("a", [member]))], {"validated": 0, "invalid_request": 1}),
        "user_id_a_float": ([jsonl(request("a", member + 0.5))], {"validated": 0, "invalid_request": 1}),
        "user_id_a_boolean": ([jsonl(request("a", True))], {"validated": 0, "invalid_request": 1}),
        "missing_field": ([jsonl({"request_id": "a", "user_id": member, "received_at": "2026-01-01T00:00:00Z"})],
                          {"validated": 0, "invalid_request": 1}),
        "extra_field": ([jsonl(request("a", member, note="hi"))], {"validated": 0, "invalid_request": 1}),
        "unknown_scope": ([jsonl(request("a", member, scope="everything"))], {"validated": 0, "invalid_request": 1}),
        "items_with_user_scope": ([jsonl(request("a", member, items=items[:1]))],
                                  {"validated": 0, "invalid_request": 1}),
        "interactions_without_items": ([jsonl(request("a", member, scope="interactions", items=[]))],
                                       {"validated": 0, "invalid_request": 1}),
        "unknown_user": ([jsonl(request("a", 10**9))], {"validated": 0, "unknown_user": 1}),
        "unknown_item": ([jsonl(request("a", member, "interactions", [items[0], 10**9]))],
                         {"validated": 0, "unknown_items": 1}),
        "item_of_another_user_only": ([jsonl(request("a", other, "interactions", [items[0]]))],
                                      {"validated": 0, "unknown_items": 1}),
        "duplicate_id_in_one_file": ([jsonl(ok, request("ok", other))],
                                     {"validated": 1, "duplicate_request_id": 1}),
        "duplicate_id_across_files": ([jsonl(ok), jsonl(request("ok", other))],
                                      {"validated": 1, "duplicate_request_id": 1}),
        "same_user_twice_in_one_batch": ([jsonl(ok, request("ok-2", member))], {"validated": 2}),
        "user_and_interaction_scope_for_one_user": (
            [jsonl(ok, request("some", member, "interactions", items[:2]))], {"validated": 2}),
        "empty_file": ([b"\n\n   \n"], {"validated": 0}),
        "zero_byte_file": ([b""], {"validated": 0}),
        "non_utf8_bytes": ([b'{"request_id": "\xff\xfe", "user_id": 1}\n' + jsonl(ok)],
                           {"validated": 1, "not_utf8": 1}),
        "byte_order_mark": ([b"\xef\xbb\xbf" + jsonl(ok)], {"validated": 1}),
        "crlf_line_ends": ([jsonl(ok).replace(b"\n", b"\r\n") + jsonl(request("ok-2", other)).replace(b"\n", b"\r\n")],
                           {"validated": 2}),
        "a_line_of_10_mb": ([jsonl(request("big", member, note="x" * 10_000_000)) + jsonl(ok)],
                            {"validated": 1, "line_too_long": 1}),
        "future_timestamp": ([jsonl(request("a", member, received_at="2999-01-01T00:00:00Z"))],
                             {"validated": 0, "future_timestamp": 1}),
        "malformed_timestamp": ([jsonl(request("a", member, received_at="yesterday"))],
                                {"validated": 0, "invalid_request": 1}),
        "sql_metacharacters_in_id": ([jsonl(request("x'); DROP TABLE requests; --", member))], {"validated": 1}),
        "shell_metacharacters_in_id": ([jsonl(request("$(rm -rf ~) `reboot` | tee; &", member))], {"validated": 1}),
        "negative_user_id": ([jsonl(request("a", -member))], {"validated": 0, "unknown_user": 1}),
        "huge_user_id": ([jsonl(request("a", 10**40))], {"validated": 0, "unknown_user": 1}),
        "huge_number_literal": ([b'{"request_id": "a", "user_id": 1e400, "scope": "user", '
                                 b'"received_at": "2026-01-01T00:00:00Z"}\n'], {"validated": 0, "invalid_request": 1}),
        "deeply_nested_json": ([b"[" * 100_000 + b"]" * 100_000 + b"\n"], {"validated": 0, "line_too_long": 1}),
        "nested_json_under_the_line_limit": ([b'{"a":' * 5_000 + b"1" + b"}" * 5_000 + b"\n"],
                                             {"validated": 0, "malformed_json": 1}),
        "empty_request_id": ([jsonl(request("", member))], {"validated": 0, "invalid_request": 1}),
        "nul_bytes": ([b'{"request_id": "a\x00", "user_id": 1}\x00\n'], {"validated": 0, "malformed_json": 1}),
    }  # fmt: skip


@pytest.fixture(scope="module")
def people(snapshot):
    member, other = (int(u) for u in snapshot.members[:2])
    interactions = snapshot.interactions

    def history(user):
        return set(interactions.item_id[interactions.user_id == user].tolist())

    items = sorted(int(i) for i in history(member) - history(other))  # the member's, in the catalogue, not other's
    assert items and set(items) <= set(snapshot.items.item_id)
    return member, other, items


CASE_NAMES = list(cases(1, 2, [3, 4]))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_is_quarantined_with_a_reason_and_the_books_balance(name, people, snapshot, tmp_path):
    files, expected = cases(*people)[name]
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    parse = partial(parse_lines, max_line_bytes=MAX_LINE)
    counts = ledger.ingest(
        [(f"{name}-{n}.jsonl", content) for n, content in enumerate(files)],
        parse,
        DeletionLogContract(snapshot),
    )
    quarantined = {}
    for state_entry in _all_entries(ledger):
        if state_entry["state"] == "quarantined":
            assert state_entry["reason"] and state_entry["message"], state_entry  # a code and a sentence
            assert state_entry["source"].startswith(name) and state_entry["line"] >= 1  # names file and line
            quarantined[state_entry["reason"]] = quarantined.get(state_entry["reason"], 0) + 1
    assert {"validated": counts.validated, **quarantined} == expected
    claimed = ledger.claim("night")
    assert len(claimed) == expected["validated"]
    ledger.honor("night", "2")
    books = ledger.counts()
    received = submitted_lines(files)
    assert counts.received == received
    assert received == books["honored"] + books["quarantined"] + books["pending_retry"] + books["in_batch"]
    assert books["honored"] == expected["validated"]


def test_the_suite_covers_at_least_25_cases():
    assert len(CASE_NAMES) >= 25


def test_a_hundred_thousand_requests_in_one_file(people, snapshot, tmp_path):
    member, other, _ = people
    content = b"".join(
        json.dumps(request(f"bulk-{n}", member if n % 2 else other)).encode() + b"\n" for n in range(100_000)
    )
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    counts = ledger.ingest(
        [("bulk.jsonl", content)],
        partial(parse_lines, max_line_bytes=MAX_LINE),
        DeletionLogContract(snapshot),
    )
    assert (counts.received, counts.validated, counts.quarantined) == (100_000, 100_000, 0)
    assert ledger.counts()["validated"] == 100_000


def _all_entries(ledger: Ledger) -> list[dict]:
    import sqlalchemy as sa

    from pipeline.ledger import requests_table

    with ledger.engine.connect() as connection:
        return [dict(row) for row in connection.execute(sa.select(requests_table)).mappings()]
