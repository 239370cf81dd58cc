"""`lethe bench --quick` end to end on the tiny config: every method, one row each, logged to MLflow."""

import hashlib
import json

import mlflow
import pytest
import torch

from components import bench
from pipeline.bench import (
    ROW_KEYS,
    Setting,
    acceptance,
    acceptance_table,
    choose,
    grid,
    head_to_head,
    head_to_head_table,
    jensen_shannon,
    privleak,
    summarise,
    with_privleak,
)
from pipeline.settings import Settings
from tests.conftest import tiny_params, write_params
from tests.e2e import with_base

pytestmark = pytest.mark.e2e


def test_jensen_shannon_on_known_distributions():
    import torch

    same = torch.tensor([[0.5, 0.5]], dtype=torch.double)
    disjoint = (torch.tensor([[1.0, 0.0]], dtype=torch.double), torch.tensor([[0.0, 1.0]], dtype=torch.double))
    assert jensen_shannon(same, same) == pytest.approx(0.0)
    assert jensen_shannon(*disjoint) == pytest.approx(1.0)


def test_privleak_follows_muse_and_open_unlearning_on_a_worked_example():
    """100 (r - a) / (1 - r) on Min-K% AUCs (open-unlearning's privleak with MUSE's 1 - AUC convention): a model
    that still separates the forgotten users (a = 0.9) against retrain at r = 0.5 leaks -80; over-unlearning
    (a = 0.3) gives +40; retrain itself 0. The LOSS AUC plays no part."""
    assert privleak(0.9, 0.5) == pytest.approx(-80.0)
    assert privleak(0.3, 0.5) == pytest.approx(40.0)
    assert privleak(0.6, 0.6) == pytest.approx(0.0)
    batch = {"scope": "user", "deletion_rate": 0.05, "seed": 1}
    rows = [
        {"method": "retrain", **batch, "mia_auc_mink": 0.55, "mia_auc_loss": 0.1},
        {"method": "cure", **batch, "mia_auc_mink": 0.73, "mia_auc_loss": 0.9},
    ]
    assert [row["privleak"] for row in with_privleak(rows)] == pytest.approx([0.0, -40.0])


QUICK_STEPS = 6  # the loop's cap in the quick run here (params.yaml: 15): what is checked is the bookkeeping


