"""The step contract as Kubernetes objects: one pod per step, and the cluster objects those pods need.

Every orchestrator runs the same command (components.contract); the local executor runs it as a subprocess, and
`step_pod` wraps it in a pod: the image for the step's kind (cpu or gpu), params.yaml from a
ConfigMap, LETHE_HOME on a shared ReadWriteMany volume claim, the secrets by reference to a Kubernetes Secret
(never a value), resources, GPU node selector and tolerations, and a locked-down security context.

Batch files move on the shared volume, not through S3: the step contract is paths under LETHE_HOME (snapshot,
models, circuits, batch folders), so a volume mounted at the same place in every pod keeps the contract
unchanged, and a step needs no staging code. The deletion log may still come from s3://, and MLflow keeps
its artifacts wherever its server puts them.

Everything here is built with the official client's models (kubernetes.client), and `render` turns it into
plain dicts for YAML and for schema validation.
"""

from __future__ import annotations

import re

from kubernetes.client import models as k8s

from components._common import MANIFEST_COPY_VARIABLE
from components.contract import arguments, invocation
from pipeline.settings import KubernetesSettings, Settings

PARAMS_DIR = "/etc/lethe"  # where the params ConfigMap is mounted
PARAMS_FILE = f"{PARAMS_DIR}/params.yaml"
SCRATCH_DIR = "/tmp"  # the only writable path besides LETHE_HOME: the root filesystem is read-only
XCOM_FILE = "/airflow/xcom/return.json"  # where KubernetesPodOperator's sidecar reads a pod's result
LABELS = {"app.kubernetes.io/name": "lethe", "app.kubernetes.io/part-of": "lethe"}
# The checkov rules a step pod does not follow, each with its reason (checkov reads these annotations).
CHECKOV_SKIPS = {
    "CKV_K8S_8": "a run-to-completion step serves nothing: no liveness endpoint; Kubernetes judges it by exit code",
    "CKV_K8S_9": "a run-to-completion step serves nothing: no readiness endpoint",
    "CKV_K8S_35": "the steps read their secrets from the environment, as MLflow, boto3 and SQLAlchemy expect; "
    "nothing logs them",
    "CKV_K8S_43": "the image reference is params.yaml's kubernetes.images: a release pins it there by digest "
    "(image@sha256:...) once it is published",
}


def pod_name(step: str) -> str:
    return f"lethe-{step.replace('_', '-')}"


def _resources(settings: KubernetesSettings, kind: str) -> k8s.V1ResourceRequirements:
    wanted = settings.resources[kind]
    requests = {"cpu": wanted.cpu, "memory": wanted.memory}
    limits = {"cpu": wanted.cpu_limit, "memory": wanted.memory_limit}
    if wanted.gpus:  # extended resources: the request must equal the limit
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(wanted.gpus)
    return k8s.V1ResourceRequirements(requests=requests, limits=limits)


def plain_environment(settings: KubernetesSettings) -> dict[str, str]:
    """A step container's variables that are not secrets (the Airflow pods and the KFP components share them)."""
    return {
        "LETHE_HOME": settings.home_mount,
        "LETHE_PARAMS": PARAMS_FILE,
        "LETHE_MODE": "production",  # refuse to run without the PII key
        "HOME": SCRATCH_DIR,
        "MPLCONFIGDIR": f"{SCRATCH_DIR}/matplotlib",
        "HF_HOME": f"{SCRATCH_DIR}/huggingface",
        "HF_HUB_OFFLINE": "1",  # nothing is downloaded at run time
    }


def _environment(settings: KubernetesSettings, xcom: bool) -> list[k8s.V1EnvVar]:
    plain = {**plain_environment(settings), **({MANIFEST_COPY_VARIABLE: XCOM_FILE} if xcom else {})}
    secrets = [
        k8s.V1EnvVar(
            name=name,
            value_from=k8s.V1EnvVarSource(
                secret_key_ref=k8s.V1SecretKeySelector(name=settings.secret, key=name, optional=optional)
            ),
        )
        for names, optional in ((settings.secret_env, False), (settings.secret_env_optional, True))
        for name in names
    ]
    return [k8s.V1EnvVar(name=name, value=value) for name, value in plain.items()] + secrets


