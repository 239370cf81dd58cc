"""Write the batch summary and the auditor's report; log both to the batch's MLflow run."""

from __future__ import annotations

import json

import mlflow

from components._common import batch_arguments, context, entry_point, parser, write_manifest
from pipeline.registry import Registry
from pipeline.report import plot_unlearning, render_html, summarize

STEPS = ("ingest", "claim", "split", "drift", "extract_circuits", "unlearn", "evaluate", "gate")


def main(argv: list[str] | None = None) -> dict:
    args = batch_arguments(parser("report", __doc__)).parse_args(argv)
    settings, home = context(args)
    batch_dir, batch_id = args.batch_dir, args.batch_dir.name
    manifests = {
        step: json.loads((batch_dir / f"{step}.json").read_text())
        for step in STEPS
        if (batch_dir / f"{step}.json").exists()
    }
    summary = summarize(batch_id, manifests)
    history = manifests.get("unlearn", {}).get("history")
    tolerance = settings.unlearn.stop_tolerance_z
    plot = plot_unlearning(history, tolerance, batch_dir / "unlearning.png") if history else None
    (batch_dir / "report.html").write_text(render_html(summary, plot.name if plot else None))

    if summary["mlflow_run_id"]:
        Registry(home, settings.mlflow)
        with mlflow.start_run(run_id=summary["mlflow_run_id"]):
            mlflow.log_dict(summary, "summary.json")
            mlflow.log_artifact(str(batch_dir / "report.html"), artifact_path="report")
            if plot:
                mlflow.log_artifact(str(plot), artifact_path="report")
    return write_manifest(batch_dir / "summary.json", summary)


if __name__ == "__main__":
    entry_point("report", main)
