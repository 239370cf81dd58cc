"""Has the retain data drifted from the data the cached circuits were extracted on?

Circuits are worth re-extracting only when the data they describe has moved. A profile is a small,
JSON-able summary of a retain set (no user ids); `compare` turns two profiles into four figures and a
decision against the thresholds in params.yaml (circuits.drift).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.settings import DriftSettings

ACTIVITY_BINS = 10


def profile(retain_sequences: dict[int, list[int]]) -> dict:
    """Item popularity, per-user activity and member count of a retain set."""
    counts: dict[int, int] = {}
    for sequence in retain_sequences.values():
        for token in sequence:
            counts[token] = counts.get(token, 0) + 1
    return {
        "item_counts": {str(token): count for token, count in sorted(counts.items())},
        "user_activity": sorted(len(sequence) for sequence in retain_sequences.values()),
        "members": len(retain_sequences),
    }


def popularity_jsd(reference: dict[str, int], current: dict[str, int]) -> float:
    """Jensen-Shannon divergence (bits, 0..1) between the two item-popularity distributions."""
    items = sorted(set(reference) | set(current))
    p = np.array([reference.get(i, 0) for i in items], float)
    q = np.array([current.get(i, 0) for i in items], float)
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        mask = a > 0
        return float((a[mask] * np.log2(a[mask] / b[mask])).sum())

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def unseen_share(reference: dict[str, int], current: dict[str, int]) -> float:
    """Share of today's interactions whose item did not occur at extraction."""
    total = sum(current.values())
    return sum(count for item, count in current.items() if item not in reference) / total if total else 0.0


def activity_psi(reference: list[int], current: list[int]) -> float:
    """Population stability index of per-user activity, on the reference's decile bins."""
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, ACTIVITY_BINS + 1)[1:-1]))
    ref = np.bincount(np.searchsorted(edges, reference, side="right"), minlength=len(edges) + 1) / len(reference)
    cur = np.bincount(np.searchsorted(edges, current, side="right"), minlength=len(edges) + 1) / len(current)
    ref, cur = np.clip(ref, 1e-4, None), np.clip(cur, 1e-4, None)
    return float(((cur - ref) * np.log(cur / ref)).sum())


@dataclass(frozen=True)
class DriftReport:
    extract: bool
    reasons: list[str]
    figures: dict[str, float]

    def as_dict(self) -> dict:
        return {"extract": self.extract, "reasons": self.reasons, "figures": self.figures}


def compare(reference: dict | None, current: dict, settings: DriftSettings) -> DriftReport:
    if reference is None:
        return DriftReport(True, ["no circuits exist for this model lineage"], {})
    figures = {
        "popularity_jsd": popularity_jsd(reference["item_counts"], current["item_counts"]),
        "unseen_item_share": unseen_share(reference["item_counts"], current["item_counts"]),
        "activity_psi": activity_psi(reference["user_activity"], current["user_activity"]),
        "forgotten_member_share": max(0.0, 1.0 - current["members"] / reference["members"]),
    }
    limits = {
        "popularity_jsd": settings.max_popularity_jsd,
        "unseen_item_share": settings.max_unseen_item_share,
        "activity_psi": settings.max_activity_psi,
        "forgotten_member_share": settings.max_forgotten_member_share,
    }
    reasons = [f"{name} {figures[name]:.4f} > {limit}" for name, limit in limits.items() if figures[name] > limit]
    return DriftReport(bool(reasons), reasons, figures)