def step_pod(
    step: str, settings: Settings, batch_id: str, deletion_log: str | None = None, xcom: bool = True
) -> k8s.V1Pod:
    """The pod that runs one step of batch `batch_id` (a name, or a Jinja expression in the DAG); with `xcom`,
    the step also leaves its manifest where KubernetesPodOperator's sidecar reads it (an Airflow task's pod)."""
    cluster = settings.kubernetes
    module, _ = invocation(step, deletion_log)
    kind = cluster.kind(step)
    batch_dir = f"{cluster.home_mount}/batches/{batch_id}"
    container = k8s.V1Container(
        name="base",  # the name KubernetesPodOperator looks for: logs, exit code and XCom come from it
        image=cluster.images[kind],
        image_pull_policy=cluster.image_pull_policy,
        command=["python", "-m", f"components.{module}"],
        args=arguments(step, PARAMS_FILE, batch_dir, deletion_log),
        env=_environment(cluster, xcom),
        resources=_resources(cluster, kind),
        volume_mounts=[
            k8s.V1VolumeMount(name="lethe-home", mount_path=cluster.home_mount),
            k8s.V1VolumeMount(name="params", mount_path=PARAMS_DIR, read_only=True),
            k8s.V1VolumeMount(name="scratch", mount_path=SCRATCH_DIR),
        ],
        security_context=k8s.V1SecurityContext(
            allow_privilege_escalation=False,
            read_only_root_filesystem=True,
            run_as_non_root=True,
            capabilities=k8s.V1Capabilities(drop=["ALL"]),
        ),
    )
    spec = k8s.V1PodSpec(
        containers=[container],
        restart_policy="Never",
        service_account_name=cluster.service_account,
        automount_service_account_token=False,  # a step never talks to the Kubernetes API
        security_context=k8s.V1PodSecurityContext(
            run_as_non_root=True,
            run_as_user=cluster.run_as_user,
            run_as_group=cluster.run_as_user,
            fs_group=cluster.run_as_user,
            seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
        ),
        volumes=[
            k8s.V1Volume(
                name="lethe-home",
                persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(claim_name=cluster.home_claim),
            ),
            k8s.V1Volume(name="params", config_map=k8s.V1ConfigMapVolumeSource(name=cluster.params_config_map)),
            k8s.V1Volume(name="scratch", empty_dir=k8s.V1EmptyDirVolumeSource()),
        ],
    )
    if kind == "gpu":
        spec.node_selector = dict(cluster.gpu_node_selector) or None
        spec.tolerations = [k8s.V1Toleration(**t.model_dump(exclude_none=True)) for t in cluster.gpu_tolerations]
    return k8s.V1Pod(
        api_version="v1",
        kind="Pod",
        metadata=k8s.V1ObjectMeta(
            name=pod_name(step),
            namespace=cluster.namespace,
            labels={**LABELS, "app.kubernetes.io/component": step.replace("_", "-")},
            annotations={
                f"checkov.io/skip{n}": f"{rule}={why}" for n, (rule, why) in enumerate(CHECKOV_SKIPS.items(), 1)
            },
        ),
        spec=spec,
    )


def render(obj) -> dict:
    """A client model as the plain dict the API server would receive (camelCase keys, no nulls)."""
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(obj)


def bootstrap_pod(settings: Settings) -> k8s.V1Pod:
    """The one-off pod that prepares the data, trains the base and registers it as champion (`lethe bootstrap`):
    the unlearn pod's image, GPU, volume, params and secrets, running the command instead of a step."""
    pod = step_pod("unlearn", settings, batch_id="bootstrap", xcom=False)  # not an Airflow task: no XCom
    pod.metadata.name = "lethe-bootstrap"
    pod.metadata.labels["app.kubernetes.io/component"] = "bootstrap"
    container = pod.spec.containers[0]
    container.command, container.args = ["python", "-m", "components.cli"], ["bootstrap"]
    return pod


TRAINING_JOB_STEPS = ("unlearn", "retrain")


def training_job(step: str, settings: Settings, batch_id: str) -> dict:
    """A Kubeflow Training Operator PyTorchJob (kubeflow.org/v1) for a step beyond one GPU: the step's pod as
    the template of a master and `nodes - 1` workers, its command under torchrun, which reads the rendezvous
    the operator sets (PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT).
    The steps run one process today (components._common refuses a larger WORLD_SIZE), so the default job is
    one node with one GPU. Checked against infra/kubeflow/pytorchjob.schema.json and, for its pod templates,
    the Kubernetes schema."""
    if step not in TRAINING_JOB_STEPS:
        raise ValueError(f"a training job runs {list(TRAINING_JOB_STEPS)}, not {step!r}")
    job = settings.kubernetes.training_job
    pod = step_pod(step, settings, batch_id, xcom=False)  # not an Airflow task: no XCom
    container = pod.spec.containers[0]
    container.name = "pytorch"  # the container the training operator configures
    container.command = ["torchrun", "-m", *container.command[2:]]  # python -m components.X -> torchrun -m ...
    for kind in ("requests", "limits"):
        getattr(container.resources, kind)["nvidia.com/gpu"] = str(job.gpus_per_node)
    pod.spec.restart_policy = "OnFailure"
    template = {"metadata": render(pod.metadata), "spec": render(pod.spec)}
    for key in ("name", "namespace"):
        template["metadata"].pop(key)
    replica = {"restartPolicy": "OnFailure", "template": template}
    replicas = {"Master": {"replicas": 1, **replica}}
    if job.nodes > 1:
        replicas["Worker"] = {"replicas": job.nodes - 1, **replica}
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {
            "name": re.sub(r"[^a-z0-9-]+", "-", f"{pod_name(step)}-{batch_id}".lower())[:63].strip("-"),
            "namespace": settings.kubernetes.namespace,
            "labels": dict(pod.metadata.labels),
        },
        "spec": {
            "nprocPerNode": str(job.gpus_per_node),
            "runPolicy": {
                "cleanPodPolicy": "None",  # keep the pods of a finished job for their logs until the TTL
                "backoffLimit": job.backoff_limit,
                "ttlSecondsAfterFinished": job.ttl_after_finished_s,
            },
            "pytorchReplicaSpecs": replicas,
        },
    }


