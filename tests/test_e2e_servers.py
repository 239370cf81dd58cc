"""The nightly against the servers a team runs, and each of them going away: the ledger on PostgreSQL, the
deletion log on S3, and MLflow as a tracking server (`make mlflow-server`: its backend store on PostgreSQL,
its artifacts proxied to S3).

PostgreSQL is this machine's server at 127.0.0.1:5432, S3 is moto's ThreadedMotoServer on loopback, the
tracking server is started by the test on a free port and stopped by it. Lethe reaches each through a relay the
test controls (tests.e2e.Relay), so that taking a server away is a state the test sets, not a race: the S3 relay
is down before a night, the PostgreSQL and MLflow relays are taken down while a step waits at a hook point
(LETHE_TEST_PAUSE_AT). Each loss must end the night with a one-line error that names the server and its URL,
after the bounded retries of params.yaml, with nothing lost; the next night, with the server back, finishes
the batch, and the promoted version is read back over HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import boto3
import mlflow
import numpy as np
import pandas as pd
import pytest

from pipeline.data import read_snapshot
from tests.conftest import REPO
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
    scan_for_rows,
    stored_files,
)

pytestmark = pytest.mark.e2e
BOUNDS = {  # fail fast: the point is that the night ends, naming the server, not how long it waits
    "ledger.attempts": 2,
    "ledger.retry_backoff_s": 0.2,
    "ledger.connect_timeout_s": 2,
    "landing.s3_connect_timeout_s": 1,
    "landing.s3_read_timeout_s": 2,
    "landing.s3_max_attempts": 2,
    "mlflow.http_timeout_s": 5,
    "mlflow.http_max_retries": 1,
    "mlflow.http_backoff_factor": 1,
}
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def s3_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    yield ("127.0.0.1", server.get_host_and_port()[1])
    server.stop()


@pytest.fixture
def tracking_server(s3_server, tmp_path):
    """`make mlflow-server` on a free port: its backend store a fresh PostgreSQL schema, its artifacts in S3."""
    require_postgres()
    s3_endpoint = f"http://127.0.0.1:{s3_server[1]}"
    boto3.client("s3", endpoint_url=s3_endpoint, **{k.lower(): v for k, v in S3_KEYS.items() if "KEY" in k},
                 region_name="us-east-1").create_bucket(Bucket="mlflow")  # fmt: skip
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend = postgres_schema_url()
    venv = Path(sys.executable).parent.parent
    command = ["make", "-s", "-C", str(REPO), "mlflow-server", f"VENV={venv}", f"MLFLOW_BACKEND={backend}",
               "MLFLOW_ARTIFACTS=s3://mlflow/artifacts", f"MLFLOW_PORT={port}"]  # fmt: skip
    log = tmp_path / "mlflow-server.log"
    with log.open("w") as sink:
        server = subprocess.Popen(command, env={**os.environ, **S3_KEYS, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint},
                                  stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and server.poll() is None:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            time.sleep(0.2)
        else:
            pytest.fail("the MLflow server did not come up: " + log.read_text()[-3000:])
        yield {"port": port, "backend": backend, "s3_endpoint": s3_endpoint}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def postgres_rows(*urls: str) -> list[tuple[str, bytes]]:
    """Every row of every table in the schemas of these SQLAlchemy URLs, as JSON text (what a scan reads)."""
    import sqlalchemy as sa

    rows = []
    for url in urls:
        engine = sa.create_engine(url)
        with engine.connect() as connection:
            for table in sa.inspect(connection).get_table_names():
                text = connection.execute(sa.text(f'SELECT row_to_json(t)::text FROM "{table}" t')).scalars().all()
                rows.append((f"{url.rsplit('%3D', 1)[-1]}.{table}", "\n".join(text).encode()))
        engine.dispose()
    return rows


def pause_and_take_away(command, env, point: str, relay: Relay, folder: Path) -> tuple[int, str]:
    """Run a night until a step waits at `point`, take `relay`'s server away, let the night go on; its exit code
    and output."""
    folder.mkdir()
    output = folder / "night.log"  # a file, not a pipe: nobody reads a pipe while the night waits
    env = {**env, "LETHE_TEST_PAUSE_AT": f"{point}:{folder}"}
    with output.open("w") as sink, subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                                    start_new_session=True) as night:  # fmt: skip
        deadline = time.monotonic() + 600
        while not (folder / f"{point}.reached").exists() and night.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (folder / f"{point}.reached").exists(), f"the night never reached {point}: " + output.read_text()
        relay.stop()
        (folder / f"{point}.resume").touch()
        night.wait(timeout=900)
    return night.returncode, output.read_text()


def test_the_nightly_on_postgresql_s3_and_a_tracking_server_survives_each_going_away(
    tmp_path, template_home, s3_server, tracking_server
):
    require_postgres()
    database, landing = Relay(("127.0.0.1", 5432)).start(), Relay(s3_server).start()
    tracking = Relay(("127.0.0.1", tracking_server["port"])).start()
    try:
        ledger_url = postgres_schema_url(f"127.0.0.1:{database.port}")
        endpoint = f"http://127.0.0.1:{landing.port}"
        home, params = new_home(template_home, tmp_path, **CHEAP, **BOUNDS, **{"landing.s3_endpoint_url": endpoint})
        tracking_uri = f"http://127.0.0.1:{tracking.port}"
        servers = {"LETHE_LEDGER_URL": ledger_url, "MLFLOW_TRACKING_URI": tracking_uri, **S3_KEYS}
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
        command = [LETHE, "nightly", "--deletion-log", log, "--batch-id", "pg-away"]
        code, said = pause_and_take_away(command, environment(home, params, **servers), "split", database,
                                         tmp_path / "pg-away")  # fmt: skip
        assert code != 0
        named = f"ledger database postgresql+psycopg2://postgres@127.0.0.1:{database.port}/test"
        assert f"error: {named}" in said and "is unavailable" in said and "2 attempts" in said, said[-4000:]

        # Night 3: PostgreSQL is back; the tracking server goes away once the evaluation is written. The gate
        # fails naming it, before any promotion; the requests stay in this batch.
        database.start()
        command = [LETHE, "nightly", "--deletion-log", log, "--batch-id", "mlflow-away"]
        code, said = pause_and_take_away(command, environment(home, params, **servers), "evaluate", tracking,
                                         tmp_path / "mlflow-away")  # fmt: skip
        assert code != 0
        assert f"lethe gate: error: MLflow tracking server {tracking_uri} is unavailable (after 1 retries)" in said, (
            said[-4000:]
        )
        assert not (home / "batches" / "mlflow-away" / "gate.json").exists()
        status = ledger_json(home, params, "status", **servers)
        assert (status["in_batch"], status["honored"]) == (2, 0)

        # Night 4: all back. The claim releases the batch that died and takes it again; the night completes.
        tracking.start()
        ran(lethe(home, params, "nightly", "--deletion-log", log, "--batch-id", "both-back", **servers))
        summary = json.loads((home / "batches" / "both-back" / "summary.json").read_text())
        assert summary["gate"] == "passed" and summary["requests_honored"] == 2 and summary["requests_total"] == 0
        claim = json.loads((home / "batches" / "both-back" / "claim.json").read_text())
        assert "released" in claim["recovered"]["mlflow-away"]
        entries = check_books(home, params, request_ids, settled=True, **servers)
        assert {entry["state"] for entry in entries.values()} == {"honored"}
        assert [e["batch_id"] for e in entries["pg-1"]["events"] if e["to_state"] == "in_batch"] == [
            "pg-away",
            "mlflow-away",
            "both-back",
        ]
        assert not (home / "ledger.db").exists()  # the ledger lived on PostgreSQL only

        # The registry, read back over HTTP: the champion is the batch's version, with its gate tags and report.
        client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        champion = client.get_model_version_by_alias("lethe-recommender", "champion")
        assert champion.version == str(summary["model_version"]) == "2"
        assert champion.tags["gate"] == "passed" and champion.tags["lethe.batch_id"] == "both-back"
        report = client.download_artifacts(champion.run_id, "report/report.html", str(tmp_path / "read-back"))
        assert "both-back" in Path(report).read_text()
        assert not (home / "mlflow.db").exists() and not (home / "mlartifacts").exists()  # all on the servers
        s3 = boto3.client("s3", endpoint_url=tracking_server["s3_endpoint"], region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip
        stored = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow")["Contents"]]
        assert any(key.endswith("report/report.html") for key in stored), stored[:20]

        # Nothing of the two forgotten users is kept: not under LETHE_HOME, not in the tracking server's artifacts
        # (S3), not in its database or the ledger's (PostgreSQL); everyone else's rows are in the snapshot as before.
        frame = snapshot.interactions
        forgotten, retained = frame[frame.user_id.isin(users)], frame[~frame.user_id.isin(users)]
        artifacts = [(key, s3.get_object(Bucket="mlflow", Key=key)["Body"].read()) for key in stored]
        assert (
            scan_for_rows(artifacts + postgres_rows(ledger_url, tracking_server["backend"]), forgotten, retained) == []
        )
        assert scan_for_rows(stored_files(home), forgotten, retained) == []
        pd.testing.assert_frame_equal(read_snapshot(home / "data" / "snapshot").interactions,
                                      retained.reset_index(drop=True))  # fmt: skip
    finally:
        database.stop()
        landing.stop()
        tracking.stop()
