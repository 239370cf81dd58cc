"""The nightly with its ledger on PostgreSQL and its deletion log on S3, and each of them going away.

PostgreSQL is this machine's server at 127.0.0.1:5432, S3 is moto's ThreadedMotoServer on loopback; each is
reached through a relay the test controls (tests.e2e.Relay), so that taking a server away is a state the test
sets, not a race: the S3 relay is down before a night, the PostgreSQL relay is taken down while a step waits
at a hook point (LETHE_TEST_PAUSE_AT). Each loss must end the night with a one-line error that names the
server and its URL, after the bounded retries of params.yaml, with nothing lost; the next night, with the
server back, finishes the batch. (The MLflow tracking server's loss comes with the production path, where
Lethe first runs against a tracking server.)"""

from __future__ import annotations

import json
import subprocess
import time

import boto3
import numpy as np
import pytest

from pipeline.data import read_snapshot
from tests.e2e import (
    CHEAP,
    LETHE,
    Relay,
    check_books,
    environment,
    ledger_json,
    lethe,
    new_home,
    postgres_schema_url,
    ran,
    request_line,
    require_postgres,
)

pytestmark = pytest.mark.e2e
BOUNDS = {  # fail fast: the point is that the night ends, naming the server, not how long it waits
    "ledger.attempts": 2,
    "ledger.retry_backoff_s": 0.2,
    "ledger.connect_timeout_s": 2,
    "landing.s3_connect_timeout_s": 1,
    "landing.s3_read_timeout_s": 2,
    "landing.s3_max_attempts": 2,
}


@pytest.fixture
def s3_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    yield ("127.0.0.1", server.get_host_and_port()[1])
    server.stop()


def test_the_nightly_on_postgresql_and_s3_survives_each_server_going_away(tmp_path, template_home, s3_server):
    require_postgres()
    database, landing = Relay(("127.0.0.1", 5432)).start(), Relay(s3_server).start()
    try:
        ledger_url = postgres_schema_url(f"127.0.0.1:{database.port}")
        endpoint = f"http://127.0.0.1:{landing.port}"
        home, params = new_home(template_home, tmp_path, **CHEAP, **BOUNDS, **{"landing.s3_endpoint_url": endpoint})
        servers = {
            "LETHE_LEDGER_URL": ledger_url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        snapshot = read_snapshot(home / "data" / "snapshot")
        users = [int(u) for u in np.random.default_rng(5).choice(snapshot.members, 2, replace=False)]
        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{s3_server[1]}", aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")  # fmt: skip
        s3.create_bucket(Bucket="deletions")
        s3.put_object(Bucket="deletions", Key="night/1.jsonl", Body=request_line("pg-1", users[0]).encode())
        s3.put_object(Bucket="deletions", Key="night/2.jsonl", Body=request_line("pg-2", users[1]).encode())
        request_ids, log = ["pg-1", "pg-2"], "s3://deletions/night/"

        # Night 1: S3 is away. The ingest fails naming the landing zone and its endpoint; nothing is recorded.
        landing.stop()
        first = lethe(home, params, "nightly", "--deletion-log", log, "--batch-id", "s3-away", **servers)
        assert first.returncode != 0
        said = first.stdout + first.stderr
        assert f"S3 landing zone {log} (endpoint {endpoint}): cannot list objects" in said, said[-3000:]
        status = ledger_json(home, params, "status", **servers)
        assert sum(v for k, v in status.items() if k != "schema_version") == 0

        # Night 2: S3 is back; PostgreSQL goes away once the split is written. The next step that reads the
        # ledger fails naming it; the claimed requests stay in this batch for the next night to settle.
        landing.start()
        pause = tmp_path / "pause"
        pause.mkdir()
        env = environment(home, params, **servers, LETHE_TEST_PAUSE_AT=f"split:{pause}")
        command = [LETHE, "nightly", "--deletion-log", log, "--batch-id", "pg-away"]
        output = tmp_path / "pg-away.log"  # a file, not a pipe: nobody reads a pipe while the night waits
        with output.open("w") as sink, subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                                        start_new_session=True) as night:  # fmt: skip
            deadline = time.monotonic() + 600
            while not (pause / "split.reached").exists() and night.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert (pause / "split.reached").exists(), "the night never reached the split: " + output.read_text()
            database.stop()
            (pause / "split.resume").touch()
            night.wait(timeout=900)
        said = output.read_text()
        assert night.returncode != 0
        named = f"ledger database postgresql+psycopg2://postgres@127.0.0.1:{database.port}/test"
        assert f"error: {named}" in said and "is unavailable" in said and "2 attempts" in said, said[-4000:]

        # Night 3: both back. The claim releases the batch that died and takes it again; the night completes.
        database.start()
        ran(lethe(home, params, "nightly", "--deletion-log", log, "--batch-id", "both-back", **servers))
        summary = json.loads((home / "batches" / "both-back" / "summary.json").read_text())
        assert summary["gate"] == "passed" and summary["requests_honored"] == 2 and summary["requests_total"] == 0
        claim = json.loads((home / "batches" / "both-back" / "claim.json").read_text())
        assert "released" in claim["recovered"]["pg-away"]
        entries = check_books(home, params, request_ids, settled=True, **servers)
        assert {entry["state"] for entry in entries.values()} == {"honored"}
        assert [e["batch_id"] for e in entries["pg-1"]["events"] if e["to_state"] == "in_batch"] == [
            "pg-away",
            "both-back",
        ]
        assert not (home / "ledger.db").exists()  # the ledger lived on PostgreSQL only
    finally:
        database.stop()
        landing.stop()
