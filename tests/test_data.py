import numpy as np

from pipeline.data import FIRST_ITEM_TOKEN, prepare_snapshot, read_snapshot, write_snapshot


def test_movielens_is_the_real_dataset(ratings):
    assert len(ratings) == 100_004
    assert ratings.user_id.nunique() == 671


def test_last_item_is_test_and_the_one_before_is_validation(snapshot):
    for _, rows in snapshot.interactions.groupby("user_id"):
        assert rows.timestamp.is_monotonic_increasing
        assert rows.split.tolist()[-2:] == ["val", "test"]
        assert set(rows.split.tolist()[:-2]) == {"train"}


def test_non_member_share_and_counts_add_up(snapshot, settings):
    counts = snapshot.manifest["counts"]
    assert counts["members"] + counts["non_members"] == counts["users"] == settings.data.max_users
    assert counts["non_members"] == round(settings.data.non_member_share * counts["users"])
    assert counts["train"] + counts["val"] + counts["test"] == counts["interactions"]
    assert snapshot.interactions.groupby("user_id").member.nunique().max() == 1


def test_rare_items_are_dropped(ratings, settings):
    snapshot = prepare_snapshot(ratings, settings.data.model_copy(update={"min_item_interactions": 10}), settings.seed)
    assert snapshot.interactions.item_id.value_counts().min() >= 10
    assert snapshot.items["count"].min() >= 10
    kept = set(snapshot.items.item_id)
    assert kept == set(snapshot.interactions.item_id)
    assert snapshot.items.token.tolist() == list(range(FIRST_ITEM_TOKEN, FIRST_ITEM_TOKEN + len(kept)))


def test_same_params_same_snapshot_other_seed_other_members(ratings, settings, snapshot):
    again = prepare_snapshot(ratings, settings.data, settings.seed)
    assert again.manifest["content_hash"] == snapshot.manifest["content_hash"]
    other = prepare_snapshot(ratings, settings.data, settings.seed + 1)
    assert other.manifest["content_hash"] != snapshot.manifest["content_hash"]


def test_min_rating_filters_interactions(ratings, settings):
    snapshot = prepare_snapshot(ratings, settings.data.model_copy(update={"min_rating": 4.0}), settings.seed)
    assert snapshot.interactions.rating.min() >= 4.0


def test_round_trip(tmp_path, snapshot):
    write_snapshot(snapshot, tmp_path)
    loaded = read_snapshot(tmp_path)
    assert loaded.manifest == snapshot.manifest
    assert np.array_equal(loaded.members, snapshot.members)
    assert loaded.sequences(("train",)) == snapshot.sequences(("train",))
