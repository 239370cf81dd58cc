"""The step contract as commands: what each step of the nightly runs, the same for every orchestrator.

The local executor runs `python -m components.<module> <arguments>` as a subprocess of the Airflow task, a
Kubernetes pod runs it as its container's command (components.pods), and DVC stages and KFP components run it
too. The step then leaves its manifest, `manifest_file(step)`, in the batch folder.

The branches of the nightly are decisions on two manifests, defined once here (`DECISIONS`): the Airflow DAG's
branch tasks evaluate them on the manifest they receive, and a KFP component has its step write them as output
parameters (`--decision NAME PATH`, components._common.entry_point) for `dsl.If`.
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.settings import STEPS

DECISIONS: dict[str, dict[str, Callable[[dict], bool]]] = {
    "claim": {
        # a night with no valid new request and none waiting for a retry skips to the report
        "has_new_requests": lambda manifest: manifest["claimed"] > 0,
        # requests that failed the gate ledger.max_failed_nights times take the fallback: a retrain from scratch
        "needs_retrain": lambda manifest: manifest["needs_retrain"] > 0,
    },
    # circuits are re-extracted only when today's retain data has drifted, or none exist
    "drift": {"extract": lambda manifest: bool(manifest["extract"])},
}


def decision(step: str, name: str) -> Callable[[dict], bool]:
    """One of the nightly's branch decisions, made on `step`'s manifest."""
    if name not in DECISIONS.get(step, {}):
        known = [f"{s}:{n}" for s, names in DECISIONS.items() for n in names]
        raise ValueError(f"step {step} makes no decision {name!r}; the decisions are {known}")
    return DECISIONS[step][name]


def invocation(step: str, deletion_log: str | None = None) -> tuple[str, list[str]]:
    """The component module a step runs and its step-specific arguments (before --batch-dir)."""
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}; the steps are {list(STEPS)}")
    if step == "ingest":
        if deletion_log is None:
            raise ValueError("the ingest step needs a deletion log")
        return "ingest", ["--deletion-log", deletion_log]
    if step == "unlearn":
        return "unlearn", ["--model", "champion"]
    if step == "retrain":  # the fallback branch: a retrain from scratch through the unlearn step
        return "unlearn", ["--model", "champion", "--method", "retrain"]
    return step, []


def arguments(step: str, params: str, batch_dir: str, deletion_log: str | None = None) -> list[str]:
    """The arguments after `python -m components.<module>`, the same for every orchestrator."""
    _, extra = invocation(step, deletion_log)
    return ["--params", params, *extra, "--batch-dir", batch_dir]


def manifest_file(step: str) -> str:
    """The manifest a step leaves in the batch folder (the retrain fallback runs the unlearn step)."""
    return {"retrain": "unlearn.json", "report": "summary.json"}.get(step, f"{step}.json")
