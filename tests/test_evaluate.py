import numpy as np
import pytest
import torch

from pipeline.data import FIRST_ITEM_TOKEN
from pipeline.evaluate import (
    attack_scores,
    auc,
    bootstrap_auc,
    hit_at,
    ndcg_at,
    paired_auc_difference,
    paired_ratio,
    ranks_of_targets,
    utility_metrics,
)
from pipeline.gate import worst_case_auc
from pipeline.model import PositionStats

T = FIRST_ITEM_TOKEN  # token of the first item column


def test_rank_excludes_seen_items_and_counts_ties_against_the_target():
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0], [1.0, 1.0, 1.0, 1.0]])
    # row 0: target is column 2 (score 3); columns 0 and 1 beat it, but column 0 was seen
    # row 1: all tied: the target ranks last among the unseen
    ranks = ranks_of_targets(scores, [T + 2, T + 0], [[T + 0], [T + 3]])
    assert ranks.tolist() == [2, 3]


def test_ndcg_and_hit_rate_on_known_ranks():
    ranks = np.array([1, 3, 10, 11])
    assert ndcg_at(ranks, 10).tolist() == pytest.approx([1.0, 0.5, 1 / np.log2(11), 0.0])
    assert hit_at(ranks, 10).tolist() == [1, 1, 1, 0]
    metrics = utility_metrics(ranks, (10, 20))
    assert metrics["hr10"] == 0.75 and metrics["hr20"] == 1.0


def test_auc_on_known_cases():
    assert auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert auc(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 0.0
    assert auc(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.5
    assert auc(np.array([2.0]), np.array([1.0, 3.0])) == 0.5
    assert np.isnan(auc(np.array([]), np.array([1.0])))


def test_attacks_on_hand_built_positions():
    # user 1: log p = [-1, -2, -3, -4]; user 2: log p = [-5, -5]; model mean -3, std 1 everywhere
    stats = PositionStats(
        users=np.array([1, 1, 1, 1, 2, 2]),
        items=np.array([10, 11, 12, 13, 10, 11]),
        log_prob=np.array([-1.0, -2.0, -3.0, -4.0, -5.0, -5.0]),
        mean_log_prob=np.full(6, -3.0),
        std_log_prob=np.ones(6),
    )
    scores = attack_scores(stats, mink_fraction=0.5)
    assert scores["loss"] == {1: -2.5, 2: -5.0}
    assert scores["mink"] == {1: -3.5, 2: -5.0}  # mean of the lowest half
    assert scores["minkpp"] == {1: -0.5, 2: -2.0}  # (log p + 3) / 1, lowest half


def test_bootstrap_interval_is_wide_for_five_users_and_narrow_for_many():
    rng = np.random.default_rng(0)
    small = bootstrap_auc(rng.normal(1, 1, 5), rng.normal(0, 1, 60), 500, 0.95, seed=1)
    large = bootstrap_auc(rng.normal(1, 1, 500), rng.normal(0, 1, 600), 500, 0.95, seed=1)
    assert small.low <= small.value <= small.high
    assert large.low <= large.value <= large.high
    assert (small.high - small.low) > 3 * (large.high - large.low)


def test_worst_case_auc_is_the_one_furthest_from_half():
    assert worst_case_auc({"loss": 0.6, "mink": 0.3, "minkpp": 0.5}) == 0.3


def test_paired_ratio_removes_the_users_own_difficulty():
    """The same users, one model slightly better on every one: unpaired intervals overlap, the paired one
    excludes 1. Identical per-user values give exactly 1 with no width."""
    rng = np.random.default_rng(0)
    reference = rng.uniform(0.0, 1.0, 200)
    better = reference * 1.05
    same = paired_ratio(reference, reference, 500, 0.95, seed=1)
    assert same.value == pytest.approx(1.0) and same.low == pytest.approx(1.0) and same.high == pytest.approx(1.0)
    ratio = paired_ratio(better, reference, 500, 0.95, seed=1)
    assert ratio.value == pytest.approx(1.05) and 1.0 < ratio.low <= 1.05 <= ratio.high


def test_paired_auc_difference_is_zero_for_the_same_scores_and_signed_otherwise():
    rng = np.random.default_rng(0)
    positives, negatives = rng.normal(1.0, 1.0, 30), rng.normal(0.0, 1.0, 60)
    same = paired_auc_difference(positives, negatives, positives, negatives, 300, 0.95, seed=2)
    assert same.value == 0.0 and same.low == 0.0 and same.high == 0.0
    forgotten = paired_auc_difference(positives - 1.0, negatives, positives, negatives, 300, 0.95, seed=2)
    assert forgotten.value < 0 and forgotten.high < 0
