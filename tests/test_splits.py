from datetime import UTC, datetime

from pipeline.requests import DeletionRequest
from pipeline.splits import build_split, check_split, unlearning_data


def request(request_id, user, **fields):
    return DeletionRequest(request_id=request_id, user_id=int(user), received_at=datetime.now(UTC), **fields)


def test_user_scope_forgets_everything_of_that_user(snapshot):
    user = snapshot.members[0]
    requests = [request("r", user, scope="user")]
    split = build_split(snapshot, requests)
    assert check_split(split, requests) == []
    assert set(split[split.user_id == user].role) == {"forget"}
    assert set(split[split.user_id != user].role) == {"retain", "non_member"}
    data = unlearning_data(snapshot, split)
    assert data.forgotten_users == [int(user)]
    assert all(data.forget_scored[int(user)])
    assert int(user) not in data.retain_sequences and int(user) not in data.eval_targets
    assert len(data.non_members) == len(snapshot.non_members)


def test_interaction_scope_forgets_only_the_listed_items(snapshot):
    user = int(snapshot.members[1])
    train_items = snapshot.interactions.query("user_id == @user and split == 'train'").item_id.tolist()
    listed = train_items[:3]
    requests = [request("r", user, scope="interactions", item_ids=listed)]
    split = build_split(snapshot, requests)
    assert check_split(split, requests) == []
    assert sorted(split[split.role == "forget"].item_id) == sorted(listed)
    data = unlearning_data(snapshot, split)
    assert sum(data.forget_scored[user]) == 3
    assert len(data.forget_sequences[user]) == len(train_items)
    assert len(data.retain_sequences[user]) == len(train_items) - 3
    assert user in data.eval_targets  # the user stays: only three interactions go


def test_a_non_member_asking_to_be_forgotten_leaves_the_reference(snapshot):
    stranger = snapshot.non_members[0]
    split = build_split(snapshot, [request("r", stranger, scope="user")])
    assert set(split[split.user_id == stranger].role) == {"excluded"}
    data = unlearning_data(snapshot, split)
    assert data.forgotten_users == [] and int(stranger) not in data.non_members


def test_check_split_catches_a_leaked_user(snapshot):
    user = snapshot.members[0]
    requests = [request("r", user, scope="user")]
    split = build_split(snapshot, requests)
    split.loc[split[split.user_id == user].index[0], "role"] = "retain"
    problems = check_split(split, requests)
    assert any("not every interaction" in p for p in problems)
    assert any("still in retain" in p for p in problems)
