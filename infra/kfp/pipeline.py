"""nightly_forgetting as a Kubeflow Pipelines v2 pipeline: the same steps, the same commands, the same branches.

Each step is a container component that runs its entry point (`python -m components.<module>`, with the
arguments of components.contract) in the image params.yaml names for it, like the Airflow pods of
components.pods: LETHE_HOME on the shared ReadWriteMany claim, params.yaml from its ConfigMap, the secrets by
reference, and for the heavy steps an accelerator (`set_accelerator_type`/`set_accelerator_limit`), the GPU
node selector and tolerations. The branches are `dsl.If` on decisions the steps write as output parameters
(components.contract.DECISIONS, `--decision NAME PATH`):
- claim.has_new_requests: without a new or retried request the night goes straight to the report;
- claim.needs_retrain: requests that failed the gate too often take the retrain-from-scratch fallback;
- drift.extract: circuits are re-extracted only when the retain data has drifted, or none exist.
KFP v2 lets no task depend on one inside a condition it is not in, so the tail a branch ends with (evaluate,
gate, report) is built in each branch (`finish`), and the compiled pipeline holds it more than once.

Compile it in the KFP environment (`make kfp-compile`: kfp 2.17 pins kubernetes<31, which the Airflow provider
cannot use, so it has its own locked environment, requirements/kfp.txt):

    .venv-kfp/bin/python infra/kfp/pipeline.py --out infra/kfp/nightly_forgetting.yaml
"""

# no `from __future__ import annotations`: KFP reads the pipeline's parameter types from live annotations
import argparse
import inspect
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # the step contract and the settings: one definition for every orchestrator

from kfp import compiler, dsl, kubernetes  # noqa: E402

from components.contract import DECISIONS, arguments, invocation  # noqa: E402
from components.pods import PARAMS_DIR, PARAMS_FILE, SCRATCH_DIR, plain_environment  # noqa: E402
from pipeline.settings import STEPS, Settings, load_settings  # noqa: E402

PIPELINE = "nightly-forgetting"


def component(step: str, settings: Settings):
    """The container component of one step: inputs batch_id (and deletion_log for ingest), one boolean output
    parameter per decision the step makes."""
    cluster = settings.kubernetes
    takes_log = step == "ingest"
    module, _ = invocation(step, "-")
    decisions = list(DECISIONS.get(step, {}))

    def run(*placeholders):  # KFP calls it once, with a placeholder per parameter, in the signature's order
        values = dict(zip(run.__signature__.parameters, placeholders, strict=True))
        batch_dir = f"{cluster.home_mount}/batches/{values['batch_id']}"
        args = arguments(step, PARAMS_FILE, batch_dir, values.get("deletion_log"))
        for name in decisions:
            args += ["--decision", name, values[name]]
        return dsl.ContainerSpec(image=cluster.images[cluster.kind(step)], command=["python", "-m",
                                 f"components.{module}"], args=args)  # fmt: skip

    parameters = [inspect.Parameter("batch_id", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str)]
    if takes_log:
        parameters.append(inspect.Parameter("deletion_log", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str))
    parameters += [
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=dsl.OutputPath(bool))
        for name in decisions
    ]
    run.__signature__ = inspect.Signature(parameters)
    run.__name__ = run.__qualname__ = step
    run.__doc__ = f"Lethe's {step} step: python -m components.{module}"
    return dsl.container_component(run)


