"""When a night goes wrong, for real: a run killed in the middle of unlearning. Nothing lost, nothing honored
twice, and the ledger agrees with the registry. (Requests that keep failing the gate: test_e2e_fallback.py, a file
of its own so that the two long runs can go to different test workers.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from tests.conftest import write_params
from tests.test_e2e import MODEL, lethe

pytestmark = pytest.mark.e2e


def ledger_json(home: Path, params: Path, *args: str) -> dict:
    result = lethe(home, params, "ledger", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_run_killed_while_unlearning_loses_nothing_and_honors_nothing_twice(tmp_path):
    home, params = tmp_path / ".lethe", write_params(tmp_path / "params.yaml")
    log = tmp_path / "sample.jsonl"
    assert lethe(home, params, "sample-log", "--out", str(log)).returncode == 0
    request_ids = [json.loads(line)["request_id"] for line in log.read_text().splitlines()]
    env = {**os.environ, "LETHE_HOME": str(home), "LETHE_PARAMS": str(params)}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [
        str(Path(sys.executable).with_name("lethe")),
        "nightly",
        "--deletion-log",
        str(log),
        "--batch-id",
        "killed",
    ]
    run = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    unlearning = home / "batches" / "killed" / "champion"  # the unlearn step's first act: fetch the champion
    deadline = time.monotonic() + 600
    while not unlearning.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert run.poll() is None, "the run ended before unlearning started"
    time.sleep(1.0)
    os.killpg(run.pid, signal.SIGKILL)  # the whole process group: lethe, airflow, the unlearn step
    run.wait(timeout=60)
    assert not (home / "batches" / "killed" / "gate.json").exists()
    assert ledger_json(home, params, "status")["in_batch"] == len(request_ids)

    again = lethe(home, params, "nightly", "--deletion-log", str(log), "--batch-id", "after")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    summary = json.loads((home / "batches" / "after" / "summary.json").read_text())
    claim = json.loads((home / "batches" / "after" / "claim.json").read_text())
    assert "killed" in claim["recovered"] and summary["requests_claimed"] == len(request_ids)
    status = ledger_json(home, params, "status")
    assert status["honored"] + status["pending_retry"] == len(request_ids)  # nothing lost
    assert status["in_batch"] == status["validated"] == status["quarantined"] == 0

    mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    versions = client.search_model_versions(f"name='{MODEL}'")
    assert not [v for v in versions if v.tags.get("lethe.batch_id") == "killed"]
    champion = client.get_model_version_by_alias(MODEL, "champion")
    for request_id in request_ids:
        entry = ledger_json(home, params, "show", request_id)["entries"][0]
        moves = [(e["from_state"], e["to_state"], e["batch_id"]) for e in entry["events"]]
        assert moves[2:4] == [("validated", "in_batch", "killed"), ("in_batch", "pending_retry", "killed")]
        assert moves[4] == ("pending_retry", "in_batch", "after")
        assert sum(to == "honored" for _, to, _ in moves) <= 1  # never honored twice
        if entry["state"] == "honored":  # the ledger and the registry agree on who honored it
            assert summary["gate"] == "passed" and entry["model_version"] == str(champion.version)
            version = client.get_model_version(MODEL, entry["model_version"])
            assert version.tags["lethe.batch_id"] == "after" and version.tags["gate"] == "passed"
        else:
            assert summary["gate"] == "rejected" and entry["model_version"] is None
