"""Calibrate the gate's leakage test on models that never saw the users, and measure its power before unlearning.

For each seed of calibration.seeds and each scope (whole users; bench.interaction_item_share of each user's
items), a pool of calibration.pool_rate of the members is drawn and the base recipe is retrained from
scratch without it. The pool is cut into disjoint batches of calibration.batch_sizes (and the whole pool is
one more batch). Each batch is tested as the gate would test it:
- on the retrained model (it never saw them: H0 holds), where the gate must pass in at least 1 - alpha of the
  batches, within the binomial interval;
- on the base model (it trained on them), where the detection rate by batch size is the test's power curve.

Then the stopping rule on small batches: the pool's batches of one and two users, and a held-out-style batch
(two whole users and one interaction request), are unlearned from the base with the nightly's settings; each row
keeps item_rank's z before any update and at the kept checkpoint, and the gate's verdict there.

Each (seed, scope) writes its rows to calibration_rows.jsonl as it finishes (pipeline.progress.RowLog, under a
fingerprint of the params, the base weights and the test's definition); a rerun skips what is there and refuses
a file written under another fingerprint. Then calibration.json, calibration.md and calibration.png are written
from all rows.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import numpy as np
from scipy import stats

from components._common import context, device_argument, entry_point, parser
from components.bench import base_provenance
from components.train import ensure_base_model
from pipeline.bench import Setting, deletion_requests, run_method
from pipeline.data import read_snapshot
from pipeline.jsonsafe import plain_numbers
from pipeline.leakage import ATTACKS, TEST_VERSION
from pipeline.model import load_model, resolve_device
from pipeline.progress import RowLog
from pipeline.splits import build_split, unlearning_data
from pipeline.unlearn import CENTRE_TARGET, LeakageProbe, run_unlearning

ROWS = "calibration_rows.jsonl"


def batches(users: list[int], sizes: tuple[int, ...]) -> list[list[int]]:
    """Disjoint batches of the given sizes, in order, while the pool lasts; then the whole pool."""
    out, start = [], 0
    for size in sizes:
        if start + size > len(users):
            break
        out.append(users[start : start + size])
        start += size
    return [*out, list(users)]


def batch_row(model, snapshot, requests, settings, keys: dict) -> dict:
    """The gate's leakage test on one batch under one model, as a row."""
    data = unlearning_data(snapshot, build_split(snapshot, requests))
    evidence = LeakageProbe(data, settings).evidence(model)
    return {
        **keys,
        "users": len(data.forgotten_users),
        "leak": evidence.leak,
        "design_effect": evidence.design_effect,
        **{f"{key}_{attack}": getattr(test, key) for attack, test in evidence.tests.items()
           for key in ("auc", "z", "p_value", "p_holm", "mde", "n_forgotten", "n_reference", "applies")},
    }  # fmt: skip


def calibrate_pool(base, snapshot, settings, seed: int, scope: str) -> list[dict]:
    config = settings.calibration
    share = settings.bench.interaction_item_share if scope == "interactions" else 1.0
    requests = deletion_requests(snapshot, Setting(scope, config.pool_rate, share), seed)
    data = unlearning_data(snapshot, build_split(snapshot, requests))
    seeded = settings.model_copy(update={"seed": seed})
    started = time.perf_counter()
    retrained, *_ = run_method("retrain", base, data, seeded)
    wall = time.perf_counter() - started
    by_user = {request.user_id: request for request in requests}
    rows = []
    for batch in batches(sorted(by_user), config.batch_sizes):
        chosen = [by_user[user] for user in batch]
        for model_name, model in (("retrained", retrained), ("base", base)):
            keys = {"seed": seed, "scope": scope, "model": model_name}
            rows.append(batch_row(model, snapshot, chosen, settings, keys))
    return [{**row, "retrain_wall_s": wall} for row in rows]


def stopping_row(base, snapshot, requests, settings, keys: dict) -> dict:
    """Unlearn one small batch from the base with the nightly's settings; item_rank's z before and after."""
    data = unlearning_data(snapshot, build_split(snapshot, requests))
    probe = LeakageProbe(data, settings)
    before = probe.evidence(base)
    model = copy.deepcopy(base)
    result = run_unlearning(model, data, settings, progress=False)
    after = probe.evidence(model)
    return {
        **keys,
        "users": len(data.forgotten_users),
        "requests": len(requests),
        "z_before_item_rank": before.tests["item_rank"].z,
        "auc_before_item_rank": before.tests["item_rank"].auc,
        **{f"z_after_{a}": t.z for a, t in after.tests.items()},
        **{f"auc_after_{a}": t.auc for a, t in after.tests.items()},
        "positions": after.tests["item_rank"].n_forgotten,
        "steps": result.steps,
        "best_step": result.best_step,
        "stopped": result.stopped,
        "leak_after": after.leak,
        "p_holm_after": {a: t.p_holm for a, t in after.tests.items()},
    }


