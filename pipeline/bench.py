"""The benchmark: every unlearning method against retraining, on the same users and items.

Per (scope, deletion rate, seed): choose the forgotten users, retrain from scratch on the retain set
(the gold standard), then run every method from the same base model. Comparisons are paired: the same
retained users' test items for utility, the same forgotten users and non-members for leakage, the same
prefixes for the divergence to the retrained model.
"""

from __future__ import annotations

import copy
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import psutil
import torch

from pipeline.circuits import Circuits, circuits_for, faithfulness, jaccard, retain_sample
from pipeline.data import FIRST_ITEM_TOKEN, Snapshot
from pipeline.evaluate import (
    ATTACKS,
    auc,
    bootstrap_auc,
    bootstrap_mean,
    ndcg_at,
    paired_auc_difference,
    paired_ratio,
    rank_users,
    utility_metrics,
)
from pipeline.model import Recommender, Windows, make_windows, scored_logits
from pipeline.requests import DeletionRequest
from pipeline.settings import BenchSettings, Settings
from pipeline.splits import UnlearningData, build_split, unlearning_data
from pipeline.unlearn import LeakageProbe, UnlearnResult, run_unlearning

log = logging.getLogger(__name__)

ROW_KEYS = (
    "method", "scope", "deletion_rate", "seed", "ndcg10_retain", "hr10_retain", "ndcg10_forget_train",
    "mia_auc_loss", "mia_auc_mink", "mia_auc_minkpp", "privleak", "jsd_to_retrain", "wall_s",
    "speedup_vs_retrain", "peak_mem_mb",
)  # fmt: skip


@dataclass(frozen=True)
class Setting:
    scope: str  # "user" or "interactions"
    deletion_rate: float  # share of member users affected
    item_share: float = 1.0  # for "interactions": share of each affected user's training items


def grid(bench: BenchSettings, quick: bool = False) -> list[tuple[Setting, tuple[int, ...]]]:
    """The batches `lethe bench` runs: each setting with its seeds. Every user rate and the interaction scope run
    bench.seeds; the judged batch (users at bench.acceptance.rate) also runs bench.acceptance.extra_seeds, since
    its verdicts rest on means across seeds; the interaction scope runs unless bench.interaction_rate is null.
    `quick`: the quick rate, the first seed."""
    if quick:
        return [(Setting("user", bench.quick_rate), bench.seeds[:1])]
    judged = bench.seeds + bench.acceptance.extra_seeds
    users = [(Setting("user", r), judged if r == bench.acceptance.rate else bench.seeds) for r in bench.user_rates]
    if bench.interaction_rate is None:
        return users
    return [*users, (Setting("interactions", bench.interaction_rate, bench.interaction_item_share), bench.seeds)]


def deletion_requests(snapshot: Snapshot, setting: Setting, seed: int) -> list[DeletionRequest]:
    rng = np.random.default_rng(seed)
    members = snapshot.members
    users = rng.choice(members, max(1, round(setting.deletion_rate * len(members))), replace=False)
    now = datetime.now(UTC)
    if setting.scope == "user":
        return [DeletionRequest(request_id=f"b{u}", user_id=int(u), scope="user", received_at=now) for u in users]
    train = snapshot.interactions[snapshot.interactions.split == "train"]
    requests = []
    for user in users:
        items = train[train.user_id == user].item_id.to_numpy()
        chosen = rng.choice(items, max(1, round(setting.item_share * len(items))), replace=False)
        requests.append(
            DeletionRequest(
                request_id=f"b{user}",
                user_id=int(user),
                scope="interactions",
                item_ids=sorted(int(i) for i in chosen),
                received_at=now,
            )
        )
    return requests


class PeakMemory:
    """Peak resident memory of this process while the block runs, sampled every 50 ms."""

    def __enter__(self) -> PeakMemory:
        self.process, self.peak, self.running = psutil.Process(), 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def megabytes(self) -> float:
        return self.peak / 2**20


@torch.no_grad()
def next_item_distributions(model: Recommender, data: UnlearningData, max_len: int) -> torch.Tensor:
    """Softmax over items at every forgotten position of the forgotten users (the same prefixes for all)."""
    windows = make_windows(data.forget_sequences, max_len, data.forget_scored)
    return torch.softmax(scored_logits(model, windows)[:, FIRST_ITEM_TOKEN:].double(), dim=-1)


def jensen_shannon(first: torch.Tensor, second: torch.Tensor) -> float:
    middle = 0.5 * (first + second)

    def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return (p * (p.clamp_min(1e-300).log() - q.clamp_min(1e-300).log())).sum(-1)

    return float((0.5 * kl(first, middle) + 0.5 * kl(second, middle)).mean() / np.log(2))  # in bits, in [0, 1]


def memorisation_ndcg(model: Recommender, data: UnlearningData, max_len: int, batch_size: int) -> float:
    """NDCG@10 of each forgotten user's last forgotten training item, given what came before it."""
    histories, targets = {}, {}
    for user, sequence in data.forget_sequences.items():
        last = max(i for i, scored in enumerate(data.forget_scored[user]) if scored)
        if last > 0:
            histories[user], targets[user] = sequence[:last], sequence[last]
    if not targets:
        return float("nan")
    ranks = np.array(list(rank_users(model, histories, targets, max_len, batch_size).values()))
    return float(ndcg_at(ranks, 10).mean())


