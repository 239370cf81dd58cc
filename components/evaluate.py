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
from pipeline.evaluate import bootstrap_mean, ndcg_at, rank_users, utility_metrics
from pipeline.model import device_facts, load_model, resolve_device
from pipeline.settings import Settings
from pipeline.splits import UnlearningData
from pipeline.unlearn import LeakageProbe


def measure(model, data: UnlearningData, probe: LeakageProbe, settings: Settings) -> dict:
    config = settings.eval
    ranks = np.array(
        list(
            rank_users(
                model, data.eval_histories, data.eval_targets, settings.model.max_len, config.batch_size
            ).values()
        )
    )
    utility = utility_metrics(ranks, config.ks)
    interval = bootstrap_mean(ndcg_at(ranks, 10), config.bootstrap_samples, config.confidence, settings.seed)
    leakage = probe.with_intervals(model, settings.seed) if data.forgotten_users else {}
    return {**utility, "ndcg10_interval": interval.as_dict(), "mia_auc": leakage}


def main(argv: list[str] | None = None) -> dict:
    args = device_argument(batch_arguments(parser("evaluate", __doc__))).parse_args(argv)
    device = resolve_device(args.device)  # before any work: --device cuda without one is an error
    settings, home = context(args)
    _, data = batch_data(args, home, settings)
    probe = LeakageProbe(data, settings)
    before, _ = load_model(args.batch_dir / CHAMPION_DIR, device)
    after, _ = load_model(args.batch_dir / CANDIDATE_DIR, device)
    return write_manifest(
        args.batch_dir / "evaluate.json",
        {
            "eval_users": len(data.eval_targets),
            "forgotten_users": len(data.forgotten_users),
            "non_members": len(data.non_members),
            "before": measure(before, data, probe, settings),
            "after": measure(after, data, probe, settings),
            **device_facts(after),
        },
    )


if __name__ == "__main__":
    entry_point("evaluate", main)
