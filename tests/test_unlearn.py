from datetime import UTC, datetime

import numpy as np
import pytest

from pipeline.leakage import ATTACKS
from pipeline.requests import DeletionRequest
from pipeline.splits import build_split, unlearning_data
from pipeline.unlearn import (
    METHODS,
    LeakageProbe,
    UnlearningMethod,
    method_named,
    register,
    run_unlearning,
)
from tests.conftest import with_unlearn


def forget_users(snapshot, count=5, seed=3):
    users = np.random.default_rng(seed).choice(snapshot.members, count, replace=False)
    requests = [
        DeletionRequest(request_id=f"r{u}", user_id=int(u), scope="user", received_at=datetime.now(UTC)) for u in users
    ]
    return unlearning_data(snapshot, build_split(snapshot, requests))


def test_methods_are_registered_by_name():
    assert method_named("grad_diff") is METHODS["grad_diff"]
    with pytest.raises(ValueError, match="unknown unlearning method 'nope'"):
        method_named("nope")
    with pytest.raises(ValueError, match="registered twice"):
        register("grad_diff")(type("Again", (UnlearningMethod,), {}))


def test_gradient_difference_lowers_the_forgotten_users_membership_auc(fresh_model, snapshot, settings):
    data = forget_users(snapshot)
    probe = LeakageProbe(data, settings)
    before = probe.evidence(fresh_model)
    assert min(before.aucs().values()) > 0.6, f"the base model should remember its members: {before.aucs()}"
    assert before.leak, "five members are detected before unlearning"
    result = run_unlearning(fresh_model, data, settings, progress=False)
    after = probe.evidence(fresh_model)
    assert after.aucs() == pytest.approx(result.aucs)
    assert max(after.aucs().values()) < min(before.aucs().values())
    assert after.worst_z() < before.worst_z()
    assert result.history[0]["step"] == 0 and 0 < result.best_step <= result.steps


def test_starting_within_the_tolerance_is_no_evidence_and_the_loop_goes_to_the_centre_itself(
    fresh_model, snapshot, settings
):
    """A batch the test cannot see (here: a tolerance so wide that any start is inside it, as a request of a few
    items is) is never honored on the untouched model: the loop drives every attack to or below the centre,
    and does not keep step 0."""
    wide = with_unlearn(settings, stop_tolerance_z=1e6)
    data = forget_users(snapshot)
    before = LeakageProbe(data, settings).evidence(fresh_model)
    assert min(before.z().values()) > 0  # the untouched model: every attack on the members' side
    result = run_unlearning(fresh_model, data, wide, progress=False)
    assert result.best_step > 0 and "the centre itself was the target" in result.stopped, result.history
    kept = next(row for row in result.history if row["step"] == result.best_step)
    assert max(v for k, v in kept.items() if k.startswith("z_")) < min(before.z().values())


@pytest.mark.parametrize("count", [1, 2])
def test_one_or_two_users_are_far_from_the_centre_before_unlearning(trained, snapshot, settings, count):
    """The stopping rule does not stop on absence of evidence: the per-user attacks cannot tell one user from
    strangers, but item_rank, over every scored position, sees the untouched model's memory."""
    data = forget_users(snapshot, count=count, seed=11)
    evidence = LeakageProbe(data, settings).evidence(trained[0])
    assert evidence.tests["loss"].mde is None  # no per-user test can reject one or two users
    assert evidence.tests["item_rank"].z > settings.unlearn.stop_tolerance_z, evidence.as_dict()


def test_the_stopping_rule_gives_up_after_patience_checks_without_progress(trained, snapshot, settings):
    """A loop that cannot come closer to the band (a learning rate too small to move any score) stops after
    `patience` checks and keeps the model it started from; with more patience it runs to max_steps."""
    import copy

    data = forget_users(snapshot)
    stalled = with_unlearn(settings, learning_rate=1e-12, max_steps=12, eval_every=2, patience=2)
    result = run_unlearning(copy.deepcopy(trained[0]), data, stalled, progress=False)
    assert result.steps == 4 and result.best_step == 0, result.history
    assert result.stopped.startswith("2 checks without coming closer"), result.stopped
    patient = with_unlearn(settings, learning_rate=1e-12, max_steps=12, eval_every=2, patience=12)
    assert run_unlearning(copy.deepcopy(trained[0]), data, patient, progress=False).stopped == "max_steps reached"


