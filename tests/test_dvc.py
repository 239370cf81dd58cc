"""`dvc repro` runs the same components as the DAG, on a tiny config, and is a no-op the second time."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, write_params

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
