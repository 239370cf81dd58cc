import pytest

from pipeline.gate import decide
from pipeline.settings import GateSettings

GATE = GateSettings(max_ndcg_drop=0.1, min_leakage_auc=0.4, max_leakage_auc=0.6)


def test_pass_when_utility_holds_and_every_attack_is_in_the_band():
    decision = decide(0.046, 0.05, {"loss": 0.52, "mink": 0.45, "minkpp": 0.58}, GATE)
    assert decision.passed and decision.label == "passed" and decision.reasons == []


def test_utility_drop_rejects():
    decision = decide(0.044, 0.05, {"loss": 0.5}, GATE)
    assert not decision.passed and "NDCG@10" in decision.reasons[0]


def test_leakage_on_either_side_of_the_band_rejects():
    high = decide(0.05, 0.05, {"loss": 0.7, "mink": 0.5, "minkpp": 0.5}, GATE)
    low = decide(0.05, 0.05, {"loss": 0.5, "mink": 0.2, "minkpp": 0.5}, GATE)
    assert not high.passed and "loss" in high.reasons[0]
    assert not low.passed and "mink" in low.reasons[0]


def test_no_measurement_rejects():
    assert not decide(0.05, 0.05, {}, GATE).passed
    assert not decide(float("nan"), 0.05, {"loss": 0.5}, GATE).passed


EPS = 1e-9
ALL_IN = {"loss": 0.5, "mink": 0.5, "minkpp": 0.5}


FLOOR = (1 - 0.1) * 0.05  # 0.045 in floating point, as the gate computes it


@pytest.mark.parametrize(("candidate", "passes"), [(FLOOR, True), (FLOOR + EPS, True), (FLOOR - EPS, False)])
def test_utility_at_just_above_and_just_below_the_floor(candidate, passes):
    decision = decide(candidate, 0.05, ALL_IN, GATE)
    assert decision.passed is passes
    assert passes or decision.reasons == ["NDCG@10 0.0450 is below 0.0450 = (1 - 0.1) x the champion's 0.0500"]


@pytest.mark.parametrize(
    ("value", "passes"),
    [(0.4, True), (0.4 + EPS, True), (0.4 - EPS, False), (0.6, True), (0.6 - EPS, True), (0.6 + EPS, False)],
)
@pytest.mark.parametrize("attack", ["loss", "mink", "minkpp"])
def test_each_attack_at_just_inside_and_just_outside_the_band(attack, value, passes):
    decision = decide(0.05, 0.05, {**ALL_IN, attack: value}, GATE)
    assert decision.passed is passes
    assert passes or (len(decision.reasons) == 1 and f"MIA AUC ({attack})" in decision.reasons[0])


@pytest.mark.parametrize("attack", ["loss", "mink", "minkpp"])
def test_a_nan_or_missing_attack_rejects(attack):
    nan = decide(0.05, 0.05, {**ALL_IN, attack: float("nan")}, GATE)
    assert not nan.passed and f"MIA AUC ({attack}) nan" in nan.reasons[0]
    missing = decide(0.05, 0.05, {a: v for a, v in ALL_IN.items() if a != attack}, GATE)
    assert not missing.passed and missing.reasons == [f"no leakage measurement for the {attack} attack"]


def test_nan_utility_on_either_side_rejects():
    assert not decide(0.05, float("nan"), ALL_IN, GATE).passed
    assert not decide(float("nan"), 0.05, ALL_IN, GATE).passed
