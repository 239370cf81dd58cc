"""The nightly job for real: `lethe nightly` runs the Airflow DAG on a migrated SQLite database,
MLflow records the batch, and the registry holds the gated candidate."""

import json
import re
import shutil
import sqlite3
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from pipeline.data import read_snapshot
from pipeline.erasure import snapshot_hashes
from tests.e2e import (
    MODEL,
    PASS,
    check_books,
    ledger_json,
    lethe,
    new_home,
    ran,
    request_line,
    scan_for_rows,
    sqlite_text,
    stored_files,
)

pytestmark = pytest.mark.e2e
# The verdict is forced to pass (tests.e2e.PASS); the rejected verdict is forced in test_e2e_fallback.py.


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, template_home):
    root = tmp_path_factory.mktemp("nightly")
    home, params = new_home(template_home, root, **PASS)
    snapshot = read_snapshot(home / "data" / "snapshot")
    # Users with three-digit ids or more: the PII scan looks for raw ids as bare numbers, and one- or two-digit
    # numbers stand in every file as counts and settings.
    members = [int(u) for u in np.random.default_rng(7).permutation(snapshot.members) if u >= 100]
    sample, later = members[:5], members[5:7]
    lines = [request_line(f"sample-{n}", user) for n, user in enumerate(sample, start=1)]
    bad = [
        '{"request_id": "broken", "user_id": 1,\n',
        request_line("who", 987654),
        request_line("what", later[1]).replace('"user"', '"all"'),
    ]
    log = root / "deletions.jsonl"
    log.write_text("".join([lines[0], bad[0], lines[1], bad[1], lines[2], bad[2], *lines[3:]]))
    run = ran(lethe(home, params, "nightly", "--deletion-log", str(log), "--batch-id", "first"))
    mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
    return {
        "root": root,
        "home": home,
        "params": params,
        "log": log,
        "run": run,
        "sample": sample,
        "later": later,
        "summary": json.loads((home / "batches" / "first" / "summary.json").read_text()),
    }


def test_valid_requests_go_through_and_bad_lines_are_reported_with_file_line_and_reason(workspace):
    summary, log = workspace["summary"], str(workspace["log"])
    assert summary["requests_total"] == 8
    assert summary["requests_honored"] + summary["requests_pending"] == 5
    assert [(r["source"], r["line"], r["reason"]) for r in summary["rejections"]] == [
        (log, 2, "malformed_json"),
        (log, 6, "invalid_request"),
        (log, 4, "unknown_user"),
    ]
    printed = workspace["run"].stdout
    assert f"{log}:4: unknown_user" in printed and "== Lethe nightly summary ==" in printed


def test_the_ledger_accounts_for_every_line_of_the_log(workspace):
    status = lethe(workspace["home"], workspace["params"], "ledger", "status")
    assert status.returncode == 0, status.stderr
    counts = json.loads(status.stdout)
    assert workspace["summary"]["gate"] == "passed" and workspace["summary"]["requests_honored"] == 5
    assert counts["quarantined"] == 3 and counts["honored"] == 5 and counts["pending_retry"] == 0
    assert counts["in_batch"] == counts["validated"] == counts["received"] == 0
    first = json.loads(workspace["log"].read_text().splitlines()[0])["request_id"]
    shown = lethe(workspace["home"], workspace["params"], "ledger", "show", first)
    entry = json.loads(shown.stdout)["entries"][0]
    assert entry["batch_id"] == "first" and entry["state"] == "honored"
    assert [e["to_state"] for e in entry["events"]] == ["received", "validated", "in_batch", "honored"]
    assert entry["model_version"] == str(workspace["summary"]["model_version"]) == "2"
    check_books(workspace["home"], workspace["params"], [f"sample-{n}" for n in range(1, 6)])


