"""When requests keep failing the gate, for real: after `ledger.max_failed_nights` rejected nights the DAG's
fallback retrains from scratch on the retain data. Nothing lost, nothing honored twice, and the ledger agrees
with the registry."""

from __future__ import annotations

import json

import mlflow
import pytest

from tests.conftest import write_params
from tests.test_e2e import MODEL, lethe
from tests.test_e2e_recovery import ledger_json

pytestmark = pytest.mark.e2e


def test_requests_that_keep_failing_the_gate_get_a_retrain_from_scratch(tmp_path):
    home = tmp_path / ".lethe"
    params = write_params(
        tmp_path / "params.yaml",
        **{
            "ledger.max_failed_nights": 1,
            "nightly.sample_users": 2,
            "gate.max_ndcg_drop": 0.0,  # no loss at all, and an AUC within 0.01 of 0.5: nights get rejected
            "gate.min_leakage_auc": 0.49,
            "gate.max_leakage_auc": 0.51,
        },
    )
    log = tmp_path / "sample.jsonl"
    assert lethe(home, params, "sample-log", "--out", str(log)).returncode == 0
    request_ids = [json.loads(line)["request_id"] for line in log.read_text().splitlines()]
    first = lethe(home, params, "nightly", "--deletion-log", str(log), "--batch-id", "night-1")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    summary = json.loads((home / "batches" / "night-1" / "summary.json").read_text())
    assert summary["gate"] == "rejected" and summary["requests_needs_retrain"] == 2
    assert ledger_json(home, params, "status")["needs_retrain"] == 2

    second = lethe(home, params, "nightly", "--deletion-log", str(log), "--batch-id", "night-2")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    batch = home / "batches" / "night-2"
    summary = json.loads((batch / "summary.json").read_text())
    assert sorted(summary["retrain_fallback"]) == sorted(request_ids)
    assert json.loads((batch / "unlearn.json").read_text())["method"] == "retrain"
    assert not (batch / "drift.json").exists()  # the fallback skips the circuit branch
    assert "retrained from scratch for" in (batch / "report.html").read_text()
    mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
    version = mlflow.MlflowClient().get_model_version(MODEL, str(summary["model_version"]))
    assert version.tags["lethe.method"] == "retrain" and version.tags["lethe.batch_id"] == "night-2"
    entry = ledger_json(home, params, "show", request_ids[0])["entries"][0]
    if summary["gate"] == "passed":  # the retrained model may well clear a gate the unlearned one did not
        assert entry["state"] == "honored" and entry["model_version"] == str(summary["model_version"])
    else:
        assert [e["to_state"] for e in entry["events"]][-2:] == ["in_batch", "needs_retrain"]