def measure(model: Recommender, data: UnlearningData, probe: LeakageProbe, settings: Settings) -> tuple[dict, dict]:
    """A row's point figures, and the per-user values behind them (for intervals and paired comparisons)."""
    max_len, batch = settings.model.max_len, settings.eval.batch_size
    users = sorted(data.eval_targets)
    logits_ranks = rank_users(model, data.eval_histories, data.eval_targets, max_len, batch)
    ranks = np.array([logits_ranks[u] for u in users])
    utility = utility_metrics(ranks, (10,))
    scores, evidence = probe.measure(model)
    per_user = {
        "ndcg10": ndcg_at(ranks, 10),
        **{
            attack: (
                np.array([scores[attack][u] for u in probe.forgotten]),
                np.array([scores[attack][u] for u in probe.non_members]),
            )
            for attack in ATTACKS
        },
    }
    figures = {
        "ndcg10_retain": utility["ndcg10"],
        "hr10_retain": utility["hr10"],
        "ndcg10_forget_train": memorisation_ndcg(model, data, max_len, batch),
        **{f"mia_auc_{attack}": auc(*per_user[attack]) for attack in ATTACKS},
        # the gate's test on this row (pipeline.leakage): item_rank's AUC, and every attack's Holm p-value
        "mia_auc_item_rank": evidence.tests["item_rank"].auc,
        **{f"leak_p_holm_{attack}": test.p_holm for attack, test in evidence.tests.items()},
        "leak_detected": evidence.leak,
    }
    return figures, per_user


def intervals(per_user: dict, retrain_per_user: dict, settings: Settings, seed: int) -> dict:
    """95% intervals over users (bootstrap) for a row, and its paired comparison with retrain on the same users:
    the NDCG@10 ratio and, per attack, the AUC difference."""
    samples, confidence = settings.eval.bootstrap_samples, settings.eval.confidence

    def with_interval(key: str, estimate) -> dict:
        return {key: estimate.value, f"{key}_ci": [estimate.low, estimate.high]}

    ndcg = bootstrap_mean(per_user["ndcg10"], samples, confidence, seed)
    figures = {
        "ndcg10_retain_ci": [ndcg.low, ndcg.high],
        **with_interval(
            "ndcg10_vs_retrain",
            paired_ratio(per_user["ndcg10"], retrain_per_user["ndcg10"], samples, confidence, seed),
        ),
    }
    for attack in ATTACKS:
        estimate = bootstrap_auc(*per_user[attack], samples, confidence, seed)
        figures[f"mia_auc_{attack}_ci"] = [estimate.low, estimate.high]
        figures |= with_interval(
            f"mia_auc_{attack}_minus_retrain",
            paired_auc_difference(*per_user[attack], *retrain_per_user[attack], samples, confidence, seed),
        )
    return figures


def run_method(
    name: str, base: Recommender, data: UnlearningData, settings: Settings
) -> tuple[Recommender, float, float, UnlearnResult]:
    model = copy.deepcopy(base)
    method_settings = settings.model_copy(update={"unlearn": settings.unlearn.model_copy(update={"method": name})})
    with PeakMemory() as memory:
        started = time.perf_counter()
        # progress as in a nightly: a retrain of a pretrained backbone runs for many minutes (in a log, a line
        # every 30 s with its steps and tokens/s)
        result = run_unlearning(model, data, method_settings, progress=True)
        wall = time.perf_counter() - started
    return model, wall, memory.megabytes, result


def stopping(result: UnlearnResult | None) -> dict:
    """How a method's loop ended, for the row: its steps and the stopping rule's reason (None without a loop)."""
    return {"steps": result.steps if result else None, "stopped": result.stopped if result else None}


@dataclass(frozen=True)
class Reference:
    """A batch's retrained model and what every row is compared with: its figures, per-user values and
    next-item distributions on the forgotten users."""

    model: Recommender
    wall: float
    memory: float
    probe: LeakageProbe  # the batch's forgotten users and non-members, windowed once for every row
    figures: dict
    per_user: dict
    distributions: torch.Tensor


def retrain_reference(base: Recommender, data: UnlearningData, settings: Settings) -> Reference:
    model, wall, memory, _ = run_method("retrain", base, data, settings)
    probe = LeakageProbe(data, settings)
    figures, per_user = measure(model, data, probe, settings)
    return Reference(
        model, wall, memory, probe, figures, per_user, next_item_distributions(model, data, settings.model.max_len)
    )


def method_row(
    name: str, model: Recommender, wall: float, memory: float | None, data: UnlearningData,
    reference: Reference, settings: Settings, setting: Setting, seed: int,
) -> dict:  # fmt: skip
    """One row: a model's figures, its divergence from the retrained model, and its paired comparison."""
    figures, per_user = measure(model, data, reference.probe, settings)
    log.info("%s: %.1fs, ndcg10 %.4f, auc loss %.3f", name, wall, figures["ndcg10_retain"], figures["mia_auc_loss"])
    distributions = next_item_distributions(model, data, settings.model.max_len)
    return {
        "method": name, "scope": setting.scope, "deletion_rate": setting.deletion_rate, "seed": seed,
        **figures,
        "privleak": privleak(figures["mia_auc_mink"], reference.figures["mia_auc_mink"]),
        "jsd_to_retrain": jensen_shannon(distributions, reference.distributions),
        "wall_s": wall, "speedup_vs_retrain": reference.wall / wall if wall else None, "peak_mem_mb": memory,
        "forgotten_users": len(data.forgotten_users), "eval_users": len(data.eval_targets),
        **intervals(per_user, reference.per_user, settings, seed),
    }  # fmt: skip


def batch_data(snapshot: Snapshot, setting: Setting, seed: int) -> UnlearningData:
    return unlearning_data(snapshot, build_split(snapshot, deletion_requests(snapshot, setting, seed)))


