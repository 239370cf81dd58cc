"""Measure the champion and the candidate on the same users: utility on retained users, leakage on forgotten ones."""

from __future__ import annotations

import numpy as np

from components._common import (
    CANDIDATE_DIR,
    CHAMPION_DIR,
    batch_arguments,
    context,
    device_argument,
    entry_point,
    parser,
    write_manifest,
)
from components.split import batch_data
from pipeline.evaluate import bootstrap_mean, ndcg_at, paired_ratio, rank_users, utility_metrics
from pipeline.model import device_facts, load_model, resolve_device
from pipeline.settings import Settings
from pipeline.splits import UnlearningData
from pipeline.unlearn import LeakageProbe


def measure(model, data: UnlearningData, probe: LeakageProbe, settings: Settings) -> dict:
    config = settings.eval
    ranks = rank_users(model, data.eval_histories, data.eval_targets, settings.model.max_len, config.batch_size)
    per_user = np.array([ranks[user] for user in sorted(ranks)])
    utility = utility_metrics(per_user, config.ks)
    ndcg = ndcg_at(per_user, 10)
    interval = bootstrap_mean(ndcg, config.bootstrap_samples, config.confidence, settings.seed)
    leakage = probe.with_intervals(model, settings.seed) if data.forgotten_users else {"mia_auc": {}}
    return {**utility, "ndcg10_interval": interval.as_dict(), **leakage, "_ndcg10_per_user": ndcg}


def non_inferiority(candidate: np.ndarray, champion: np.ndarray, settings: Settings) -> dict:
    """The candidate's mean NDCG@10 over the champion's on the same users, with the one-sided (1 - alpha) lower
    bound of a paired bootstrap (users resampled once for both models), against the margin."""
    gate = settings.gate
    ratio = paired_ratio(candidate, champion, settings.eval.bootstrap_samples, 1 - 2 * gate.alpha, settings.seed)
    return {
        "ratio": ratio.as_dict(),
        "lower_bound": ratio.low,
        "level": 1 - gate.alpha,
        "margin": gate.max_ndcg_drop,
        "users": len(candidate),
    }


def main(argv: list[str] | None = None) -> dict:
    args = device_argument(batch_arguments(parser("evaluate", __doc__))).parse_args(argv)
    device = resolve_device(args.device)  # before any work: --device cuda without one is an error
    settings, home = context(args)
    _, data = batch_data(args, home, settings)
    probe = LeakageProbe(data, settings)
    before, _ = load_model(args.batch_dir / CHAMPION_DIR, device)
    after, _ = load_model(args.batch_dir / CANDIDATE_DIR, device)
    champion, candidate = measure(before, data, probe, settings), measure(after, data, probe, settings)
    utility = non_inferiority(candidate.pop("_ndcg10_per_user"), champion.pop("_ndcg10_per_user"), settings)
    return write_manifest(
        args.batch_dir / "evaluate.json",
        {
            "eval_users": len(data.eval_targets),
            "forgotten_users": len(data.forgotten_users),
            "non_members": len(data.non_members),
            "before": champion,
            "after": candidate,
            "utility": utility,
            **device_facts(after),
        },
    )


if __name__ == "__main__":
    entry_point("evaluate", main)
