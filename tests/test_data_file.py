"""A team's own interactions (data.source: file): string ids end to end, a contract that turns a broken file into a
report, S3 as well as a local path, and the nightly on the shipped example file."""

from __future__ import annotations

import io
import json
import shutil
import sys
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest

from pipeline.contracts import ContractViolation, DeletionLogContract
from pipeline.data import load_interactions, prepare_snapshot
from pipeline.ids import ID_LIMIT, canonical_id
from pipeline.requests import DeletionRequest, Received
from pipeline.settings import Settings
from tests.conftest import REPO, tiny_params, write_params
from tests.e2e import CHEAP, LETHE, ledger_json, ran

EXAMPLE = REPO / "examples" / "interactions.csv"


def file_settings(path: str | Path, **overrides) -> Settings:
    return Settings.model_validate(
        tiny_params(**{"data.source": "file", "data.path": str(path), "data.max_users": None, **overrides})
    )


@pytest.fixture(scope="module")
def example() -> pd.DataFrame:
    return pd.read_csv(EXAMPLE, dtype={"user_id": str, "item_id": str})


def test_the_example_file_is_read_with_its_string_ids_made_stable_integers(example):
    frame = load_interactions(file_settings(EXAMPLE))
    assert len(frame) == len(example) and frame.user_id.nunique() == example.user_id.nunique()
    first = example.iloc[0]
    assert frame.user_id.iloc[0] == canonical_id(first.user_id) >= ID_LIMIT  # a UUID maps above the integer range
    assert frame.item_id.iloc[0] == canonical_id(first.item_id)
    assert frame.timestamp.iloc[0] == int(pd.Timestamp(first.timestamp).timestamp())
    assert canonical_id("12") == canonical_id(12) == 12 and canonical_id("012") != 12  # "012" is text, not 12
    snapshot = prepare_snapshot(frame, file_settings(EXAMPLE).data, seed=42)
    assert snapshot.items.title.notna().all(), "titles come along for the item rows of a pretrained backbone"

    # a deletion request names the person by the team's own id, as the file does
    member = next(u for u in example.user_id.unique() if canonical_id(u) in set(snapshot.members))
    stranger = "00000000-0000-0000-0000-000000000000"
    now = datetime.now(UTC)
    received = [
        Received(DeletionRequest(request_id=f"r{n}", user_id=user, scope="user", received_at=now), "log", n)
        for n, user in enumerate((member, stranger))
    ]
    valid, rejected = DeletionLogContract(snapshot)(received)
    assert [entry.request.request_id for entry in valid] == ["r0"]
    assert [entry.reason for entry in rejected] == ["unknown_user"]


def _csv(frame: pd.DataFrame) -> bytes:
    return frame.to_csv(index=False).encode()