def benchmark_setting(
    base: Recommender, snapshot: Snapshot, settings: Settings, setting: Setting, seed: int, methods: list[str]
) -> tuple[list[dict], dict]:
    """All methods on one deletion batch; returns the rows and what the floor and stability need.

    The first row, `original`, is the model before unlearning: the utility every method starts from and
    the leakage it has to remove. Its wall time is zero and it has no speed-up."""
    data = batch_data(snapshot, setting, seed)
    seeded = settings.model_copy(update={"seed": seed})
    reference = retrain_reference(base, data, seeded)
    rows, extras = [], {"data": data, "reference": reference}
    for name in ["original", *methods]:
        if name == "retrain":
            model, wall, memory, result = reference.model, reference.wall, reference.memory, None
        elif name == "original":
            model, wall, memory, result = base, 0.0, None, None
        else:
            model, wall, memory, result = run_method(name, base, data, seeded)
        if result is not None and result.circuits is not None:
            extras["circuits"] = result.circuits
        rows.append(
            {**method_row(name, model, wall, memory, data, reference, settings, setting, seed), **stopping(result)}
        )
    return rows, extras


FRACTIONS = ("forget_fraction", "retain_fraction")  # CURE's circuit sizes, which the tuning rule chooses


def privleak(auc_mink: float, retrain_auc_mink: float) -> float:
    """MUSE's PrivLeak as open-unlearning computes it: 100 (r - a) / (1 - r) on the Min-K% AUCs of the unlearned
    model (a) and of retrain (r), AUCs taken the conventional way (higher: more member-like). 0 is retrain;
    negative means the forgotten users still look like members (under-unlearning), positive that they look
    less like members than under retrain (over-unlearning)."""
    return 100.0 * (retrain_auc_mink - auc_mink) / (1.0 - retrain_auc_mink)


def with_privleak(rows: list[dict]) -> list[dict]:
    """Rows with `privleak` derived from their Min-K% AUC and the same batch's retrain row (a derived figure:
    judging recomputes it, the measured AUCs stay as they are)."""
    retrain = {(r["scope"], r["deletion_rate"], r["seed"]): r["mia_auc_mink"] for r in rows if r["method"] == "retrain"}
    return [
        {**r, "privleak": privleak(r["mia_auc_mink"], retrain[(r["scope"], r["deletion_rate"], r["seed"])])}
        if (r["scope"], r["deletion_rate"], r["seed"]) in retrain
        else r
        for r in rows
    ]


def forgot(entry: dict, band: tuple[float, float]) -> bool:
    """Whether a row or a mean over seeds lies inside the benchmark's AUC band on every attack."""
    return all(band[0] <= entry[f"mia_auc_{attack}"] <= band[1] for attack in ATTACKS)


def forgot_by_test(rows: list[dict], method: str, mean: dict, band: tuple[float, float]) -> bool:
    """Whether a method forgot a setting's batches: the gate's own leakage test (`leak_detected`: Holm over the
    attacks at gate.alpha, either direction) finds no leak on at least half of its seeds. Rows measured before
    the test existed carry no verdict; for them the benchmark's band on the mean AUCs decides (`forgot`)."""
    verdicts = [r["leak_detected"] for r in rows if r["method"] == method and "leak_detected" in r]
    if not verdicts:
        return forgot(mean, band)
    return sum(not leak for leak in verdicts) >= len(verdicts) / 2


def tuning_variants(settings: Settings) -> list[tuple[dict, Settings]]:
    """Every candidate of `bench.tuning`: each method at each retain weight and learning rate, CURE also at
    each pair of forget and retain fractions, NPO at each of its betas."""
    tuning, variants = settings.bench.tuning, []
    cure_pairs = list(itertools.product(tuning.cure_forget_fractions, tuning.cure_retain_fractions))
    for weight, rate in itertools.product(tuning.retain_weights, tuning.learning_rates):
        for method in tuning.methods:
            for pair in cure_pairs if method == "cure" else [(None, None)]:
                for beta in tuning.npo_betas if method == "npo" else [None]:
                    fractions = dict(zip(FRACTIONS, pair, strict=True))
                    unlearn = {"retain_weight": weight, "learning_rate": rate}
                    beta_update = {} if beta is None else {"npo_beta": beta}
                    update = {"unlearn": settings.unlearn.model_copy(update={**unlearn, **beta_update})}
                    if method == "cure":
                        update["circuits"] = settings.circuits.model_copy(update=fractions)
                    variant = {"method": method, **unlearn, **fractions, "npo_beta": beta}
                    variants.append((variant, settings.model_copy(update=update)))
    return variants


def tune(
    base: Recommender, snapshot: Snapshot, settings: Settings, report: Callable[[dict], None] = lambda row: None
) -> tuple[list[dict], list[dict]]:
    """Rows for every tuning variant on every tuning seed and user deletion rate, each against one retrain of
    its batch, and the faithfulness of CURE's circuits at each of its fraction pairs on each batch; `report`
    sees each row as it is done."""
    rows, faithful = [], []
    for rate in settings.bench.tuning.deletion_rates:
        setting = Setting("user", rate)
        for seed in settings.bench.tuning.seeds:
            data = batch_data(snapshot, setting, seed)
            seeded = settings.model_copy(update={"seed": seed})
            faithful += [{"deletion_rate": rate, **entry} for entry in pair_faithfulness(base, data, settings, seed)]
            reference = retrain_reference(base, data, seeded)
            for variant, variant_settings in tuning_variants(seeded):
                name = variant["method"]
                model, wall, memory, result = run_method(name, base, data, variant_settings)
                row = method_row(name, model, wall, memory, data, reference, settings, setting, seed)
                rows.append({**row, **stopping(result), **variant})
                report(rows[-1])
    return rows, faithful