def stopping_rows(base, snapshot, settings, seed: int) -> list[dict]:
    """Batches of one and two whole users, one interaction request, and the held-out-style mix."""
    config, share = settings.calibration, settings.bench.interaction_item_share
    users = deletion_requests(snapshot, Setting("user", config.pool_rate), seed + 1000)
    items = deletion_requests(snapshot, Setting("interactions", config.pool_rate, share), seed + 2000)
    batches = {"1 user": users[:1], "2 users": users[1:3], "1 interaction request": items[:1],
               "held-out style: 2 users + 1 interaction request": [*users[3:5], items[1]]}  # fmt: skip
    return [
        stopping_row(base, snapshot, requests, settings, {"seed": seed, "model": "unlearned", "batch": name})
        for name, requests in batches.items()
    ]


def binomial(successes: int, trials: int, confidence: float) -> dict:
    if trials == 0:
        return {"rate": None, "low": None, "high": None, "n": 0}
    interval = stats.binomtest(successes, trials).proportion_ci(confidence, method="exact")
    return {"rate": successes / trials, "low": interval.low, "high": interval.high, "n": trials}


def summarise(rows: list[dict], settings) -> dict:
    alpha, confidence = settings.gate.alpha, settings.eval.confidence
    stops = [r for r in rows if r["model"] == "unlearned"]
    rows = [r for r in rows if r["model"] != "unlearned"]
    null = [r for r in rows if r["model"] == "retrained"]
    passes = binomial(sum(not r["leak"] for r in null), len(null), confidence)
    by_scope = {}
    for scope in sorted({r["scope"] for r in null}):
        at = [r for r in null if r["scope"] == scope]
        by_scope[scope] = binomial(sum(not r["leak"] for r in at), len(at), confidence)
    per_attack = {}
    for attack in ATTACKS:  # over the batches it applies to (the per-user attacks: batches with whole users)
        applied = [r for r in null if r.get(f"applies_{attack}", True)]
        per_attack[attack] = binomial(sum(r[f"p_value_{attack}"] <= alpha / len(ATTACKS) for r in applied),
                                      len(applied), confidence)  # fmt: skip
    power = {}
    for scope in sorted({r["scope"] for r in rows}):
        for size in sorted({r["users"] for r in rows if r["scope"] == scope}):
            at = [r for r in rows if r["model"] == "base" and r["scope"] == scope and r["users"] == size]
            detected = binomial(sum(r["leak"] for r in at), len(at), confidence)
            power[f"{scope}:{size}"] = {"scope": scope, "users": size, **detected}
    big = [r for r in rows if r["model"] == "base" and r["users"] >= 5]
    return {
        "alpha": alpha,
        "batches_null": len(null),
        "pass_rate_null": passes,
        "pass_rate_null_by_scope": by_scope,
        "holds": passes["n"] >= 60 and passes["high"] is not None and passes["high"] >= 1 - alpha,
        "rejections_per_attack_null_at_alpha_over_attacks": per_attack,
        "power_curve": list(power.values()),
        "detection_rate_5_or_more": binomial(sum(r["leak"] for r in big), len(big), confidence),
        "tolerance_z": settings.unlearn.stop_tolerance_z,
        "stopping": [
            {
                k: r[k]
                for k in (
                    "seed",
                    "batch",
                    "users",
                    "positions",
                    "z_before_item_rank",
                    "auc_before_item_rank",
                    "z_after_item_rank",
                    "auc_after_item_rank",
                    "auc_after_loss",
                    "steps",
                    "best_step",
                    "stopped",
                    "leak_after",
                )
            }
            for r in stops
        ],  # fmt: skip
    }


