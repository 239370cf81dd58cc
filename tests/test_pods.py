"""The Kubernetes path, checked where this machine can: every rendered object against the official OpenAPI schema,
the DAG's pod tasks against the builder, no secret value anywhere, and the pod contract run for real: the unlearn
pod's own command, arguments and environment, run here, give the local executor's manifest and weights."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from components.contract import manifest_file
from components.pods import PARAMS_DIR, cluster_objects, render, step_pod
from pipeline.pii import DEVELOPMENT_KEY
from pipeline.settings import STEPS, Settings, load_settings
from tests.conftest import REPO
from tests.e2e import CHEAP, LETHE, champion, lethe, new_home

KUBERNETES_VERSION = "1.35.0"  # a current minor version; kubernetes-validate ships its schema, offline
GPU_STEPS = {"extract_circuits", "unlearn", "retrain"}


@pytest.fixture(scope="module")
def settings() -> Settings:
    return load_settings(REPO / "params.yaml")


def rendered_pods(settings: Settings, batch_id: str = "20261206T020000Z") -> dict[str, dict]:
    return {step: render(step_pod(step, settings, batch_id, "/lethe/landing")) for step in STEPS}


def test_every_pod_and_cluster_object_is_valid_kubernetes(settings):
    objects = list(rendered_pods(settings).values())
    objects += [render(obj) for group in cluster_objects(settings).values() for obj in group]
    assert {obj["kind"] for obj in objects} >= {"Pod", "Namespace", "ServiceAccount", "Role", "RoleBinding"}
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)  # raises on the first violation
    broken = rendered_pods(settings)["unlearn"]
    broken["spec"]["containers"][0]["resources"]["limits"]["cpu"] = {"cores": 8}  # the checker can fail
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_the_heavy_steps_ask_for_a_gpu_and_a_gpu_node_and_the_light_ones_do_not(settings):
    for step, pod in rendered_pods(settings).items():
        container = pod["spec"]["containers"][0]
        resources = container["resources"]
        if step in GPU_STEPS:
            assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == "1", step
            assert pod["spec"]["nodeSelector"] == settings.kubernetes.gpu_node_selector
            assert pod["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
            assert container["image"] == settings.kubernetes.images["gpu"]
        elif step != "evaluate":  # evaluate runs on the GPU image too (forward passes over every user)
            assert "nvidia.com/gpu" not in resources["limits"] and "nodeSelector" not in pod["spec"], step
            assert container["image"] == settings.kubernetes.images["cpu"]
        assert container["command"] == ["python", "-m", f"components.{'unlearn' if step == 'retrain' else step}"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_no_rendered_object_holds_a_secret_value(tmp_path):
    """Secrets set in the environment that renders must reach no output: pods name them by reference only."""
    cluster = load_settings(REPO / "params.yaml").kubernetes
    names = (*cluster.secret_env, *cluster.secret_env_optional)
    secrets = {name: f"do-not-leak-{index}-{name.lower()}" for index, name in enumerate(names)}
    for command in (["k8s", "render"], ["k8s", "write", str(tmp_path)]):
        result = subprocess.run(
            [LETHE, "--params", str(REPO / "params.yaml"), *command],
            env={**os.environ, **secrets}, capture_output=True, text=True, check=True,
        )  # fmt: skip
        written = "".join(path.read_text() for path in sorted(tmp_path.glob("*.yaml")))
        for value in secrets.values():
            assert value not in result.stdout + result.stderr + written
    objects = list(yaml.safe_load_all(subprocess.run(
        [LETHE, "--params", str(REPO / "params.yaml"), "k8s", "render"], capture_output=True, text=True, check=True
    ).stdout))  # fmt: skip
    for pod in (obj for obj in objects if obj["kind"] == "Pod"):
        env = {entry["name"]: entry for entry in pod["spec"]["containers"][0]["env"]}
        for name in secrets:
            assert "value" not in env[name] and env[name]["valueFrom"]["secretKeyRef"]["key"] == name
    example = next(obj for obj in objects if obj["kind"] == "Secret")
    assert set(example["stringData"]) == set(secrets) and all(v.startswith("<") for v in example["stringData"].values())


def test_the_checked_in_cluster_manifests_are_what_params_yaml_renders(tmp_path):
    subprocess.run([LETHE, "--params", str(REPO / "params.yaml"), "k8s", "write", str(tmp_path)], check=True)
    checked_in = REPO / "infra" / "k8s"
    for written in sorted(tmp_path.glob("*.yaml")):
        assert (checked_in / written.name).read_text() == written.read_text(), (
            f"infra/k8s/{written.name} is stale: run `lethe k8s write infra/k8s`"
        )


def load_dag(params: Path):
    spec = importlib.util.spec_from_file_location("nightly_on_kubernetes", REPO / "dags" / "nightly_forgetting.py")
    module = importlib.util.module_from_spec(spec)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LETHE_PARAMS", str(params))
        spec.loader.exec_module(module)
    return module.dag_object


def test_on_kubernetes_each_step_is_the_pod_the_builder_renders(tmp_path):
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({**yaml.safe_load((REPO / "params.yaml").read_text()), "nightly": {
        **yaml.safe_load((REPO / "params.yaml").read_text())["nightly"], "executor": "kubernetes"}}))  # fmt: skip
    settings = load_settings(params)
    dag = load_dag(params)
    assert {t.task_id for t in dag.tasks if isinstance(t, KubernetesPodOperator)} == set(STEPS)
    assert {t.task_id for t in dag.tasks if not isinstance(t, KubernetesPodOperator)} == {
        "has_new_requests", "route", "choose_circuits", "reuse_circuits"}  # fmt: skip
    conf = {"batch_id": "b-42", "deletion_log": "s3://landing/2026-12-06/"}
    for step in STEPS:
        operator = dag.get_task(step)
        context = {"dag_run": type("Run", (), {"conf": conf})(), "run_id": "scheduled__2026-12-06T02:00:00+00:00"}
        context |= dag.user_defined_macros
        operator.render_template_fields(context)
        built = render(operator.build_pod_request_obj(dry_run=True))
        sidecar = built["spec"]["containers"].pop()  # KubernetesPodOperator's XCom reader: it adds a volume and
        assert sidecar["name"] == "airflow-xcom-sidecar"  # mounts it at /airflow/xcom in the step's container
        assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True
        built["spec"]["volumes"] = [v for v in built["spec"]["volumes"] if v["name"] != "xcom"]
        built["spec"]["containers"][0]["volumeMounts"] = [
            m for m in built["spec"]["containers"][0]["volumeMounts"] if m["mountPath"] != "/airflow/xcom"
        ]
        expected = render(step_pod(step, settings, "b-42", conf["deletion_log"]))
        got_container, want_container = built["spec"]["containers"][0], expected["spec"]["containers"][0]
        for key in ("image", "command", "args", "env", "resources", "volumeMounts", "securityContext"):
            assert got_container[key] == want_container[key], (step, key)
        for key in ("serviceAccountName", "securityContext", "volumes", "nodeSelector", "tolerations"):
            assert (built["spec"].get(key) or None) == (expected["spec"].get(key) or None), (step, key)
        assert built["metadata"]["namespace"] == settings.kubernetes.namespace
        assert operator.do_xcom_push and operator.get_logs == settings.kubernetes.get_logs
        assert operator.on_finish_action.value == settings.kubernetes.on_finish_action
        assert operator.retries == settings.kubernetes.retries and operator.retry_exponential_backoff
        kubernetes_validate.validate(built, KUBERNETES_VERSION, strict=True)


def digest(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def run_pod_here(pod: dict, mounts: dict[str, Path], secrets: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """What a kubelet would run, on this machine: the container's command and arguments, its environment with
    each secret reference resolved from `secrets`, every mount path mapped to the folder standing in for its
    volume. Nothing else of this process's environment reaches the step but PATH."""

    def local(text: str) -> str:
        for mount, folder in sorted(mounts.items(), key=lambda item: -len(item[0])):
            if text == mount or text.startswith(mount + "/"):
                return str(folder) + text[len(mount) :]
        return text

    container = pod["spec"]["containers"][0]
    declared = {mount["mountPath"] for mount in container["volumeMounts"]}
    assert declared <= set(mounts), f"no stand-in for the volumes at {declared - set(mounts)}"
    env = {"PATH": os.environ["PATH"]}
    for entry in container["env"]:
        if "value" in entry:
            env[entry["name"]] = local(entry["value"])
        else:
            env[entry["name"]] = secrets[entry["valueFrom"]["secretKeyRef"]["key"]]
    command = [sys.executable if container["command"][0] == "python" else container["command"][0]]
    command += container["command"][1:] + [local(argument) for argument in container["args"]]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.e2e