def pair_faithfulness(base: Recommender, data: UnlearningData, settings: Settings, seed: int) -> list[dict]:
    """The circuits CURE's runs extract on this batch (same windows, same seed), partitioned at every fraction
    pair of bench.tuning and mean-ablated (`circuit_faithfulness`): one extraction serves every pair."""
    tuning = settings.bench.tuning
    circuits = circuits_for(base, *_windows(data, settings), settings.circuits, seed)
    pairs = list(itertools.product(tuning.cure_forget_fractions, tuning.cure_retain_fractions))
    reports = circuit_faithfulness(base, data, [circuits.with_fractions(*pair) for pair in pairs], settings, seed)
    return [{**dict(zip(FRACTIONS, pair, strict=True)), **report} for pair, report in zip(pairs, reports, strict=True)]


CANDIDATE = ("retain_weight", "learning_rate")  # what the tuning rule chooses for every method alike
# what a tuning row's variant is, and the rule reads: NPO's beta is NPO's own, as the fractions are CURE's
TUNING_KEYS = ("deletion_rate", "method", *CANDIDATE, *FRACTIONS, "npo_beta")


def faithful_pairs(faithful: list[dict]) -> dict[tuple, bool]:
    """Per CURE (forget, retain) fraction pair: whether its circuits met both of the issue's conditions on every
    batch measured (every tuning seed and rate): mean-ablating the forget circuit raises the forget loss more
    than random unit sets of its size do, and the retain loss less than ablating the retain circuit does.
    Faithfulness is a property each extracted circuit must have, not an average: a mean over seeds would pass
    circuits that are unfaithful on some batches."""
    verdicts: dict[tuple, bool] = {}
    for entry in faithful:
        pair = _pair(entry)
        holds = entry["ratio_forget_vs_random"] > 1 and entry["ratio_retain_forget_vs_retain_circuit"] < 1
        verdicts[pair] = verdicts.get(pair, True) and holds
    return verdicts


def choose(rows: list[dict], faithful: list[dict], band: tuple[float, float], utility_rate: float) -> dict:
    """The rule of `bench.tuning`, forgetting first. A variant forgets at a deletion rate if the gate's own
    leakage test finds no leak on at least half of its tuning seeds (`forgot_by_test`; rows from before the test
    existed: its mean AUC inside the band on every attack). A (retain weight, learning rate) candidate forgets
    if every method forgets at every tuning deletion rate, CURE counting if one of its (forget, retain) fraction
    pairs does and NPO if one of its betas does. CURE's pairs must also give faithful circuits on every batch
    (`faithful_pairs`; a pair never measured is not). Of the faithful CURE pairs that forget at `utility_rate`
    under a candidate that forgets, the rule takes the one with the highest ratio of CURE's mean NDCG@10 to
    retrain's there, and with it its candidate (the ratio of the means, as bench.acceptance judges utility: a
    mean of per-seed ratios is inflated by a seed whose retrain came out low); on a tie, the smaller learning
    rate, then the larger weight. NPO's beta is chosen the same way under that candidate: among the betas that
    forget at every tuning rate, the best ratio of means at `utility_rate`; on a tie, the larger beta. Returns
    the means it decided on, the faithfulness verdict per pair and the choice (None everywhere if nothing
    fits)."""
    by = TUNING_KEYS
    means = summarise(rows, by=by)
    # every row of a batch is paired with that batch's one retrain: its NDCG@10 is a row's mean over users divided
    # by the row's ratio to retrain on the same users (any row with a nonzero ratio gives it)
    retrain = {
        (row["deletion_rate"], row["seed"]): row["ndcg10_retain"] / row["ndcg10_vs_retrain"]
        for row in rows
        if row["ndcg10_vs_retrain"]
    }
    for entry in means:
        members = [row for row in rows if all(row[key] == entry[key] for key in by)]
        entry["forgot"] = forgot_by_test(members, entry["method"], entry, band)
        entry["ndcg10_ratio_of_means"] = sum(row["ndcg10_retain"] for row in members) / sum(
            retrain[row["deletion_rate"], row["seed"]] for row in members
        )
    methods, rates = {e["method"] for e in means}, {e["deletion_rate"] for e in means}
    inside = {(_candidate(e), e["deletion_rate"], e["method"]) for e in means if e["forgot"]}
    forgetting = {
        candidate
        for candidate in {_candidate(e) for e in means}
        if all((candidate, rate, method) in inside for rate in rates for method in methods)
    }
    verdicts = faithful_pairs(faithful)
    cure = [
        e
        for e in means
        if e["method"] == "cure"
        and e["deletion_rate"] == utility_rate
        and e["forgot"]
        and _candidate(e) in forgetting
        and verdicts.get(_pair(e), False)
    ]
    choice = dict.fromkeys((*CANDIDATE, *FRACTIONS, "npo_beta"))
    if cure:
        best = max(cure, key=lambda e: (e["ndcg10_ratio_of_means"], -e["learning_rate"], e["retain_weight"]))
        choice.update({key: best[key] for key in (*CANDIDATE, *FRACTIONS)})
        npo = {(e["npo_beta"], e["deletion_rate"]): e for e in means
               if e["method"] == "npo" and _candidate(e) == _candidate(best)}  # fmt: skip
        betas = [b for b in {b for b, _ in npo} if all(npo.get((b, rate), {}).get("forgot") for rate in rates)]
        npo = [npo[b, utility_rate] for b in betas if (b, utility_rate) in npo]
        if npo:
            choice["npo_beta"] = max(npo, key=lambda e: (e["ndcg10_ratio_of_means"], e["npo_beta"]))["npo_beta"]
    faithfulness = [{**dict(zip(FRACTIONS, pair, strict=True)), "faithful": holds} for pair, holds in verdicts.items()]
    return {"means": means, "faithful_pairs": faithfulness, "choice": choice}