def test_the_registry_holds_a_gated_candidate_and_leakage_went_down(workspace):
    client = mlflow.MlflowClient()
    summary = workspace["summary"]
    base = client.get_model_version(MODEL, "1")
    candidate = client.get_model_version(MODEL, str(summary["model_version"]))
    assert base.tags["lethe.lineage"] == "base" and str(candidate.version) == "2"
    assert candidate.tags["gate"] == summary["gate"] == "passed" and summary["gate_reasons"] == []
    assert "gate.reasons" not in candidate.tags and candidate.tags["lethe.batch_id"] == "first"
    assert float(candidate.tags["ndcg10"]) == pytest.approx(summary["ndcg10_after"], abs=1e-5)
    assert float(candidate.tags["mia_auc"]) == pytest.approx(summary["mia_auc_after"], abs=1e-4)
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert str(champion.version) == "2" and champion.tags["lethe.parent_version"] == "1"
    before = {a: e["value"] for a, e in summary["mia_auc_before_by_attack"].items()}
    after = {a: e["value"] for a, e in summary["mia_auc_after_by_attack"].items()}
    assert min(before.values()) > 0.6
    assert all(after[attack] < before[attack] for attack in before)
    assert abs(summary["mia_auc_after"] - 0.5) < abs(summary["mia_auc_before"] - 0.5)


def test_the_batch_run_carries_the_evidence(workspace):
    client = mlflow.MlflowClient()
    run = client.get_run(workspace["summary"]["mlflow_run_id"])
    assert run.data.tags["gate"] == workspace["summary"]["gate"]
    assert run.data.params["unlearn.method"] == "grad_diff"
    assert "after.ndcg10" in run.data.metrics and "after.mia_auc.minkpp" in run.data.metrics
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "report", "manifests", "contracts"} <= logged
    contracts = {a.path for a in client.list_artifacts(run.info.run_id, "contracts")}
    assert contracts == {"contracts/deletion_log.json", "contracts/split.json"}
    manifests = {a.path for a in client.list_artifacts(run.info.run_id, "manifests")}
    assert "manifests/split.json" in manifests


def test_the_first_batch_extracts_circuits_for_the_champion_lineage(workspace):
    home = workspace["home"]
    drift = json.loads((home / "batches" / "first" / "drift.json").read_text())
    assert drift["extract"] and "no circuits" in drift["reasons"][0] and drift["lineage_root"] == "1"
    cached = json.loads((home / "circuits" / "current" / "circuits.json").read_text())
    assert cached["lineage_root"] == "1" and cached["model_version"] == "1"
    assert sum(cached["sizes"].values()) > 0


def test_the_champion_serves_recommendations_without_seen_items(workspace):
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    snapshot = read_snapshot(workspace["home"] / "data" / "snapshot")
    history = snapshot.interactions[snapshot.interactions.user_id == snapshot.members[3]].item_id.tolist()[:20]
    out = model.predict(pd.DataFrame({"history": [history, history[:3]]}), params={"k": 7})
    assert [len(row) for row in out["recommended"]] == [7, 7]
    assert not set(out["recommended"][0]) & set(history)
    assert set(np.concatenate(out["recommended"].to_numpy())) <= set(snapshot.items.item_id)


def test_a_night_with_nothing_new_short_circuits_and_changes_nothing_but_the_quarantine(workspace):
    """One night, two ways of having nothing to unlearn: the first night's log again (skipped whole by its
    content hash: eight duplicates) and a file whose only line is not a request (quarantined). The DAG
    short-circuits to the report, says so, registers nothing, and the ledger gains the quarantined line only."""
    home, params = workspace["home"], workspace["params"]
    before = ledger_json(home, params, "status")
    landing = workspace["root"] / "landing"
    landing.mkdir()
    shutil.copy(workspace["log"], landing / "a-again.jsonl")
    (landing / "b-bad-only.jsonl").write_text('{"not json\n')
    versions_before = len(mlflow.MlflowClient().search_model_versions(f"name='{MODEL}'"))
    run = ran(lethe(home, params, "nightly", "--deletion-log", str(landing), "--batch-id", "nothing-new"))
    summary = json.loads((home / "batches" / "nothing-new" / "summary.json").read_text())
    assert summary["gate"] == "skipped" and summary["model_version"] is None and summary["requests_claimed"] == 0
    assert (summary["requests_total"], summary["requests_duplicate"], summary["requests_rejected"]) == (1, 8, 1)
    assert summary["rejections"][0]["reason"] == "malformed_json"
    assert "no new valid requests" in run.stdout
    assert not (home / "batches" / "nothing-new" / "split.json").exists()
    assert len(mlflow.MlflowClient().search_model_versions(f"name='{MODEL}'")) == versions_before
    assert ledger_json(home, params, "status") == {**before, "quarantined": before["quarantined"] + 1}


