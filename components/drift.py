"""Compare today's retain data with the data the cached circuits were extracted on; decide extract or reuse."""

from __future__ import annotations

import json

from components._common import batch_arguments, context, entry_point, parser, write_manifest
from components.split import batch_data
from pipeline.drift import compare, profile
from pipeline.registry import Registry

PROFILE_FILE = "profile.json"


def main(argv: list[str] | None = None) -> dict:
    args = batch_arguments(parser("drift", __doc__)).parse_args(argv)
    settings, home = context(args)
    _, data = batch_data(args, home, settings)
    registry = Registry(home, settings.mlflow)
    champion = registry.champion()
    if champion is None:
        raise ValueError(f"registered model {settings.mlflow.registered_model!r} has no champion yet")
    lineage = registry.lineage_root(champion.version)
    cached = home.circuits / PROFILE_FILE
    reference = None
    if cached.exists() and json.loads((home.circuits / "circuits.json").read_text()).get("lineage_root") == lineage:
        reference = json.loads(cached.read_text())
    current = profile(data.retain_sequences)
    (args.batch_dir / PROFILE_FILE).write_text(json.dumps(current))
    report = compare(reference, current, settings.circuits.drift)
    print(("extract circuits: " + "; ".join(report.reasons)) if report.extract else "reuse the cached circuits")
    return write_manifest(args.batch_dir / "drift.json", {**report.as_dict(), "lineage_root": lineage})


if __name__ == "__main__":
    entry_point("drift", main)