def test_an_overshoot_goes_back_to_the_last_check_before_the_band_at_a_smaller_rate(trained, snapshot, settings):
    """A learning rate that carries every attack past the band in one update: with no backtracks the loop stops
    there; with one it goes back to the last check with no attack below the band (here the start) and goes on
    at backtrack_lr_factor x the rate. At a negligible factor the model after going back scores as the start
    did (the weights were restored), and the loop goes back only once."""
    import copy

    data = forget_users(snapshot)
    bold = {"learning_rate": 0.03, "warmup_steps": 1, "eval_every": 1, "max_steps": 8, "patience": 3}
    stop = run_unlearning(copy.deepcopy(trained[0]), data, with_unlearn(settings, backtracks=0, **bold), progress=False)
    start, crossed = stop.history[0], stop.history[-1]
    assert stop.stopped.startswith("overshot below the strangers' centre"), stop.history
    assert all(crossed[f"z_{a}"] < -settings.unlearn.stop_tolerance_z for a in ATTACKS)

    again = with_unlearn(settings, backtracks=1, backtrack_lr_factor=1e-6, **bold)
    back = run_unlearning(copy.deepcopy(trained[0]), data, again, progress=False)
    assert back.history[: len(stop.history)] == stop.history  # the same updates up to the overshoot
    after = back.history[len(stop.history) :]
    assert after and all(check["lr_scale"] == 1e-6 for check in after), back.history
    assert all(after[0][f"auc_{a}"] == pytest.approx(start[f"auc_{a}"], abs=0.02) for a in ATTACKS), after[0]
    assert back.stopped.startswith("3 checks without coming closer"), back.stopped

    def deviation(check: dict) -> float:
        return max(abs(check[f"z_{a}"]) for a in ATTACKS)

    for run in (stop, back):  # each keeps the checkpoint closest to the centre (the earliest of equals)
        assert run.best_step == min(run.history, key=deviation)["step"], run.history


def test_same_params_same_unlearned_model(trained, snapshot, settings):
    import copy

    data = forget_users(snapshot)
    first, second = copy.deepcopy(trained[0]), copy.deepcopy(trained[0])
    short = with_unlearn(settings, max_steps=4)
    run_unlearning(first, data, short, progress=False)
    run_unlearning(second, data, short, progress=False)
    assert all(
        np.array_equal(a.numpy(), b.numpy())
        for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    )


