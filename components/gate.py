"""Register the candidate, then promote it to `champion` only if the utility and leakage gates pass."""

from __future__ import annotations

import mlflow

from components._common import (
    CANDIDATE_DIR,
    batch_arguments,
    context,
    entry_point,
    erase_honored,
    hook_point,
    open_ledger,
    parser,
    read_manifest,
    snapshot_dir,
    write_manifest,
)
from pipeline.gate import decide, worst_case_auc
from pipeline.registry import Registry


def flatten(prefix: str, value) -> dict[str, object]:
    if isinstance(value, dict):
        return {
            k: v for key, item in value.items() for k, v in flatten(f"{prefix}.{key}" if prefix else key, item).items()
        }
    return {prefix: value}


TEST_FIGURES = ("auc", "p_value", "p_holm", "z", "mde", "n_forgotten", "n_reference", "applies")


def request_evidence(evaluation: dict, batch_id: str, version, settings):
    """What each honored request's event keeps (numbers and hashes only): the batch's test per attack, its
    power, the thresholds it was judged by, utility's bound, and the request's own user's item_rank z."""
    leakage, utility = evaluation["after"].get("leakage", {}), evaluation.get("utility") or {}
    batch = {
        "batch_id": batch_id,
        "model_version": str(version),
        "gate": {
            "alpha": settings.gate.alpha,
            "power": settings.gate.power,
            "max_ndcg_drop": settings.gate.max_ndcg_drop,
        },
        "tests": {a: {k: t[k] for k in TEST_FIGURES} for a, t in leakage.get("tests", {}).items()},
        "design_effect": leakage.get("design_effect"),
        "utility": {"ratio": utility.get("ratio", {}).get("value"), "lower_bound": utility.get("lower_bound")},
    }
    per_user = evaluation["after"].get("per_user", {})
    return lambda user_key: {**batch, "user": per_user.get(user_key)}


def main(argv: list[str] | None = None) -> dict:
    args = batch_arguments(parser("gate", __doc__)).parse_args(argv)
    settings, home = context(args)
    batch_id = args.batch_dir.name
    evaluation = read_manifest(args.batch_dir / "evaluate.json")
    unlearned = read_manifest(args.batch_dir / "unlearn.json")
    before, after = evaluation["before"], evaluation["after"]
    after_auc = {attack: estimate["value"] for attack, estimate in after["mia_auc"].items()}
    decision = decide(evaluation.get("utility"), after.get("leakage"), settings.gate)

    # the ledger is reached before anything is promoted: a ledger that is down stops the gate here, not after
    ledger = open_ledger(settings, home, f"batch {batch_id}")
    registry = Registry(home, settings.mlflow)
    with mlflow.start_run(run_id=registry.batch_run_id(args.batch_dir, batch_id)) as run:
        mlflow.log_params(flatten("", settings.model_dump(mode="json")))
        for stage, figures in (("before", before), ("after", after)):
            mlflow.log_metrics({f"{stage}.{k}": v for k, v in figures.items() if isinstance(v, float)})
            mlflow.log_metrics({f"{stage}.mia_auc.{a}": e["value"] for a, e in figures["mia_auc"].items()})
            for attack, test in figures.get("leakage", {}).get("tests", {}).items():
                if not test.get("applies", True):  # no figures: the batch had nothing it could score
                    continue
                mlflow.log_metrics({f"{stage}.leakage.{attack}.{key}": test[key] for key in ("p_value", "p_holm", "z")})
        if evaluation.get("utility"):
            mlflow.log_metrics({"utility.ndcg10_ratio_lower_bound": evaluation["utility"]["lower_bound"]})
        for row in unlearned["history"]:
            mlflow.log_metrics({k: v for k, v in row.items() if k.startswith("auc_")}, step=row["step"])
        for name in ("ingest", "claim", "split", "drift", "extract_circuits", "unlearn", "evaluate"):
            if (args.batch_dir / f"{name}.json").exists():
                mlflow.log_artifact(str(args.batch_dir / f"{name}.json"), artifact_path="manifests")
        if (args.batch_dir / "contracts").exists():  # Great Expectations results: deletion log and split
            mlflow.log_artifacts(str(args.batch_dir / "contracts"), artifact_path="contracts")
        model_uri = registry.log_recommender(args.batch_dir / CANDIDATE_DIR)
        figures = {
            "ndcg10": f"{after['ndcg10']:.5f}",
            "champion_ndcg10": f"{before['ndcg10']:.5f}",
            "mia_auc": f"{worst_case_auc(after_auc):.4f}",
            **{f"mia_auc_{attack}": f"{value:.4f}" for attack, value in after_auc.items()},
        }
        version = registry.register(
            model_uri,
            {
                "lethe.batch_id": batch_id,
                "lethe.lineage": "unlearned",
                "lethe.method": unlearned["method"],
                "lethe.parent_version": str(unlearned["champion_version"]),
            },
        )
        registry.tag_version(version.version, {**figures, "gate": decision.label})
        if decision.passed:
            registry.promote(version.version)
        else:
            registry.tag_version(version.version, {"gate.reasons": " | ".join(decision.reasons)})
        mlflow.set_tags({"gate": decision.label, "model_version": version.version})
    # The ledger follows the registry: a crash between the two leaves requests in_batch, and the next night's
    # claim settles them from the registry's record (components.claim.recover).
    hook_point("gate.promoted")
    if decision.passed:
        evidence = request_evidence(evaluation, batch_id, version.version, settings)
        outcome = {"honored": ledger.honor(batch_id, version.version, evidence)}
        # honored: Lethe's own copies of what was forgotten go now (until here they stay, for a retry)
        outcome["erased"] = erase_honored(ledger, home, snapshot_dir(args, home))
    else:
        outcome = ledger.fail(
            batch_id, "gate_rejected", " | ".join(decision.reasons), settings.ledger.max_failed_nights
        )
    for reason in decision.reasons:
        print(f"gate: {reason}")
    return write_manifest(
        args.batch_dir / "gate.json",
        {
            "gate": decision.label,
            "reasons": decision.reasons,
            "model_version": version.version,
            "model_uri": model_uri,
            "run_id": run.info.run_id,
            "promoted": decision.passed,
            "ledger": outcome,
        },
    )


if __name__ == "__main__":
    entry_point("gate", main)
