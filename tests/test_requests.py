import json
from datetime import UTC, datetime

import pytest

from pipeline.contracts import DeletionLogContract
from pipeline.requests import DeletionRequest, Received, parse_log

NOW = "2026-11-21T22:00:00+00:00"


def line(**fields) -> str:
    return json.dumps({"received_at": NOW, **fields})


def test_bad_lines_are_rejected_with_file_line_and_reason_and_the_rest_goes_on(tmp_path, snapshot):
    member = int(snapshot.members[0])
    log = tmp_path / "log.jsonl"
    log.write_text(
        "\n".join(
            [
                line(request_id="ok-1", user_id=member, scope="user"),
                '{"request_id": "broken", "user_id": ',  # malformed JSON
                line(request_id="unknown-user", user_id=999_999, scope="user"),
                line(request_id="bad-scope", user_id=member, scope="everything"),
                "",
                line(request_id="ok-2", user_id=int(snapshot.members[1]), scope="user"),
            ]
        )
        + "\n"
    )
    received, rejected = parse_log(log, 65536)
    assert [(r.line, r.reason) for r in rejected] == [(2, "malformed_json"), (4, "invalid_request")]
    assert all(r.source == str(log) for r in rejected)
    assert "scope" in rejected[1].message and rejected[1].request_id == "bad-scope"
    valid, unknown = DeletionLogContract(snapshot)(received)
    assert [v.request.request_id for v in valid] == ["ok-1", "ok-2"]
    assert [(u.line, u.reason, u.request_id) for u in unknown] == [(3, "unknown_user", "unknown-user")]


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"scope": "interactions"}, "non-empty item_ids"),
        ({"scope": "interactions", "item_ids": []}, "non-empty item_ids"),
        ({"scope": "user", "item_ids": [1]}, "must be absent"),
        ({"scope": "user", "user_id": 12.5}, "user_id"),
        ({"scope": "user", "user_id": ""}, "user_id"),
        ({"scope": "interactions", "item_ids": [1, None]}, "item_ids"),
        ({"scope": "user", "user_id": True}, "user_id"),
        ({"scope": "user", "extra": 1}, "extra"),
        ({"scope": "user", "received_at": "yesterday"}, "received_at"),
        ({"scope": "user", "request_id": ""}, "request_id"),
    ],
)
def test_schema_violations(tmp_path, fields, fragment):
    log = tmp_path / "log.jsonl"
    log.write_text(line(**{"request_id": "r", "user_id": 1, **fields}) + "\n")
    received, rejected = parse_log(log, 65536)
    assert not received and len(rejected) == 1
    assert fragment in rejected[0].message


def test_bom_crlf_non_utf8_and_non_objects(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_bytes(
        b"\xef\xbb\xbf"
        + line(request_id="a", user_id=1, scope="user").encode()
        + b"\r\n"
        + b"\xff\xfe broken\r\n"
        + b"[1, 2]\r\n"
    )
    received, rejected = parse_log(log, 65536)
    assert [r.request.request_id for r in received] == ["a"]
    assert [(r.line, r.reason) for r in rejected] == [(2, "not_utf8"), (3, "not_an_object")]


def test_a_folder_is_read_in_name_order_and_a_missing_path_is_a_clear_error(tmp_path):
    (tmp_path / "b.jsonl").write_text(line(request_id="b", user_id=1, scope="user"))
    (tmp_path / "a.jsonl").write_text(line(request_id="a", user_id=1, scope="user"))
    (tmp_path / "notes.txt").write_text("not a log")
    received, _ = parse_log(tmp_path, 65536)
    assert [r.request.request_id for r in received] == ["a", "b"]
    with pytest.raises(FileNotFoundError, match="no such deletion log"):
        parse_log(tmp_path / "absent.jsonl", 65536)


def test_referential_checks(snapshot):
    user = int(snapshot.members[0])
    history = snapshot.interactions[snapshot.interactions.user_id == user].item_id.tolist()
    stranger_item = int(snapshot.items.item_id[~snapshot.items.item_id.isin(history)].iloc[0])

    def received(request_id, **fields):
        request = DeletionRequest(request_id=request_id, user_id=user, received_at=datetime.now(UTC), **fields)
        return Received(request, "log.jsonl", 1)

    valid, rejected = DeletionLogContract(snapshot)(
        [
            received("items-ok", scope="interactions", item_ids=history[:2]),
            received("items-bad", scope="interactions", item_ids=[history[0], stranger_item]),
            received("items-ok", scope="user"),
        ],
    )
    assert [v.request.request_id for v in valid] == ["items-ok"]
    assert [r.reason for r in rejected] == ["unknown_items", "duplicate_request_id"]
    assert f"user {user}" not in " ".join(r.message for r in rejected)  # reports name users by keyed hash only


def test_the_contract_results_keep_counts_and_rows_but_no_user_ids(snapshot):
    import json as _json

    member = int(snapshot.members[0])
    contract = DeletionLogContract(snapshot)
    entries = [
        Received(DeletionRequest(request_id=f"r{n}", user_id=user, scope="user", received_at=datetime.now(UTC)),
                 "log.jsonl", n)
        for n, user in enumerate([member, 987_654_321], start=1)
    ]  # fmt: skip
    valid, rejected = contract(entries)
    assert [v.request.request_id for v in valid] == ["r1"] and [r.reason for r in rejected] == ["unknown_user"]
    stored = _json.dumps(contract.results, default=str)
    assert contract.results[0]["success"] is False and '"unexpected_index_list": [1]' in stored
    assert "987654321" not in stored
