"""The nightly on a running Airflow, as a team deploys it: the scheduler, the dag-processor and the api-server,
LocalExecutor, the metadata database on PostgreSQL. The test starts the three on a free port, triggers
nightly_forgetting through the REST API with a run conf (a token from the auth manager, as any client gets
one), waits for the run with a bound, and reads back the task states, the branch taken, the promoted version
and the ledger. It stops the three and drops their schema."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from components.cli import airflow_env
from pipeline.data import read_snapshot
from pipeline.settings import Home
from tests.e2e import (
    CHEAP,
    POSTGRES,
    champion,
    check_books,
    client,
    lethe,
    new_home,
    postgres_schema_url,
    ran,
    request_line,
    require_postgres,
)

pytestmark = pytest.mark.e2e
AIRFLOW = str(Path(sys.executable).with_name("airflow"))
DAG = "nightly_forgetting"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Api:
    """Airflow's public REST API (v2) as a client reaches it: a bearer token from POST /auth/token."""

    def __init__(self, url: str, username: str, password: str) -> None:
        self.url = url
        token = self.call("POST", "/auth/token", {"username": username, "password": password}, token=None)
        self.token = token["access_token"]

    def call(self, method: str, path: str, body: dict | None = None, token: str | None = "") -> dict:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token or self.token}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"{}")


def wait_for(what: str, check, timeout: float, logs: list[Path]):
    """check() until it returns something truthy; fail naming `what` and the servers' last lines after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, urllib.error.URLError, KeyError):
            if result := check():
                return result
        time.sleep(1)
    tails = "\n".join(f"--- {log.name}\n{log.read_text()[-2500:]}" for log in logs if log.exists())
    pytest.fail(f"{what}: not within {timeout:.0f} s\n{tails}")


@pytest.fixture
def airflow_schema():
    """A fresh PostgreSQL schema for the metadata database, dropped afterwards."""
    import sqlalchemy as sa

    require_postgres()
    url = postgres_schema_url(prefix="airflow")
    yield url
    engine = sa.create_engine(POSTGRES)
    with engine.begin() as connection:
        connection.execute(sa.text(f"DROP SCHEMA {url.rsplit('%3D', 1)[1]} CASCADE"))
    engine.dispose()


@pytest.fixture
def airflow(tmp_path, template_home, airflow_schema):
    """Scheduler, dag-processor and api-server on a free port, LocalExecutor, PostgreSQL; a home and params of
    the tiny config with no schedule (the run is the one the test triggers)."""
    home, params = new_home(template_home, tmp_path, **CHEAP, **{"nightly.schedule": None})
    ran(lethe(home, params, "bootstrap"))  # the base model as champion, before any night
    port, password = free_port(), os.urandom(12).hex()
    passwords = tmp_path / "airflow-passwords.json"
    passwords.write_text(json.dumps({"lethe": password}))
    env = {
        **airflow_env(Home(home), params),
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": airflow_schema,
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__API_AUTH__JWT_SECRET": os.urandom(64).hex(),
        "AIRFLOW__API__SECRET_KEY": os.urandom(32).hex(),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "lethe:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
    }
    for name in ("MLFLOW_TRACKING_URI", "LETHE_LEDGER_URL"):  # the home's own SQLite stores
        env.pop(name, None)
    subprocess.run([AIRFLOW, "db", "migrate"], env=env, check=True, capture_output=True, timeout=600)
    services, logs = [], []
    try:
        for name, args in (
            ("api-server", ["api-server", "--host", "127.0.0.1", "--port", str(port)]),
            ("scheduler", ["scheduler"]),
            ("dag-processor", ["dag-processor"]),
        ):
            logs.append(tmp_path / f"airflow-{name}.log")
            with logs[-1].open("w") as sink:
                services.append(subprocess.Popen([AIRFLOW, *args], env=env, stdout=sink, stderr=subprocess.STDOUT,
                                                 start_new_session=True))  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        api = wait_for("the api-server answering", lambda: Api(url, "lethe", password), 180, logs)
        yield {"api": api, "home": home, "params": params, "logs": logs, "url": url}
    finally:
        for service in services:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(service.pid, signal.SIGTERM)
        for service in services:
            try:
                service.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(service.pid, signal.SIGKILL)
                service.wait(timeout=30)


def test_a_running_scheduler_runs_the_nightly_triggered_over_the_rest_api(tmp_path, airflow):
    api, home, params, logs = airflow["api"], airflow["home"], airflow["params"], airflow["logs"]
    snapshot = read_snapshot(home / "data" / "snapshot")
    users = [int(u) for u in np.random.default_rng(11).choice(snapshot.members, 2, replace=False)]
    log = tmp_path / "landing" / "requests.jsonl"
    log.parent.mkdir()
    log.write_text(request_line("rest-1", users[0]) + request_line("rest-2", users[1]))

    dag = wait_for("the dag-processor parsing the DAG", lambda: api.call("GET", f"/api/v2/dags/{DAG}"), 180, logs)
    assert dag["is_paused"] is True and dag["timetable_summary"] in (None, "None")  # no run but ours
    conf = {"deletion_log": str(log), "batch_id": "over-rest", "params": str(params)}
    run = api.call("POST", f"/api/v2/dags/{DAG}/dagRuns", {"dag_run_id": "rest-1", "logical_date": None, "conf": conf})
    assert run["state"] == "queued" and run["run_type"] == "manual" and run["conf"] == conf
    api.call("PATCH", f"/api/v2/dags/{DAG}", {"is_paused": False})

    def finished():
        state = api.call("GET", f"/api/v2/dags/{DAG}/dagRuns/rest-1")["state"]
        return state if state in ("success", "failed") else None

    assert wait_for("the triggered run finishing", finished, 900, logs) == "success", "\n".join(
        log.read_text()[-3000:] for log in logs
    )
    instances = api.call("GET", f"/api/v2/dags/{DAG}/dagRuns/rest-1/taskInstances")["task_instances"]
    states = {instance["task_id"]: instance["state"] for instance in instances}
    assert states == {
        **dict.fromkeys(
            ["ingest", "claim", "has_new_requests", "split", "route", "drift", "choose_circuits"], "success"
        ),  # fmt: skip
        "extract_circuits": "success",  # a first night: no circuits yet, so the branch extracts them
        "reuse_circuits": "skipped",
        "retrain": "skipped",
        **dict.fromkeys(["unlearn", "evaluate", "gate", "report"], "success"),
    }
    xcom = api.call("GET", f"/api/v2/dags/{DAG}/dagRuns/rest-1/taskInstances/claim/xcomEntries/return_value")
    claimed = json.loads(xcom["value"]) if isinstance(xcom["value"], str) else xcom["value"]  # the claim's manifest
    assert (claimed["claimed"], claimed["needs_retrain"]) == (2, 0), claimed

    summary = json.loads((home / "batches" / "over-rest" / "summary.json").read_text())
    assert summary["gate"] == "passed" and summary["requests_honored"] == 2
    assert champion(home) == str(summary["model_version"]) == "2"
    assert client(home).get_model_version("lethe-recommender", "2").tags["lethe.batch_id"] == "over-rest"
    entries = check_books(home, params, ["rest-1", "rest-2"], settled=True)
    assert {entry["state"] for entry in entries.values()} == {"honored"}
