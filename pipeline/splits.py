"""Forget, retain and non-member sets for one batch of deletion requests.

The split is one table: the snapshot's interactions with a `role` per row, so disjointness and
completeness are properties of a single column, easy to check and to audit.
  forget      interactions the batch must forget (all of a user's for scope `user`)
  retain      members' interactions the model keeps learning from
  non_member  the reference users never trained on
  excluded    a non-member who asked to be deleted: dropped from the reference, nothing to unlearn
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pipeline.data import Snapshot
from pipeline.requests import DeletionRequest

ROLES = ("forget", "retain", "non_member", "excluded")


def build_split(snapshot: Snapshot, requests: list[DeletionRequest]) -> pd.DataFrame:
    frame = snapshot.interactions[["user_id", "item_id", "position", "split", "member"]].copy()
    whole_users = {r.user_id for r in requests if r.scope == "user"}
    items = {(r.user_id, item) for r in requests if r.scope == "interactions" for item in r.item_ids}
    requested_users = whole_users | {user for user, _ in items}
    listed = pd.Series(list(zip(frame.user_id, frame.item_id, strict=True)), index=frame.index).isin(items)
    forget = frame.member & (frame.user_id.isin(whole_users) | listed)
    frame["role"] = np.select(
        [forget, frame.member, frame.user_id.isin(requested_users)],
        ["forget", "retain", "excluded"],
        default="non_member",
    )
    return frame


@dataclass(frozen=True)
class UnlearningData:
    """Token sequences derived from a split, in the shape the model and the attacks need."""

    forget_sequences: dict[int, list[int]]  # affected members' original training sequences
    forget_scored: dict[int, list[bool]]  # which of those positions are to be forgotten
    retain_sequences: dict[int, list[int]]  # members' training sequences without forgotten items
    non_member_sequences: dict[int, list[int]]
    eval_histories: dict[int, list[int]]  # retained users: train + val without forgotten items
    eval_targets: dict[int, int]  # retained users' test item
    val_histories: dict[int, list[int]]  # retained users: train without forgotten items (for retraining)
    val_targets: dict[int, int]  # retained users' validation item
    # the snapshot's items in token order: what a retrain builds its vocabulary (and a pretrained one its rows) from
    catalogue: pd.DataFrame = field(compare=False, repr=False)

    @property
    def forgotten_users(self) -> list[int]:
        return sorted(self.forget_sequences)

    @property
    def whole_users(self) -> list[int]:
        """Forgotten users none of whose training interactions is kept: the per-user attacks' subjects."""
        return sorted(user for user, scored in self.forget_scored.items() if all(scored))

    @property
    def non_members(self) -> list[int]:
        return sorted(self.non_member_sequences)


def _sequences(frame: pd.DataFrame, token: dict[int, int]) -> dict[int, list[int]]:
    ordered = frame.sort_values(["user_id", "position"])
    tokens = ordered.item_id.map(token)
    return {int(user): group.tolist() for user, group in tokens.groupby(ordered.user_id, sort=True)}


def unlearning_data(snapshot: Snapshot, split: pd.DataFrame) -> UnlearningData:
    token = snapshot.item_to_token()
    train = split[split.split == "train"]
    affected = train[train.user_id.isin(train.user_id[train.role == "forget"].unique())].sort_values(
        ["user_id", "position"]
    )
    forget_scored = {
        int(user): (group.role == "forget").tolist() for user, group in affected.groupby("user_id", sort=True)
    }
    whole_users = split.groupby("user_id").role.agg(lambda roles: (roles == "forget").all())
    retained_users = set(whole_users.index[~whole_users & split.groupby("user_id").member.first()])
    kept = split[(split.role == "retain") & split.user_id.isin(retained_users)]
    tests, vals = kept[kept.split == "test"], kept[kept.split == "val"]
    return UnlearningData(
        forget_sequences=_sequences(affected, token),
        forget_scored=forget_scored,
        retain_sequences=_sequences(train[train.role == "retain"], token),
        non_member_sequences=_sequences(train[train.role == "non_member"], token),
        eval_histories=_sequences(kept[kept.split.isin(["train", "val"])], token),
        eval_targets={int(u): token[int(i)] for u, i in zip(tests.user_id, tests.item_id, strict=True)},
        val_histories=_sequences(kept[kept.split == "train"], token),
        val_targets={int(u): token[int(i)] for u, i in zip(vals.user_id, vals.item_id, strict=True)},
        catalogue=snapshot.items,
    )
