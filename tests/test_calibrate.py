"""`lethe calibrate`'s bookkeeping: disjoint batches, and the verdicts read off the rows with exact intervals."""

import pytest

from components.calibrate import batches, summarise
from pipeline.settings import Settings
from tests.conftest import tiny_params


def test_batches_are_disjoint_in_order_then_the_whole_pool():
    pool = list(range(30))
    cut = batches(pool, (1, 2, 3, 5, 8, 10, 50))
    assert [len(b) for b in cut] == [1, 2, 3, 5, 8, 10, 30]  # 50 does not fit: skipped; the pool comes last
    assert sorted(u for b in cut[:-1] for u in b) == list(range(29))


def row(model, scope, users, leak):
    p = 0.001 if leak else 0.5
    return {"model": model, "scope": scope, "users": users, "leak": leak,
            **{f"p_value_{a}": p for a in ("loss", "mink", "minkpp", "item_rank")}}  # fmt: skip


def test_the_null_pass_rate_and_the_power_curve_come_from_the_rows():
    settings = Settings.model_validate(tiny_params())
    rows = [row("retrained", "user", 1, n < 3) for n in range(64)]  # 61 of 64 pass: 0.953
    rows += [row("base", "user", 1, n < 2) for n in range(10)] + [row("base", "user", 5, True) for _ in range(10)]
    summary = summarise(rows, settings)
    passes = summary["pass_rate_null"]
    assert passes["n"] == 64 and passes["rate"] == pytest.approx(61 / 64)
    assert passes["low"] < 0.95 < passes["high"] and summary["holds"]  # within the exact binomial interval
    curve = {e["users"]: e["rate"] for e in summary["power_curve"]}
    assert curve == {1: 0.2, 5: 1.0} and summary["detection_rate_5_or_more"]["rate"] == 1.0
    worse = summarise([row("retrained", "user", 1, n < 12) for n in range(64)], settings)  # 52 of 64: 0.81
    assert not worse["holds"] and worse["pass_rate_null"]["high"] < 0.95
    assert not summarise(rows[:59], settings)["holds"]  # fewer than 60 batches cannot show it