def deployed(task: dsl.PipelineTask, step: str, settings: Settings) -> dsl.PipelineTask:
    """Where and how the step's container runs: the same choices as its Airflow pod (components.pods)."""
    cluster = settings.kubernetes
    kind = cluster.kind(step)
    wanted = cluster.resources[kind]
    task.set_display_name(step).set_caching_options(False)  # a night's steps read state: never reuse a result
    task.set_cpu_request(wanted.cpu).set_cpu_limit(wanted.cpu_limit)
    task.set_memory_request(wanted.memory).set_memory_limit(wanted.memory_limit)
    if wanted.gpus:
        task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(wanted.gpus)
    if cluster.retries:
        task.set_retry(cluster.retries, backoff_duration=f"{cluster.retry_delay_s:g}s", backoff_factor=2)
    for name, value in plain_environment(cluster).items():
        task.set_env_variable(name, value)
    kubernetes.set_image_pull_policy(task, cluster.image_pull_policy)
    kubernetes.set_security_context(task, run_as_user=cluster.run_as_user, run_as_group=cluster.run_as_user,
                                    run_as_non_root=True)  # fmt: skip
    kubernetes.mount_pvc(task, pvc_name=cluster.home_claim, mount_path=cluster.home_mount)
    kubernetes.use_config_map_as_volume(task, config_map_name=cluster.params_config_map, mount_path=PARAMS_DIR)
    kubernetes.empty_dir_mount(task, volume_name="scratch", mount_path=SCRATCH_DIR)
    for names, optional in ((cluster.secret_env, False), (cluster.secret_env_optional, True)):
        if names:
            kubernetes.use_secret_as_env(task, secret_name=cluster.secret, optional=optional,
                                         secret_key_to_env={name: name for name in names})  # fmt: skip
    if kind == "gpu":
        for key, value in cluster.gpu_node_selector.items():
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
        for toleration in cluster.gpu_tolerations:
            kubernetes.add_toleration(task, **toleration.model_dump(exclude_none=True))
    return task


def build(settings: Settings):
    """The pipeline function, its steps configured from `settings`."""
    steps = {step: component(step, settings) for step in STEPS}
    landing = f"{settings.kubernetes.home_mount}/landing"

    def run(step: str, batch_id, *after: dsl.PipelineTask, **inputs) -> dsl.PipelineTask:
        task = deployed(steps[step](batch_id=batch_id, **inputs), step, settings)
        return task.after(*after) if after else task

    def finish(batch_id, after: dsl.PipelineTask) -> None:
        """What every night that made a candidate ends with."""
        evaluated = run("evaluate", batch_id, after)
        run("report", batch_id, run("gate", batch_id, evaluated))

    @dsl.pipeline(name=PIPELINE, description="Lethe's nightly: turn a deletion log into a model that has forgotten "
                  "those people, promoted only if it passes the leakage and utility gate.")  # fmt: skip
    def nightly_forgetting(batch_id: str, deletion_log: str = landing):
        ingest = run("ingest", batch_id, deletion_log=deletion_log)
        claim = run("claim", batch_id, ingest)
        with dsl.If(claim.outputs["has_new_requests"] == True, name="new-requests"):  # noqa: E712 (a KFP condition)
            split = run("split", batch_id, claim)
            with dsl.If(claim.outputs["needs_retrain"] == True, name="failed-the-gate-too-often"):  # noqa: E712
                finish(batch_id, run("retrain", batch_id, split))
            with dsl.Else(name="unlearn"):
                drift = run("drift", batch_id, split)
                with dsl.If(drift.outputs["extract"] == True, name="drifted"):  # noqa: E712
                    finish(batch_id, run("unlearn", batch_id, run("extract_circuits", batch_id, drift)))
                with dsl.Else(name="reuse-circuits"):
                    finish(batch_id, run("unlearn", batch_id, drift))
        with dsl.Else(name="nothing-to-forget"):
            run("report", batch_id, claim)

    return nightly_forgetting


def main(argv: list[str] | None = None) -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--params", type=Path, default=REPO / "params.yaml")
    cli.add_argument("--out", type=Path, default=REPO / "infra" / "kfp" / "nightly_forgetting.yaml")
    args = cli.parse_args(argv)
    compiler.Compiler().compile(build(load_settings(args.params)), str(args.out))
    print(f"compiled {PIPELINE} to {args.out}")


if __name__ == "__main__":
    main()
