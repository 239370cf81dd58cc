"""The deployment files, checked by the tools an operator's CI would run: hadolint on the Dockerfiles, checkov on
the Dockerfiles and the Kubernetes manifests (the checked-in ones and every rendered step pod). Each silenced
rule carries its reason next to it; these tests fail on any other finding."""

from __future__ import annotations

import json
import os
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


def test_there_is_a_cpu_and_a_gpu_image():
    assert [path.name for path in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.gpu"]
    for path in DOCKERFILES:
        text = path.read_text()
        assert "USER 10001" in text and "requirements/constraints.txt" in text
        assert 'ENTRYPOINT ["python", "-m"]' in text


def test_hadolint_passes_on_both_dockerfiles_and_catches_a_root_image(tmp_path):
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
