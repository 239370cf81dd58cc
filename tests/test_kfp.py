"""The Kubeflow pipeline (infra/kfp): the checked-in YAML is what its own pinned environment compiles from
params.yaml today; every container runs the command and arguments of the step's Airflow pod and is placed as that
pod is (image, GPU, node, volume, secrets by reference); the branches read the decisions the steps write; and the
compiled ingest and claim containers, run here, write the decisions the first `dsl.If` reads.

kfp.local cannot run this pipeline on this machine: its SubprocessRunner runs only lightweight Python components,
and its DockerRunner needs a Docker daemon (README "Kubeflow Pipelines")."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.contract import DECISIONS
from components.pods import PARAMS_DIR, plain_environment, render, step_pod
from pipeline.pii import DEVELOPMENT_KEY
from pipeline.settings import STEPS, Settings, load_settings
from tests.conftest import REPO
from tests.e2e import lethe, new_home
from tests.test_pods import GPU_STEPS, run_pod_here

CHECKED_IN = REPO / "infra" / "kfp" / "nightly_forgetting.yaml"
KFP_PYTHON = Path(os.environ.get("LETHE_KFP_VENV", REPO / ".venv-kfp")) / "bin" / "python"
INPUT = re.compile(r"\{\{\$\.inputs\.parameters\['(\w+)'\]\}\}")
OUTPUT = re.compile(r"\{\{\$\.outputs\.parameters\['(\w+)'\]\.output_file\}\}")


@pytest.fixture(scope="module")
def settings() -> Settings:
    return load_settings(REPO / "params.yaml")


@pytest.fixture(scope="module")
def compiled() -> tuple[dict, dict]:
    """The checked-in pipeline spec and its Kubernetes platform spec."""
    pipeline, platform = yaml.safe_load_all(CHECKED_IN.read_text())
    return pipeline, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def executors_of(pipeline: dict, step: str) -> list[str]:
    """The executors that run `step` (a branch's tail is built once per branch: exec-evaluate, exec-evaluate-2...)."""
    name = f"exec-{step.replace('_', '-')}"
    return [key for key in pipeline["deploymentSpec"]["executors"] if re.fullmatch(rf"{name}(-\d+)?", key)]


def test_the_checked_in_pipeline_is_a_fresh_compile(tmp_path):
    if not KFP_PYTHON.exists():
        message = f"no KFP environment at {KFP_PYTHON.parent.parent}: `make kfp` makes it"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    fresh = tmp_path / "nightly_forgetting.yaml"
    result = subprocess.run([str(KFP_PYTHON), str(REPO / "infra" / "kfp" / "pipeline.py"), "--out", str(fresh)],
                            capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert fresh.read_text() == CHECKED_IN.read_text(), "infra/kfp/nightly_forgetting.yaml is stale: make kfp-compile"


def test_every_container_is_its_steps_pod(compiled, settings):
    """Same image, command, arguments, plain environment, resources, volumes, secrets and node placement as the
    Airflow pod of components.pods, with the batch id a KFP input."""
    pipeline, platform = compiled
    for step in STEPS:
        names = executors_of(pipeline, step)
        assert names, f"no executor runs {step}"
        pod = render(step_pod(step, settings, "{{$.inputs.parameters['batch_id']}}",
                              "{{$.inputs.parameters['deletion_log']}}"))["spec"]  # fmt: skip
        want = pod["containers"][0]
        for name in names:
            container, placed = pipeline["deploymentSpec"]["executors"][name]["container"], platform[name]
            assert (container["image"], container["command"]) == (want["image"], want["command"]), name
            decisions = [a for a in container["args"] if a != "--decision" and not OUTPUT.fullmatch(a)]
            assert decisions[: len(want["args"])] == want["args"] and len(decisions) == len(want["args"]) + len(
                DECISIONS.get(step, {})
            ), (name, container["args"])
            plain = plain_environment(settings.kubernetes)  # the pod's, without the Airflow XCom path
            assert {e["name"]: e["value"] for e in container["env"]} == plain, name
            limits, requests = want["resources"]["limits"], want["resources"]["requests"]
            resources = container["resources"]
            assert [
                resources[f"resource{kind}"] for kind in ("CpuRequest", "CpuLimit", "MemoryRequest", "MemoryLimit")
            ] == [requests["cpu"], limits["cpu"], requests["memory"], limits["memory"]], name
            if step in GPU_STEPS or "nvidia.com/gpu" in limits:
                assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu", name
                assert resources["accelerator"]["resourceCount"] == limits["nvidia.com/gpu"] == "1", name
                assert placed["nodeSelector"]["labels"] == pod["nodeSelector"], name
                assert placed["tolerations"] == pod["tolerations"], name
            else:
                assert "accelerator" not in resources and "nodeSelector" not in placed, name
            mounts = {m["mountPath"] for m in want["volumeMounts"]}
            assert {m["mountPath"] for m in placed["pvcMount"]} == {settings.kubernetes.home_mount}
            assert placed["pvcMount"][0]["constant"] == settings.kubernetes.home_claim
            assert {placed["configMapAsVolume"][0]["mountPath"], placed["emptyDirMounts"][0]["mountPath"]} | {
                settings.kubernetes.home_mount} == mounts  # fmt: skip
            referenced = {
                (entry["secretName"], key["secretKey"], entry["optional"])
                for entry in placed["secretAsEnv"]
                for key in entry["keyToEnv"]
            }
            assert referenced == {
                (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"],
                 e["valueFrom"]["secretKeyRef"]["optional"]) for e in want["env"] if "valueFrom" in e}  # fmt: skip
            assert placed["securityContext"]["runAsNonRoot"] is True


def test_the_branches_read_the_decisions_the_steps_write(compiled):
    pipeline, _ = compiled
    text = json.dumps(pipeline)
    conditions = re.findall(r'"condition": "((?:[^"\\]|\\.)*)"', text)
    for step, names in DECISIONS.items():
        for name in names:
            # every decision is an output of its step and some dsl.If tests it
            for executor in executors_of(pipeline, step):
                assert name in {OUTPUT.fullmatch(a).group(1) for a in pipeline["deploymentSpec"]["executors"][
                    executor]["container"]["args"] if OUTPUT.fullmatch(a)}  # fmt: skip
            assert any(f"pipelinechannel--{step.replace('_', '-')}-{name}" in c for c in conditions), (name, conditions)
    assert "nvidia.com/gpu" in CHECKED_IN.read_text()
    assert len(executors_of(pipeline, "report")) == 4  # each way a night ends: no requests, retrain, two unlearns


@pytest.mark.e2e
def test_the_compiled_ingest_and_claim_run_here_and_decide(tmp_path, template_home, compiled):
    """The compiled containers' own commands, run here: what `dsl.If` reads is what the claim decided."""
    pipeline, platform = compiled
    home, params = new_home(template_home, tmp_path)
    log = home / "landing" / "sample.jsonl"
    assert lethe(home, params, "sample-log", "--out", str(log)).returncode == 0
    assert lethe(home, params, "bootstrap").returncode == 0
    config = tmp_path / "configmap"
    config.mkdir()
    (config / "params.yaml").write_text(params.read_text())
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    settings = load_settings(params)
    mounts = {settings.kubernetes.home_mount: home, PARAMS_DIR: config, "/tmp": scratch}
    secrets = {
        "LETHE_PII_KEY": DEVELOPMENT_KEY.decode(),
        "LETHE_LEDGER_URL": f"sqlite:///{home / 'ledger.db'}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
    }
    inputs = {"batch_id": "kfp-1", "deletion_log": f"{settings.kubernetes.home_mount}/landing/sample.jsonl"}
    for step in ("ingest", "claim"):
        container = pipeline["deploymentSpec"]["executors"][f"exec-{step}"]["container"]
        placed = platform[f"exec-{step}"]
        args = [
            OUTPUT.sub(lambda m: f"/tmp/outputs/{m.group(1)}/data", INPUT.sub(lambda m: inputs[m.group(1)], a))
            for a in container["args"]
        ]
        pod = {"spec": {"containers": [{
            "command": container["command"], "args": args,
            "env": container["env"] + [
                {"name": key["envVar"], "valueFrom": {"secretKeyRef": {"key": key["secretKey"]}}}
                for entry in placed["secretAsEnv"] for key in entry["keyToEnv"] if key["secretKey"] in secrets],
            "volumeMounts": [{"mountPath": m["mountPath"]} for kind in ("pvcMount", "configMapAsVolume",
                                                                      "emptyDirMounts") for m in placed[kind]],
        }]}}  # fmt: skip
        result = run_pod_here(pod, mounts, secrets, cwd=scratch)
        assert result.returncode == 0, (step, result.stdout[-3000:] + result.stderr[-3000:])
    claimed = json.loads((home / "batches" / "kfp-1" / "claim.json").read_text())
    assert claimed["claimed"] == settings.nightly.sample_users
    outputs = scratch / "outputs"  # where KFP's launcher would read them: /tmp/outputs/NAME/data
    assert json.loads((outputs / "has_new_requests" / "data").read_text()) is True
    assert json.loads((outputs / "needs_retrain" / "data").read_text()) is False


def test_a_decision_the_step_does_not_make_is_refused_before_any_work(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "components.drift", "--batch-dir", str(tmp_path / "b"), "--decision", "needs_retrain",
         str(tmp_path / "out")], capture_output=True, text=True, timeout=120, check=False, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "lethe drift: error: step drift makes no decision 'needs_retrain'" in result.stderr
    assert "claim:needs_retrain" in result.stderr and not (tmp_path / "b").exists() and not (tmp_path / "out").exists()
