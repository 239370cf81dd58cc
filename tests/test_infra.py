"""The deployment files, checked by the tools an operator's CI would run: hadolint on the Dockerfiles, checkov on
the Dockerfiles and the Kubernetes manifests (the checked-in ones and every rendered step pod). Each silenced
rule carries its reason next to it; these tests fail on any other finding."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from components.pods import render, step_pod
from pipeline.settings import STEPS, load_settings
from tests.conftest import REPO

TOOLS = REPO / ".venv-tools" / "bin"  # hadolint and checkov, in their own locked environment (make tools)
DOCKERFILES = sorted((REPO / "infra" / "docker").glob("Dockerfile.*"))


def tool(name: str) -> Path:
    path = TOOLS / name
    if not path.exists():
        message = f"{path} is missing: `make tools` installs it (make test does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def test_there_is_a_cpu_and_a_gpu_step_image_and_an_airflow_image():
    assert [path.name for path in DOCKERFILES] == ["Dockerfile.airflow", "Dockerfile.cpu", "Dockerfile.gpu"]
    for path in DOCKERFILES:
        text = path.read_text()
        assert "requirements/constraints.txt" in text
        if path.name != "Dockerfile.airflow":  # the steps' images; the Airflow image keeps its own user 50000
            assert "USER 10001" in text and 'ENTRYPOINT ["python", "-m"]' in text
    airflow = (REPO / "infra" / "docker" / "Dockerfile.airflow").read_text()
    version = re.search(r"^apache-airflow==(\S+)$", (REPO / "requirements" / "constraints.txt").read_text(), re.M)
    assert f"FROM apache/airflow:{version.group(1)}-python3.11" in airflow  # the Airflow the DAG is tested on
    assert "USER 50000" in airflow and "COPY --chown=airflow:0 dags /opt/airflow/dags" in airflow


def test_hadolint_passes_on_every_dockerfile_and_catches_a_root_image(tmp_path):
    hadolint = tool("hadolint")
    result = subprocess.run([hadolint, *DOCKERFILES], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    careless = tmp_path / "Dockerfile"
    careless.write_text("FROM python:latest\nRUN pip install torch\nUSER root\n")
    result = subprocess.run([hadolint, careless], capture_output=True, text=True, check=False)
    assert result.returncode != 0 and "DL3007" in result.stdout and "DL3013" in result.stdout


def checkov(*arguments) -> dict:
    result = subprocess.run(
        [tool("checkov"), "--quiet", "--compact", "--output", "json", *arguments],
        capture_output=True, text=True, check=False, env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )  # fmt: skip
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed = [
        f"{check['check_id']} {check['check_name']} in {check['file_path']}"
        for report in reports
        for check in report.get("results", {}).get("failed_checks", [])
    ]
    return {"failed": failed, "passed": sum(report.get("summary", {}).get("passed", 0) for report in reports)}


def test_checkov_passes_on_the_images_the_cluster_objects_and_every_step_pod(tmp_path):
    settings = load_settings(REPO / "params.yaml")
    cluster = tmp_path / "cluster"  # every step pod beside the checked-in objects, as the cluster holds them
    shutil.copytree(REPO / "infra" / "k8s", cluster)
    for step in STEPS:
        (cluster / f"pod-{step}.yaml").write_text(
            yaml.safe_dump(render(step_pod(step, settings, "b", "/lethe/landing")))
        )
    for folder, framework in ((REPO / "infra" / "docker", "dockerfile"), (cluster, "kubernetes")):
        report = checkov("--directory", str(folder), "--framework", framework)
        assert report["passed"] > 0 and report["failed"] == [], (folder, report["failed"])
    loose = render(step_pod("unlearn", settings, "b"))
    loose["spec"]["containers"][0]["securityContext"] = {"privileged": True}  # the scan can fail
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "pod.yaml").write_text(yaml.safe_dump(loose))
    failed = checkov("--directory", str(tmp_path / "loose"), "--framework", "kubernetes")["failed"]
    assert any(finding.startswith("CKV_K8S_16 ") for finding in failed), failed  # privileged container


def test_the_helm_values_deploy_the_tested_airflow_and_hold_no_secret():
    values = yaml.safe_load((REPO / "infra" / "helm" / "values.yaml").read_text())
    locked = re.search(r"^apache-airflow==(\S+)$", (REPO / "requirements" / "constraints.txt").read_text(), re.M)
    assert values["airflowVersion"] == locked.group(1)
    assert values["executor"] == "LocalExecutor"  # what tests/test_e2e_airflow.py runs
    assert values["scheduler"]["serviceAccount"] == {"create": False, "name": "lethe-launcher"}
    # Airflow's keys and the metadata URL by Secret name only: none of the chart's literal-value keys is set
    for literal in ("fernetKey", "apiSecretKey", "jwtSecret", "webserverSecretKey"):
        assert values.get(literal) is None, literal
    assert "metadataConnection" not in values["data"] and values["data"]["metadataSecretName"]
    mounted = {volume["name"]: volume for volume in values["volumes"]}
    config_map = load_settings(REPO / "params.yaml").kubernetes.params_config_map
    assert mounted["lethe-params"]["configMap"]["name"] == config_map  # the one the step pods mount
    assert {"name": "LETHE_PARAMS", "value": "/etc/lethe/params.yaml"} in values["env"]
