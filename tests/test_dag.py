"""The DAG's shape: what runs after what, and what happens after a short-circuit or a failure."""

import importlib.util

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def dag(params_env):
    spec = importlib.util.spec_from_file_location("nightly_forgetting", REPO / "dags" / "nightly_forgetting.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.dag_object


@pytest.fixture(scope="module")
def params_env():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LETHE_PARAMS", str(REPO / "params.yaml"))
        yield patch


def test_schedule_and_concurrency(dag):
    assert dag.dag_id == "nightly_forgetting"
    assert dag.catchup is False and dag.max_active_runs == 1
    assert dag.schedule == "0 2 * * *"


def test_steps_run_in_order(dag):
    def downstream(task_id):
        return sorted(dag.get_task(task_id).downstream_task_ids)

    assert downstream("ingest") == ["claim"]
    assert downstream("claim") == ["has_new_requests", "route", "split"]
    assert downstream("has_new_requests") == ["split"]
    assert downstream("split") == ["route"]
    assert downstream("route") == ["drift", "retrain"]
    assert downstream("drift") == ["choose_circuits"]
    assert downstream("choose_circuits") == ["extract_circuits", "reuse_circuits"]
    assert downstream("extract_circuits") == downstream("reuse_circuits") == ["unlearn"]
    assert downstream("unlearn") == downstream("retrain") == ["evaluate"]
    assert [downstream(t) for t in ("evaluate", "gate")] == [["gate"], ["report"]]


def test_the_joins_after_branches_run_when_one_branch_ran(dag):
    assert dag.get_task("unlearn").trigger_rule == "none_failed_min_one_success"
    assert dag.get_task("evaluate").trigger_rule == "none_failed_min_one_success"


def test_report_runs_after_a_short_circuit_but_not_after_a_failure(dag):
    assert dag.get_task("report").trigger_rule == "none_failed"
    short_circuit = dag.get_task("has_new_requests")
    assert short_circuit.ignore_downstream_trigger_rules is False
