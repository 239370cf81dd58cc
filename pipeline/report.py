"""The batch summary and the auditor's report (HTML with the unlearning curve)."""

from __future__ import annotations

import html
from pathlib import Path

from pipeline.gate import worst_case_auc


def summarize(batch_id: str, manifests: dict[str, dict]) -> dict:
    """One flat record of what the batch did, from the step manifests that exist."""
    ingest, claim = manifests.get("ingest", {}), manifests.get("claim", {})
    gate, evaluation, unlearn = manifests.get("gate"), manifests.get("evaluate"), manifests.get("unlearn", {})
    rejections = ingest.get("quarantine", []) + [
        {"source": "claim", "line": 0, "reason": entry["reason"], "message": f"{', '.join(entry['request_ids'])}: "
         f"{entry['message']}"}
        for entry in claim.get("quarantined", [])
    ]  # fmt: skip
    claimed = claim.get("claimed", 0)
    passed = gate is not None and gate["gate"] == "passed"
    outcome = (gate or {}).get("ledger", {})
    summary = {
        "batch_id": batch_id,
        "deletion_log": ingest.get("deletion_log"),
        "requests_total": ingest.get("received", 0),
        "requests_claimed": claimed,
        "requests_retried": claim.get("retries", 0),
        "requests_honored": outcome.get("honored", 0) if passed else 0,
        "requests_pending": outcome.get("pending_retry", 0),
        "requests_needs_retrain": outcome.get("needs_retrain", 0),
        "requests_rejected": len(rejections),
        # interactions erased from Lethe's stores tonight: honored by this gate, or left by a night that died
        "rows_erased": (outcome.get("erased") or {}).get("rows", 0) + (claim.get("erased") or {}).get("rows", 0),
        "requests_duplicate": ingest.get("duplicates", 0),
        # repeats of requests honored before: answered at claim by the version that honored the original
        "requests_already_honored": len(claim.get("already_honored", [])),
        "already_honored": claim.get("already_honored", []),
        # requests that failed the gate ledger.max_failed_nights times: this batch retrained from scratch for them
        "retrain_fallback": claim.get("needs_retrain_ids", []),
        "rejections": rejections,
        "gate": gate["gate"] if gate else "skipped",
        "gate_reasons": gate["reasons"] if gate else ["no new valid requests: nothing to unlearn"],
        "model_version": gate["model_version"] if gate else None,
        "mlflow_run_id": gate["run_id"] if gate else None,
        "circuits": None if "drift" not in manifests else "extracted" if manifests["drift"]["extract"] else "reused",
        "drift": manifests.get("drift", {}).get("figures"),
        "unlearn_method": unlearn.get("method"),
        "unlearn_steps": unlearn.get("steps"),
        "unlearn_stopped": unlearn.get("stopped"),
    }
    for stage in ("before", "after"):
        figures = (evaluation or {}).get(stage, {})
        aucs = {attack: estimate["value"] for attack, estimate in figures.get("mia_auc", {}).items()}
        summary[f"ndcg10_{stage}"] = figures.get("ndcg10")
        summary[f"hr10_{stage}"] = figures.get("hr10")
        summary[f"mia_auc_{stage}"] = worst_case_auc(aucs) if aucs else None
        summary[f"mia_auc_{stage}_by_attack"] = figures.get("mia_auc", {})
        summary[f"leakage_{stage}"] = figures.get("leakage")  # the gate's test: p-values, power, n per attack
    summary["utility_test"] = (evaluation or {}).get("utility")
    if evaluation:
        summary["forgotten_users"] = evaluation["forgotten_users"]
        summary["non_members"] = evaluation["non_members"]
        summary["eval_users"] = evaluation["eval_users"]
    return summary