def _candidate(entry: dict) -> tuple:
    return tuple(entry[key] for key in CANDIDATE)


def _pair(entry: dict) -> tuple:
    return tuple(entry[key] for key in FRACTIONS)


def retrain_floor(
    base: Recommender, data: UnlearningData, settings: Settings, setting: Setting, seed: int, first: Reference
) -> dict:
    """Two retrains of the same batch that differ only in their seed: the divergence no method can beat,
    and how far apart their utility and leakage land by chance alone."""
    second = retrain_reference(base, data, settings.model_copy(update={"seed": seed + 1000}))
    paired = intervals(second.per_user, first.per_user, settings, seed)
    return {
        "scope": setting.scope, "deletion_rate": setting.deletion_rate, "seed": seed,
        "jsd_retrain_vs_retrain": jensen_shannon(first.distributions, second.distributions),
        "ndcg10_ratio": paired["ndcg10_vs_retrain"], "ndcg10_ratio_ci": paired["ndcg10_vs_retrain_ci"],
        **{f"auc_diff_{attack}": abs(paired[f"mia_auc_{attack}_minus_retrain"]) for attack in ATTACKS},
    }  # fmt: skip


def circuit_faithfulness(
    base: Recommender, data: UnlearningData, partitions: list[Circuits], settings: Settings, seed: int
) -> list[dict[str, float]]:
    """Mean-ablate the circuits CURE used (one report per partition of an extraction), on the model they were
    extracted from: the forget circuit against random unit sets of its size (forget loss), and against the
    retain circuit (retain loss); the same again for their specific parts alone (`circuits.faithfulness`)."""
    forget, retain = _windows(data, settings)
    sample = retain_sample(retain, settings.circuits, seed)
    reports = faithfulness(base, partitions, forget, sample, settings.circuits.batch_size, seed)
    return [{"seed": seed, **report} for report in reports]


def _windows(data: UnlearningData, settings: Settings) -> tuple[Windows, Windows]:
    """A batch's forget windows (only the positions being forgotten scored) and retain windows, as CURE reads
    them for its circuits."""
    max_len = settings.model.max_len
    forget = make_windows(data.forget_sequences, max_len, data.forget_scored)
    return forget, make_windows(data.retain_sequences, max_len)


def circuit_stability(base: Recommender, snapshot: Snapshot, settings: Settings, seeds: list[int]) -> dict:
    """Jaccard of forget-specific sets: one batch across extraction seeds, and two successive batches."""
    config = settings.circuits
    setting = Setting("user", 0.05)

    def forget_specific(batch_seed: int, sample_seed: int) -> set:
        data = batch_data(snapshot, setting, batch_seed)
        return circuits_for(base, *_windows(data, settings), config, sample_seed).units("forget_specific")

    same_batch = [forget_specific(seeds[0], s) for s in seeds]
    across_seeds = [jaccard(a, b) for i, a in enumerate(same_batch) for b in same_batch[i + 1 :]]
    successive = jaccard(forget_specific(seeds[0], seeds[0]), forget_specific(seeds[0] + 1, seeds[0]))
    return {
        "jaccard_across_retain_samples": float(np.mean(across_seeds)) if across_seeds else 1.0,
        "jaccard_successive_batches": successive,
    }


# leak_detected: its mean is the share of seeds on which the gate's test found a leak
SUMMARY_KEYS = (
    *ROW_KEYS[4:], "steps", "ndcg10_vs_retrain", "mia_auc_loss_minus_retrain", "mia_auc_mink_minus_retrain",
    "mia_auc_minkpp_minus_retrain", "mia_auc_item_rank", "leak_detected",
)  # fmt: skip


def _t_interval(values: list[float]) -> tuple[float, list[float]]:
    """The mean across seeds and its 95% t-interval (a single seed: the point itself)."""
    from scipy import stats

    array = np.asarray(values, dtype=float)
    mean = float(array.mean())
    if len(array) < 2:
        return mean, [mean, mean]
    half = float(stats.t.ppf(0.975, len(array) - 1) * array.std(ddof=1) / np.sqrt(len(array)))
    return mean, [mean - half, mean + half]


