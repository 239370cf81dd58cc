import pytest

from pipeline.drift import activity_psi, compare, popularity_jsd, profile, unseen_share
from pipeline.settings import DriftSettings

LIMITS = DriftSettings(
    max_popularity_jsd=0.01, max_unseen_item_share=0.01, max_activity_psi=0.1, max_forgotten_member_share=0.05
)


def test_figures_on_known_cases():
    assert popularity_jsd({"1": 5, "2": 5}, {"1": 10, "2": 10}) == pytest.approx(0.0)
    assert popularity_jsd({"1": 1}, {"2": 1}) == pytest.approx(1.0)
    assert unseen_share({"1": 3}, {"1": 1, "2": 3}) == pytest.approx(0.75)
    assert activity_psi(list(range(1, 101)), list(range(1, 101))) == pytest.approx(0.0, abs=1e-9)
    assert activity_psi(list(range(1, 101)), [500] * 100) > 1.0


def test_no_reference_means_extract():
    report = compare(None, profile({1: [2, 3]}), LIMITS)
    assert report.extract and "no circuits" in report.reasons[0]


def test_same_data_reuses_and_a_large_deletion_extracts(snapshot):
    sequences = snapshot.sequences(("train",), snapshot.members)
    reference = profile(sequences)
    same = compare(reference, profile(sequences), LIMITS)
    assert not same.extract and same.figures["popularity_jsd"] == pytest.approx(0.0)

    kept = dict(list(sequences.items())[: int(0.8 * len(sequences))])
    drifted = compare(reference, profile(kept), LIMITS)
    assert drifted.extract
    assert drifted.figures["forgotten_member_share"] == pytest.approx(1 - len(kept) / len(sequences))
    assert any("forgotten_member_share" in reason for reason in drifted.reasons)
