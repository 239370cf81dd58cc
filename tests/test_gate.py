import pytest

from pipeline.gate import ATTACKS, decide
from pipeline.settings import GateSettings

GATE = GateSettings(max_ndcg_drop=0.1, alpha=0.05, power=0.8)
EPS = 1e-9


def utility(lower_bound: float, ratio: float = 1.0) -> dict:
    return {"ratio": {"value": ratio, "low": lower_bound, "high": ratio}, "lower_bound": lower_bound}


def leakage(**p_holm: float) -> dict:
    """Evidence whose attacks all have Holm p 0.5 unless given; AUC above 0.5 for a positive key."""
    tests = {}
    for attack in ATTACKS:
        p = p_holm.get(attack, 0.5)
        tests[attack] = {"auc": 0.8 if p_holm.get(attack) is not None else 0.5, "p_value": p, "p_holm": p}
    return {"tests": tests, "alpha": 0.05}


def test_pass_when_utility_is_non_inferior_and_no_attack_rejects():
    decision = decide(utility(0.95), leakage(), GATE)
    assert decision.passed and decision.label == "passed" and decision.reasons == []


FLOOR = 1 - 0.1


@pytest.mark.parametrize(("bound", "passes"), [(FLOOR, True), (FLOOR + EPS, True), (FLOOR - EPS, False)])
def test_utility_lower_bound_at_and_around_the_margin(bound, passes):
    decision = decide(utility(bound), leakage(), GATE)
    assert decision.passed is passes
    assert passes or (len(decision.reasons) == 1 and "not shown non-inferior" in decision.reasons[0])


@pytest.mark.parametrize(("p", "passes"), [(0.05, False), (0.05 - EPS, False), (0.05 + EPS, True)])
@pytest.mark.parametrize("attack", ATTACKS)
def test_each_attack_rejects_at_alpha_and_passes_just_above(attack, p, passes):
    decision = decide(utility(1.0), leakage(**{attack: p}), GATE)
    assert decision.passed is passes
    assert passes or (len(decision.reasons) == 1 and decision.reasons[0].startswith(f"{attack}:"))


def test_far_below_the_strangers_is_a_leak_too():
    evidence = leakage()
    evidence["tests"]["loss"] = {"auc": 0.1, "p_value": 0.001, "p_holm": 0.004}
    decision = decide(utility(1.0), evidence, GATE)
    assert not decision.passed and "below 0.5" in decision.reasons[0]


@pytest.mark.parametrize("attack", ATTACKS)
def test_a_nan_or_missing_attack_rejects(attack):
    nan = decide(utility(1.0), leakage(**{attack: float("nan")}), GATE)
    assert not nan.passed and nan.reasons == [f"{attack}: no p-value (nothing of the batch could be scored by it)"]
    evidence = leakage()
    del evidence["tests"][attack]
    missing = decide(utility(1.0), evidence, GATE)
    assert not missing.passed and missing.reasons == [f"no leakage measurement for the {attack} attack"]


def test_no_measurement_rejects():
    assert not decide(utility(1.0), {}, GATE).passed
    assert not decide(None, leakage(), GATE).passed
    assert not decide(utility(float("nan")), leakage(), GATE).passed


def test_an_attack_that_does_not_apply_neither_passes_nor_rejects_but_item_rank_still_must():
    evidence = leakage()
    for attack in ("loss", "mink", "minkpp"):
        evidence["tests"][attack] = {"auc": float("nan"), "p_value": float("nan"), "p_holm": float("nan"),
                                     "applies": False}  # fmt: skip
    assert decide(utility(1.0), evidence, GATE).passed
    evidence["tests"]["item_rank"] = {**evidence["tests"]["item_rank"], "p_holm": float("nan")}
    assert not decide(utility(1.0), evidence, GATE).passed
