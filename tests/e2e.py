"""What the end-to-end tests share: running `lethe` as a user would, a prepared home to start from, and the
ledger and registry read back as an auditor would.

Every end-to-end home starts from one template, built once per test session (across pytest-xdist workers,
under a file lock): the tiny config's snapshot, its trained base model and a migrated Airflow database. A
test copies it; `lethe nightly` then finds the base and registers it in the test's own MLflow store. The
template is never written to after it is built.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from filelock import FileLock

from tests.conftest import write_params

MODEL = "lethe-recommender"
# Verdicts forced by params, so that a test knows what it must find: a non-inferiority margin of 99% and a
# leakage level of 1e-300 (a leak only at |z| > 37) pass any candidate that ranks at all.
PASS = {"gate.max_ndcg_drop": 0.99, "gate.alpha": 1e-300}
# A short night, whatever its verdict, and a cheap one (short, forced to pass) for tests about what survives a
# kill or a lost server, not about how well the model forgets.
SHORT = {"unlearn.max_steps": 4, "eval.bootstrap_samples": 100, "circuits.retain_windows": 64}
CHEAP = {**PASS, **SHORT}
LETHE = str(Path(sys.executable).with_name("lethe"))


def environment(home: Path, params: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "LETHE_HOME": str(home), "LETHE_PARAMS": str(params), **extra}
    for name in ("MLFLOW_TRACKING_URI", "LETHE_LEDGER_URL", "LETHE_TEST_CRASH_AT", "LETHE_TEST_PAUSE_AT"):
        if name not in extra:
            env.pop(name, None)
    return env


def lethe(home: Path, params: Path, *args: str, timeout: float = 900, **extra: str) -> subprocess.CompletedProcess:
    """`lethe ARGS` as its own process group (session): a crash hook kills that group, never pytest."""
    return subprocess.run(
        [LETHE, *args],
        env=environment(home, params, **extra),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        start_new_session=True,
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
            for name in ("ledger.db", "ledger.db-wal", "ledger.db-shm"):  # prepare looked for honored requests
                (home / name).unlink(missing_ok=True)
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


def with_base(template: Path, home: Path) -> Path:
    """A LETHE_HOME holding only the template's snapshot and base model (what `lethe bench` starts from)."""
    for part in ("data", "models"):
        shutil.copytree(template / part, home / part)
    return home


def client(home: Path, tracking_uri: str | None = None) -> mlflow.MlflowClient:
    """The home's own MLflow store, or the tracking server the night used."""
    uri = tracking_uri or f"sqlite:///{home / 'mlflow.db'}"
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def champion(home: Path, tracking_uri: str | None = None) -> str:
    return str(client(home, tracking_uri).get_model_version_by_alias(MODEL, "champion").version)


def promoted_lineage(home: Path, tracking_uri: str | None = None) -> set[str]:
    """The champion and every version it descends from: the versions that were promoted in turn."""
    registry, lineage = client(home, tracking_uri), set()
    version = champion(home, tracking_uri)
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
    tracking_uri = extra.get("MLFLOW_TRACKING_URI")
    registry, lineage = client(home, tracking_uri), promoted_lineage(home, tracking_uri)
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


POSTGRES = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"


def require_postgres() -> None:
    """The PostgreSQL server this machine runs at 127.0.0.1:5432. In CI (CI set) a missing server fails the
    test, since .ci/run starts it; elsewhere the test is skipped with the reason."""
    import sqlalchemy as sa

    try:
        with sa.create_engine(POSTGRES, connect_args={"connect_timeout": 3}).connect():
            return
    except sa.exc.OperationalError as error:
        message = f"no PostgreSQL server answers at {POSTGRES}: {' '.join(str(error.orig).split())[:200]}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI must have one: .ci/run starts it)")
    pytest.skip(message)


def postgres_schema_url(host_port: str = "127.0.0.1:5432", prefix: str = "lethe") -> str:
    """A fresh schema in the test database (every test starts from an empty ledger), reached at `host_port`."""
    import uuid

    import sqlalchemy as sa

    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with sa.create_engine(POSTGRES).begin() as connection:
        connection.execute(sa.text(f"CREATE SCHEMA {schema}"))
    return f"postgresql+psycopg2://postgres@{host_port}/test?options=-csearch_path%3D{schema}"


