from datetime import UTC, datetime

import numpy as np
import pytest

from pipeline.requests import DeletionRequest
from pipeline.splits import build_split, unlearning_data
from pipeline.unlearn import METHODS, LeakageProbe, UnlearningMethod, method_named, register, run_unlearning


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
    before = probe.point(fresh_model)
    assert min(before.values()) > 0.6, f"the base model should remember its members: {before}"
    result = run_unlearning(fresh_model, data, settings, progress=False)
    after = probe.point(fresh_model)
    assert after == pytest.approx(result.aucs)
    assert max(after.values()) < min(before.values())
    assert result.history[0]["step"] == 0 and result.best_step <= result.steps


def test_the_stopping_rule_stops_at_once_inside_the_band(fresh_model, snapshot, settings):
    wide = settings.model_copy(update={"unlearn": settings.unlearn.model_copy(update={"target_auc_band": (0.0, 1.0)})})
    result = run_unlearning(fresh_model, forget_users(snapshot), wide, progress=False)
    assert result.steps == 0 and "already inside" in result.stopped


def test_same_params_same_unlearned_model(trained, snapshot, settings):
    import copy

    data = forget_users(snapshot)
    first, second = copy.deepcopy(trained[0]), copy.deepcopy(trained[0])
    short = settings.model_copy(update={"unlearn": settings.unlearn.model_copy(update={"max_steps": 4})})
    run_unlearning(first, data, short, progress=False)
    run_unlearning(second, data, short, progress=False)
    assert all(
        np.array_equal(a.numpy(), b.numpy())
        for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    )