def test_the_unlearn_pod_run_here_gives_the_local_executors_manifest_and_weights(tmp_path, template_home):
    """The one thing that proves the pod would do the job: its own command, run on the tiny config."""
    home, params = new_home(template_home, tmp_path, **CHEAP)
    log = tmp_path / "log.jsonl"
    assert lethe(home, params, "sample-log", "--out", str(log)).returncode == 0
    # the local executor, through the real DAG, up to the end of unlearn (the champion is still the base)
    night = lethe(
        home, params, "nightly", "--deletion-log", str(log), "--batch-id", "local", LETHE_TEST_CRASH_AT="unlearn"
    )
    assert night.returncode == -9, night.stdout[-3000:] + night.stderr[-3000:]
    local = home / "batches" / "local"
    local_manifest = json.loads((local / manifest_file("unlearn")).read_text())

    # the same batch's inputs for the pod, without anything unlearn wrote
    shutil.copytree(local, home / "batches" / "pod")
    for output in ("unlearn.json", "candidate", "champion"):
        target = home / "batches" / "pod" / output
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    config = tmp_path / "configmap"
    config.mkdir()
    shutil.copy(params, config / "params.yaml")
    settings = load_settings(params)
    pod = render(step_pod("unlearn", settings, "pod"))
    scratch, xcom = tmp_path / "scratch", tmp_path / "xcom"
    scratch.mkdir()
    secrets = {  # test values for the Secret's keys: the same stores the local run used
        "LETHE_PII_KEY": DEVELOPMENT_KEY.decode(),
        "LETHE_LEDGER_URL": f"sqlite:///{home / 'ledger.db'}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "AWS_ACCESS_KEY_ID": "test-only",
        "AWS_SECRET_ACCESS_KEY": "test-only",
    }
    mounts = {settings.kubernetes.home_mount: home, PARAMS_DIR: config, "/tmp": scratch, "/airflow/xcom": xcom}
    result = run_pod_here(pod, mounts, secrets, cwd=scratch)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    pod_manifest = json.loads((home / "batches" / "pod" / "unlearn.json").read_text())
    assert json.loads((xcom / "return.json").read_text()) == pod_manifest  # what the XCom sidecar would read
    for manifest in (local_manifest, pod_manifest):
        manifest.pop("wall_s")
    assert pod_manifest == local_manifest  # every figure, to the digit
    assert digest(home / "batches" / "pod" / "candidate") == digest(local / "candidate")