def summarise(rows: list[dict], by: tuple[str, ...] = ("method", "scope", "deletion_rate")) -> list[dict]:
    """Per group of rows (by default method, scope and rate): mean, standard deviation and a 95% t-interval
    across seeds."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[key] for key in by), []).append(row)
    summary = []
    for values_by, members in groups.items():
        entry = {**dict(zip(by, values_by, strict=True)), "seeds": len(members)}
        for key in SUMMARY_KEYS:
            values = [m[key] for m in members if m.get(key) is not None]
            if not values:
                entry[key] = entry[f"{key}_std"] = entry[f"{key}_ci"] = None
                continue
            entry[key], entry[f"{key}_ci"] = _t_interval(values)
            entry[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        summary.append(entry)
    return summary


TABLE_COLUMNS = ("ndcg10_retain", "hr10_retain", "ndcg10_forget_train", "mia_auc_loss", "mia_auc_mink",
                 "mia_auc_minkpp", "mia_auc_item_rank", "leak_detected", "privleak", "jsd_to_retrain", "wall_s",
                 "speedup_vs_retrain")  # fmt: skip
PAIRED_COLUMNS = ("ndcg10_vs_retrain", "mia_auc_loss_minus_retrain", "mia_auc_mink_minus_retrain",
                  "mia_auc_minkpp_minus_retrain")  # fmt: skip


def markdown_table(summary: list[dict]) -> str:
    """Means ± standard deviations across seeds; then the paired comparisons with retrain, each with its
    95% interval across seeds."""
    ordered = sorted(summary, key=lambda e: (e["scope"], e["deletion_rate"], e["method"] != "original", e["method"]))

    def table(columns, cell) -> list[str]:
        lines = ["| method | scope | rate | " + " | ".join(columns) + " |", "|" + "---|" * (3 + len(columns))]
        for entry in ordered:
            cells = ["—" if entry[c] is None else cell(entry, c) for c in columns]
            lines.append(
                f"| {entry['method']} | {entry['scope']} | {entry['deletion_rate']:.2f} | " + " | ".join(cells) + " |"
            )
        return lines

    means = table(TABLE_COLUMNS, lambda e, c: f"{e[c]:.4f} ± {e[c + '_std']:.4f}")
    paired = table(PAIRED_COLUMNS, lambda e, c: f"{e[c]:.3f} [{e[c + '_ci'][0]:.3f}, {e[c + '_ci'][1]:.3f}]")
    return "\n".join(
        [
            *means,
            "",
            "Paired with retrain on the same users (mean over seeds [95% interval across seeds]):",
            "",
            *paired,
        ]
    )


def acceptance(rows: list[dict], summary: list[dict], grid_wall_s: float, settings: Settings) -> list[dict]:
    """CURE against the acceptance criteria of bench.acceptance, at its user deletion rate, means over seeds.

    Each criterion gives CURE's figure with its 95% interval across seeds, the threshold, whether the mean
    meets it, and whether the interval straddles the threshold: then the verdict is inside the noise and says
    nothing either way. The divergence is compared per seed with the closest other method that forgot (paired:
    the same retrain, users and prefixes), so the large seed-to-seed spread shared by both does not hide a
    difference. Utility and wall time are judged as ratios of the means, through their paired form: per seed,
    CURE's figure minus the threshold's share of retrain's.
    """
    config, rate = settings.bench.acceptance, settings.bench.acceptance.rate
    at = {e["method"]: e for e in summary if e["scope"] == "user" and e["deletion_rate"] == rate}
    if "cure" not in at or "retrain" not in at:
        return []
    cure, criteria = at["cure"], []
    batch_rows = [r for r in rows if r["scope"] == "user" and r["deletion_rate"] == rate]

    def paired(key: str) -> tuple[list[float], list[float]]:
        """CURE's and retrain's figure, seed by seed, over the seeds that have both."""
        values = {(r["method"], r["seed"]): r[key] for r in batch_rows}
        seeds = sorted(seed for method, seed in values if method == "cure" and ("retrain", seed) in values)
        return [values["cure", s] for s in seeds], [values["retrain", s] for s in seeds]

    def criterion(name: str, value: float, interval: list[float], threshold: str, low=-np.inf, high=np.inf, **extra):
        """`low` and `high` bound where the criterion holds; inside the noise if the interval reaches both
        into that region and out of it (a wide interval can cover the region while its mean lies outside)."""
        reaches_in = interval[0] <= high and interval[1] >= low
        reaches_out = interval[0] < low or interval[1] > high
        entry = dict(criterion=name, value=value, ci=interval, threshold=threshold, holds=bool(low <= value <= high))
        criteria.append({**entry, "inside_noise": bool(reaches_in and reaches_out), **extra})

    # "CURE's NDCG at least a share of retrain's", on the means and paired by seed; not the mean of per-seed
    # ratios, which one seed with a low retrain inflates (a noisy denominator), as with the speed-up below
    cure_ndcg, retrain_ndcg = paired("ndcg10_retain")
    ratio = float(np.sum(cure_ndcg) / np.sum(retrain_ndcg))
    share = config.min_ndcg_ratio
    criterion(
        f"NDCG@10 on retained users minus {share:g} × retrain's (ratio of the means {ratio:.3f})",
        *_t_interval([c - share * r for c, r in zip(cure_ndcg, retrain_ndcg, strict=True)]),
        ">= 0", low=0.0, ratio_of_means=ratio,
    )  # fmt: skip
    for attack in ATTACKS:
        key = f"mia_auc_{attack}_minus_retrain"
        criterion(
            f"MIA AUC ({attack}) minus retrain", cure[key], cure[key + "_ci"], f"within ±{config.max_auc_gap}",
            low=-config.max_auc_gap, high=config.max_auc_gap,
        )  # fmt: skip
    by_seed = {}
    for row in batch_rows:
        if row["method"] not in ("original", "retrain"):
            by_seed.setdefault(row["method"], {})[row["seed"]] = row["jsd_to_retrain"]
    # A method that did not forget stays near the base model, and the base is as close to retrain as two
    # retrains are to each other: its low divergence says it did little, not that it behaves like retrain. The
    # rivals are the methods that forgot (`forgot_by_test`). If none did, every other method is a rival, and the
    # criterion's name says so.
    others = {m: v for m, v in by_seed.items() if m != "cure"}
    passed_over = sorted(m for m in others if not forgot_by_test(batch_rows, m, at[m], settings.bench.auc_band))
    if len(passed_over) < len(others):
        others = {m: v for m, v in others.items() if m not in passed_over}
        note = f"; only methods that forgot count, not {', '.join(passed_over)}" if passed_over else ""
    else:
        passed_over, note = [], "; no other method forgot, so all count"
    if others:
        rival = min(others, key=lambda m: float(np.mean(list(others[m].values()))))
        seeds = sorted(set(by_seed["cure"]) & set(others[rival]))
        value, interval = _t_interval([by_seed["cure"][s] - others[rival][s] for s in seeds])
        criterion(
            f"JSD to retrain minus the lowest other method's ({rival}{note})", value, interval,
            "< 0", high=0.0, rival=rival, did_not_forget=passed_over,
        )  # fmt: skip
    cure_wall, retrain_wall = paired("wall_s")
    # "CURE's mean wall time at most 1/n of retrain's", paired by seed; not the mean of per-seed speed-ups,
    # which one seed with a slow retrain inflates
    speedup = float(np.sum(retrain_wall) / np.sum(cure_wall))
    criterion(
        f"wall time minus retrain's / {config.min_speedup:g}, s (circuit extraction included; "
        f"speed-up of the means {speedup:.1f}×)",
        *_t_interval([c - r / config.min_speedup for c, r in zip(cure_wall, retrain_wall, strict=True)]),
        "<= 0", high=0.0, speedup_of_means=speedup,
    )  # fmt: skip
    minutes = grid_wall_s / 60
    criterion("whole grid, minutes", minutes, [minutes, minutes], f"<= {config.max_grid_minutes}",
              high=config.max_grid_minutes)  # fmt: skip
    return criteria


HEAD_TO_HEAD = (  # (key, what it says, whether lower is better)
    ("jsd_to_retrain", "JSD to retrain", True),
    ("ndcg10_retain", "NDCG@10 on retained users", False),
    ("wall_s", "wall time, s", True),
)


def head_to_head(rows: list[dict], summary: list[dict], settings: Settings) -> list[dict]:
    """CURE against every other unlearning method at the acceptance rate, paired by seed (the same retrain, users
    and prefixes): per figure, CURE's minus the method's, its mean and 95% t-interval across seeds, and whether the
    interval settles who is better. Beating a method that did not forget says nothing, so each entry says
    whether the method forgot (`forgot_by_test`)."""
    rate, band = settings.bench.acceptance.rate, settings.bench.auc_band
    batch = [r for r in rows if r["scope"] == "user" and r["deletion_rate"] == rate]
    at = {e["method"]: e for e in summary if e["scope"] == "user" and e["deletion_rate"] == rate}
    values = {(r["method"], r["seed"]): r for r in batch}
    entries = []
    if "cure" not in at:
        return entries
    for method in sorted(m for m in at if m not in ("cure", "original", "retrain")):
        seeds = sorted(s for m, s in values if m == "cure" and (method, s) in values)
        if not seeds:
            continue
        entry = {"method": method, "forgot": forgot_by_test(batch, method, at[method], band), "seeds": seeds}
        for key, _, lower_better in HEAD_TO_HEAD:
            mean, interval = _t_interval([values["cure", s][key] - values[method, s][key] for s in seeds])
            # one seed has no spread to judge by: its point is no verdict
            settled = len(seeds) > 1 and (interval[1] < 0 or interval[0] > 0)
            better = (mean < 0) == lower_better
            verdict = ("CURE better" if better else "CURE worse") if settled else "not resolved (0 inside)"
            entry[key] = {"difference": mean, "ci": interval, "verdict": verdict}
        entries.append(entry)
    return entries


def head_to_head_table(entries: list[dict], rate: float) -> str:
    """`head_to_head` as Markdown, and one plain sentence per method that forgot."""
    if not entries:
        return ""
    columns = " | ".join(f"CURE minus it: {label}" for _, label, _ in HEAD_TO_HEAD)
    lines = [
        f"CURE against each other method at {rate:.0%} user deletion, paired by seed (CURE's figure minus the "
        "method's, mean [95% interval across seeds]):",
        "",
        f"| method | forgot | {columns} |",
        "|---|---|" + "---|" * len(HEAD_TO_HEAD),
    ]
    for e in entries:
        cells = [
            f"{e[key]['difference']:+.4f} [{e[key]['ci'][0]:+.4f}, {e[key]['ci'][1]:+.4f}]: {e[key]['verdict']}"
            for key, _, _ in HEAD_TO_HEAD
        ]
        lines.append(f"| {e['method']} | {'yes' if e['forgot'] else 'no'} | " + " | ".join(cells) + " |")
    lines.append("")
    for e in (e for e in entries if e["forgot"]):
        jsd, ndcg = e["jsd_to_retrain"], e["ndcg10_retain"]
        verdicts = {jsd["verdict"], ndcg["verdict"]}
        if "CURE better" in verdicts and "CURE worse" not in verdicts:
            plainly = "CURE beats it"
        elif "CURE worse" in verdicts and "CURE better" not in verdicts:
            plainly = "CURE loses to it"
        elif len(verdicts) == 1:
            plainly = "neither beats the other beyond the noise"
        else:
            plainly = "CURE is better on one figure and worse on the other"
        lines.append(
            f"- Against {e['method']}, over {len(e['seeds'])} seeds, {plainly}: JSD to retrain "
            f"{jsd['difference']:+.4f} [{jsd['ci'][0]:+.4f}, {jsd['ci'][1]:+.4f}], NDCG@10 {ndcg['difference']:+.4f} "
            f"[{ndcg['ci'][0]:+.4f}, {ndcg['ci'][1]:+.4f}] (CURE minus it; lower JSD and higher NDCG are better)."
        )
    return "\n".join(lines) + "\n"


def acceptance_table(criteria: list[dict], rows: list[dict], rate: float) -> str:
    """The verdicts as Markdown, headed by the seeds whose CURE rows at the judged rate the means are over."""
    seeds = sorted({r["seed"] for r in rows if (r["method"], r["scope"], r["deletion_rate"]) == ("cure", "user", rate)})
    lines = [
        f"Acceptance at {rate:.0%} user deletion (CURE, mean over {len(seeds)} seeds, {', '.join(map(str, seeds))} "
        "[95% interval across seeds]):",
        "",
        "| criterion | CURE | threshold | verdict |",
        "|---|---|---|---|",
    ]
    for c in criteria:
        verdict = ("holds" if c["holds"] else "fails") + (", inside the noise" if c["inside_noise"] else "")
        lines.append(
            f"| {c['criterion']} | {c['value']:.3f} [{c['ci'][0]:.3f}, {c['ci'][1]:.3f}] | {c['threshold']} "
            f"| {verdict} |"
        )
    return "\n".join(lines) + "\n"


def tuning_table(decision: dict, settings: Settings) -> str:
    """The means `choose` decided on, one line per variant, and what it chose."""
    tuning = settings.bench.tuning
    rates = ", ".join(f"{rate:.0%}" for rate in tuning.deletion_rates)
    lines = [
        f"Tuning seeds {list(tuning.seeds)}, user deletion at {rates}; means over seeds; the NDCG ratio and AUC "
        "differences are paired with a retrain of the same batch.",
        "",
        "| deletion | method | retain weight | learning rate | forget / retain fraction (NPO: β) "
        "| NDCG@10 / retrain's (means) | MIA AUC loss / Min-K / Min-K++ | forgot | AUC minus retrain "
        "| JSD to retrain | steps | speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def order(e: dict) -> tuple:
        keys = (*FRACTIONS, "npo_beta")
        return e["deletion_rate"], e["retain_weight"], e["learning_rate"], e["method"], *(e[k] or 0 for k in keys)

    for e in sorted(decision["means"], key=order):
        fractions = " / ".join(str(e[k]) for k in FRACTIONS) if e["method"] == "cure" else "—"
        if e["method"] == "npo":
            fractions = f"β {e['npo_beta']}"
        aucs = " / ".join(f"{e[f'mia_auc_{a}']:.3f}" for a in ATTACKS)
        diffs = " / ".join(f"{e[f'mia_auc_{a}_minus_retrain']:+.3f}" for a in ATTACKS)
        lines.append(
            f"| {e['deletion_rate']:.0%} | {e['method']} | {e['retain_weight']} | {e['learning_rate']} | {fractions} "
            f"| {e['ndcg10_ratio_of_means']:.3f} | {aucs} | {'yes' if e['forgot'] else 'no'} | {diffs} "
            f"| {e['jsd_to_retrain']:.3f} | {e['steps']:.1f} | {e['speedup_vs_retrain']:.1f}× |"
        )
    seeds = " / ".join(str(seed) for seed in tuning.seeds)
    lines += [
        "",
        "CURE's circuits at each fraction pair, mean-ablated on the model they were extracted from: the forget "
        "circuit's rise of the forget loss as a multiple of random unit sets' of its size (faithful above 1), and its "
        "rise of the retain loss as a multiple of the retain circuit's (faithful below 1); the rule takes only pairs "
        "faithful on every batch.",
        "",
        f"| forget / retain fraction | deletion | forget loss vs random (seeds {seeds}) "
        f"| retain loss vs retain circuit (seeds {seeds}) | faithful on every batch |",
        "|---|---|---|---|---|",
    ]
    verdicts = {_pair(e): e["faithful"] for e in decision["faithful_pairs"]}
    by_batch = {(*_pair(e), e["deletion_rate"], e["seed"]): e for e in decision["faithfulness"]}
    for pair in sorted(verdicts):
        for rate in tuning.deletion_rates:
            batches = [by_batch.get((*pair, rate, seed)) for seed in tuning.seeds]
            forget, retain = (
                " / ".join(f"{b[key]:.2f}" if b else "—" for b in batches)
                for key in ("ratio_forget_vs_random", "ratio_retain_forget_vs_retain_circuit")
            )
            verdict = "yes" if verdicts[pair] else "no"
            lines.append(f"| {pair[0]} / {pair[1]} | {rate:.0%} | {forget} | {retain} | {verdict} |")
    choice = decision["choice"]
    lines += [
        "",
        f"Chosen by the rule of bench.tuning (params.yaml), CURE's utility compared at "
        f"{settings.bench.acceptance.rate:.0%}: retain weight {choice['retain_weight']}, learning rate "
        f"{choice['learning_rate']}, CURE forget fraction {choice['forget_fraction']}, retain fraction "
        f"{choice['retain_fraction']}, NPO's beta {choice.get('npo_beta')}.",
    ]
    return "\n".join(lines) + "\n"


def pareto_plot(summary: list[dict], path) -> None:
    """Utility against leakage, one panel per setting; bars are one standard deviation across seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({(e["scope"], e["deletion_rate"]) for e in summary})
    figure, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 4.2), squeeze=False, sharey=True)
    markers = "osD^vP*Xhp<>"
    methods = sorted({e["method"] for e in summary})  # one colour and marker per method, the same in every panel
    for axis, (scope, rate) in zip(axes[0], settings, strict=True):
        for entry in (e for e in summary if (e["scope"], e["deletion_rate"]) == (scope, rate)):
            attack = max(("loss", "mink", "minkpp"), key=lambda a: abs(entry[f"mia_auc_{a}"] - 0.5))
            leakage = abs(entry[f"mia_auc_{attack}"] - 0.5)
            style = methods.index(entry["method"])
            axis.errorbar(
                leakage, entry["ndcg10_retain"], xerr=entry[f"mia_auc_{attack}_std"],
                yerr=entry["ndcg10_retain_std"], fmt=markers[style % len(markers)], color=f"C{style % 10}",
                capsize=3, label=entry["method"], alpha=0.85,
            )  # fmt: skip
        axis.legend(fontsize=7, loc="best")  # a legend, not labels at the points: close methods overlap there
        axis.set(
            title=f"{scope} scope, {rate:.0%} of members", xlabel="max over attacks |MIA AUC - 0.5| (lower: better)"
        )
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("NDCG@10 on retained users (higher: better)")
    figure.suptitle("Forget / retain trade-off (means over seeds, ±1 s.d.)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