def _parquet(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def broken_files(example: pd.DataFrame) -> dict[str, tuple[str, bytes, str]]:
    """name -> (file name, content, a fragment of the report it must get)."""
    good = example[example.user_id.isin(example.user_id.unique()[:15])].reset_index(drop=True)
    rows = len(good)
    floats = good.assign(user_id=[i + 0.5 for i in range(len(good))])
    nulls = good.copy()
    nulls.loc[[3, 7], "item_id"] = None
    once = good.drop_duplicates("user_id")
    future = good.copy()
    future.loc[[0, 1], "timestamp"] = "2999-01-01T00:00:00Z"
    return {
        "missing_column": ("a.csv", _csv(good.drop(columns="timestamp")), "lack the column(s) timestamp"),
        "wrong_types": ("a.parquet", _parquet(floats), f"user_id: {rows} of {rows} rows of a type other than int"),
        "timestamps_not_times": ("a.csv", _csv(good.assign(timestamp="yesterday")), "neither unix seconds nor a date"),
        "null_ids": ("a.csv", _csv(nulls), f"item_id: 2 of {rows} rows empty"),
        "negative_ids": ("a.parquet", _parquet(good.assign(item_id=-good.index - 1)), "outside [0, 2^62)"),
        "duplicate_rows": ("a.csv", _csv(pd.concat([good, good.head(5)])), f": 10 of {rows + 5} rows in repeats"),
        "one_interaction_per_user": ("a.csv", _csv(once), f"only 0 of {len(once)} users have the 3 interactions"),
        "future_timestamps": ("a.csv", _csv(future), f"timestamp: 2 of {rows} rows outside [1970, now]"),
        "empty_file": ("a.csv", b"", "the file is empty"),
        "header_only": ("a.csv", b"user_id,item_id,timestamp\n", "the file holds no interactions"),
        "not_utf8": ("a.csv", "user_id,item_id,timestamp\nJosé,1,0\n".encode("latin-1"), "not UTF-8"),
        "not_a_table": ("a.parquet", b"PAR1 this is not parquet", "cannot be read as parquet"),
        "unknown_suffix": ("a.json", _csv(good), "is .parquet or .csv"),
    }  # fmt: skip


@pytest.mark.parametrize("name", list(broken_files(pd.read_csv(EXAMPLE, dtype={"user_id": str, "item_id": str}))))
def test_a_broken_interaction_file_gets_a_report_naming_what_is_wrong(name, example, tmp_path):
    file_name, content, fragment = broken_files(example)[name]
    path = tmp_path / file_name
    path.write_bytes(content)
    with pytest.raises(ContractViolation) as failure:
        load_interactions(file_settings(path))
    assert fragment in str(failure.value), str(failure.value)
    assert str(path) in str(failure.value), "the report names the file"


def test_a_broken_file_stops_lethe_prepare_with_one_line_not_a_traceback(tmp_path):
    import subprocess

    path = tmp_path / "interactions.csv"
    path.write_bytes("user_id,item_id,timestamp\nJosé,1,0\n".encode("latin-1"))
    params = write_params(tmp_path / "params.yaml", **{"data.source": "file", "data.path": str(path)})
    env = {"LETHE_HOME": str(tmp_path / ".lethe"), "LETHE_PARAMS": str(params), "LETHE_PII_KEY": "test",
           "PATH": str(Path(sys.executable).parent)}  # fmt: skip
    result = subprocess.run([LETHE, "prepare"], capture_output=True, text=True, check=False, timeout=300, env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert f"lethe prepare: error: {path}: not UTF-8" in result.stderr


def test_the_file_can_live_in_s3(example, tmp_path):
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{server._server.server_port}"
        credentials = {"aws_access_key_id": "test", "aws_secret_access_key": "test", "region_name": "us-east-1"}
        s3 = boto3.client("s3", endpoint_url=endpoint, **credentials)
        s3.create_bucket(Bucket="team")
        s3.put_object(Bucket="team", Key="exports/interactions.csv", Body=EXAMPLE.read_bytes())
        with pytest.MonkeyPatch.context() as patch:
            for name, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                                ("AWS_DEFAULT_REGION", "us-east-1")):  # fmt: skip
                patch.setenv(name, value)
            settings = file_settings("s3://team/exports/interactions.csv", **{"landing.s3_endpoint_url": endpoint})
            from_s3 = load_interactions(settings)
        pd.testing.assert_frame_equal(from_s3, load_interactions(file_settings(EXAMPLE)))
    finally:
        server.stop()


@pytest.mark.e2e
def test_the_nightly_runs_on_the_example_file_and_forgets_people_named_by_their_own_ids(
    example, template_home, tmp_path
):
    """From a fresh home: prepare and train on the example file, then one night whose deletion log names a person
    and one interaction by the team's own string ids. The verdict is forced to pass (tests.e2e.CHEAP): what is
    checked is the path, not how well a 98-person model forgets."""
    import subprocess

    from tests.e2e import environment

    home = tmp_path / ".lethe"
    shutil.copytree(template_home / "airflow", home / "airflow")  # a migrated Airflow database; no data, no model
    params = write_params(
        tmp_path / "params.yaml",
        **{"data.source": "file", "data.path": str(EXAMPLE), "data.max_users": None, "train.epochs": 2, **CHEAP},
    )

    def run(*args: str) -> subprocess.CompletedProcess:
        return ran(subprocess.run([LETHE, *args], env=environment(home, params), capture_output=True, text=True,
                                  timeout=900, check=False))  # fmt: skip

    run("prepare")
    members = set(pd.read_parquet(home / "data" / "snapshot" / "interactions.parquet").query("member").user_id)
    people = [user for user in example.user_id.unique() if canonical_id(user) in members]
    whole, partly = people[0], people[1]
    item = example.item_id[example.user_id == partly].iloc[0]
    log = tmp_path / "deletions.jsonl"
    log.write_text(
        json.dumps({"request_id": "whole", "user_id": whole, "scope": "user", "received_at": "2026-12-01T00:00:00Z"})
        + "\n"
        + json.dumps({"request_id": "one", "user_id": partly, "scope": "interactions", "item_ids": [item],
                      "received_at": "2026-12-01T00:00:00Z"})  # fmt: skip
        + "\n"
    )
    run("nightly", "--deletion-log", str(log))
    (summary_file,) = (home / "batches").glob("*/summary.json")
    summary = json.loads(summary_file.read_text())
    assert summary["gate"] == "passed" and summary["requests_honored"] == 2, summary
    for request_id in ("whole", "one"):
        assert ledger_json(home, params, "show", request_id)["entries"][0]["state"] == "honored"
    after = pd.read_parquet(home / "data" / "snapshot" / "interactions.parquet")
    assert canonical_id(whole) not in set(after.user_id)
    kept = after[after.user_id == canonical_id(partly)]
    assert len(kept) and canonical_id(item) not in set(kept.item_id)
