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
    high = decide(0.05, 0.05, {"loss": 0.7, "mink": 0.5}, GATE)
    low = decide(0.05, 0.05, {"loss": 0.5, "mink": 0.2}, GATE)
    assert not high.passed and "loss" in high.reasons[0]
    assert not low.passed and "mink" in low.reasons[0]


def test_no_measurement_rejects():
    assert not decide(0.05, 0.05, {}, GATE).passed
    assert not decide(float("nan"), 0.05, {"loss": 0.5}, GATE).passed
