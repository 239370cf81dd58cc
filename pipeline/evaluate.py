"""Utility (NDCG@K, HR@K over the full catalogue) and leakage (membership inference AUC).

Every figure is per user first, then aggregated with a bootstrap interval: with a handful of forgotten
users an AUC is noisy, and the auditor must see how noisy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.data import FIRST_ITEM_TOKEN
from pipeline.leakage import USER_ATTACKS as ATTACKS
from pipeline.model import PositionStats


def ranks_of_targets(scores: torch.Tensor, targets: list[int], seen: list[list[int]]) -> np.ndarray:
    """1-based rank of each target item token among all items, items already seen excluded.

    Ties count against the target (a model that scores everything equal ranks it last), so a
    constant model cannot look good.
    """
    scores = scores.clone().float()
    for row, tokens in enumerate(seen):
        columns = [token - FIRST_ITEM_TOKEN for token in tokens if token >= FIRST_ITEM_TOKEN]
        if columns:
            scores[row, columns] = -torch.inf
    target_columns = torch.tensor(targets) - FIRST_ITEM_TOKEN
    target_scores = scores[torch.arange(len(targets)), target_columns].unsqueeze(1)
    others = scores >= target_scores
    others[torch.arange(len(targets)), target_columns] = False
    return (others.sum(dim=1) + 1).numpy()


def ndcg_at(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-user NDCG@k for one relevant item: 1/log2(rank+1) inside the top k, else 0."""
    return np.where(ranks <= k, 1.0 / np.log2(ranks + 1.0), 0.0)


def hit_at(ranks: np.ndarray, k: int) -> np.ndarray:
    return (ranks <= k).astype(float)