def test_a_person_forgotten_asks_again_and_the_next_batch_goes_on(workspace):
    """The held-out case: a user honored on one night asks again under a new id on the next, beside a new
    user's request. The repeat is answered (honored by the version that honored the original, linked to it);
    the new request is unlearned, gated and honored as usual; nothing is left in_batch. The small batch also
    reuses the cached circuits."""
    home, params = workspace["home"], workspace["params"]
    log = workspace["root"] / "next.jsonl"
    log.write_text(request_line("next-1", workspace["later"][0]) + request_line("again-1", workspace["sample"][0]))
    ran(lethe(home, params, "nightly", "--deletion-log", str(log), "--batch-id", "second"))
    summary = json.loads((home / "batches" / "second" / "summary.json").read_text())
    assert summary["requests_total"] == 2 and summary["requests_claimed"] == 1
    assert summary["requests_already_honored"] == 1 and summary["requests_honored"] == 1
    assert summary["already_honored"] == [{"request_id": "again-1", "original": "sample-1", "model_version": "2"}]
    assert summary["gate"] == "passed" and summary["model_version"] == 3
    again = ledger_json(home, params, "show", "again-1")["entries"][0]
    assert (again["state"], again["reason"], again["original_key"], again["model_version"]) == (
        "honored",
        "already_honored",
        "sample-1",
        "2",
    )
    assert [e["to_state"] for e in again["events"]] == ["received", "validated", "honored"]
    assert "already honored" in (home / "batches" / "second" / "report.html").read_text()
    status = ledger_json(home, params, "status")
    assert status["in_batch"] == status["validated"] == 0 and status["honored"] == 7
    check_books(home, params, [*(f"sample-{n}" for n in range(1, 6)), "next-1", "again-1"])

    drift = json.loads((home / "batches" / "second" / "drift.json").read_text())
    assert drift["extract"] is False, drift
    assert drift["figures"]["popularity_jsd"] < 0.01
    assert not (home / "batches" / "second" / "extract_circuits.json").exists()
    assert summary["circuits"] == "reused"


def test_nothing_honored_is_kept_in_any_store_and_everyone_else_is_intact(workspace, template_home):
    """After both honored nights, every store under LETHE_HOME (the snapshot, the batch folders, the ledger,
    MLflow's database and artifact store, Airflow's database and logs) is scanned for the forgotten users' rows:
    none is left, and the snapshot holds every other row as it was, under a new content hash it records."""
    home = workspace["home"]
    original = read_snapshot(template_home / "data" / "snapshot")
    gone = [*workspace["sample"], workspace["later"][0]]
    frame = original.interactions
    forgotten, retained = frame[frame.user_id.isin(gone)], frame[~frame.user_id.isin(gone)]
    assert scan_for_rows(stored_files(template_home / "data"), forgotten, retained)  # there before: the scan sees
    assert scan_for_rows(stored_files(home), forgotten, retained) == []
    now = read_snapshot(home / "data" / "snapshot")
    pd.testing.assert_frame_equal(now.interactions, retained.reset_index(drop=True))
    assert snapshot_hashes(now.manifest) >= {original.manifest["content_hash"], now.manifest["content_hash"]}
    assert [e["rows"] for e in now.manifest["erasures"]] == [
        int(frame.user_id.isin(workspace["sample"]).sum()),
        int((frame.user_id == workspace["later"][0]).sum()),
    ]
    summaries = [json.loads((home / "batches" / b / "summary.json").read_text()) for b in ("first", "second")]
    assert all(s["rows_erased"] > 0 for s in summaries)


def raw_id_pattern(user_ids) -> re.Pattern:
    """Any of these ids as a bare number in text: no digit, letter, underscore or decimal point beside it (so
    0.478 is a figure, not user 478)."""
    ids = "|".join(str(u) for u in user_ids)
    return re.compile(rf"(?<![0-9A-Za-z_.])(?:{ids})(?![0-9A-Za-z_]|\.[0-9])")


