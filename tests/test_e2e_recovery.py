"""When a night dies, for real: `lethe nightly` killed (the whole process group, as a power cut would) at every
step boundary in turn, each following night recovering the one before. Nothing lost, nothing honored twice, no
version promoted without its requests, no request honored by a version that was not promoted. (Requests that
keep failing the gate: test_e2e_fallback.py, a file of its own so that the long runs go to different workers.)

The kills come from the steps themselves (LETHE_TEST_CRASH_AT, components._common.hook_point), at a named
point, never from a timer. The nights form a chain: night k dies at boundary k, and night k+1's claim settles
what night k left. Each night brings one new request, so every night has work."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest

from pipeline.data import read_snapshot
from tests.e2e import CHEAP, check_books, client, ledger_json, lethe, new_home, promoted_lineage, ran, request_line

pytestmark = pytest.mark.e2e

# Each boundary with the manifest its step writes last and the one the next step would write (None: the last
# step of a night), and whether the night's claim has run by then.
BOUNDARIES = [
    ("ingest", "ingest.json", "claim.json"),
    ("claim", "claim.json", "split.json"),
    ("split", "split.json", "drift.json"),
    ("drift", "drift.json", "unlearn.json"),
    ("extract_circuits", "extract_circuits.json", "unlearn.json"),
    ("unlearn", "unlearn.json", "evaluate.json"),
    ("evaluate", "evaluate.json", "gate.json"),
    ("gate.promoted", "mlflow_run.json", "gate.json"),  # promoted in the registry, not yet honored in the ledger
    ("report", "summary.json", None),
]


# A chain of nights: about 10 minutes on a quiet machine, and the 900 s default is a hang detector, not a
# budget; a busy machine (one other job) took 850 s. Still bounded.
@pytest.mark.timeout(1500)
def test_a_night_killed_at_every_step_boundary_loses_nothing_and_honors_nothing_twice(tmp_path, template_home):
    home, params = new_home(template_home, tmp_path, **CHEAP)
    snapshot = read_snapshot(home / "data" / "snapshot")
    users = [int(u) for u in np.random.default_rng(11).choice(snapshot.members, len(BOUNDARIES) + 1, replace=False)]
    request_ids: list[str] = []

    def night(number: int, crash_at: str | None):
        request_ids.append(f"night-{number}")
        log = tmp_path / f"night-{number}.jsonl"
        user = users[number - 1]
        if crash_at == "report":  # a batch of one interaction request: only item_rank applies, to the report
            frame = snapshot.interactions
            items = frame[(frame.user_id == user) & (frame.split == "train")].item_id.head(3)
            log.write_text(request_line(request_ids[-1], user, scope="interactions", items=items))
        else:
            log.write_text(request_line(request_ids[-1], user))
        extra = {"LETHE_TEST_CRASH_AT": crash_at} if crash_at else {}
        return lethe(home, params, "nightly", "--deletion-log", str(log), "--batch-id", f"n{number}", **extra)

    for number, (boundary, written, next_manifest) in enumerate(BOUNDARIES, start=1):
        run = night(number, boundary)
        batch = home / "batches" / f"n{number}"
        assert run.returncode == -signal.SIGKILL, (boundary, run.returncode, run.stderr[-3000:])
        assert f"LETHE_TEST_CRASH_AT={boundary}" in run.stdout + run.stderr
        assert (batch / written).exists(), f"killed at {boundary} before {written} was written"
        assert next_manifest is None or not (batch / next_manifest).exists(), f"{boundary}: ran past the kill"
        if number > 1 and boundary != "gate.promoted":  # its claim settled the night before (the promoted-then-
            claim = json.loads((batch / "claim.json").read_text())  # killed night's own books are checked below)
            stuck = [e for e in check_books(home, params, request_ids, settled=False).values()]
            in_other_batches = [e for e in stuck if e["state"] == "in_batch" and e["batch_id"] != f"n{number}"]
            assert not in_other_batches, (boundary, in_other_batches)
            if BOUNDARIES[number - 2][0] != "ingest":  # a night killed after its claim held requests: settled now
                assert f"n{number - 1}" in claim["recovered"], (boundary, claim["recovered"])
        if boundary == "report":  # the per-user attacks had no whole user to score: outside the test, not NaN
            tests = json.loads((batch / "evaluate.json").read_text())["after"]["leakage"]["tests"]
            assert [attack for attack, test in tests.items() if test["applies"]] == ["item_rank"], tests
        if boundary == "gate.promoted":  # the dangerous window: promoted in the registry, not yet in the ledger
            version = client(home).get_model_version("lethe-recommender", max(promoted_lineage(home), key=int))
            assert version.tags["lethe.batch_id"] == f"n{number}" and version.tags["gate"] == "passed"
            assert ledger_json(home, params, "status")["in_batch"] == number

    ran(night(len(BOUNDARIES) + 1, None))  # the next night, undisturbed
    entries = check_books(home, params, request_ids, settled=True)
    assert all(entry["state"] == "honored" for entry in entries.values()), entries
    by_version = {}
    for request_id, entry in entries.items():
        by_version.setdefault(entry["model_version"], []).append(request_id)
    # the promoted-then-killed night's version honored every request claimed until then, at the next claim
    assert sorted(by_version.values(), key=len)[-1] == [f"night-{n}" for n in range(1, 9)], by_version
    recovered = json.loads((home / "batches" / "n9" / "claim.json").read_text())["recovered"]
    assert "honored by version" in recovered["n8"]
    status = ledger_json(home, params, "status")
    assert status["honored"] == len(request_ids) and status["in_batch"] == status["pending_retry"] == 0
