"""The promotion gate: our own code, thresholds from params.yaml.

A candidate passes when
- utility is non-inferior: the one-sided (1 - alpha) paired-bootstrap lower bound of candidate / champion mean
  NDCG@10 on the same retained users is at least 1 - gate.max_ndcg_drop; and
- no attack finds the forgotten users distinguishable from strangers: H0 (exchangeable with non-members) is
  not rejected by any attack after Holm's correction at gate.alpha, in either direction (pipeline.leakage).
Every decision keeps each attack's p-value, n and minimum detectable AUC (its power), so a pass on a batch too
small to detect anything says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pipeline.leakage import ATTACKS, USER_ATTACKS
from pipeline.settings import GateSettings

__all__ = ["ATTACKS", "USER_ATTACKS", "GateDecision", "decide", "worst_case_auc"]


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reasons: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return "passed" if self.passed else "rejected"


def decide(utility: dict, leakage: dict, settings: GateSettings) -> GateDecision:
    """`utility`: components.evaluate.non_inferiority's record; `leakage`: LeakageEvidence.as_dict()."""
    reasons = []
    floor = 1.0 - settings.max_ndcg_drop
    bound = utility.get("lower_bound", float("nan")) if utility else float("nan")
    if not bound >= floor:  # NaN fails
        ratio = utility.get("ratio", {}).get("value", float("nan")) if utility else float("nan")
        reasons.append(
            f"NDCG@10 not shown non-inferior: candidate / champion {ratio:.4f}, one-sided {1 - settings.alpha:.0%} "
            f"lower bound {bound:.4f} < {floor:.4f} = 1 - {settings.max_ndcg_drop}"
        )
    tests = (leakage or {}).get("tests", {})
    if not tests:
        reasons.append("no leakage measurement: no forgotten user could be scored")
    reasons += [f"no leakage measurement for the {attack} attack" for attack in ATTACKS if attack not in tests]
    for attack, test in sorted(tests.items()):
        if not test.get("applies", True):  # e.g. the per-user attacks on a batch of interaction requests only
            continue
        p_holm = test.get("p_holm", float("nan"))
        if math.isnan(p_holm):
            reasons.append(f"{attack}: no p-value (nothing of the batch could be scored by it)")
        elif p_holm <= settings.alpha:
            side = "above" if test["auc"] > 0.5 else "below"
            reasons.append(
                f"{attack}: forgotten users distinguishable from strangers, AUC {test['auc']:.3f} {side} 0.5, "
                f"p {test['p_value']:.3g} (Holm {p_holm:.3g}) <= alpha {settings.alpha}"
            )
    return GateDecision(passed=not reasons, reasons=reasons)


def worst_case_auc(aucs: dict[str, float]) -> float:
    """The attack's AUC furthest from 0.5: one conservative figure for summaries (attacks that did not apply,
    NaN, left out)."""
    values = [value for value in aucs.values() if not math.isnan(value)]
    return max(values, key=lambda value: abs(value - 0.5)) if values else float("nan")