# Files that hold the interaction data itself, raw ids included, until the data is erased: the snapshot and a
# batch's split and claimed requests. Pixels (PNG) say nothing. Everything else must never carry a raw id.
DATA_FILES = ("data/snapshot/interactions.parquet", "claimed.jsonl", "split.parquet", ".png")
# Fields that hold people's ids (user_id, user_ids, users, member_ids, ...), as the last key of a path. Our own
# counts are named otherwise (forgotten_users, eval_users, non_members, user_activity: numbers of, not ids).
PEOPLE = re.compile(r"\.(?:user|member|person|subject)(?:s|_?ids?)?(?:\[\d+\])?$", re.IGNORECASE)


def json_hits(value, pattern: re.Pattern, path: str = "") -> list[str]:
    """Raw ids in a parsed JSON document: in any string (a message, a name, a path, a tag), in any key, and
    as a number in a field about people. Other numbers are item ids, tokens, counts and weights: MovieLens user
    ids (1-671) share their range, so a bare number is a user id only where the field says so."""
    if isinstance(value, dict):
        found = []
        for key, item in value.items():
            where = f"{path}.{key}"
            if (
                pattern.fullmatch(str(key))
                and PEOPLE.search(path)
                or not str(key).isdigit()
                and pattern.search(str(key))
            ):
                found.append(f"{where} (key)")
            found += json_hits(item, pattern, where)
        return found
    if isinstance(value, list):
        return [hit for index, item in enumerate(value) for hit in json_hits(item, pattern, f"{path}[{index}]")]
    if isinstance(value, str):
        return [f"{path}: {value[:120]!r}"] if pattern.search(value) else []
    if isinstance(value, int) and not isinstance(value, bool) and PEOPLE.search(path):
        return [f"{path}: {value}"] if pattern.fullmatch(str(value)) else []
    return []


def text_hits(text: str, pattern: re.Pattern) -> list[str]:
    """JSON (or JSON Lines) is read as such; any other text is searched whole."""
    try:
        return json_hits(json.loads(text), pattern)
    except ValueError:
        pass
    lines = text.splitlines()
    if lines and all(line.lstrip().startswith(("{", "[")) for line in lines if line.strip()):
        try:
            return [hit for line in lines if line.strip() for hit in json_hits(json.loads(line), pattern)]
        except ValueError:
            pass
    return [f"...{text[max(0, m.start() - 60) : m.end() + 60]!r}..." for m in pattern.finditer(text)]


def scan_for_raw_ids(home: Path, user_ids) -> list[str]:
    """Every place under LETHE_HOME (the ledger, Airflow's and MLflow's stores and MLflow's artifacts live
    there), binary files included, and every text column of its SQLite databases, where one of `user_ids`
    stands as a raw id. Safetensors files are read by their JSON header (the rest is weights)."""
    pattern, found = raw_id_pattern(user_ids), []
    for path in sorted(home.rglob("*")):
        relative = path.relative_to(home).as_posix()
        if not path.is_file() or relative.endswith(DATA_FILES):
            continue
        content = path.read_bytes()
        if content.startswith(b"SQLite format 3"):
            for table, value in sqlite_text(path):
                found += [f"{relative}:{table}: {hit}" for hit in text_hits(value, pattern)]
        elif path.suffix == ".safetensors":
            header = content[8 : 8 + int.from_bytes(content[:8], "little")].decode()
            found += [f"{relative}: {hit}" for hit in text_hits(header, pattern)]
        else:
            found += [f"{relative}: {hit}" for hit in text_hits(content.decode("utf-8", "replace"), pattern)]
    return found


