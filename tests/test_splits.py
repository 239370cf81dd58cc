from datetime import UTC, datetime

import pytest

from pipeline.contracts import ContractViolation, check_split
from pipeline.requests import DeletionRequest
from pipeline.splits import build_split, unlearning_data


def request(request_id, user, **fields):
    return DeletionRequest(request_id=request_id, user_id=int(user), received_at=datetime.now(UTC), **fields)


def test_user_scope_forgets_everything_of_that_user(snapshot):
    user = snapshot.members[0]
    requests = [request("r", user, scope="user")]
    split = build_split(snapshot, requests)
    assert check_split(split, requests, len(snapshot.interactions))["success"]
    assert set(split[split.user_id == user].role) == {"forget"}
    assert set(split[split.user_id != user].role) == {"retain", "non_member"}
    data = unlearning_data(snapshot, split)
    assert data.forgotten_users == data.whole_users == [int(user)]
    assert all(data.forget_scored[int(user)])
    assert int(user) not in data.retain_sequences and int(user) not in data.eval_targets
    assert len(data.non_members) == len(snapshot.non_members)


def test_interaction_scope_forgets_only_the_listed_items(snapshot):
    user = int(snapshot.members[1])
    train_items = snapshot.interactions.query("user_id == @user and split == 'train'").item_id.tolist()
    listed = train_items[:3]
    requests = [request("r", user, scope="interactions", item_ids=listed)]
    split = build_split(snapshot, requests)
    assert check_split(split, requests, len(snapshot.interactions))["success"]
    assert sorted(split[split.role == "forget"].item_id) == sorted(listed)
    data = unlearning_data(snapshot, split)
    assert sum(data.forget_scored[user]) == 3
    assert len(data.forget_sequences[user]) == len(train_items)
    assert len(data.retain_sequences[user]) == len(train_items) - 3
    assert user in data.eval_targets  # the user stays: only three interactions go
    assert data.forgotten_users == [user] and data.whole_users == []  # not for the per-user attacks


def test_a_non_member_asking_to_be_forgotten_leaves_the_reference(snapshot):
    stranger = snapshot.non_members[0]
    split = build_split(snapshot, [request("r", stranger, scope="user")])
    assert set(split[split.user_id == stranger].role) == {"excluded"}
    data = unlearning_data(snapshot, split)
    assert data.forgotten_users == [] and int(stranger) not in data.non_members


def test_the_split_contract_catches_a_leaked_user_a_lost_row_and_a_twice_seen_interaction(snapshot):
    user = snapshot.members[0]
    requests = [request("r", user, scope="user")]
    split = build_split(snapshot, requests)
    leaked = split.copy()
    leaked.loc[leaked[leaked.user_id == user].index[0], "role"] = "retain"
    with pytest.raises(ContractViolation) as violation:
        check_split(leaked, requests, len(snapshot.interactions))
    assert "column_A=must_forget, column_B=forgotten): 1 rows" in str(violation.value)
    assert "column=role, where whole_user == True): 1 rows" in str(violation.value)
    stranger = [request("s", snapshot.non_members[0], scope="user")]  # excluded, not forgotten: no member row
    kept = build_split(snapshot, stranger)
    kept.loc[kept[kept.user_id == snapshot.non_members[0]].index[0], "role"] = "non_member"
    with pytest.raises(
        ContractViolation, match=r"the split broke its contract: [^;]*where whole_user == True\): 1 rows$"
    ):
        check_split(kept, stranger, len(snapshot.interactions))
    with pytest.raises(ContractViolation, match="expect_table_row_count_to_equal"):
        check_split(split.iloc[1:], requests, len(snapshot.interactions))
    with pytest.raises(ContractViolation, match="expect_compound_columns_to_be_unique"):
        check_split(split.iloc[[0, 0, *range(2, len(split))]], requests, len(snapshot.interactions))
