"""`dvc repro` runs the same components as the DAG, on a tiny config, and is a no-op the second time; once the
batch is honored, `lethe erase` leaves no copy of it in the workspace or DVC's cache."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline.data import read_snapshot
from pipeline.ledger import Ledger
from pipeline.requests import read_received
from tests.conftest import REPO, write_params
from tests.e2e import scan_for_rows, stored_files

pytestmark = pytest.mark.e2e


def dvc(workspace: Path, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "LETHE_HOME": str(workspace / ".lethe"),
        "DVC_NO_ANALYTICS": "1",
    }
    return subprocess.run(
        [str(Path(sys.executable).with_name("dvc")), *args],
        cwd=workspace,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_dvc_repro_runs_every_stage_and_then_has_nothing_to_do(tmp_path: Path):
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    write_params(tmp_path / "params.yaml", **{"unlearn.max_steps": 10})
    assert dvc(tmp_path, "init", "--no-scm").returncode == 0

    first = dvc(tmp_path, "repro")
    assert first.returncode == 0, first.stderr[-3000:]
    evaluation = json.loads((tmp_path / "batch" / "evaluate.json").read_text())
    assert evaluation["forgotten_users"] == 5
    assert evaluation["after"]["mia_auc"]["loss"]["value"] < evaluation["before"]["mia_auc"]["loss"]["value"]
    lock = (tmp_path / "dvc.lock").read_text()
    for stage in ("prepare", "train", "requests", "split", "unlearn", "evaluate"):
        assert f"  {stage}:" in lock

    second = dvc(tmp_path, "repro")
    assert second.returncode == 0
    assert "didn't change, skipping" in second.stdout
    assert "Running stage" not in second.stdout

    # The batch is honored (the DVC stages stop before a gate: the ledger is told directly, as a gate would). Then
    # `lethe erase` purges the workspace's outputs and DVC's cache: no copy of the forgotten rows is left, the
    # rest is as it was, and DVC knows the data changed (the base must be trained again without them).
    original = read_snapshot(tmp_path / "data" / "snapshot").interactions
    forgotten_users = {r.request.user_id for r in read_received(tmp_path / "batch" / "claimed.jsonl")}
    forgotten = original[original.user_id.isin(forgotten_users)]
    retained = original[~original.user_id.isin(forgotten_users)]
    assert scan_for_rows(stored_files(tmp_path / ".dvc" / "cache"), forgotten, retained)  # cached before
    ledger = Ledger(f"sqlite:///{tmp_path / '.lethe' / 'ledger.db'}")
    assert ledger.honor("batch", "1") == 5
    ledger.dispose()
    erased = subprocess.run(
        [str(Path(sys.executable).with_name("lethe")), "erase", "--snapshot", "data/snapshot", "--dvc-root", "."],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "LETHE_HOME": str(tmp_path / ".lethe"), "LETHE_PARAMS": str(tmp_path / "params.yaml")},
    )  # fmt: skip
    assert erased.returncode == 0, erased.stderr[-3000:]
    assert scan_for_rows(stored_files(tmp_path), forgotten, retained) == []  # workspace, cache and .lethe
    after = read_snapshot(tmp_path / "data" / "snapshot").interactions
    pd.testing.assert_frame_equal(after, retained.reset_index(drop=True))
    status = dvc(tmp_path, "status", "--json")
    assert status.returncode == 0 and "train" in json.loads(status.stdout), status.stdout
    assert "prepare" not in json.loads(status.stdout)  # the purged snapshot is what the lock file records
