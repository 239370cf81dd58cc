"""Extract the champion's circuits for this batch's forget objective and a retain sample; cache them."""

from __future__ import annotations

import shutil

from components._common import (
    CHAMPION_DIR,
    batch_arguments,
    context,
    device_argument,
    entry_point,
    parser,
    read_manifest,
    write_manifest,
)
from components.drift import PROFILE_FILE
from components.split import batch_data
from pipeline.circuits import circuits_for
from pipeline.model import device_facts, load_model, make_windows, resolve_device
from pipeline.registry import Registry


def main(argv: list[str] | None = None) -> dict:
    args = device_argument(batch_arguments(parser("extract_circuits", __doc__))).parse_args(argv)
    device = resolve_device(args.device)  # before any work: --device cuda without one is an error
    settings, home = context(args)
    drift = read_manifest(args.batch_dir / "drift.json")
    snapshot, data = batch_data(args, home, settings)
    registry = Registry(home, settings.mlflow)
    champion = registry.champion()
    model, _ = load_model(registry.download_model_dir(champion.version, args.batch_dir / CHAMPION_DIR), device)
    config, max_len = settings.circuits, settings.model.max_len
    forget = make_windows(data.forget_sequences, max_len, data.forget_scored)
    retain = make_windows(data.retain_sequences, max_len)
    circuits = circuits_for(
        model, forget, retain, config, settings.seed,
        meta={"model_version": str(champion.version), "lineage_root": drift["lineage_root"],
              "snapshot_hash": snapshot.manifest["content_hash"], "params": config.model_dump()},
    )  # fmt: skip
    shutil.rmtree(home.circuits, ignore_errors=True)
    circuits.save(home.circuits)
    shutil.copy(args.batch_dir / PROFILE_FILE, home.circuits / PROFILE_FILE)
    return write_manifest(args.batch_dir / "extract_circuits.json", {
        "circuits": str(home.circuits), "model_version": str(champion.version), "sizes": circuits.group_sizes(),
        "sizes_by_site": circuits.sizes_by_site(),
        "reasons": drift["reasons"], **device_facts(model),
    })  # fmt: skip


if __name__ == "__main__":
    entry_point("extract_circuits", main)
