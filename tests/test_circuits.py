import numpy as np
import pytest
import torch

from pipeline.circuits import (
    GROUPS,
    Circuits,
    attribution_scores,
    extract_circuits,
    faithfulness,
    jaccard,
    mean_ablated,
    mean_loss,
    site_means,
    top_units,
)
from pipeline.model import make_windows
from tests.test_unlearn import forget_users


@pytest.fixture(scope="module")
def windows(snapshot, settings):
    data = forget_users(snapshot)
    forget = make_windows(data.forget_sequences, settings.model.max_len, data.forget_scored)
    retain = make_windows(data.retain_sequences, settings.model.max_len)
    return forget, retain.batch(slice(0, 128))


def test_scores_cover_every_head_and_neuron(trained, windows, settings):
    model = trained[0]
    model.zero_grad(set_to_none=True)
    scores = attribution_scores(model, windows[0], batch_size=16)
    config = model.config
    assert set(scores) == {f"layer{i}.{kind}" for i in range(config.num_hidden_layers) for kind in ("heads", "neurons")}
    assert scores["layer0.heads"].shape == (config.num_attention_heads,)
    assert scores["layer0.neurons"].shape == (config.intermediate_size,)
    assert all((score >= 0).all() and score.sum() > 0 for score in scores.values())
    assert all(p.grad is None for p in model.parameters()), "attribution needs no weight gradient"


def test_scores_do_not_depend_on_batch_size(trained, windows):
    whole = attribution_scores(trained[0], windows[0], batch_size=len(windows[0]))
    small = attribution_scores(trained[0], windows[0], batch_size=3)
    assert len(windows[0]) > 2 * 3  # several batches, the last one short
    for site in whole:
        assert torch.allclose(small[site], whole[site], rtol=1e-4, atol=1e-7), site


def test_top_units_and_partition(trained, windows, tmp_path):
    scores = {"layer0.heads": torch.tensor([0.1, 0.9, 0.5, 0.2]), "layer0.neurons": torch.arange(10.0)}
    masks = top_units(scores, 0.25)
    assert masks["layer0.heads"].tolist() == [False, True, False, False]
    assert masks["layer0.neurons"].nonzero().flatten().tolist() == [8, 9]

    forget, retain = windows
    circuits = extract_circuits(trained[0], forget, retain, 0.2, 0.2, 16, meta={"model_version": "1"})
    for site in circuits.forget_scores:
        stacked = torch.stack([circuits.groups[g][site] for g in GROUPS]).int()
        assert (stacked.sum(0) == 1).all(), "each unit belongs to exactly one group"
    circuits.save(tmp_path)
    loaded = Circuits.load(tmp_path)
    assert loaded.units("shared") == circuits.units("shared") and loaded.meta["model_version"] == "1"
    assert jaccard(loaded.units("forget_specific"), circuits.units("forget_specific")) == 1.0


def test_mean_ablation_changes_only_what_it_should(trained, windows):
    model, (forget, retain) = trained[0], windows
    means = site_means(model, retain, 32)
    base = mean_loss(model, forget, 32)
    with mean_ablated(model, set(), means):
        assert mean_loss(model, forget, 32) == pytest.approx(base)
    with mean_ablated(model, {("layer0.heads", 0), ("layer0.neurons", 3)}, means):
        assert mean_loss(model, forget, 32) != pytest.approx(base)
    assert mean_loss(model, forget, 32) == pytest.approx(base), "hooks are removed afterwards"


def test_the_forget_circuit_is_faithful(trained, windows, settings):
    forget, retain = windows
    circuits = extract_circuits(trained[0], forget, retain, 0.1, 0.1, 16)
    (report,) = faithfulness(trained[0], [circuits], forget, retain, 16, seed=0)
    assert report["forget_loss_rise_forget_circuit"] > report["forget_loss_rise_random_mean"]
    assert np.isfinite(report["ratio_retain_forget_vs_retain_circuit"])
    # the split itself, with item units as the benchmark extracts them: with equal fractions the two specific
    # parts have the same size, and each hurts its own objective more than the other part does
    circuits = extract_circuits(trained[0], forget, retain, 0.1, 0.1, 16, items=True)
    (report,) = faithfulness(trained[0], [circuits], forget, retain, 16, seed=0)
    assert report["forget_specific_units"] == report["retain_specific_units"] > 0
    assert report["forget_loss_rise_forget_specific"] > report["forget_loss_rise_random_specific_mean"]
    assert report["retain_loss_rise_forget_specific"] < report["retain_loss_rise_retain_specific"]
    assert report["forget_loss_rise_retain_specific"] < report["forget_loss_rise_forget_specific"]


def test_partitions_measured_together_report_what_each_reports_alone(trained, windows):
    """Several partitions of one extraction share the ablations they have in common, and each draws its own
    random sets: measured together, each report is the one it gets alone."""
    forget, retain = windows
    circuits = extract_circuits(trained[0], forget, retain, 0.1, 0.1, 16)
    partitions = [circuits.with_fractions(*pair) for pair in [(0.1, 0.1), (0.1, 0.3), (0.3, 0.1)]]
    together = faithfulness(trained[0], partitions, forget, retain, 16, seed=0)
    assert together == [faithfulness(trained[0], [each], forget, retain, 16, seed=0)[0] for each in partitions]
    assert together[0]["forget_loss_rise_random_mean"] == together[1]["forget_loss_rise_random_mean"]
    assert together[0]["retain_specific_units"] < together[1]["retain_specific_units"]
    assert faithfulness(trained[0], [], forget, retain, 16, seed=0) == []


def test_item_units_are_scored_on_the_item_head_and_can_be_ablated(trained, windows):
    """With items as units every item token gets a score; the items the forgotten users rated score higher
    on the forget objective than items they never touched, and mean-ablating those items raises the loss."""
    model, (forget, retain) = trained[0], windows
    scores = attribution_scores(model, forget, batch_size=16, items=True)
    assert scores["items"].shape == (model.config.vocab_size,)
    rated = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    rated[forget.labels[forget.labels >= 0].unique()] = True
    assert scores["items"][rated].mean() > 5 * scores["items"][~rated].mean()
    circuits = extract_circuits(model, forget, retain, 0.1, 0.1, 16, items=True)
    assert {"items"} <= set(circuits.groups["forget_specific"])
    means = site_means(model, retain, 32, items=True)
    ablated = {("items", i) for i in torch.nonzero(circuits.groups["forget_specific"]["items"]).flatten().tolist()}
    with mean_ablated(model, ablated, means):
        raised = mean_loss(model, forget, 32)
    assert raised > mean_loss(model, forget, 32)
