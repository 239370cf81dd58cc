"""What the end-to-end tests share: running `lethe` as a user would, a prepared home to start from, and the
ledger and registry read back as an auditor would.

Every end-to-end home starts from one template, built once per test session (across pytest-xdist workers,
under a file lock): the tiny config's snapshot, its trained base model and a migrated Airflow database. A
test copies it; `lethe nightly` then finds the base and registers it in the test's own MLflow store. The
template is never written to after it is built.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
from filelock import FileLock

from tests.conftest import tiny_params, write_params

MODEL = "lethe-recommender"
LETHE = str(Path(sys.executable).with_name("lethe"))


def environment(home: Path, params: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "LETHE_HOME": str(home), "LETHE_PARAMS": str(params), **extra}
    env.pop("MLFLOW_TRACKING_URI", None)
    for name in ("LETHE_LEDGER_URL", "LETHE_TEST_CRASH_AT", "LETHE_TEST_PAUSE_AT"):
        if name not in extra:
            env.pop(name, None)
    return env


def lethe(home: Path, params: Path, *args: str, timeout: float = 900, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [LETHE, *args],
        env=environment(home, params, **extra),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def ran(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def ledger_json(home: Path, params: Path, *args: str, **extra: str) -> dict:
    return json.loads(ran(lethe(home, params, "ledger", *args, **extra)).stdout)


def build_template(root: Path) -> Path:
    """A LETHE_HOME with the tiny config's snapshot, base model and migrated Airflow database (read-only),
    built in `root` by the first caller; the others wait for it and reuse it."""
    template = root / "lethe-template" / ".lethe"
    with FileLock(str(root / "lethe-template.lock")):
        if not (template / "airflow" / ".migrated").exists():
            build = root / "lethe-template-build"
            shutil.rmtree(build, ignore_errors=True)
            build.mkdir(parents=True)
            params = write_params(build / "params.yaml")
            home = build / ".lethe"
            ran(lethe(home, params, "prepare"))
            ran(lethe(home, params, "train"))
            from components.cli import airflow_env  # the environment lethe nightly gives Airflow
            from pipeline.settings import Home

            env = airflow_env(Home(home), params)
            (home / "airflow").mkdir(parents=True)
            airflow = str(Path(sys.executable).with_name("airflow"))
            subprocess.run([airflow, "db", "migrate"], env=env, check=True, capture_output=True, timeout=600)
            (home / "airflow" / "airflow.cfg").unlink()  # it names this folder; each home writes its own
            shutil.rmtree(home / "airflow" / "logs", ignore_errors=True)
            (home / "airflow" / ".migrated").write_text("template")
            template.parent.mkdir(parents=True, exist_ok=True)
            home.rename(template)
    return template


def new_home(template: Path, folder: Path, **overrides) -> tuple[Path, Path]:
    """A fresh LETHE_HOME copied from the template, and a params file of the tiny config with `overrides`
    (which must leave the data, model and training settings alone: the base was trained under them)."""
    recipe = {key for key in overrides if key.split(".")[0] in ("seed", "data", "model", "train")}
    assert not recipe, f"the template's base model was trained without {recipe}"
    home = folder / ".lethe"
    shutil.copytree(template, home)
    return home, write_params(folder / "params.yaml", **overrides)


def client(home: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")


def champion(home: Path) -> str:
    return str(client(home).get_model_version_by_alias(MODEL, "champion").version)


def promoted_lineage(home: Path) -> set[str]:
    """The champion and every version it descends from: the versions that were promoted in turn."""
    registry, lineage = client(home), set()
    version = champion(home)
    while version not in lineage and version not in (None, "", "None"):
        lineage.add(version)
        version = registry.get_model_version(MODEL, version).tags.get("lethe.parent_version")
    return lineage


def all_requests(home: Path, params: Path, request_ids: list[str], **extra: str) -> dict[str, dict]:
    """request id -> its ledger entry with events (`lethe ledger show`)."""
    return {rid: ledger_json(home, params, "show", rid, **extra)["entries"][0] for rid in request_ids}


def check_books(home: Path, params: Path, request_ids: list[str], settled: bool = True, **extra: str) -> dict:
    """The invariants that hold after any night, finished or killed and then recovered:
    - no request is honored twice, and each honored one is honored by a promoted version whose batch it was in;
    - every promoted version's batch has all its requests honored by that version (none promoted without them);
    - with `settled`, nothing is left in_batch: every request is honored, pending again or quarantined."""
    registry, lineage = client(home), promoted_lineage(home)
    entries = all_requests(home, params, request_ids, **extra)
    for request_id, entry in entries.items():
        honored = [e for e in entry["events"] if e["to_state"] == "honored"]
        assert len(honored) <= 1, f"{request_id} honored twice: {honored}"
        if entry["state"] == "honored" and entry["reason"] != "already_honored":
            version = registry.get_model_version(MODEL, entry["model_version"])
            assert entry["model_version"] in lineage, f"{request_id} honored by unpromoted {entry['model_version']}"
            assert version.tags["lethe.batch_id"] == entry["batch_id"] and version.tags["gate"] == "passed"
        if settled:
            assert entry["state"] in ("honored", "pending_retry", "needs_retrain", "quarantined"), (request_id, entry)
    for version in lineage:
        tags = registry.get_model_version(MODEL, version).tags
        if tags.get("lethe.lineage") == "base":
            continue
        batch = [e for e in entries.values() if e["batch_id"] == tags["lethe.batch_id"]]
        claimed = [e for e in batch if e["reason"] != "already_honored"]
        assert claimed and all(e["state"] == "honored" and e["model_version"] == version for e in claimed), (
            f"version {version} was promoted without honoring batch {tags['lethe.batch_id']}: {claimed}"
        )
    return entries


def request_line(request_id: str, user_id: int, scope: str = "user", items=None) -> str:
    payload = {"request_id": request_id, "user_id": int(user_id), "scope": scope, "received_at": "2026-11-21T22:00:00Z"}
    if items is not None:
        payload["item_ids"] = [int(i) for i in items]
    return json.dumps(payload) + "\n"


def tiny_settings():
    from pipeline.settings import Settings

    return Settings.model_validate(tiny_params())
