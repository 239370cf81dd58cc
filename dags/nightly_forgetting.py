"""nightly_forgetting: turn the day's deletion log into a model that has forgotten those users.

Only composition lives here: which step runs when and where. Every step runs its component's entry point
(`python -m components.<step>`, components.contract), the same command a DVC stage or a KFP component runs, and
passes on the small JSON manifest the step wrote. Where it runs is `nightly.executor` in params.yaml:
- local: a subprocess of the Airflow task, on the worker's own LETHE_HOME;
- kubernetes: a pod per step (KubernetesPodOperator), built by components.pods: the GPU image and a GPU for the
  heavy steps, LETHE_HOME on a shared volume claim, secrets by reference; the manifest comes back as XCom.
The branches and the short-circuit are small Airflow tasks that read those manifests. Tasks never touch the
Airflow metadata database.

DAG run conf:
  deletion_log  a .jsonl file or folder, or s3://bucket/prefix/ (default: $LETHE_HOME/landing)
  batch_id      folder name under $LETHE_HOME/batches (default: derived from the run id)
  params        params.yaml to use (default: $LETHE_PARAMS or ./params.yaml; local executor only: the pods
                read the params ConfigMap)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import datetime, timedelta

from airflow.sdk import dag, get_current_context, task

from components.contract import arguments, decision, invocation, manifest_file
from pipeline.jsonsafe import plain_numbers
from pipeline.settings import Home, default_params_path, load_settings

SETTINGS = load_settings()
ON_KUBERNETES = SETTINGS.nightly.executor == "kubernetes"


def batch_id_of(conf: dict, run_id: str) -> str:
    """The batch folder's name: the run conf's batch_id, else the run id made safe for a path."""
    return conf.get("batch_id") or re.sub(r"[^A-Za-z0-9_.-]+", "_", run_id)


def run_component(step: str) -> dict:
    """Run one step as its own process; stream its output to the task log; return its manifest."""
    context = get_current_context()
    conf = dict(context["dag_run"].conf or {})
    batch_dir = Home().batch(batch_id_of(conf, context["run_id"]))
    params = conf.get("params") or str(default_params_path())
    deletion_log = conf.get("deletion_log") or str(Home().landing)
    module, _ = invocation(step, deletion_log)
    command = [sys.executable, "-m", f"components.{module}", *arguments(step, params, str(batch_dir), deletion_log)]
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
    return plain_numbers(json.loads((batch_dir / manifest_file(step)).read_text()))  # XCom is strict JSON


def pod_task(step: str, **task_arguments):
    """The step as a pod; its manifest comes back as the task's XCom."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    from components.pods import step_pod

    cluster = SETTINGS.kubernetes
    landing = f"{cluster.home_mount}/landing"
    pod = step_pod(
        step,
        SETTINGS,
        batch_id="{{ batch_id_of(dag_run.conf or {}, run_id) }}",
        deletion_log="{{ (dag_run.conf or {}).get('deletion_log') or '" + landing + "' }}",
    )
    container = pod.spec.containers[0]
    return KubernetesPodOperator(
        task_id=step,
        name=pod.metadata.name,
        namespace=cluster.namespace,
        image=container.image,
        cmds=container.command,
        arguments=container.args,  # templated: the batch folder and the deletion log of this run
        full_pod_spec=pod,
        do_xcom_push=True,
        xcom_sidecar_container_security_context=container.security_context,
        get_logs=cluster.get_logs,
        on_finish_action=cluster.on_finish_action,
        startup_timeout_seconds=cluster.startup_timeout_s,
        retries=cluster.retries,
        retry_delay=timedelta(seconds=cluster.retry_delay_s),
        retry_exponential_backoff=True,
        **task_arguments,
    ).output


def step(name: str, **task_arguments):
    """One step of the nightly as a task, on the configured executor; its output is the step's manifest."""
    if ON_KUBERNETES:
        return pod_task(name, **task_arguments)

    @task(task_id=name, **task_arguments)
    def run_step() -> dict:
        return run_component(name)

    return run_step()


@dag(
    dag_id="nightly_forgetting",
    schedule=SETTINGS.nightly.schedule,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["lethe", "unlearning"],
    doc_md=__doc__,
    user_defined_macros={"batch_id_of": batch_id_of},
)
def nightly_forgetting():
    @task.short_circuit(ignore_downstream_trigger_rules=False)
    def has_new_requests(claimed: dict) -> bool:
        if not (new := decision("claim", "has_new_requests")(claimed)):
            print("no new valid requests and none waiting for a retry: nothing to unlearn tonight; on to the report")
        return new

    @task.branch
    def route(claimed: dict) -> str:
        """Requests that failed the gate ledger.max_failed_nights times take the fallback: retrain from scratch."""
        if decision("claim", "needs_retrain")(claimed):
            print(f"{claimed['needs_retrain']} requests failed the gate too often: retraining from scratch")
            return "retrain"
        return "drift"

    @task.branch
    def choose_circuits(drifted: dict) -> str:
        """Circuits are re-extracted only when today's retain data has drifted, or none exist."""
        return "extract_circuits" if decision("drift", "extract")(drifted) else "reuse_circuits"

    @task
    def reuse_circuits() -> None:
        print("the data has not drifted past the thresholds: reusing the cached circuits")

    claimed = step("ingest") >> step("claim")
    split = step("split")
    claimed >> split
    has_new_requests(claimed) >> split
    routed = route(claimed)
    split >> routed
    drifted, retrained = step("drift"), step("retrain")
    routed >> [drifted, retrained]
    circuits = [step("extract_circuits"), reuse_circuits()]
    choose_circuits(drifted) >> circuits
    unlearned = step("unlearn", trigger_rule="none_failed_min_one_success")
    evaluated = step("evaluate", trigger_rule="none_failed_min_one_success")
    circuits >> unlearned
    [unlearned, retrained] >> evaluated
    evaluated >> step("gate") >> step("report", trigger_rule="none_failed")


dag_object = nightly_forgetting()
