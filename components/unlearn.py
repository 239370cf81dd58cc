"""Unlearn the batch's forget set from the champion (or a model folder) with the configured method.

Locally this runs as a subprocess; in production the same command runs in a GPU pod.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from components._common import (
    CANDIDATE_DIR,
    CHAMPION_DIR,
    batch_arguments,
    context,
    device_argument,
    entry_point,
    parser,
    write_manifest,
)
from components.split import batch_data
from pipeline.circuits import Circuits
from pipeline.model import device_facts, load_model, resolve_device, save_model
from pipeline.unlearn import method_named, run_unlearning


def main(argv: list[str] | None = None) -> dict:
    cli = device_argument(batch_arguments(parser("unlearn", __doc__)))
    cli.add_argument(
        "--model", default="champion", help="'champion' (the registry's champion version) or a saved model folder"
    )
    cli.add_argument("--method", default=None, help="override unlearn.method (the DAG's fallback passes 'retrain')")
    args = cli.parse_args(argv)
    device = resolve_device(args.device)  # before any work: --device cuda without one is an error
    settings, home = context(args)
    if args.method:
        method_named(args.method)  # an unknown name is a clear error here, not after loading the model
        settings = settings.model_copy(update={"unlearn": settings.unlearn.model_copy(update={"method": args.method})})
    snapshot, data = batch_data(args, home, settings)
    start_dir, champion_version = args.batch_dir / CHAMPION_DIR, None
    if args.model == "champion":
        from pipeline.registry import Registry

        registry = Registry(home, settings.mlflow)
        champion = registry.champion()
        if champion is None:
            raise ValueError(
                f"registered model {settings.mlflow.registered_model!r} has no champion yet "
                "(run `lethe nightly`, which trains and registers the base model first)"
            )
        champion_version = champion.version
        registry.download_model_dir(champion.version, start_dir)
    elif Path(args.model).resolve() != start_dir.resolve():
        shutil.rmtree(start_dir, ignore_errors=True)
        shutil.copytree(args.model, start_dir)

    model, meta = load_model(start_dir, device)
    circuits = None
    if method_named(settings.unlearn.method).needs_circuits and (home.circuits / "circuits.json").exists():
        circuits = Circuits.load(home.circuits)
    started = time.perf_counter()
    result = run_unlearning(model, data, settings, circuits=circuits)
    save_model(
        model,
        args.batch_dir / CANDIDATE_DIR,
        {
            **meta,
            "lineage": f"{meta.get('lineage', 'unknown')}>unlearn:{settings.unlearn.method}",
            "snapshot_hash": snapshot.manifest["content_hash"],
        },
    )
    return write_manifest(
        args.batch_dir / "unlearn.json",
        {
            "method": settings.unlearn.method,
            "circuits": circuits.meta if circuits is not None else None,
            "champion_version": champion_version,
            "steps": result.steps,
            "stopped": result.stopped,
            "kept_step": result.best_step,
            "aucs_at_kept_step": result.aucs,
            "wall_s": round(time.perf_counter() - started, 2),
            **device_facts(model),
            "history": result.history,
        },
    )


if __name__ == "__main__":
    entry_point("unlearn", main)
