"""Train the base recommender on members' training items; report it against MostPop."""

from __future__ import annotations

import json
from pathlib import Path

from components._common import (
    context,
    device_argument,
    entry_point,
    load_snapshot,
    parser,
    read_manifest,
    write_manifest,
)
from pipeline.erasure import snapshot_hashes
from pipeline.recipe import META_FILE, RECIPE, model_meta, recipe_hash
from pipeline.settings import Home, Settings


def main(argv: list[str] | None = None) -> dict:
    cli = device_argument(parser("train", __doc__))
    cli.add_argument("--snapshot", type=Path, default=None, help="data snapshot folder (default: under home)")
    cli.add_argument("--out", type=Path, default=None, help="model folder (default: under home)")
    args = cli.parse_args(argv)
    from pipeline.model import resolve_device, save_model  # torch: only when there is a model to train
    from pipeline.train import train_base

    device = resolve_device(args.device)  # before any work: --device cuda without one is an error
    settings, home = context(args)
    snapshot = load_snapshot(args, home, settings)  # without anything the ledger holds as honored
    out = args.out or home.base_model
    model, report = train_base(snapshot, settings, device=device)
    save_model(model, out, model_meta(snapshot, settings, lineage="base"))
    return write_manifest(out / "train.json", report)


def ensure_base_model(params: Path | None, home: Home, settings: Settings) -> Path:
    """The snapshot and the base model under LETHE_HOME, prepared and trained once if missing; `settings` are
    those loaded from `params`, which a base found there must have been trained with."""
    from components import prepare

    common = [*(["--params", str(params)] if params else []), "--home", str(home.root)]
    if not (home.snapshot / "manifest.json").exists():
        prepare.main(common)
    if not (home.base_model / "train.json").exists():
        print("lethe: no base model yet: training it", flush=True)
        main(common)
        return home.base_model
    meta = json.loads((home.base_model / META_FILE).read_text())
    lineage = snapshot_hashes(read_manifest(home.snapshot / "manifest.json"))  # erasures change the hash
    if meta.get("recipe") != recipe_hash(settings) or meta.get("snapshot_hash") not in lineage:
        raise ValueError(
            f"{home.base_model}: this base model was trained on another data snapshot or with other seed, "
            f"{'/'.join(RECIPE)} settings than {params or 'params.yaml'}; what is built on it would not match "
            f"a fresh run. Use another --home (LETHE_HOME), or move {home.root} away to start afresh."
        )
    return home.base_model


if __name__ == "__main__":
    entry_point("train", main)