def cluster_objects(settings: Settings) -> dict[str, list]:
    """What the cluster needs before the first night, by file under infra/k8s/: the namespace, the two service
    accounts and the launcher's rights, the shared volume claim, and an example Secret with placeholders. The
    params ConfigMap comes from the deployment's own params.yaml (`kubectl create configmap`, see the README)."""
    cluster = settings.kubernetes
    namespace = cluster.namespace

    def meta(name: str) -> k8s.V1ObjectMeta:
        return k8s.V1ObjectMeta(name=name, namespace=namespace, labels=dict(LABELS))

    launcher_rules = [
        k8s.V1PolicyRule(
            api_groups=[""], resources=["pods"], verbs=["create", "get", "list", "watch", "patch", "delete"]
        ),
        k8s.V1PolicyRule(api_groups=[""], resources=["pods/log"], verbs=["get", "list"]),
        k8s.V1PolicyRule(api_groups=[""], resources=["pods/exec"], verbs=["create", "get"]),  # the XCom sidecar
        k8s.V1PolicyRule(api_groups=[""], resources=["events"], verbs=["get", "list", "watch"]),
    ]
    placeholder = "<set in your secret store; never commit a real value>"
    return {
        "namespace.yaml": [
            k8s.V1Namespace(
                api_version="v1", kind="Namespace", metadata=k8s.V1ObjectMeta(name=namespace, labels=dict(LABELS))
            )
        ],
        "rbac.yaml": [
            k8s.V1ServiceAccount(
                api_version="v1",
                kind="ServiceAccount",
                metadata=meta(cluster.service_account),
                automount_service_account_token=False,
            ),
            k8s.V1ServiceAccount(api_version="v1", kind="ServiceAccount", metadata=meta(cluster.launcher_account)),
            k8s.V1Role(
                api_version="rbac.authorization.k8s.io/v1",
                kind="Role",
                metadata=meta("lethe-pod-launcher"),
                rules=launcher_rules,
            ),
            k8s.V1RoleBinding(
                api_version="rbac.authorization.k8s.io/v1",
                kind="RoleBinding",
                metadata=meta("lethe-pod-launcher"),
                role_ref=k8s.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="lethe-pod-launcher"),
                subjects=[k8s.RbacV1Subject(kind="ServiceAccount", name=cluster.launcher_account, namespace=namespace)],
            ),
        ],
        "network.yaml": [  # the steps serve nothing: no ingress; egress to the ledger, MLflow and S3
            k8s.V1NetworkPolicy(
                api_version="networking.k8s.io/v1",
                kind="NetworkPolicy",
                metadata=meta("lethe-steps"),
                spec=k8s.V1NetworkPolicySpec(
                    pod_selector=k8s.V1LabelSelector(match_labels=dict(LABELS)),
                    policy_types=["Ingress"],
                ),
            )
        ],
        "volume.yaml": [
            k8s.V1PersistentVolumeClaim(
                api_version="v1",
                kind="PersistentVolumeClaim",
                metadata=meta(cluster.home_claim),
                spec=k8s.V1PersistentVolumeClaimSpec(
                    access_modes=["ReadWriteMany"],
                    storage_class_name=cluster.home_storage_class,
                    resources=k8s.V1VolumeResourceRequirements(requests={"storage": cluster.home_size}),
                ),
            )
        ],
        "secret.example.yaml": [
            k8s.V1Secret(
                api_version="v1",
                kind="Secret",
                metadata=meta(cluster.secret),
                type="Opaque",
                string_data={name: placeholder for name in (*cluster.secret_env, *cluster.secret_env_optional)},
            )
        ],
    }
