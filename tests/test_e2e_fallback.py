"""Verdicts forced both ways, for real, and what no later load of training data may contain.

Night 1 honors two users (the verdict forced to pass). Night 2's verdict is forced to reject (one warm-up step
of unlearning leaves every attack far above the band): tags, alias, ledger and summary say so, and with
`ledger.max_failed_nights` 1 its requests need a retrain. Night 3 is the DAG's fallback, a retrain from
scratch, which passes. After it: the retrain, a fresh `lethe train` and `dvc repro` each read the data
without every honored row, checked on the content hash each one recorded of the data it read."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import content_hash, read_snapshot
from tests.conftest import REPO, write_params
from tests.e2e import (
    MODEL,
    PASS,
    SHORT,
    check_books,
    client,
    environment,
    ledger_json,
    lethe,
    new_home,
    ran,
    request_line,
)

pytestmark = pytest.mark.e2e
REJECT = {"unlearn.max_steps": 1}  # one warm-up step leaves item_rank far above the strangers (gate: p << alpha)
# A short night (tests.e2e.SHORT; the verdict is forced by PASS or REJECT): what this file checks is the books
# and what each step read, not how well a night forgets (tests/test_e2e.py). One rejected night is enough for a
# retrain.
COMMON = {**SHORT, "ledger.max_failed_nights": 1}


def without(frame, users) -> str:
    """The content hash of the snapshot's rows without these users: what a step may read after they went."""
    return content_hash(frame[~frame.user_id.isin(users)])


# A chain of nights: about 10 minutes on a quiet machine, and the 900 s default is a hang detector, not a
# budget; a busy machine (one other job) took 850 s. Still bounded.
@pytest.mark.timeout(1500)
def test_verdicts_forced_both_ways_and_the_retrain_and_later_loads_never_read_what_was_forgotten(
    tmp_path, template_home
):
    home, passing = new_home(template_home, tmp_path, **COMMON, **PASS)
    rejecting = write_params(tmp_path / "reject.yaml", **{**COMMON, **REJECT})
    raw = read_snapshot(home / "data" / "snapshot").interactions
    members = np.random.default_rng(3).choice(read_snapshot(home / "data" / "snapshot").members, 4, replace=False)
    first, second = [int(u) for u in members[:2]], [int(u) for u in members[2:]]

    def night(batch: str, params: Path, users: list[int]) -> dict:
        log = tmp_path / f"{batch}.jsonl"
        log.write_text("".join(request_line(f"{batch}-{n}", user) for n, user in enumerate(users)))
        ran(lethe(home, params, "nightly", "--deletion-log", str(log), "--batch-id", batch))
        return json.loads((home / "batches" / batch / "summary.json").read_text())

    honored = night("night-1", passing, first)
    assert honored["gate"] == "passed" and honored["requests_honored"] == 2 and honored["model_version"] == 2

    rejected = night("night-2", rejecting, second)
    registry = client(home)
    version = registry.get_model_version(MODEL, str(rejected["model_version"]))
    assert rejected["gate"] == "rejected" and rejected["requests_honored"] == 0
    assert rejected["requests_needs_retrain"] == 2 and rejected["requests_pending"] == 0
    assert any("distinguishable from strangers" in reason for reason in rejected["gate_reasons"])
    assert version.tags["gate"] == "rejected" and "distinguishable from strangers" in version.tags["gate.reasons"]
    assert str(registry.get_model_version_by_alias(MODEL, "champion").version) == "2"  # the alias stayed
    status = ledger_json(home, passing, "status")
    assert (status["honored"], status["needs_retrain"], status["in_batch"]) == (2, 2, 0)
    entry = ledger_json(home, passing, "show", "night-2-0")["entries"][0]
    assert entry["reason"] == "gate_rejected" and entry["failed_nights"] == 1 and entry["model_version"] is None

    retrained = night("night-3", passing, [])  # nothing new: the requests that need a retrain are the batch
    batch = home / "batches" / "night-3"
    assert sorted(retrained["retrain_fallback"]) == ["night-2-0", "night-2-1"]
    unlearned = json.loads((batch / "unlearn.json").read_text())
    assert unlearned["method"] == "retrain" and not (batch / "drift.json").exists()  # no circuit branch
    assert "retrained from scratch for" in (batch / "report.html").read_text()
    assert retrained["gate"] == "passed" and retrained["model_version"] == 4
    version = client(home).get_model_version(MODEL, "4")
    assert version.tags["lethe.method"] == "retrain" and version.tags["lethe.batch_id"] == "night-3"
    entries = check_books(home, passing, ["night-1-0", "night-1-1", "night-2-0", "night-2-1"])
    assert {e["model_version"] for e in entries.values()} == {"2", "4"}

    # No resurrection, checked on what each step read. The retrain read the data without night 1's users
    # (night 2's were its forget set, taken out of what it fitted on by the split: tests/test_unlearn.py).
    candidate = json.loads((batch / "candidate" / "lethe_model.json").read_text())
    assert candidate["snapshot_hash"] == without(raw, first) != content_hash(raw)
    # A fresh base training after it reads the data without anyone honored (one epoch: what it read is the
    # point, and the recipe's other settings are the template's).
    one_epoch = write_params(tmp_path / "one-epoch.yaml", **COMMON, **PASS, **{"train.epochs": 1})
    command = [
        sys.executable,
        "-m",
        "components.train",
        "--params",
        str(one_epoch),
        "--out",
        str(tmp_path / "fresh-base"),
    ]
    result = subprocess.run(command, env=environment(home, one_epoch), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    fresh = json.loads((tmp_path / "fresh-base" / "lethe_model.json").read_text())
    assert fresh["snapshot_hash"] == without(raw, first + second)
    # So does `dvc repro` of the stage that builds the training data from the raw ratings, on this ledger (its
    # train stage is the same `components.train` as above).
    workspace = tmp_path / "dvc"
    workspace.mkdir()
    shutil.copy(REPO / "dvc.yaml", workspace / "dvc.yaml")
    shutil.copy(passing, workspace / "params.yaml")
    dvc = [str(Path(sys.executable).with_name("dvc"))]
    env = environment(home, workspace / "params.yaml", DVC_NO_ANALYTICS="1")
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    for args in (["init", "--no-scm"], ["repro", "prepare"]):
        result = subprocess.run(dvc + args, cwd=workspace, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    prepared = read_snapshot(workspace / "data" / "snapshot")
    assert not set(first + second) & set(prepared.interactions.user_id)
    assert prepared.manifest["content_hash"] == content_hash(prepared.interactions)
    assert set(first + second) <= set(raw.user_id)  # they were in the data the deletion removed them from
