"""The promotion gate: our own code, thresholds from params.yaml.

A candidate passes when ranking quality on retained users holds against the champion on the same
users, and the forgotten users look like strangers to every membership attack: inside a band around
0.5, since far below 0.5 is a leak too (they stand out by looking worse than strangers).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.settings import GateSettings

# The membership-inference attacks: pipeline.evaluate runs each, and a candidate must be measured on each to pass.
# Defined here, in a module without torch, so that the gate and the report start fast.
ATTACKS = ("loss", "mink", "minkpp")


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reasons: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return "passed" if self.passed else "rejected"


def decide(
    candidate_ndcg10: float, champion_ndcg10: float, leakage_auc: dict[str, float], settings: GateSettings
) -> GateDecision:
    reasons = []
    floor = (1.0 - settings.max_ndcg_drop) * champion_ndcg10
    if not candidate_ndcg10 >= floor:
        reasons.append(
            f"NDCG@10 {candidate_ndcg10:.4f} is below {floor:.4f} = (1 - {settings.max_ndcg_drop}) x the "
            f"champion's {champion_ndcg10:.4f}"
        )
    if not leakage_auc:
        reasons.append("no leakage measurement: no forgotten user could be scored")
    else:
        reasons += [
            f"no leakage measurement for the {attack} attack" for attack in ATTACKS if attack not in leakage_auc
        ]
    for attack, value in sorted(leakage_auc.items()):
        if not settings.min_leakage_auc <= value <= settings.max_leakage_auc:  # NaN is outside any band
            reasons.append(
                f"MIA AUC ({attack}) {value:.3f} is outside the leakage band "
                f"[{settings.min_leakage_auc}, {settings.max_leakage_auc}]"
            )
    return GateDecision(passed=not reasons, reasons=reasons)


def worst_case_auc(aucs: dict[str, float]) -> float:
    """The attack's AUC furthest from 0.5: one conservative figure for summaries."""
    return max(aucs.values(), key=lambda value: abs(value - 0.5)) if aucs else float("nan")