@pytest.mark.e2e
def test_the_bootstrap_pod_run_here_registers_the_base_as_champion(tmp_path, template_home):
    from components.pods import bootstrap_pod

    home, params = new_home(template_home, tmp_path)
    settings = load_settings(params)
    pod = render(bootstrap_pod(settings))
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
    container = pod["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"  # it trains: the unlearn pod's GPU
    assert "LETHE_MANIFEST_COPY" not in {entry["name"] for entry in container["env"]}
    config, scratch = tmp_path / "configmap", tmp_path / "scratch"
    config.mkdir(), scratch.mkdir()
    shutil.copy(params, config / "params.yaml")
    secrets = {
        "LETHE_PII_KEY": DEVELOPMENT_KEY.decode(),
        "LETHE_LEDGER_URL": f"sqlite:///{home / 'ledger.db'}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "AWS_ACCESS_KEY_ID": "test-only",
        "AWS_SECRET_ACCESS_KEY": "test-only",
    }
    mounts = {settings.kubernetes.home_mount: home, PARAMS_DIR: config, "/tmp": scratch}
    result = run_pod_here(pod, mounts, secrets, cwd=scratch)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "the champion is version 1 of lethe-recommender" in result.stdout
    assert champion(home) == "1"


@pytest.mark.parametrize("nodes", [1, 3])
def test_the_training_job_is_a_valid_pytorchjob_of_the_steps_pod_under_torchrun(nodes, settings):
    import jsonschema

    from components.pods import training_job

    schema = json.loads((REPO / "infra" / "kubeflow" / "pytorchjob.schema.json").read_text())
    cluster = settings.kubernetes.model_copy(update={"training_job": settings.kubernetes.training_job.model_copy(
        update={"nodes": nodes, "gpus_per_node": 4})})  # fmt: skip
    wide = settings.model_copy(update={"kubernetes": cluster})
    for step in ("unlearn", "retrain"):
        job = training_job(step, wide, "2026-12-06")
        jsonschema.validate(job, schema)
        assert job["metadata"]["name"] == f"lethe-{step}-2026-12-06" and job["spec"]["nprocPerNode"] == "4"
        replicas = job["spec"]["pytorchReplicaSpecs"]
        assert replicas["Master"]["replicas"] == 1
        assert replicas.get("Worker", {}).get("replicas", 0) == nodes - 1
        pod = render(step_pod(step, settings, "2026-12-06"))
        for replica in replicas.values():
            template = replica["template"]
            as_pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x", **template["metadata"]},
                      "spec": template["spec"]}  # fmt: skip
            kubernetes_validate.validate(as_pod, KUBERNETES_VERSION, strict=True)
            container, want = template["spec"]["containers"][0], pod["spec"]["containers"][0]
            assert container["name"] == "pytorch"
            assert container["command"] == ["torchrun", "-m", want["command"][2]] and container["args"] == want["args"]
            assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
            assert template["spec"]["nodeSelector"] == pod["spec"]["nodeSelector"]
            assert "LETHE_MANIFEST_COPY" not in {e["name"] for e in container["env"]}
    assert "--method" in training_job("retrain", settings, "b")["spec"]["pytorchReplicaSpecs"]["Master"]["template"][
        "spec"]["containers"][0]["args"]  # fmt: skip
    broken = training_job("unlearn", settings, "b")
    broken["spec"]["runpolicy"] = broken["spec"].pop("runPolicy")  # a typo the CRD schema lets through silently
    with pytest.raises(jsonschema.ValidationError, match="runpolicy"):
        jsonschema.validate(broken, schema)
    with pytest.raises(ValueError, match="a training job runs"):
        training_job("gate", settings, "b")


def test_a_step_started_as_one_of_several_processes_refuses_before_any_work(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "components.unlearn", "--home", str(tmp_path / "home"), "--batch-dir",
         str(tmp_path / "batch")], capture_output=True, text=True, timeout=300, check=False, cwd=REPO,
        env={**os.environ, "WORLD_SIZE": "8", "RANK": "0"},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "lethe unlearn: error: started as one of 8 processes (WORLD_SIZE=8)" in result.stderr
    assert not (tmp_path / "home").exists() and not (tmp_path / "batch").exists()