@pytest.mark.parametrize("name", ["grad_ascent", "grad_diff", "npo", "grad_projection", "cure", "finetune", "ssd"])
def test_every_method_changes_the_model_through_the_shared_interface(name, trained, snapshot, settings):
    import copy

    import torch

    data, short = forget_users(snapshot), with_unlearn(settings, method=name, max_steps=6)
    result = run_unlearning(copy.deepcopy(trained[0]), data, short, progress=False)
    assert set(result.aucs) == {"loss", "mink", "minkpp", "item_rank"}
    # The loop may keep its starting checkpoint, so the update itself is checked: one step of the method (SSD,
    # which has no steps, its one shot) must move the model.
    model = copy.deepcopy(trained[0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method = method_named(name)(model, short, data)
    if name == "ssd":
        method.run(LeakageProbe(data, short), progress=False)
    else:
        optimizer = torch.optim.AdamW(method.parameter_groups(), lr=short.unlearn.learning_rate, weight_decay=0.0)
        method.step(method.forget.batch(slice(0, 16)), method.retain.batch(slice(0, 16)), optimizer)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, f"{name} changed nothing"


@pytest.mark.parametrize("scale", [0.0, 0.1])
def test_the_layers_learn_at_their_share_of_the_learning_rate(scale, trained, snapshot, settings):
    """AdamW's first step moves every parameter with a gradient by about its group's learning rate: the item
    rows by unlearn.learning_rate, the transformer layers by layer_lr_scale of it. The shared loop uses
    these groups: at scale 0 a whole run leaves every layer as it was."""
    import copy

    import torch

    model = copy.deepcopy(trained[0])
    scaled = with_unlearn(settings, method="grad_diff", layer_lr_scale=scale)
    method = method_named("grad_diff")(model, scaled, forget_users(snapshot))
    rate = settings.unlearn.learning_rate
    optimizer = torch.optim.AdamW(method.parameter_groups(), lr=rate, weight_decay=0.0)
    method.step(method.forget.batch(slice(0, 8)), method.retain.batch(slice(0, 8)), optimizer)
    before = dict(trained[0].named_parameters())
    moved = {name: float((p - before[name]).detach().abs().max()) for name, p in model.named_parameters()}
    assert moved.pop("model.embed_tokens.weight") == pytest.approx(rate, rel=1e-3)
    assert max(moved.values()) == pytest.approx(rate * scale, rel=1e-3, abs=1e-9), moved
    if scale == 0.0:
        model = copy.deepcopy(trained[0])
        # full-rate steps from the first, so that the run keeps a checkpoint after some update, not the start
        bold = with_unlearn(scaled, max_steps=4, warmup_steps=1, learning_rate=0.03)
        result = run_unlearning(model, forget_users(snapshot), bold, progress=False)
        assert result.best_step > 0, result.history
        after = dict(model.named_parameters())
        assert not torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
        assert all(torch.equal(p, before[name]) for name, p in after.items() if name != "model.embed_tokens.weight")


@pytest.mark.parametrize("item_rows", ["all", "scored"])
def test_cure_touches_only_circuit_units(item_rows, trained, snapshot, settings):
    """Heads and neurons move by their group's rule; item rows by theirs too, or, when the forget gradient
    reaches only the forgotten items' rows, all of them as task-shared (the retain objective holds every row)."""
    import copy

    import torch

    model = copy.deepcopy(trained[0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cure = method_named("cure")(model, with_unlearn(settings, forget_item_rows=item_rows), forget_users(snapshot))
    optimizer = torch.optim.AdamW(cure.parameters(), lr=1e-2, weight_decay=0.0)  # as the shared loop
    for _ in range(3):
        cure.step(cure.forget.batch(slice(0, 8)), cure.retain.batch(slice(0, 8)), optimizer)
    after = model.state_dict()
    assert settings.circuits.item_units, "params.yaml makes items units: this test checks their rows"
    assert torch.equal(after["model.norm.weight"], before["model.norm.weight"]), "not a unit: frozen"
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    for group, should_move in (("inert", False), ("forget_specific", True), ("retain_specific", True)):
        for head in torch.nonzero(cure.circuits.groups[group]["layer0.heads"]).flatten().tolist():
            rows = slice(head * head_dim, (head + 1) * head_dim)
            moved = not torch.equal(
                after["model.layers.0.self_attn.q_proj.weight"][rows],
                before["model.layers.0.self_attn.q_proj.weight"][rows],
            )
            assert moved == should_move, f"{group} head {head}"
        for neuron in torch.nonzero(cure.circuits.groups[group]["layer0.neurons"]).flatten().tolist():
            moved = not torch.equal(
                after["model.layers.0.mlp.down_proj.weight"][:, neuron],
                before["model.layers.0.mlp.down_proj.weight"][:, neuron],
            )
            assert moved == should_move, f"{group} neuron {neuron}"
        for item in torch.nonzero(cure.circuits.groups[group]["items"]).flatten().tolist():
            moved = not torch.equal(after["model.embed_tokens.weight"][item], before["model.embed_tokens.weight"][item])
            assert moved == (should_move or item_rows == "scored"), f"{group} item {item}"


@pytest.mark.parametrize("item_rows", ["all", "scored"])
def test_the_forget_gradient_reaches_only_the_forgotten_items_rows_when_asked(item_rows, trained, snapshot, settings):
    """Pure ascent, one step: with `scored`, exactly the item rows scored in the forget batch change (every other
    parameter still moves); with `all`, the softmax lifts the rows of other items as well."""
    import copy

    import torch

    from pipeline.data import FIRST_ITEM_TOKEN
    from pipeline.model import scored_labels

    model = copy.deepcopy(trained[0])
    before = model.get_input_embeddings().weight.detach().clone()
    rows_settings = with_unlearn(settings, forget_item_rows=item_rows)
    ascent = method_named("grad_ascent")(model, rows_settings, forget_users(snapshot))
    forget = ascent.forget.batch(slice(0, 8))
    ascent.step(forget, ascent.retain.batch(slice(0, 8)), torch.optim.SGD(ascent.parameters(), lr=1e-2))
    moved = (model.get_input_embeddings().weight.detach() != before).any(1)
    scored = torch.zeros_like(moved)
    scored[scored_labels(forget)] = True
    assert moved[scored].all(), "every forgotten item's row takes the ascent"
    if item_rows == "scored":
        assert not moved[~scored].any(), f"rows of {int(moved[~scored].sum())} other items moved"
    else:
        assert moved[FIRST_ITEM_TOKEN:][~scored[FIRST_ITEM_TOKEN:]].sum() > 100, "the softmax lifts other items"
    assert not torch.equal(model.model.norm.weight, trained[0].model.norm.weight), "other parameters still move"


def test_retrain_never_sees_the_forgotten_users(trained, snapshot, settings, monkeypatch):
    """What the retrain is fitted on, captured at the fit, holds no forgotten user and no forgotten interaction."""
    import copy

    import pipeline.train

    users = [int(u) for u in np.random.default_rng(3).choice(snapshot.members, 4, replace=False)]
    partly = users.pop()
    interactions = snapshot.interactions
    items = interactions[(interactions.user_id == partly) & (interactions.split == "train")].item_id.tolist()[:3]
    now = datetime.now(UTC)
    requests = [DeletionRequest(request_id=f"r{u}", user_id=u, scope="user", received_at=now) for u in users]
    requests.append(
        DeletionRequest(request_id="some", user_id=partly, scope="interactions", item_ids=items, received_at=now)
    )
    data = unlearning_data(snapshot, build_split(snapshot, requests))
    fitted, real_fit = {}, pipeline.train.fit

    def spy(model, sequences, *args, **kwargs):
        fitted.update(copy.deepcopy(sequences))
        return real_fit(model, sequences, *args, **kwargs)

    monkeypatch.setattr(pipeline.train, "fit", spy)
    short = settings.model_copy(
        update={
            "unlearn": settings.unlearn.model_copy(update={"method": "retrain"}),
            "train": settings.train.model_copy(update={"epochs": 2}),
        }
    )
    result = run_unlearning(copy.deepcopy(trained[0]), data, short, progress=False)
    assert result.stopped.startswith("retrained")
    token = snapshot.item_to_token()
    assert fitted and not set(users) & set(fitted)
    assert partly in fitted and not {token[i] for i in items} & set(fitted[partly])


def test_the_forget_objective_stops_pulling_at_the_non_member_level(trained, snapshot, settings):
    """A forget window already as unlikely as a stranger's gives no gradient; a remembered one does."""
    import copy

    import torch

    from pipeline.model import window_nll

    data = forget_users(snapshot)
    method = method_named("grad_ascent")(copy.deepcopy(trained[0]), settings, data)
    nll = window_nll(method.model, method.forget).detach()
    assert method.forget_ceiling is not None and nll.mean() < method.forget_ceiling, "members should be remembered"

    def gradient_norm() -> float:
        method.model.zero_grad()
        method.forget_loss(method.forget).backward()
        return float(sum(p.grad.norm() ** 2 for p in method.model.parameters() if p.grad is not None))

    assert gradient_norm() > 0
    method.forget_ceiling = float(nll.min()) - 1.0  # every window is past the ceiling
    assert gradient_norm() == 0
    unbounded = method_named("grad_ascent")(
        copy.deepcopy(trained[0]), with_unlearn(settings, forget_objective="ascent"), data
    )
    assert unbounded.forget_ceiling is None
    assert float(unbounded.forget_loss(unbounded.forget)) == pytest.approx(
        float(torch.nn.functional.cross_entropy(
            unbounded.model(input_ids=unbounded.forget.input_ids).logits.flatten(0, 1),
            unbounded.forget.labels.flatten(),
            ignore_index=-100,
        )), rel=1e-4
    )  # fmt: skip
