"""Leakage as a statistical test, calibrated at any batch size (one statistic for the gate and the stopping rule).

H0: under the candidate model the forgotten users are exchangeable with the non-members, as they would be
under a model that never saw them. Each attack gives a test of H0 with a known null distribution:

- `loss`, `mink`, `minkpp`: one score per user. The forgotten users' scores against the non-members' by the
  Mann-Whitney U test (exact for small samples, scipy). AUC = U / (n_f n_r). With one or two users these
  tests cannot reject at any effect size: their minimum detectable AUC (`mde`) says so. They score only users
  forgotten whole: a non-member's whole sequence is what a model that never saw such a user would match. A
  user with some interactions forgotten keeps the rest trained, so under H0 their forgotten positions still
  sit in trained contexts, and on retrained models these attacks put them at AUC 0.61-0.69 against
  non-members (results/calibration.md, 2026-12-06): no matched reference, so they do not apply to that user.
  When a batch has no user forgotten whole they do not apply at all (`applies` False, outside Holm's family).
- `item_rank`: one figure per scored position. Each forgotten position's log p(item) is ranked among the
  non-members' positions on the same item, so the item's popularity drops out and, under H0, the position's
  mid-rank percentile is uniform with a known variance. A batch's statistic is the mean percentile (an AUC
  of positions against same-item strangers); its null spread is the independent-position variance times a
  design effect measured on the non-members themselves (each ranked against the other non-members, leaving
  itself out), which absorbs the correlation between one user's positions. A user with 50 scored positions
  gives this test real power where the per-user tests have none.

The attacks are combined by Holm's step-down correction at the family-wise level alpha: the gate finds a
leak when any Holm-adjusted p-value is at most alpha, in either direction (far below the strangers is a leak
too). The stopping rule reads the same tests' standardised deviations `z`: it drives every attack to within
a tolerance of the null centre in that attack's own noise (pipeline.unlearn).

numpy, pandas and scipy only: the gate and the audit import this without torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats

USER_ATTACKS = ("loss", "mink", "minkpp")
ATTACKS = (*USER_ATTACKS, "item_rank")
# What the test is, for the fingerprints of long runs that record its verdicts (calibration, benchmark rows):
# a change to the test's definition must not be mixed into one result with rows under the old one.
TEST_VERSION = "2026-12-06.2: user attacks on whole users only; item_rank on same-item non-member positions"


@dataclass(frozen=True)
class AttackTest:
    """One attack's test of H0 on one batch."""

    attack: str
    auc: float  # P(a forgotten score exceeds a reference score), ties one half; item_rank: mean percentile
    null_sd: float  # the standard deviation of `auc` under H0
    z: float  # (auc - 0.5) / null_sd
    p_value: float  # two-sided
    n_forgotten: int  # users (user-level attacks) or scored positions with a reference (item_rank)
    n_reference: int  # non-member users, or non-member positions on the forgotten positions' items
    mde: float | None  # the smallest AUC above 0.5 detected with the configured power; None: none is
    p_holm: float = float("nan")  # Holm-adjusted across the batch's attacks that apply
    applies: bool = True  # False: the batch has nothing this attack can score against a matched reference

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Positions:
    """Per scored position: user, item token, log p(item). What item_rank needs."""

    users: np.ndarray
    items: np.ndarray
    log_prob: np.ndarray


def upper_quantile(tail: float) -> float:
    """z with P(Z > z) = tail, exact for tiny tails too (1 - tail would round to 1)."""
    return float(stats.norm.isf(tail))


def norm_quantile(level: float) -> float:
    return float(stats.norm.ppf(level))


def minimum_detectable_auc(n_forgotten: int, n_reference: int, alpha: float, power: float) -> float | None:
    """The smallest AUC that a two-sided Mann-Whitney test at `alpha` detects with probability `power`
    (normal approximation; Hanley & McNeil's variance under the alternative). None when no AUC up to 1 is."""
    if n_forgotten < 1 or n_reference < 1:
        return None
    n1, n2 = n_forgotten, n_reference
    null_sd = math.sqrt((n1 + n2 + 1) / (12 * n1 * n2))
    z_alpha, z_power = upper_quantile(alpha / 2), norm_quantile(power)

    def margin(theta: float) -> float:
        q1, q2 = theta / (2 - theta), 2 * theta**2 / (1 + theta)
        variance = (theta * (1 - theta) + (n1 - 1) * (q1 - theta**2) + (n2 - 1) * (q2 - theta**2)) / (n1 * n2)
        return theta - 0.5 - z_alpha * null_sd - z_power * math.sqrt(max(variance, 0.0))

    if margin(1.0) < 0:
        return None
    low, high = 0.5, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if margin(middle) < 0 else (low, middle)
    return high


