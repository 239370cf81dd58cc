"""nightly_forgetting: turn the day's deletion log into a model that has forgotten those users.

Only composition lives here: which step runs when and where. Each task runs its component's entry
point (`python -m components.<step>`) as a subprocess, the same command a Kubernetes pod, a DVC stage
or a KFP component runs, and passes on the small JSON manifest the step wrote. Tasks never touch the
Airflow metadata database.

DAG run conf:
  deletion_log  a .jsonl file or folder (default: $LETHE_HOME/landing)
  batch_id      folder name under $LETHE_HOME/batches (default: derived from the run id)
  params        params.yaml to use (default: $LETHE_PARAMS or ./params.yaml)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from airflow.sdk import dag, get_current_context, task

from pipeline.settings import Home, default_params_path, load_settings

SETTINGS = load_settings()


def _batch() -> tuple[Path, dict]:
    """The batch folder and the run conf, from the running task's context."""
    context = get_current_context()
    conf = dict(context["dag_run"].conf or {})
    batch_id = conf.get("batch_id") or re.sub(r"[^A-Za-z0-9_.-]+", "_", context["run_id"])
    return Home().batch(batch_id), conf


def run_component(step: str, *args: str, manifest: str | None = None) -> dict:
    """Run one step as its own process; stream its output to the task log; return its manifest."""
    batch_dir, conf = _batch()
    params = conf.get("params") or str(default_params_path())
    command = [sys.executable, "-m", f"components.{step}", "--params", params, *args]
    command += ["--batch-dir", str(batch_dir)]
    print("running:", " ".join(command), flush=True)
    process = subprocess.run(
        command,
        env={**os.environ, "LETHE_PARAMS": params},
        text=True,
        stdout=sys.stdout,
        stderr=sys.stderr,
        check=False,
    )
    if process.returncode != 0:
        raise RuntimeError(f"step {step} failed with exit code {process.returncode}; its error is in the log above")
    return json.loads((batch_dir / (manifest or f"{step}.json")).read_text())


@dag(
    dag_id="nightly_forgetting",
    schedule=SETTINGS.nightly.schedule,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["lethe", "unlearning"],
    doc_md=__doc__,
)
def nightly_forgetting():
    @task
    def ingest() -> dict:
        _, conf = _batch()
        return run_component("ingest", "--deletion-log", conf.get("deletion_log") or str(Home().landing))

    @task
    def claim(ingested: dict) -> dict:
        return run_component("claim")

    @task.short_circuit(ignore_downstream_trigger_rules=False)
    def has_new_requests(claimed: dict) -> bool:
        if claimed["claimed"] == 0:
            print("no new valid requests and none waiting for a retry: nothing to unlearn tonight; on to the report")
        return claimed["claimed"] > 0

    @task
    def split(claimed: dict) -> dict:
        return run_component("split")

    @task.branch
    def route(claimed: dict) -> str:
        """Requests that failed the gate ledger.max_failed_nights times take the fallback: retrain from scratch."""
        if claimed["needs_retrain"]:
            print(f"{claimed['needs_retrain']} requests failed the gate too often: retraining from scratch")
            return "retrain"
        return "drift"

    @task
    def retrain() -> dict:
        return run_component("unlearn", "--model", "champion", "--method", "retrain")

    @task.branch
    def drift() -> str:
        """Circuits are re-extracted only when today's retain data has drifted, or none exist."""
        return "extract_circuits" if run_component("drift")["extract"] else "reuse_circuits"

    @task
    def extract_circuits() -> dict:
        return run_component("extract_circuits")

    @task
    def reuse_circuits() -> None:
        print("the data has not drifted past the thresholds: reusing the cached circuits")

    @task(trigger_rule="none_failed_min_one_success")
    def unlearn() -> dict:
        return run_component("unlearn", "--model", "champion")

    @task(trigger_rule="none_failed_min_one_success")
    def evaluate() -> dict:
        return run_component("evaluate")

    @task
    def gate() -> dict:
        return run_component("gate")

    @task(trigger_rule="none_failed")
    def report() -> dict:
        return run_component("report", manifest="summary.json")

    claimed = claim(ingest())
    split_manifest = split(claimed)
    has_new_requests(claimed) >> split_manifest
    routed, circuits, evaluated = route(claimed), drift(), evaluate()
    split_manifest >> routed >> [circuits, retrain_task := retrain()]
    circuits >> [extract_circuits(), reuse_circuits()] >> (unlearned := unlearn())
    [unlearned, retrain_task] >> evaluated
    evaluated >> gate() >> report()


dag_object = nightly_forgetting()
