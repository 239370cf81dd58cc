"""The S3 landing zone against moto's ThreadedMotoServer on loopback, the endpoint taken from params.yaml."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import sqlalchemy as sa

from pipeline.settings import LandingSettings, load_settings
from pipeline.storage import LandingUnavailable, read_logs
from tests.conftest import write_params


def bounded(endpoint: str) -> LandingSettings:
    return LandingSettings(s3_endpoint_url=endpoint, s3_connect_timeout_s=2, s3_read_timeout_s=5, s3_max_attempts=2)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            patch.setenv(name, value)
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="deletions")
        yield endpoint, client
    server.stop()


def request(request_id: str, user_id: int) -> bytes:
    payload = {"request_id": request_id, "user_id": user_id, "scope": "user", "received_at": "2026-11-01T00:00:00Z"}
    return json.dumps(payload).encode() + b"\n"


def test_logs_are_listed_in_name_order_under_the_prefix_only(s3):
    endpoint, client = s3
    client.put_object(Bucket="deletions", Key="order/b.jsonl", Body=request("b", 1))
    client.put_object(Bucket="deletions", Key="order/a.jsonl", Body=request("a", 1))
    client.put_object(Bucket="deletions", Key="order/readme.txt", Body=b"not a log")
    client.put_object(Bucket="deletions", Key="elsewhere/c.jsonl", Body=request("c", 1))
    logs = list(read_logs("s3://deletions/order/", bounded(endpoint)))
    assert [log.uri for log in logs] == ["s3://deletions/order/a.jsonl", "s3://deletions/order/b.jsonl"]
    assert logs[0].content == request("a", 1)


def test_a_missing_bucket_is_a_clear_error(s3):
    endpoint, _ = s3
    with pytest.raises(LandingUnavailable, match=rf"s3://no-such-bucket/x/ \(endpoint {endpoint}\): cannot list"):
        list(read_logs("s3://no-such-bucket/x/", bounded(endpoint)))


def test_lethe_ingest_reads_s3_records_the_files_and_never_moves_them(s3, tmp_path, snapshot):
    endpoint, client = s3
    params = write_params(tmp_path / "params.yaml", **{"landing.s3_endpoint_url": endpoint})
    home = tmp_path / "home"
    from pipeline.data import write_snapshot

    write_snapshot(snapshot, home / "data" / "snapshot")
    members = [int(u) for u in snapshot.members[:3]]
    client.put_object(Bucket="deletions", Key="night/1.jsonl", Body=request("s3-1", members[0]) + b"{oops\n")
    client.put_object(Bucket="deletions", Key="night/2.jsonl", Body=request("s3-2", members[1]))

    def ingest() -> dict:
        result = subprocess.run(
            [str(Path(sys.executable).with_name("lethe")), "--params", str(params), "--home", str(home),
             "ingest", "s3://deletions/night/"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    first = ingest()
    assert (first["received"], first["validated"], first["quarantined"]) == (3, 2, 1)
    second = ingest()
    assert second["received"] == 0 and second["files_skipped"] == [
        "s3://deletions/night/1.jsonl",
        "s3://deletions/night/2.jsonl",
    ]
    listed = client.list_objects_v2(Bucket="deletions", Prefix="night/")["Contents"]
    assert sorted(item["Key"] for item in listed) == ["night/1.jsonl", "night/2.jsonl"]  # still there
    engine = sa.create_engine(f"sqlite:///{home / 'ledger.db'}")
    with engine.connect() as connection:
        recorded = sorted(row.uri for row in connection.execute(sa.text("SELECT uri FROM ingested_files")))
    assert recorded == ["s3://deletions/night/1.jsonl", "s3://deletions/night/2.jsonl"]


def test_an_unreachable_endpoint_is_a_one_line_error(tmp_path, snapshot, monkeypatch):
    params = write_params(tmp_path / "params.yaml", **{"landing.s3_endpoint_url": f"http://127.0.0.1:{free_port()}"})
    home = tmp_path / "home"
    from pipeline.data import write_snapshot

    write_snapshot(snapshot, home / "data" / "snapshot")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    result = subprocess.run(
        [str(Path(sys.executable).with_name("lethe")), "--params", str(params), "--home", str(home),
         "ingest", "s3://deletions/night/"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    endpoint = f"endpoint {load_settings(params).landing.s3_endpoint_url}"
    assert (
        result.stderr.strip().count("\n") == 0 and "cannot list objects" in result.stderr and endpoint in result.stderr
    )