def test_no_raw_id_of_anyone_who_entered_the_ledger_is_kept_outside_the_data(workspace):
    """Every id that ever entered the ledger (both nights' requests and the quarantined lines) is searched for
    in every file under LETHE_HOME and in the databases' text columns; and the scan finds a planted one."""
    home = workspace["home"]
    ids = [*workspace["sample"], *workspace["later"], 987654]
    assert scan_for_raw_ids(home, ids) == []

    planted = workspace["root"] / "planted"  # the scan's own test: the same scan over a copy with planted ids
    shutil.copytree(home, planted, ignore=shutil.ignore_patterns("*.parquet", "airflow"))
    report = next(planted.glob("mlartifacts/**/report.html"))
    report.write_text(report.read_text() + f"<p>{workspace['sample'][1]}</p>")
    summary = planted / "batches" / "second" / "summary.json"
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "user_ids": [ids[2]]}))
    with sqlite3.connect(planted / "mlflow.db") as connection:
        connection.execute("UPDATE runs SET name = ? WHERE rowid = 1", (f"batch for {ids[-1]}",))
    with sqlite3.connect(planted / "ledger.db") as connection:
        connection.execute("UPDATE events SET actor = ? WHERE id = 1", (f"batch first ({workspace['later'][0]})",))
    leaks = scan_for_raw_ids(planted, ids)  # (SQLite's write-ahead log may show a planted row a second time)
    marks = [str(u) for u in (workspace["sample"][1], ids[2], ids[-1], workspace["later"][0])]
    assert all(any(mark in leak for mark in marks) for leak in leaks), leaks
    for where in ("report.html", "summary.json: .user_ids[0]", "mlflow.db:runs", "ledger.db:events"):
        assert any(where in leak for leak in leaks), (where, leaks)


def test_the_audit_combines_both_nights_and_its_report_renders_in_a_browser(workspace):
    """After the two honored nights: `lethe audit` combines every request honored by an unlearned model (five on
    the first night, one on the second; the repeat carries its original's evidence, not its own) into one test,
    over a ledger whose chain verifies; the report opens in headless Chromium with every plot and no console
    error; and a receipt for one of them verifies, while a receipt altered by one byte does not."""
    from tests.browser import open_page

    home, params, out = workspace["home"], workspace["params"], workspace["root"] / "audit"
    ran(lethe(home, params, "audit", "--out", str(out)))
    record = json.loads((out / "audit.json").read_text())
    assert [n["batch_id"] for n in record["nights"]] == ["first", "second"]
    assert [n["requests"] for n in record["nights"]] == [5, 1]
    assert record["cumulative"]["requests"] == 6 and record["ledger_chain"]["ok"]
    z = [r["z"] for r in record["requests"]]
    assert record["cumulative"]["z"] == pytest.approx(sum(z) / len(z) ** 0.5)
    from scipy.stats import norm  # (z_{1-alpha/2} + z_power) / sqrt(n), at the test's alpha of 1e-300 (tests.e2e.PASS)

    assert record["cumulative"]["mde_z"] == pytest.approx((norm.isf(0.5e-300) + norm.ppf(0.8)) / 6**0.5, rel=1e-6)
    assert all(set(n["tests"]) == {"loss", "mink", "minkpp", "item_rank"} for n in record["nights"])
    one = workspace["root"] / "audit-one"
    ran(lethe(home, params, "audit", "--request", "next-1", "--out", str(one)))
    assert json.loads((one / "audit.json").read_text())["cumulative"]["requests"] == 1

    page = open_page(out / "audit.html")
    assert page["errors"] == [] and page["title"] == "Lethe audit"
    assert page["images"] == 3 and page["images_loaded"] == 3  # histograms, p-values, circuits per layer

    keys = workspace["root"] / "keys"
    ran(lethe(home, params, "receipt", "--keygen", str(keys)))
    signed = {"LETHE_RECEIPT_KEY_FILE": str(keys / "receipt_key.pem")}
    receipt = workspace["root"] / "receipt.json"
    ran(lethe(home, params, "receipt", "sample-2", "--out", str(receipt), **signed))
    assert ran(lethe(home, params, "receipt", "--verify", str(receipt), **signed)).returncode == 0
    text = receipt.read_text()
    altered = workspace["root"] / "altered.json"
    altered.write_text(text.replace('"version": "2"', '"version": "3"', 1))
    failed = lethe(home, params, "receipt", "--verify", str(altered), **signed)
    assert failed.returncode == 1 and "signature does not match" in failed.stderr