class Relay:
    """A TCP relay from a loopback port to a server: `stop()` takes the server away for whoever reaches it
    through the relay (the port refuses, every open connection is cut); `start()` brings it back, same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        import socket

        self.target, self.connections, self.listener = target, [], None
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]

    def start(self) -> Relay:
        import socket
        import threading

        self.listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()
        return self

    def _accept(self, listener) -> None:
        import socket
        import threading

        while True:
            try:
                client_side, _ = listener.accept()
            except OSError:
                return  # stopped
            try:
                server_side = socket.create_connection(self.target, timeout=5)
            except OSError:
                client_side.close()
                continue
            server_side.settimeout(None)  # the 5 s bound is for connecting: an idle pooled connection stays open
            self.connections += [client_side, server_side]
            for source, sink in ((client_side, server_side), (server_side, client_side)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source, sink) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.close()

    def stop(self) -> None:
        import socket

        if self.listener is not None:
            with contextlib.suppress(OSError):
                self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked on it: no late client
            self.listener.close()
            self.listener = None
        for connection in self.connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
                connection.close()
        self.connections = []


def stored_files(root: Path):
    """(name, bytes) of every file under a folder, whatever its name or suffix (DVC's cache names files by hash)."""
    for path in sorted(Path(root).rglob("*")):
        if path.is_file():
            yield path.relative_to(root).as_posix(), path.read_bytes()


def sqlite_text(database: Path | bytes):
    """(table, text) for every text value of every table of a SQLite database: a file (read in place, its
    write-ahead log included) or a file's content (read from a copy)."""
    import sqlite3
    import tempfile

    with contextlib.ExitStack() as stack:
        if isinstance(database, bytes):
            copy = stack.enter_context(tempfile.NamedTemporaryFile(suffix=".db"))
            copy.write(database)
            copy.flush()
            database = Path(copy.name)
        connection = stack.enter_context(contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)))
        tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for row in connection.execute(f'SELECT * FROM "{table}"'):
                for value in row:
                    if isinstance(value, bytes):
                        value = value.decode("utf-8", "replace")
                    if isinstance(value, str):
                        yield table, value


def scan_for_rows(stores, forgotten, retained) -> list[str]:
    """Where any forgotten interaction (rows of user_id, item_id, timestamp) is still stored, over `stores`
    (name, bytes):
    - in any Parquet table (found by its magic bytes), as a (user, item) row, or an (item, timestamp) row where
      the table has timestamps;
    - in any other file, a SQLite database's text values included, as one of the forgotten rows' timestamps:
      a bare 9-10 digit number that no retained row has (so a match is theirs, not a neighbour's)."""
    import io
    import re

    import pandas as pd

    pairs = set(zip(forgotten.user_id, forgotten.item_id, strict=True))
    stamped = set(zip(forgotten.item_id, forgotten.timestamp, strict=True))
    stamps = sorted({str(t) for t in forgotten.timestamp} - {str(t) for t in retained.timestamp})
    pattern = re.compile(rf"(?<![0-9.])(?:{'|'.join(stamps)})(?![0-9])") if stamps else None
    found = []
    for name, content in stores:
        if content[:4] == b"PAR1":
            frame = pd.read_parquet(io.BytesIO(content))
            if {"user_id", "item_id"} <= set(frame.columns):
                hits = pairs & set(zip(frame.user_id, frame.item_id, strict=True))
                found += [f"{name}: (user, item) row {hit}" for hit in sorted(hits)[:3]]
            if {"item_id", "timestamp"} <= set(frame.columns):
                hits = stamped & set(zip(frame.item_id, frame.timestamp, strict=True))
                found += [f"{name}: (item, timestamp) row {hit}" for hit in sorted(hits)[:3]]
            continue
        if pattern is None:
            continue
        texts = sqlite_text(content) if content.startswith(b"SQLite format 3") else [(None, content.decode("latin-1"))]
        for table, text in texts:
            where = f"{table}: " if table else ""
            found += [f"{name}: {where}...{text[max(0, m.start() - 60) : m.end() + 20]!r}"
                      for m in pattern.finditer(text)][:3]  # fmt: skip
    return found