def test_quick_benchmark_writes_rows_table_plot_and_runs(tmp_path, monkeypatch, capsys, template_home):
    params = write_params(tmp_path / "params.yaml", **{"bench.quick_max_steps": QUICK_STEPS})
    home, out = with_base(template_home, tmp_path / ".lethe"), tmp_path / "results"  # the base, trained once
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = bench.main(["--params", str(params), "--home", str(home), "--quick", "--out", str(out)])

    rows = json.loads((out / "benchmark.json").read_text())
    methods = [row["method"] for row in rows]
    assert methods == [
        "original", "retrain", "finetune", "grad_ascent", "grad_diff", "npo", "ssd", "grad_projection", "cure"
    ]  # fmt: skip
    assert all(set(ROW_KEYS) <= set(row) for row in rows)
    original, retrain = rows[0], rows[1]
    assert retrain["jsd_to_retrain"] == pytest.approx(0.0) and retrain["privleak"] == pytest.approx(0.0)
    assert retrain["speedup_vs_retrain"] == pytest.approx(1.0) and retrain["ndcg10_vs_retrain"] == pytest.approx(1.0)
    assert retrain["ndcg10_vs_retrain_ci"] == pytest.approx([1.0, 1.0])
    assert original["wall_s"] == 0.0 and original["speedup_vs_retrain"] is None
    # the model before unlearning remembers its members: it leaks more than the retrained model
    assert original["mia_auc_loss_minus_retrain"] > 0
    for row in rows:
        assert 0.0 <= row["jsd_to_retrain"] <= 1.0
        low, high = row["ndcg10_retain_ci"]
        assert low <= row["ndcg10_retain"] <= high
        for attack in ("loss", "mink", "minkpp"):
            low, high = row[f"mia_auc_{attack}_ci"]
            assert low <= row[f"mia_auc_{attack}"] <= high
    assert all(row["peak_mem_mb"] > 0 for row in rows[1:])
    # every loop says how it ended; the quick run caps the loop at bench.quick_max_steps
    cure = rows[-1]
    assert 0 <= cure["steps"] <= QUICK_STEPS and cure["stopped"] and original["steps"] is None
    assert cure["stopped"] != "max_steps reached" or cure["steps"] == QUICK_STEPS
    summary = json.loads((out / "benchmark_summary.json").read_text())
    assert summary["retrain_floor"] and 0.0 <= summary["circuit_stability"]["jaccard_successive_batches"] <= 1.0
    table = (out / "benchmark.md").read_text()
    assert "| cure | user | 0.05 |" in table and "| original | user | 0.05 |" in table
    judged = {c["criterion"]: c for c in summary["acceptance"]}  # quick_rate is the acceptance rate here
    assert len(judged) == 7 and judged["whole grid, minutes"]["value"] * 60 == pytest.approx(summary["wall_s_total"])
    assert "Acceptance at 5% user deletion" in table

    # judging again under a stricter limit rewrites the verdict from the same rows, which stay as measured
    assert judged["whole grid, minutes"]["holds"]
    measured = (out / "benchmark.json").read_bytes()
    strict = write_params(tmp_path / "strict.yaml", **{"bench.acceptance.max_grid_minutes": 0.001})
    bench.main(["--params", str(strict), "--home", str(home), "--judge", "--out", str(out)])
    rejudged = json.loads((out / "benchmark_summary.json").read_text())
    assert not next(c for c in rejudged["acceptance"] if c["criterion"] == "whole grid, minutes")["holds"]
    assert (out / "benchmark.json").read_bytes() == measured and rejudged["summary"] == summary["summary"]
    with pytest.raises(FileNotFoundError, match="run `lethe bench"):
        bench.main(["--params", str(params), "--home", str(home), "--judge", "--out", str(tmp_path / "none")])
    weights = (home / "models" / "base" / "model.safetensors").read_bytes()
    assert summary["base_model"]["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    machine = summary["base_model"]["machine"]
    assert machine["torch"] == torch.__version__ and machine["cpu"]
    assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    floor = summary["retrain_floor"][0]
    assert floor["ndcg10_ratio_ci"][0] <= floor["ndcg10_ratio"] <= floor["ndcg10_ratio_ci"][1]
    assert (out / "pareto.png").stat().st_size > 0

    mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
    children = mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{result['run_id']}'")
    assert len(children) == len(rows)

    # a second sitting with the same params finds every batch in the row log and measures nothing again; a sitting
    # with other params is refused, not mixed into the same results
    capsys.readouterr()
    bench.main(["--params", str(params), "--home", str(home), "--quick", "--out", str(out)])
    assert "measured in an earlier sitting" in capsys.readouterr().out
    assert json.loads((out / "benchmark.json").read_text()) == rows
    assert json.loads((out / "benchmark_summary.json").read_text())["wall_s_total"] == summary["wall_s_total"]
    other = write_params(tmp_path / "other.yaml", **{"bench.quick_max_steps": 3})
    with pytest.raises(ValueError, match="benchmark_rows.jsonl:1: written by a run with other params"):
        bench.main(["--params", str(other), "--home", str(home), "--quick", "--out", str(out)])


def _tuning_row(method, candidate, fractions, seed, ratio, auc, retrain=0.05, rate=0.05, beta=None):
    (weight, learning_rate), (forget_fraction, retain_fraction) = candidate, fractions
    return {
        "method": method, "deletion_rate": rate, "retain_weight": weight, "learning_rate": learning_rate,
        "forget_fraction": forget_fraction, "retain_fraction": retain_fraction, "seed": seed, "npo_beta": beta,
        "ndcg10_retain": ratio * retrain, "ndcg10_vs_retrain": ratio, "jsd_to_retrain": 0.3,
        "speedup_vs_retrain": 5.0, "steps": 10,
        **{f"mia_auc_{a}": auc for a in ("loss", "mink", "minkpp")},
        **{f"mia_auc_{a}_minus_retrain": auc - 0.5 for a in ("loss", "mink", "minkpp")},
    }  # fmt: skip


def _faithfulness(pairs, seeds=(0, 1), rates=(0.05, 0.10), unfaithful=()) -> list[dict]:
    """Faithfulness entries that hold for every pair on every batch, except the (pair, rate, seed) in
    `unfaithful`, whose forget circuit raises the forget loss less than random sets do."""
    return [
        {
            "forget_fraction": pair[0],
            "retain_fraction": pair[1],
            "deletion_rate": rate,
            "seed": seed,
            "ratio_forget_vs_random": 0.9 if (pair, rate, seed) in unfaithful else 1.5,
            "ratio_retain_forget_vs_retain_circuit": 0.8,
        }  # fmt: skip
        for pair in pairs
        for rate in rates
        for seed in seeds
    ]


PAIRS = ((0.3, 0.5), (0.3, 0.7), (0.5, 0.7), (0.3, 0.9))


def test_choose_takes_the_candidate_that_forgets_at_every_rate_with_cures_best_utility():
    band, none = (0.45, 0.55), (None, None)
    rows = []
    for seed, wobble in ((0, -0.02), (1, 0.02)):  # the rule reads means over seeds, not single seeds
        for rate in (0.05, 0.10):
            rows += [
                _tuning_row("grad_diff", (30, 0.01), none, seed, 0.95, 0.60 + wobble, rate=rate),  # does not forget
                _tuning_row("cure", (30, 0.01), (0.3, 0.5), seed, 0.99, 0.50, rate=rate),
                _tuning_row("grad_diff", (30, 0.02), none, seed, 0.90, 0.54 + wobble, rate=rate),  # mean 0.54: inside
                _tuning_row("cure", (30, 0.02), (0.3, 0.5), seed, 0.80, 0.50, rate=rate),
                _tuning_row("cure", (30, 0.02), (0.3, 0.7), seed, 0.85, 0.52, rate=rate),
                _tuning_row("cure", (30, 0.02), (0.5, 0.7), seed, 0.87, 0.52, rate=rate),  # a larger circuit
                _tuning_row("cure", (30, 0.02), (0.3, 0.9), seed, 0.99, 0.58, rate=rate),  # does not forget
                _tuning_row("grad_diff", (30, 0.03), none, seed, 0.70, 0.50, rate=rate),
                _tuning_row("cure", (30, 0.03), (0.3, 0.7), seed, 0.80 if rate == 0.05 else 0.99, 0.50, rate=rate),
            ]
        # weight 15 keeps more of CURE's utility at 5%, but grad_diff does not forget a 10% batch there
        rows += [
            _tuning_row("grad_diff", (15, 0.02), none, seed, 0.95, 0.50, rate=0.05),
            _tuning_row("cure", (15, 0.02), (0.3, 0.7), seed, 0.97, 0.50, rate=0.05),
            _tuning_row("grad_diff", (15, 0.02), none, seed, 0.95, 0.57, rate=0.10),
            _tuning_row("cure", (15, 0.02), (0.3, 0.7), seed, 0.97, 0.50, rate=0.10),
        ]
    faithful = _faithfulness(PAIRS)
    decision = choose(rows, faithful, band, 0.05)
    assert decision["choice"] == {
        "retain_weight": 30, "learning_rate": 0.02, "forget_fraction": 0.5, "retain_fraction": 0.7, "npo_beta": None
    }  # fmt: skip
    grad_diff = next(e for e in decision["means"] if e["method"] == "grad_diff" and e["learning_rate"] == 0.02)
    assert grad_diff["seeds"] == 2 and grad_diff["mia_auc_loss"] == pytest.approx(0.54) and grad_diff["forgot"]
    # CURE's utility is compared at the given rate only: at 10% (30, 0.03) would win with 0.99
    assert choose(rows, faithful, band, 0.10)["choice"] == {
        "retain_weight": 30, "learning_rate": 0.03, "forget_fraction": 0.3, "retain_fraction": 0.7, "npo_beta": None
    }  # fmt: skip
    # once grad_diff forgets the 10% batch at weight 15, that candidate's better utility wins
    aucs = ("mia_auc_loss", "mia_auc_mink", "mia_auc_minkpp")
    forgetting = [{**r, **dict.fromkeys(aucs, 0.5)} if r["retain_weight"] == 15 else r for r in rows]
    assert choose(forgetting, faithful, band, 0.05)["choice"] == {
        "retain_weight": 15, "learning_rate": 0.02, "forget_fraction": 0.3, "retain_fraction": 0.7, "npo_beta": None
    }  # fmt: skip
    # the ratio of the means, not the mean of per-seed ratios: with retrains at 0.05 and 0.01, (0.3, 0.7)'s
    # ratios 0.6 and 1.3 average 0.95, above (0.5, 0.7)'s 0.87, but its NDCG is 0.717 of retrain's on the means
    pair = ("cure", 0.05, 30, 0.02, 0.3, 0.7)
    keys = ("method", "deletion_rate", "retain_weight", "learning_rate", "forget_fraction", "retain_fraction")
    skewed = [
        r if r["seed"] == 0 else {**r, "ndcg10_retain": r["ndcg10_vs_retrain"] * 0.01}  # seed 1's one retrain
        for r in rows
        if tuple(r[k] for k in keys) != pair
    ]
    skewed += [
        _tuning_row("cure", (30, 0.02), (0.3, 0.7), 0, 0.6, 0.52),
        _tuning_row("cure", (30, 0.02), (0.3, 0.7), 1, 1.3, 0.52, retrain=0.01),
    ]
    skewed_decision = choose(skewed, faithful, band, 0.05)
    means = {tuple(e[k] for k in keys): e for e in skewed_decision["means"]}
    assert means[pair]["ndcg10_vs_retrain"] == pytest.approx(0.95)
    assert means[pair]["ndcg10_ratio_of_means"] == pytest.approx(0.043 / 0.06)
    assert skewed_decision["choice"] == decision["choice"]
    never = [r for r in rows if not (r["method"] == "grad_diff" and r["learning_rate"] > 0.01)]
    assert choose(never, faithful, band, 0.05)["choice"] == dict.fromkeys(decision["choice"])


def test_choose_takes_only_cure_pairs_whose_circuits_are_faithful_on_every_batch():
    band, none = (0.45, 0.55), (None, None)
    rows = [
        row
        for seed in (0, 1)
        for rate in (0.05, 0.10)
        for row in (
            _tuning_row("grad_diff", (30, 0.02), none, seed, 0.90, 0.50, rate=rate),
            _tuning_row("cure", (30, 0.02), (0.3, 0.7), seed, 0.85, 0.52, rate=rate),
            _tuning_row("cure", (30, 0.02), (0.5, 0.7), seed, 0.87, 0.52, rate=rate),
        )
    ]
    pairs = ((0.3, 0.7), (0.5, 0.7))
    assert choose(rows, _faithfulness(pairs), band, 0.05)["choice"]["forget_fraction"] == 0.5
    # the better pair's circuits fail on one batch of four, at the other rate: a mean over batches would keep it
    decision = choose(rows, _faithfulness(pairs, unfaithful={((0.5, 0.7), 0.10, 1)}), band, 0.05)
    assert decision["choice"] == {
        "retain_weight": 30, "learning_rate": 0.02, "forget_fraction": 0.3, "retain_fraction": 0.7, "npo_beta": None
    }  # fmt: skip
    verdicts = {(e["forget_fraction"], e["retain_fraction"]): e["faithful"] for e in decision["faithful_pairs"]}
    assert verdicts == {(0.3, 0.7): True, (0.5, 0.7): False}
    # a pair whose circuits were never measured is not taken; with none measured nothing is
    assert choose(rows, _faithfulness([(0.3, 0.7)]), band, 0.05)["choice"]["forget_fraction"] == 0.3
    assert choose(rows, [], band, 0.05)["choice"] == dict.fromkeys(decision["choice"])


def test_choose_takes_npos_beta_like_cures_pair_under_the_chosen_candidate():
    """NPO counts as forgetting if one of its betas does; its beta is then the one inside the band with the best
    utility at the utility rate, under the candidate CURE's choice fixed."""
    band, none = (0.45, 0.55), (None, None)
    rows = []
    for seed in (0, 1):
        for rate in (0.05, 0.10):
            rows += [
                _tuning_row("cure", (30, 0.02), (0.3, 0.5), seed, 0.95, 0.50, rate=rate),
                _tuning_row("npo", (30, 0.02), none, seed, 0.99, 0.62, rate=rate, beta=0.1),  # not forgotten
                _tuning_row("npo", (30, 0.02), none, seed, 0.90, 0.50, rate=rate, beta=1.0),
                _tuning_row("npo", (30, 0.02), none, seed, 0.93, 0.52, rate=rate, beta=5.0),
                _tuning_row("npo", (30, 0.02), none, seed, 0.97, 0.44, rate=rate, beta=2.0),  # overshoots the band
            ]
    decision = choose(rows, _faithfulness(PAIRS), band, 0.05)
    assert decision["choice"]["npo_beta"] == 5.0 and decision["choice"]["retain_weight"] == 30
    only_the_peers_beta = [r for r in rows if r["npo_beta"] in (None, 0.1)]  # at 0.1 alone NPO never forgets
    assert choose(only_the_peers_beta, _faithfulness(PAIRS), band, 0.05)["choice"]["retain_weight"] is None
    # rows that carry the gate's test are judged by it: beta 5 leaks at 10% (so it does not forget at every
    # rate), and beta 0.1, outside the band, passes the test everywhere; of the betas left, 0.1 keeps most utility
    tested = [{**r, "leak_detected": r["npo_beta"] in (2.0, 5.0) and r["deletion_rate"] == 0.10} for r in rows]
    assert choose(tested, _faithfulness(PAIRS), band, 0.05)["choice"]["npo_beta"] == 0.1


def row(method, seed, ratio, gaps, jsd, wall_s, rate=0.05):  # retrain's AUC is 0.5 on every attack
    """A benchmark row of the judged grid, with only the figures the verdicts read."""
    attacks = ("loss", "mink", "minkpp")
    return {  # retrain's NDCG@10 is 0.05 on every seed unless a test sets it
        "method": method, "scope": "user", "deletion_rate": rate, "seed": seed, "ndcg10_vs_retrain": ratio,
        "ndcg10_retain": 0.05 * ratio,
        **{f"mia_auc_{a}_minus_retrain": gap for a, gap in zip(attacks, gaps, strict=True)},
        **{f"mia_auc_{a}": 0.5 + gap for a, gap in zip(attacks, gaps, strict=True)},
        "jsd_to_retrain": jsd, "wall_s": wall_s,
    }  # fmt: skip


def test_acceptance_judges_cure_on_means_and_says_when_an_interval_straddles_the_threshold():
    cure_by_seed = {  # NDCG ratio, AUC gaps (loss, Min-K, Min-K++), wall time against retrain's
        1: (0.99, (0.01, 0.05, 0.12), 5.0, 100.0),
        2: (0.985, (0.015, 0.06, 0.04), 8.0, 40.0),
        3: (0.99, (0.005, 0.055, -0.04), 7.3, 60.0),
    }
    rows = []
    for seed, shared_jsd in ((1, 0.3), (2, 0.5), (3, 0.4)):  # the retrain reference moves every JSD alike
        ratio, gaps, wall, retrain_wall = cure_by_seed[seed]
        rows += [
            row("retrain", seed, 1.0, (0, 0, 0), 0.0, retrain_wall),
            row("cure", seed, ratio, gaps, shared_jsd, wall),
            row("grad_diff", seed, 0.9, (0, 0, 0), shared_jsd + 0.01, 3.0),
            # closer to retrain than anything, because it barely moved: its AUC stays far above the band
            row("ssd", seed, 1.0, (0.3, 0.3, 0.3), shared_jsd - 0.05, 3.0),
            row("cure", seed, 0.5, (0.3, 0.3, 0.3), 0.9, 1.0, rate=0.10),  # another rate: not judged
        ]
    settings = Settings.model_validate(tiny_params())
    criteria = {c["criterion"]: c for c in acceptance(rows, summarise(rows), 61 * 60.0, settings)}
    # 0.99, 0.985 and 0.99 of retrain's NDCG: above 0.98 on every seed, a clear hold
    ndcg = next(c for name, c in criteria.items() if name.startswith("NDCG@10 on retained users minus 0.98"))
    assert ndcg["ratio_of_means"] == pytest.approx(0.98833, abs=1e-4) and "means 0.988" in ndcg["criterion"]
    assert ndcg["value"] == pytest.approx(0.05 * (0.98833 - 0.98), abs=1e-6)  # CURE's minus 0.98 x retrain's
    assert ndcg["holds"] and not ndcg["inside_noise"]
    # a low retrain on one seed: per seed 1.2, 0.85 and 0.94 of retrain's, whose mean (0.997) would pass, but
    # CURE's mean NDCG is 0.957 of retrain's mean
    retrain_ndcg, cure_ndcg = {1: 0.03, 2: 0.06, 3: 0.05}, {1: 0.036, 2: 0.051, 3: 0.047}
    noisy = [
        {**r, "ndcg10_retain": {"retrain": retrain_ndcg, "cure": cure_ndcg}[r["method"]][r["seed"]]}
        if r["method"] in ("retrain", "cure") and r["deletion_rate"] == 0.05
        else r
        for r in rows
    ]
    ndcg = next(c for c in acceptance(noisy, summarise(noisy), 60.0, settings) if c["criterion"].startswith("NDCG"))
    assert ndcg["ratio_of_means"] == pytest.approx(0.134 / 0.14) and not ndcg["holds"] and ndcg["inside_noise"]
    loss, mink, minkpp = (criteria[f"MIA AUC ({a}) minus retrain"] for a in ("loss", "mink", "minkpp"))
    assert loss["holds"] and not loss["inside_noise"]
    assert not mink["holds"] and not mink["inside_noise"]  # 0.05-0.06 every seed: a clear miss
    # mean 0.04, outside; but its interval across seeds (-0.16 to 0.24) reaches far inside the limits too
    assert not minkpp["holds"] and minkpp["inside_noise"]
    jsd = next(c for name, c in criteria.items() if name.startswith("JSD to retrain"))
    # the rival is the closest method that forgot; ssd, closer only because it did not forget, is named, not used
    assert jsd["rival"] == "grad_diff" and jsd["did_not_forget"] == ["ssd"] and "ssd" in jsd["criterion"]
    # 0.01 below grad_diff on every seed: a sure win although the seeds' JSDs spread over 0.2
    assert jsd["value"] == pytest.approx(-0.01) and jsd["holds"] and not jsd["inside_noise"]
    # when no other method forgot, all count again (and the name says so): ssd is the rival, 0.04 below CURE
    unforgetting = [{**r, "mia_auc_loss": 0.9} if r["method"] == "grad_diff" else r for r in rows]
    judged = acceptance(unforgetting, summarise(unforgetting), 60.0, settings)
    jsd = next(c for c in judged if c["criterion"].startswith("JSD to retrain"))
    assert jsd["rival"] == "ssd" and "no other method forgot" in jsd["criterion"]
    assert jsd["value"] == pytest.approx(0.05) and not jsd["holds"]
    # rows that carry the gate's test are judged by it, not by the band: ssd's leak went undetected on 2 of 3 seeds
    # (it forgot by the test although its AUC is far from 0.5), grad_diff's was detected on 2 of 3 (it did not)
    detected = {("ssd", 1): True, ("grad_diff", 1): True, ("grad_diff", 2): True}
    tested = [{**r, "leak_detected": detected.get((r["method"], r["seed"]), False)} for r in rows]
    jsd = next(c for c in acceptance(tested, summarise(tested), 60.0, settings) if c["criterion"].startswith("JSD"))
    assert jsd["rival"] == "ssd" and jsd["did_not_forget"] == ["grad_diff"]
    # per seed 20x, 5x and 8.2x: their mean (11.1x) would pass, but CURE's mean wall time is 1/9.9 of retrain's
    speed = next(c for name, c in criteria.items() if name.startswith("wall time minus retrain's / 10"))
    assert speed["speedup_of_means"] == pytest.approx(200 / 20.3)
    assert speed["value"] == pytest.approx(0.1) and not speed["holds"] and speed["inside_noise"]
    minutes = criteria["whole grid, minutes"]
    assert minutes["value"] == pytest.approx(61.0) and not minutes["holds"]
    # the table names the seeds the means are over: CURE's at the judged rate, not another rate's
    elsewhere = row("cure", 9, 0.5, (0.3, 0.3, 0.3), 0.9, 1.0, rate=0.10)
    table = acceptance_table(list(criteria.values()), [*rows, elsewhere], 0.05)
    assert table.startswith("Acceptance at 5% user deletion (CURE, mean over 3 seeds, 1, 2, 3 [")
    without_cure = [r for r in rows if r["method"] != "cure"]
    assert acceptance(without_cure, summarise(without_cure), 60.0, settings) == []


def test_head_to_head_says_whom_cure_beats_by_more_than_the_noise():
    rows = []
    for seed, shared_jsd in ((1, 0.3), (2, 0.5), (3, 0.4)):  # the retrain reference moves every JSD alike
        rows += [
            row("retrain", seed, 1.0, (0, 0, 0), 0.0, 100.0),
            row("cure", seed, 0.99, (0, 0, 0), shared_jsd, 10.0),
            # further from retrain by 0.01 and 9% lower utility on every seed: beaten, though the JSDs spread 0.2
            row("grad_diff", seed, 0.9, (0, 0, 0), shared_jsd + 0.01, 10.0),
            # closer on one seed, further on the others, as useful: nothing resolved
            row("npo", seed, 0.99 + {1: 0.01, 2: -0.01, 3: 0.0}[seed], (0, 0, 0),
                shared_jsd + {1: -0.02, 2: 0.03, 3: 0.01}[seed], 10.0),
            # closest of all because it did not forget: in the table, marked, and given no sentence
            row("ssd", seed, 1.0, (0.3, 0.3, 0.3), shared_jsd - 0.05, 10.0),
        ]  # fmt: skip
    settings = Settings.model_validate(tiny_params())
    entries = {e["method"]: e for e in head_to_head(rows, summarise(rows), settings)}
    assert set(entries) == {"grad_diff", "npo", "ssd"}  # never original or retrain
    beaten = entries["grad_diff"]
    assert beaten["forgot"] and beaten["seeds"] == [1, 2, 3]
    assert beaten["jsd_to_retrain"]["difference"] == pytest.approx(-0.01)
    assert beaten["jsd_to_retrain"]["verdict"] == "CURE better"
    assert beaten["ndcg10_retain"]["difference"] == pytest.approx(0.05 * 0.09)
    assert beaten["ndcg10_retain"]["verdict"] == "CURE better"
    assert entries["npo"]["jsd_to_retrain"]["verdict"].startswith("not resolved")
    assert entries["ssd"]["jsd_to_retrain"]["verdict"] == "CURE worse" and not entries["ssd"]["forgot"]
    text = head_to_head_table(list(entries.values()), 0.05)
    assert "- Against grad_diff, over 3 seeds, CURE beats it: JSD to retrain -0.0100" in text
    assert "- Against npo, over 3 seeds, neither beats the other beyond the noise" in text
    assert "| ssd | no |" in text and "- Against ssd" not in text
    # the same seeds the other way round: now grad_diff beats CURE
    swapped = [{**r, "method": {"cure": "grad_diff", "grad_diff": "cure"}.get(r["method"], r["method"])} for r in rows]
    loser = next(e for e in head_to_head(swapped, summarise(swapped), settings) if e["method"] == "grad_diff")
    assert "CURE loses to it" in head_to_head_table([loser], 0.05)
    # one seed has no interval: whatever its difference, nothing is settled
    alone = [r for r in rows if r["seed"] == 1]
    assert all(
        e[key]["verdict"].startswith("not resolved")
        for e in head_to_head(alone, summarise(alone), settings)
        for key in ("jsd_to_retrain", "ndcg10_retain", "wall_s")
    )


def test_grid_runs_the_judged_batch_on_the_extra_seeds_too():
    settings = Settings.model_validate(tiny_params(**{"bench.acceptance.extra_seeds": [7, 8]}))
    bench_settings = settings.bench
    batches = dict(grid(bench_settings))
    judged = Setting("user", bench_settings.acceptance.rate)
    assert batches.pop(judged) == (*bench_settings.seeds, 7, 8)
    interactions = Setting("interactions", bench_settings.interaction_rate, bench_settings.interaction_item_share)
    assert set(batches) == {Setting("user", r) for r in bench_settings.user_rates if r != judged.deletion_rate} | {
        interactions
    }
    assert all(seeds == bench_settings.seeds for seeds in batches.values())
    assert grid(bench_settings, quick=True) == [(Setting("user", bench_settings.quick_rate), bench_settings.seeds[:1])]
    users_only = Settings.model_validate(tiny_params(**{"bench.interaction_rate": None, "bench.user_rates": [0.05]}))
    assert grid(users_only.bench) == [(judged, users_only.bench.seeds + users_only.bench.acceptance.extra_seeds)]


def test_tuning_runs_every_variant_on_the_tuning_seeds_only(tmp_path, monkeypatch, template_home):
    params = write_params(
        tmp_path / "params.yaml",
        **{
            "bench.tuning.seeds": [7],
            "bench.acceptance.extra_seeds": [],  # 7 is one of params.yaml's; tuning seeds are kept apart from them
            "bench.tuning.methods": ["cure"],  # the fewest runs that still cover every axis of the rule
            "bench.tuning.deletion_rates": [0.05, 0.10],
            "bench.tuning.retain_weights": [3.0, 30.0],
            "bench.tuning.learning_rates": [0.05],
            "bench.tuning.cure_forget_fractions": [0.5],
            "bench.tuning.cure_retain_fractions": [0.3, 0.7],
            "unlearn.max_steps": 10,
        },
    )
    home, out = with_base(template_home, tmp_path / ".lethe"), tmp_path / "results"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = bench.main(["--params", str(params), "--home", str(home), "--tuning", "--out", str(out)])

    record = json.loads((out / "tuning.json").read_text())
    rows = record["rows"]
    assert {row["seed"] for row in rows} == {7}

    def variant(row: dict) -> tuple:
        return row["deletion_rate"], row["method"], row["retain_weight"], row["learning_rate"], row["retain_fraction"]

    assert {variant(row) for row in rows} == {
        (rate, "cure", w, 0.05, f) for rate in (0.05, 0.10) for w in (3.0, 30.0) for f in (0.3, 0.7)
    }
    assert {row["forget_fraction"] for row in rows if row["method"] == "cure"} == {0.5}
    forgotten = {row["deletion_rate"]: row["forgotten_users"] for row in rows}  # one batch per rate
    assert len(rows) == 8 and forgotten[0.10] > forgotten[0.05]

    # each variant really ran with its own settings: the same method at another weight or fraction lands elsewhere
    def figures(method, weight, fraction, rate=0.05):
        row = next(r for r in rows if variant(r) == (rate, method, weight, 0.05, fraction))
        return row["mia_auc_loss"], row["ndcg10_retain"], row["jsd_to_retrain"]

    assert figures("cure", 3.0, 0.3) != figures("cure", 30.0, 0.3)
    assert figures("cure", 30.0, 0.3) != figures("cure", 30.0, 0.7)
    # the circuits' faithfulness, once per batch and fraction pair, from one extraction per batch
    faithful = record["faithfulness"]
    assert {(e["deletion_rate"], e["retain_fraction"]) for e in faithful} == {
        (r, f) for r in (0.05, 0.10) for f in (0.3, 0.7)
    }
    assert len(faithful) == 4 and all(e["ratio_forget_vs_random"] > 0 for e in faithful)
    by_fraction = {e["retain_fraction"]: e for e in faithful if e["deletion_rate"] == 0.05}
    assert by_fraction[0.3]["forget_loss_rise_forget_circuit"] == by_fraction[0.7]["forget_loss_rise_forget_circuit"]
    assert by_fraction[0.3]["retain_specific_units"] < by_fraction[0.7]["retain_specific_units"]
    assert record["choice"] == choose(rows, faithful, (0.45, 0.55), 0.05)["choice"] == result["choice"]
    assert record["base_model"]["weights_sha256"]
    table = (out / "tuning.md").read_text()
    assert table.count("| cure |") == 8 and f"learning rate {result['choice']['learning_rate']}" in table

    # judging again re-decides from the stored rows: where the gate's test found a leak on every row, no candidate
    # forgets and nothing is chosen (the band does not enter: these rows carry the test)
    leaking = [{**r, "leak_detected": True} for r in rows]
    (out / "tuning.json").write_text(json.dumps({**record, "rows": leaking}))
    judged = bench.main(["--params", str(params), "--home", str(home), "--judge", "--out", str(out)])
    rejudged = json.loads((out / "tuning.json").read_text())
    assert judged["tuning_choice"] == rejudged["choice"] == dict.fromkeys(rejudged["choice"])
    assert rejudged["rows"] == leaking and "learning rate None" in (out / "tuning.md").read_text()

    # records from before the rule chose the retain weight, or before it measured the circuits' faithfulness,
    # cannot be judged by it: a clear error, the file kept
    older = tmp_path / "older"
    older.mkdir()
    without_weight = {**rejudged, "rows": [{k: v for k, v in r.items() if k != "retain_weight"} for r in rows]}
    without_faithfulness = {k: v for k, v in rejudged.items() if k != "faithfulness"}
    for stale, lacking in ((without_weight, "retain_weight"), (without_faithfulness, "the circuits' faithfulness")):
        (older / "tuning.json").write_text(json.dumps(stale))
        with pytest.raises(ValueError, match=rf"lacks {lacking}, .* run it again"):
            bench.main(["--params", str(params), "--home", str(home), "--judge", "--out", str(older)])
        assert json.loads((older / "tuning.json").read_text()) == stale