def user_level_test(
    attack: str, forgotten: np.ndarray, reference: np.ndarray, alpha: float, power: float
) -> AttackTest:
    forgotten, reference = np.asarray(forgotten, float), np.asarray(reference, float)
    n1, n2 = len(forgotten), len(reference)
    if n1 == 0 or n2 == 0:
        return AttackTest(attack, float("nan"), float("nan"), float("nan"), float("nan"), n1, n2, None)
    result = stats.mannwhitneyu(forgotten, reference, alternative="two-sided", method="auto")
    value, null_sd = float(result.statistic) / (n1 * n2), math.sqrt((n1 + n2 + 1) / (12 * n1 * n2))
    mde = minimum_detectable_auc(n1, n2, alpha, power)
    return AttackTest(attack, value, null_sd, (value - 0.5) / null_sd, float(result.pvalue), n1, n2, mde)


def _midranks(values: np.ndarray, sorted_reference: np.ndarray) -> np.ndarray:
    """Mid-rank of each value among the reference and itself: 1 + #smaller + #equal / 2."""
    less = np.searchsorted(sorted_reference, values, side="left")
    equal = np.searchsorted(sorted_reference, values, side="right") - less
    return 1.0 + less + 0.5 * equal


def _percentile_variance(k: np.ndarray) -> np.ndarray:
    """Variance of (rank - 1/2) / (k + 1) when the rank is uniform on 1..k+1 (k references)."""
    return ((k + 1.0) ** 2 - 1.0) / (12.0 * (k + 1.0) ** 2)


def item_percentiles(forgotten: Positions, reference: Positions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each forgotten position's percentile among the reference positions on its item, its null variance, and
    the number of references; positions whose item no reference position holds are left out (k = 0)."""
    order = np.lexsort((reference.log_prob, reference.items))
    items, log_prob = reference.items[order], reference.log_prob[order]
    starts = np.searchsorted(items, forgotten.items, side="left")
    ends = np.searchsorted(items, forgotten.items, side="right")
    percentile, variance, counts = np.full(len(starts), np.nan), np.zeros(len(starts)), ends - starts
    for item in np.unique(forgotten.items[counts > 0]):
        at = np.flatnonzero(forgotten.items == item)
        start, end = starts[at[0]], ends[at[0]]
        ranks = _midranks(forgotten.log_prob[at], log_prob[start:end])
        percentile[at] = (ranks - 0.5) / (end - start + 1)
        variance[at] = _percentile_variance(np.full(len(at), end - start))
    return percentile, variance, counts


def reference_percentiles(reference: Positions) -> tuple[np.ndarray, np.ndarray]:
    """Each reference position ranked among the *other* reference users' positions on the same item (and
    itself): the null distribution that the design effect is measured on. The mid-rank among others and
    itself is the mid-rank in the item's block less that among the user's own positions there, plus one."""
    frame = pd.DataFrame({"user": reference.users, "item": reference.items, "log_prob": reference.log_prob})
    by_item, by_own = frame.groupby("item").log_prob, frame.groupby(["item", "user"]).log_prob
    others = (by_item.transform("size") - by_own.transform("size")).to_numpy()
    rank = (by_item.rank(method="average") - by_own.rank(method="average") + 1).to_numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        percentile = np.where(others > 0, (rank - 0.5) / (others + 1), np.nan)
    return percentile, np.where(others > 0, _percentile_variance(others), 0.0)


def design_effect(users: np.ndarray, percentile: np.ndarray, variance: np.ndarray) -> float:
    """Observed variance of users' summed percentile deviations over the independent-position variance, at
    least 1: how much one user's positions move together."""
    keep = ~np.isnan(percentile)
    if not keep.any():
        return 1.0
    users, deviation, variance = users[keep], percentile[keep] - 0.5, variance[keep]
    _, index = np.unique(users, return_inverse=True)
    sums, variances = np.bincount(index, deviation), np.bincount(index, variance)
    return max(1.0, float((sums**2).sum() / max(variances.sum(), 1e-12)))


@dataclass(frozen=True)
class ItemRankSummary:
    """What item_rank computed, per user too (for the report's histograms and the ledger's evidence)."""

    test: AttackTest
    design_effect: float
    forgotten_users: dict[int, float]  # user -> mean percentile
    reference_users: dict[int, float]
    forgotten_user_z: dict[int, dict]  # user -> {"z": the user's own standardised deviation, "positions": m}


def _user_means(users: np.ndarray, percentile: np.ndarray) -> dict[int, float]:
    keep = ~np.isnan(percentile)
    out: dict[int, list[float]] = {}
    for user, value in zip(users[keep].tolist(), percentile[keep].tolist(), strict=True):
        out.setdefault(int(user), []).append(value)
    return {user: float(np.mean(values)) for user, values in sorted(out.items())}


