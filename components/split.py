"""Turn the batch's valid requests into forget, retain and non-member sets, and check them."""

from __future__ import annotations

import argparse
import json

import pandas as pd

from components._common import batch_arguments, context, entry_point, load_snapshot, parser, write_manifest
from components.claim import read_claimed
from pipeline.contracts import check_split
from pipeline.data import Snapshot, content_hash
from pipeline.settings import Home, Settings
from pipeline.splits import ROLES, UnlearningData, build_split, unlearning_data

SPLIT_FILE = "split.parquet"


def batch_data(args: argparse.Namespace, home: Home, settings: Settings) -> tuple[Snapshot, UnlearningData]:
    """The snapshot and this batch's forget / retain / reference sequences, as every later step reads them."""
    snapshot = load_snapshot(args, home, settings)
    return snapshot, unlearning_data(snapshot, pd.read_parquet(args.batch_dir / SPLIT_FILE))


def main(argv: list[str] | None = None) -> dict:
    args = batch_arguments(parser("split", __doc__)).parse_args(argv)
    settings, home = context(args)
    snapshot = load_snapshot(args, home, settings)
    requests = read_claimed(args.batch_dir)
    split = build_split(snapshot, requests)
    contract = check_split(split, requests, len(snapshot.interactions))  # raises on a violation
    (args.batch_dir / "contracts").mkdir(parents=True, exist_ok=True)
    (args.batch_dir / "contracts" / "split.json").write_text(json.dumps(contract, indent=1, default=str))
    split.to_parquet(args.batch_dir / SPLIT_FILE, index=False)
    forget = split[split.role == "forget"]
    return write_manifest(
        args.batch_dir / "split.json",
        {
            "snapshot_hash": snapshot.manifest["content_hash"],
            "split_hash": content_hash(split),
            "rows": {role: int((split.role == role).sum()) for role in ROLES},
            "forgotten_users": int(forget.user_id.nunique()),
            "requests": len(requests),
        },
    )


if __name__ == "__main__":
    entry_point("split", main)