def utility_metrics(ranks: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    metrics = {}
    for k in ks:
        metrics[f"ndcg{k}"] = float(ndcg_at(ranks, k).mean()) if len(ranks) else float("nan")
        metrics[f"hr{k}"] = float(hit_at(ranks, k).mean()) if len(ranks) else float("nan")
    return metrics


def most_popular_scores(train_sequences: dict[int, list[int]], n_items: int) -> torch.Tensor:
    """MostPop: every user gets the items ranked by how often members trained on them."""
    counts = torch.zeros(n_items)
    for sequence in train_sequences.values():
        for token in sequence:
            counts[token - FIRST_ITEM_TOKEN] += 1
    return counts


def attack_scores(stats: PositionStats, mink_fraction: float) -> dict[str, dict[int, float]]:
    """Per-user membership scores, higher meaning 'more likely trained on'.

    LOSS: mean log-likelihood of the user's items. Min-K%: mean of the lowest k% log-likelihoods.
    Min-K%++: the same on log p standardised by the model's own mean and spread at that position.
    """
    standardised = (stats.log_prob - stats.mean_log_prob) / stats.std_log_prob
    scores: dict[str, dict[int, float]] = {attack: {} for attack in ATTACKS}
    order = np.argsort(stats.users, kind="stable")
    users, starts = np.unique(stats.users[order], return_index=True)
    for user, positions in zip(users, np.split(order, starts[1:]), strict=True):
        log_p = stats.log_prob[positions]
        keep = max(1, int(np.ceil(mink_fraction * len(positions))))
        scores["loss"][int(user)] = float(log_p.mean())
        scores["mink"][int(user)] = float(np.sort(log_p)[:keep].mean())
        scores["minkpp"][int(user)] = float(np.sort(standardised[positions])[:keep].mean())
    return scores


def auc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counting one half."""
    positives, negatives = np.asarray(positives, float), np.asarray(negatives, float)
    if len(positives) == 0 or len(negatives) == 0:
        return float("nan")
    greater = (positives[:, None] > negatives[None, :]).sum()
    ties = (positives[:, None] == negatives[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(positives) * len(negatives)))


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


def _tail(confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2 * 100
    return tail, 100 - tail


def bootstrap_auc(positives: np.ndarray, negatives: np.ndarray, samples: int, confidence: float, seed: int) -> Estimate:
    """AUC with a percentile bootstrap interval, resampling users within each group."""
    rng = np.random.default_rng(seed)
    positives, negatives = np.asarray(positives, float), np.asarray(negatives, float)
    draws = [auc(rng.choice(positives, len(positives)), rng.choice(negatives, len(negatives))) for _ in range(samples)]
    low, high = np.nanpercentile(draws, _tail(confidence))
    return Estimate(auc(positives, negatives), float(low), float(high))


def bootstrap_mean(values: np.ndarray, samples: int, confidence: float, seed: int) -> Estimate:
    rng = np.random.default_rng(seed)
    values = np.asarray(values, float)
    draws = rng.choice(values, (samples, len(values))).mean(axis=1)
    low, high = np.percentile(draws, _tail(confidence))
    return Estimate(float(values.mean()), float(low), float(high))


def paired_ratio(values: np.ndarray, reference: np.ndarray, samples: int, confidence: float, seed: int) -> Estimate:
    """mean(values) / mean(reference) over the same users, with a bootstrap interval that resamples users
    once for both: the pairing removes the users' own difficulty from the comparison."""
    rng = np.random.default_rng(seed)
    values, reference = np.asarray(values, float), np.asarray(reference, float)
    draws = rng.integers(0, len(values), (samples, len(values)))
    ratios = values[draws].mean(1) / np.maximum(reference[draws].mean(1), 1e-12)
    low, high = np.percentile(ratios, _tail(confidence))
    return Estimate(float(values.mean() / max(reference.mean(), 1e-12)), float(low), float(high))


def paired_auc_difference(
    positives: np.ndarray,
    negatives: np.ndarray,
    reference_positives: np.ndarray,
    reference_negatives: np.ndarray,
    samples: int,
    confidence: float,
    seed: int,
) -> Estimate:
    """AUC(model) - AUC(reference model) on the same forgotten users and non-members, resampled together."""
    rng = np.random.default_rng(seed)
    positives, negatives, reference_positives, reference_negatives = (
        np.asarray(a, float) for a in (positives, negatives, reference_positives, reference_negatives)
    )
    draws = []
    for _ in range(samples):
        pick_positive = rng.integers(0, len(positives), len(positives))
        pick_negative = rng.integers(0, len(negatives), len(negatives))
        draws.append(
            auc(positives[pick_positive], negatives[pick_negative])
            - auc(reference_positives[pick_positive], reference_negatives[pick_negative])
        )
    low, high = np.nanpercentile(draws, _tail(confidence))
    return Estimate(auc(positives, negatives) - auc(reference_positives, reference_negatives), float(low), float(high))


def membership_auc(
    scores: dict[str, dict[int, float]],
    forgotten: list[int],
    non_members: list[int],
    samples: int,
    confidence: float,
    seed: int,
) -> dict[str, Estimate]:
    """AUC of forgotten users (positives) against non-members (negatives), per attack."""
    return {
        attack: bootstrap_auc(
            np.array([per_user[user] for user in forgotten if user in per_user]),
            np.array([per_user[user] for user in non_members if user in per_user]),
            samples,
            confidence,
            seed,
        )
        for attack, per_user in scores.items()
    }


def rank_users(
    model: torch.nn.Module,
    histories: dict[int, list[int]],
    targets: dict[int, int],
    max_len: int,
    batch_size: int,
) -> dict[int, int]:
    """Rank of each user's held-out item after reading their history (seen items excluded)."""
    from pipeline.model import next_item_logits

    users = [user for user in sorted(targets) if user in histories]
    logits = next_item_logits(model, [histories[user] for user in users], max_len, batch_size)
    ranks = ranks_of_targets(logits, [targets[user] for user in users], [histories[user] for user in users])
    return dict(zip(users, ranks.tolist(), strict=True))