def markdown(summary: dict) -> str:
    def figure(value) -> str:  # n/a: LOSS does not apply to a batch with no user forgotten whole
        return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"

    def rate(entry: dict) -> str:
        if entry["rate"] is None:
            return "none"
        return f"{entry['rate']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}] of {entry['n']}"

    lines = [
        "# Calibration of the gate's leakage test",
        "",
        f"Retrained models (they never saw the batch): the gate passed {rate(summary['pass_rate_null'])} batches "
        f"(exact 95% interval); it must pass at least 1 - alpha = {1 - summary['alpha']:.2f} within that interval: "
        f"**{'holds' if summary['holds'] else 'does not hold'}**.",
        "",
        "| scope | pass rate on retrained models |",
        "|---|---|",
        *(f"| {scope} | {rate(entry)} |" for scope, entry in summary["pass_rate_null_by_scope"].items()),
        "",
        "Each attack alone, rejections at alpha / 4 on retrained models, over the batches it applies to (the "
        "per-user attacks: batches with a user forgotten whole):",
        "",
        "| attack | rejection rate |",
        "|---|---|",
        *(f"| {a} | {rate(e)} |" for a, e in summary["rejections_per_attack_null_at_alpha_over_attacks"].items()),
        "",
        "Power curve: batches detected on the model before unlearning (it trained on them):",
        "",
        "| scope | users | detected |",
        "|---|---|---|",
        *(f"| {e['scope']} | {e['users']} | {rate(e)} |" for e in summary["power_curve"]),
        "",
        f"Batches of 5 or more users detected: {rate(summary['detection_rate_5_or_more'])} (must be >= 0.90).",
        "",
        "![calibration](calibration.png)",
        "",
        f"The stopping rule on small batches (unlearned from the base with the nightly's settings; tolerance "
        f"|z| <= {summary['tolerance_z']}): item_rank's z and AUC before any update and at the kept checkpoint. "
        "Target: `tolerance` where the test saw the untouched model's memory (every attack to within the "
        "tolerance); `centre` where it did not (no evidence either way: every attack to or below the centre).",
        "",
        "| seed | batch | positions | z before | AUC before | target | z kept | AUC kept | LOSS AUC kept "
        "| kept step / steps | gate |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *(
            f"| {r['seed']} | {r['batch']} | {r['positions']} | {r['z_before_item_rank']:.1f} | "
            f"{r['auc_before_item_rank']:.3f} | {'centre' if CENTRE_TARGET in r['stopped'] else 'tolerance'} | "
            f"{r['z_after_item_rank']:.2f} | {r['auc_after_item_rank']:.3f} | "
            f"{figure(r['auc_after_loss'])} | {r['best_step']} / {r['steps']} | "
            f"{'leak' if r['leak_after'] else 'pass'} |"
            for r in summary["stopping"]
        ),
        "",
    ]
    return "\n".join(lines)


def plot(rows: list[dict], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    null = [r for r in rows if r["model"] == "retrained"]
    for attack in ATTACKS:
        values = np.sort([r[f"p_value_{attack}"] for r in null if not np.isnan(r[f"p_value_{attack}"])])
        if len(values):
            left.plot(np.arange(1, len(values) + 1) / (len(values) + 1), values, marker=".", label=attack)
    left.plot([0, 1], [0, 1], color="grey", linewidth=0.8)
    left.set(xlabel="uniform quantile", ylabel="p-value", title="p-values on retrained models (H0 true)")
    left.legend(fontsize=8)
    for scope in sorted({e["scope"] for e in summary["power_curve"]}):
        curve = [e for e in summary["power_curve"] if e["scope"] == scope and e["rate"] is not None]
        right.plot([e["users"] for e in curve], [e["rate"] for e in curve], marker="o", label=scope)
    right.axhline(0.9, color="grey", linewidth=0.8, linestyle="--")
    right.set(xscale="log", xlabel="users in the batch", ylabel="detection rate", ylim=(0, 1.05),
              title="power before unlearning")  # fmt: skip
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    cli = device_argument(parser("calibrate", __doc__))
    cli.add_argument("--out", type=Path, default=Path("results"), help="results folder (default: ./results)")
    args = cli.parse_args(argv)
    device = resolve_device(args.device)
    settings, home = context(args)
    base_dir = ensure_base_model(args.params, home, settings)
    base, meta = load_model(base_dir, device)
    snapshot = read_snapshot(home.snapshot)
    args.out.mkdir(parents=True, exist_ok=True)
    provenance = base_provenance(base_dir, meta, base)
    identity = {"settings": settings.model_dump(mode="json"), "leakage_test": TEST_VERSION,
                **{key: provenance[key] for key in ("weights_sha256", "snapshot_hash", "machine")}}  # fmt: skip
    log = RowLog(args.out / ROWS, identity)
    seeds = settings.calibration.seeds
    units = [(f"{seed}:{scope}", seed, scope) for seed in seeds for scope in ("user", "interactions")]
    units += [(f"{seed}:stopping", seed, None) for seed in seeds]
    for key, seed, scope in units:
        if key in log.done:
            continue
        if scope is None:
            print(f"calibrate: seed {seed}, the stopping rule on small batches", flush=True)
            log.add(key, {"rows": stopping_rows(base, snapshot, settings, seed)})
            continue
        print(f"calibrate: seed {seed}, {scope}: retraining without the pool", flush=True)
        log.add(key, {"rows": calibrate_pool(base, snapshot, settings, seed, scope)})
        null = [r for r in log.done[key]["rows"] if r["model"] == "retrained"]
        print(f"  passed {sum(not r['leak'] for r in null)} of {len(null)} on the retrained model", flush=True)
    rows = [row for key, _, _ in units for row in log.done[key]["rows"]]
    summary = summarise(rows, settings)
    (args.out / "calibration.json").write_text(json.dumps(plain_numbers({"summary": summary, "rows": rows}), indent=2))
    (args.out / "calibration.md").write_text(markdown(summary))
    plot(rows, summary, args.out / "calibration.png")
    print(markdown(summary))
    return summary


if __name__ == "__main__":
    entry_point("calibrate", main)
