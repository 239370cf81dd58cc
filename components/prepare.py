"""Prepare the data snapshot (MovieLens or a team's own file): filtered, ordered, split per user, non-members chosen."""

from __future__ import annotations

from pathlib import Path

from components._common import context, entry_point, forgotten, parser
from pipeline.data import load_interactions, prepare_snapshot, write_snapshot


def main(argv: list[str] | None = None) -> dict:
    cli = parser("prepare", __doc__)
    cli.add_argument("--out", type=Path, default=None, help="snapshot folder (default: under home)")
    args = cli.parse_args(argv)
    settings, home = context(args)
    out = args.out or home.snapshot
    ratings = load_interactions(settings)
    honored = forgotten(settings, home, ratings.user_id.unique())  # no resurrection through a fresh snapshot
    snapshot = prepare_snapshot(ratings, settings.data, settings.seed, honored)
    write_snapshot(snapshot, out)
    print(f"snapshot {snapshot.manifest['content_hash'][:12]} -> {out}: {snapshot.manifest['counts']}")
    return snapshot.manifest


if __name__ == "__main__":
    entry_point("prepare", main)