def item_rank_test(forgotten: Positions, reference: Positions, alpha: float, power: float) -> ItemRankSummary:
    percentile, variance, counts = item_percentiles(forgotten, reference)
    ref_percentile, ref_variance = reference_percentiles(reference)
    effect = design_effect(reference.users, ref_percentile, ref_variance)
    used = ~np.isnan(percentile)
    n, n_reference = int(used.sum()), int(np.isin(reference.items, np.unique(forgotten.items[used])).sum())
    forgotten_users = _user_means(forgotten.users, percentile)
    reference_users = _user_means(reference.users, ref_percentile)
    per_user = {}
    for user in np.unique(forgotten.users[used]):
        mine = used & (forgotten.users == user)
        deviation, spread_u = (percentile[mine] - 0.5).sum(), math.sqrt(effect * variance[mine].sum())
        per_user[int(user)] = {"z": float(deviation / spread_u), "positions": int(mine.sum())}
    if n == 0:
        test = AttackTest("item_rank", float("nan"), float("nan"), float("nan"), float("nan"), 0, n_reference, None)
        return ItemRankSummary(test, effect, forgotten_users, reference_users, per_user)
    spread = math.sqrt(effect * variance[used].sum())
    z = float((percentile[used] - 0.5).sum() / spread)
    mde = 0.5 + (upper_quantile(alpha / 2) + norm_quantile(power)) * spread / n
    test = AttackTest(
        "item_rank",
        float(percentile[used].mean()),
        spread / n,
        z,
        float(2 * stats.norm.sf(abs(z))),
        n,
        n_reference,
        mde if mde <= 1.0 else None,
    )
    return ItemRankSummary(test, effect, forgotten_users, reference_users, per_user)


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjusted p-values (NaN stays NaN and counts as a test)."""
    m = len(p_values)
    ordered = sorted(p_values.items(), key=lambda kv: (math.isnan(kv[1]), kv[1]))
    adjusted, running = {}, 0.0
    for position, (name, p) in enumerate(ordered):
        if math.isnan(p):
            adjusted[name] = float("nan")
            continue
        running = max(running, min(1.0, (m - position) * p))
        adjusted[name] = running
    return adjusted


@dataclass(frozen=True)
class LeakageEvidence:
    """Every attack's test on one batch, Holm-adjusted, and the per-user figures behind them."""

    tests: dict[str, AttackTest]
    alpha: float
    design_effect: float
    user_scores: dict[str, dict[str, dict[int, float]]]  # attack -> {"forgotten"|"reference": {user: score}}
    user_z: dict[int, dict]  # forgotten user -> item_rank's z for that user alone, and its positions

    @property
    def leak(self) -> bool:
        """H0 rejected by some attack that applies (a NaN p-value is no evidence of forgetting, so it counts as
        a leak)."""
        return any(not test.p_holm > self.alpha for test in self.tests.values() if test.applies)

    def worst_z(self) -> float:
        """The largest |z| among the attacks: how far, in its own noise, the furthest attack is from H0."""
        values = [abs(t.z) for t in self.tests.values() if t.applies and not math.isnan(t.z)]
        return max(values) if values else float("inf")

    def aucs(self) -> dict[str, float]:
        """Each attack that applies: its AUC."""
        return {attack: test.auc for attack, test in self.tests.items() if test.applies}

    def z(self) -> dict[str, float]:
        """Each attack that applies: its z (what the stopping rule reads)."""
        return {attack: test.z for attack, test in self.tests.items() if test.applies}

    def as_dict(self) -> dict:
        return {
            "alpha": self.alpha,
            "correction": "holm",
            "design_effect": self.design_effect,
            "leak": self.leak,
            "tests": {attack: test.as_dict() for attack, test in self.tests.items()},
        }


def leakage_evidence(
    user_scores: dict[str, dict[int, float]],
    whole_users: list[int],
    reference_users: list[int],
    forgotten_positions: Positions,
    reference_positions: Positions,
    alpha: float,
    power: float,
) -> LeakageEvidence:
    """Run every attack that applies at the per-attack level Holm gives the smallest p-value (alpha / #attacks
    that apply, for the `mde`) and adjust their p-values together. `whole_users`: the forgotten users whose
    every interaction is forgotten, the only ones the per-user attacks score; item_rank scores every forgotten
    position."""
    applying = len(ATTACKS) if whole_users else 1
    each = alpha / applying
    tests, per_user = {}, {}
    for attack in USER_ATTACKS:
        scores = user_scores[attack]
        forgotten = {u: scores[u] for u in whole_users if u in scores}
        reference = {u: scores[u] for u in reference_users if u in scores}
        test = user_level_test(
            attack, np.array(list(forgotten.values())), np.array(list(reference.values())), each, power
        )
        tests[attack] = test if whole_users else AttackTest(**{**test.as_dict(), "applies": False})
        per_user[attack] = {"forgotten": forgotten, "reference": reference}
    ranked = item_rank_test(forgotten_positions, reference_positions, each, power)
    tests["item_rank"] = ranked.test
    per_user["item_rank"] = {"forgotten": ranked.forgotten_users, "reference": ranked.reference_users}
    adjusted = holm({attack: test.p_value for attack, test in tests.items() if test.applies})
    tests = {
        attack: AttackTest(**{**test.as_dict(), "p_holm": adjusted.get(attack, float("nan"))})
        for attack, test in tests.items()
    }
    return LeakageEvidence(tests, alpha, ranked.design_effect, per_user, ranked.forgotten_user_z)