def plot_unlearning(history: list[dict], tolerance: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    steps = [row["step"] for row in history]
    for key in sorted(k for k in history[0] if k.startswith("z_")):
        axis.plot(steps, [row[key] for row in history], marker=".", label=key.removeprefix("z_"))
    axis.axhspan(-tolerance, tolerance, color="green", alpha=0.15, label="stopping tolerance")
    axis.axhline(0.0, color="grey", linewidth=0.8)
    axis.set(xlabel="unlearning step", ylabel="z: forgotten vs strangers, in null sd")
    axis.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def render_html(summary: dict, plot_name: str | None) -> str:
    def row(label: str, value) -> str:
        return f"<tr><th>{html.escape(label)}</th><td>{html.escape(str(value))}</td></tr>"

    def interval(figures: dict) -> str:
        return ", ".join(
            f"{attack}: {e['value']:.3f} [{e['low']:.3f}, {e['high']:.3f}]" for attack, e in figures.items()
        )

    def tests(leakage: dict | None) -> str:
        if not leakage:
            return "not measured"
        return "; ".join(
            f"{attack}: does not apply (no user forgotten whole: no matched reference)"
            if not t.get("applies", True) else
            f"{attack}: p={t['p_value']:.3g} (Holm {t['p_holm']:.3g}), n={t['n_forgotten']} vs {t['n_reference']}, "
            f"detects AUC>={t['mde']:.3f}" if t["mde"] is not None else
            f"{attack}: p={t['p_value']:.3g} (Holm {t['p_holm']:.3g}), n={t['n_forgotten']} vs {t['n_reference']}, "
            "no power at this size"
            for attack, t in leakage["tests"].items()
        ) + f" (alpha {leakage['alpha']}, Holm over the attacks that apply)"  # fmt: skip

    utility = summary.get("utility_test") or {}
    rows = [
        row("batch", summary["batch_id"]),
        row("gate", summary["gate"]),
        row("model version", summary["model_version"]),
        row(
            "requests received / quarantined / duplicates",
            f"{summary['requests_total']} / {summary['requests_rejected']} / {summary['requests_duplicate']}",
        ),
        row(
            "this batch: claimed / honored / pending retry / need a retrain",
            f"{summary['requests_claimed']} / {summary['requests_honored']} / {summary['requests_pending']} / "
            f"{summary['requests_needs_retrain']}",
        ),
        row(
            "already honored (repeats)",
            ", ".join(
                f"{a['request_id']} (by {a['original']}, version {a['model_version']})"
                for a in summary["already_honored"]
            )
            or "none",
        ),  # fmt: skip
        row("retrained from scratch for", ", ".join(summary["retrain_fallback"]) or "none"),
        row("NDCG@10 before -> after", f"{summary['ndcg10_before']} -> {summary['ndcg10_after']}"),
        row("MIA AUC before (95% CI)", interval(summary["mia_auc_before_by_attack"])),
        row("MIA AUC after (95% CI)", interval(summary["mia_auc_after_by_attack"])),
        row("leakage test after (the gate's)", tests(summary.get("leakage_after"))),
        row(
            "NDCG@10 candidate / champion, same users",
            f"{utility['ratio']['value']:.3f}, one-sided lower bound {utility['lower_bound']:.3f} "
            f"(margin {utility['margin']})"
            if utility
            else "not measured",
        ),
        row(
            "unlearning", f"{summary['unlearn_method']}, {summary['unlearn_steps']} steps: {summary['unlearn_stopped']}"
        ),
    ]
    reasons = "".join(f"<li>{html.escape(reason)}</li>" for reason in summary["gate_reasons"])
    rejected = "".join(
        f"<li>{html.escape(str(r['source']))}:{r['line']} {html.escape(r['reason'])}: {html.escape(r['message'])}</li>"
        for r in summary["rejections"]
    )
    image = f'<img src="{plot_name}" alt="leakage z during unlearning">' if plot_name else ""
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Lethe batch report</title></head><body>"
        f"<h1>Lethe batch {html.escape(summary['batch_id'])}</h1><table>{''.join(rows)}</table>"
        f"<h2>Gate reasons</h2><ul>{reasons or '<li>all gates passed</li>'}</ul>"
        f"<h2>Quarantined requests</h2><ul>{rejected or '<li>none</li>'}</ul>{image}"
        "<p>An AUC of 0.5 means the forgotten users look exactly like users the model never saw. The gate tests "
        "that (p-values, Holm over the attacks); each test's power is the smallest AUC it detects.</p></body></html>"
    )
