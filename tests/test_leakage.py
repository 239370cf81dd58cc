"""The gate's test (pipeline/leakage.py) on data whose truth is known: calibrated under H0, powerful under H1."""

import math

import numpy as np
import pytest

from pipeline.leakage import (
    Positions,
    holm,
    item_rank_test,
    leakage_evidence,
    minimum_detectable_auc,
    user_level_test,
)


def test_holm_on_a_worked_example():
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.5})
    # sorted 0.01, 0.03, 0.04, 0.5 times 4, 3, 2, 1, then running maxima: 0.04, 0.09, 0.09 (not 0.08), 0.5
    assert adjusted == pytest.approx({"a": 0.04, "c": 0.09, "b": 0.09, "d": 0.5})
    assert math.isnan(holm({"a": float("nan"), "b": 0.01})["a"])


def test_one_user_cannot_reject_by_rank_and_the_power_says_so():
    reference = np.arange(67, dtype=float)
    extreme = user_level_test("loss", np.array([1000.0]), reference, alpha=0.05 / 4, power=0.8)
    assert extreme.auc == 1.0
    assert extreme.p_value == pytest.approx(2 / 68)  # exact: the smallest two-sided p one user can reach
    assert extreme.p_value > 0.05 / 4 and extreme.mde is None


def test_minimum_detectable_auc_has_its_power_by_simulation():
    n1, n2, alpha = 30, 67, 0.05 / 4
    mde = minimum_detectable_auc(n1, n2, alpha, 0.8)
    assert 0.6 < mde < 0.9
    shift = math.sqrt(2) * float(__import__("scipy").stats.norm.ppf(mde))  # normals: AUC = Phi(shift / sqrt 2)
    rng = np.random.default_rng(0)
    detected = [
        user_level_test("loss", rng.normal(shift, 1, n1), rng.normal(0, 1, n2), alpha, 0.8).p_value <= alpha
        for _ in range(600)
    ]
    assert abs(np.mean(detected) - 0.8) < 0.06  # 600 draws: sd of the rate 0.016


def synthetic(rng, n_reference=67, forgotten_sizes=(5,), positions=60, items=80, shift=0.0, user_sd=0.3):
    """Positions whose log p = item effect + user effect (shared by a user's positions) + noise; forgotten users
    are shifted by `shift`. Users and items are exchangeable, as under H0 with shift 0."""
    item_effect = rng.normal(0, 1, items)

    def user_positions(user, delta):
        chosen = rng.choice(items, positions, replace=False)
        values = item_effect[chosen] + rng.normal(0, user_sd) + rng.normal(0, 1, positions) + delta
        return np.full(positions, user), chosen, values

    reference = [user_positions(u, 0.0) for u in range(n_reference)]
    forgotten = [user_positions(1000 + u, shift) for u in range(sum(forgotten_sizes))]
    pack = lambda parts: Positions(*(np.concatenate(column) for column in zip(*parts, strict=True)))  # noqa: E731
    return pack(forgotten), pack(reference)


def test_item_rank_is_calibrated_under_h0_with_correlated_positions():
    rng = np.random.default_rng(1)
    rejections = []
    for _ in range(300):
        forgotten, reference = synthetic(rng, forgotten_sizes=(int(rng.integers(1, 6)),))
        rejections.append(item_rank_test(forgotten, reference, 0.05, 0.8).test.p_value <= 0.05)
    # 300 batches: the exact 99% binomial interval of a 0.05 rate is about [0.023, 0.089]
    assert 0.02 <= np.mean(rejections) <= 0.09


def test_without_the_design_effect_the_correlated_positions_would_reject_too_often():
    rng = np.random.default_rng(2)
    summary = item_rank_test(*synthetic(rng, user_sd=0.6), 0.05, 0.8)
    assert summary.design_effect > 2  # the shared user effect is measured on the strangers themselves


def test_item_rank_gives_one_user_real_power_where_the_user_level_tests_have_none():
    rng = np.random.default_rng(3)
    detected = []
    for _ in range(100):
        forgotten, reference = synthetic(rng, forgotten_sizes=(1,), shift=1.2)
        summary = item_rank_test(forgotten, reference, 0.05 / 4, 0.8)
        detected.append(summary.test.p_value <= 0.05 / 4)
        assert summary.test.mde is not None and summary.test.auc > 0.5
    assert np.mean(detected) >= 0.8


def test_the_evidence_combines_every_attack_and_finds_a_leak_below_the_strangers_too():
    rng = np.random.default_rng(4)
    forgotten, reference = synthetic(rng, forgotten_sizes=(20,), shift=-1.0)
    users_f, users_r = sorted(set(forgotten.users.tolist())), sorted(set(reference.users.tolist()))
    mean = lambda pos, users: {u: float(pos.log_prob[pos.users == u].mean()) for u in users}  # noqa: E731
    scores = {a: {**mean(reference, users_r), **mean(forgotten, users_f)} for a in ("loss", "mink", "minkpp")}
    evidence = leakage_evidence(scores, users_f, users_r, forgotten, reference, 0.05, 0.8)
    assert evidence.leak
    assert all(test.auc < 0.5 and test.p_holm <= 0.05 for test in evidence.tests.values())
    assert evidence.worst_z() > 3
    null_forgotten, null_reference = synthetic(rng, forgotten_sizes=(20,), shift=0.0)
    assert set(evidence.as_dict()["tests"]) == {"loss", "mink", "minkpp", "item_rank"}
    assert item_rank_test(null_forgotten, null_reference, 0.05, 0.8).test.p_value > 0.001


def test_per_user_attacks_score_only_users_forgotten_whole_and_do_not_apply_without_them():
    """A partly forgotten user keeps trained contexts, so a non-member's whole sequence is no matched
    reference: the per-user attacks leave them out. Here their per-user scores sit far above the strangers
    (as retrained models put them, results/calibration.md) while their positions are exchangeable."""
    rng = np.random.default_rng(5)
    forgotten, reference = synthetic(rng, forgotten_sizes=(12,), shift=0.0)
    users_f, users_r = sorted(set(forgotten.users.tolist())), sorted(set(reference.users.tolist()))
    scores = {a: {**{u: 0.0 for u in users_r}, **{u: 10.0 for u in users_f}} for a in ("loss", "mink", "minkpp")}
    as_whole = leakage_evidence(scores, users_f, users_r, forgotten, reference, 0.05, 0.8)
    assert as_whole.leak and as_whole.tests["loss"].auc == 1.0  # scored as whole users, they would be a leak
    partial = leakage_evidence(scores, [], users_r, forgotten, reference, 0.05, 0.8)
    assert not partial.leak, partial.as_dict()
    assert [a for a, t in partial.tests.items() if t.applies] == ["item_rank"]
    assert set(partial.z()) == {"item_rank"} and partial.worst_z() == abs(partial.tests["item_rank"].z)
    # Holm's family is the attacks that apply: item_rank alone keeps its raw p-value
    assert partial.tests["item_rank"].p_holm == pytest.approx(partial.tests["item_rank"].p_value)
    assert as_whole.tests["item_rank"].p_holm >= as_whole.tests["item_rank"].p_value
