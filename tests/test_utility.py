"""`lethe utility`: every base model beside MostPop and SASRec (RecTools, its own environment) on one split.

The tiny config's base model from the end-to-end template (read only); SASRec runs for real in .venv-peer with a
few epochs: what is checked is that every figure is of the same users and the same ranking, not how good SASRec is.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO, write_params
from tests.e2e import lethe, ran

PEER_PYTHON = Path(os.environ.get("LETHE_PEER_VENV", REPO / ".venv-peer")) / "bin" / "python"


@pytest.fixture(scope="module")
def peer() -> Path:
    if not PEER_PYTHON.exists():
        message = f"no SASRec environment at {PEER_PYTHON.parent.parent}: `make peer` makes it"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    return PEER_PYTHON


def test_every_model_is_measured_on_the_same_users_and_the_same_ranking(template_home, peer, tmp_path):
    params = write_params(tmp_path / "params.yaml", **{"utility.sasrec.epochs": [1, 3], "utility.sasrec.n_factors": 16})
    out = tmp_path / "utility"
    ran(lethe(template_home, params, "utility", "--model", f"tiny={template_home}", "--peer-python", str(peer),
              "--out", str(out), timeout=600))  # fmt: skip
    record = json.loads((out / "utility.json").read_text())
    models = {entry["name"]: entry for entry in record["models"]}
    assert list(models) == ["MostPop", "SASRec (RecTools)", "tiny"]
    trained = json.loads((template_home / "models" / "base" / "train.json").read_text())
    for entry in models.values():
        assert entry["test"]["users"] == entry["val"]["users"] == trained["members"] == record["split"]["members"]
    # the same figures the training step reported for its model and for MostPop: the same split and ranking
    for name, reported in (("tiny", trained["test"]), ("MostPop", trained["mostpop_test"])):
        for metric in ("ndcg10", "hr10"):
            assert models[name]["test"][metric]["value"] == pytest.approx(reported[metric], abs=1e-12), name
            low, high = models[name]["test"][metric]["low"], models[name]["test"][metric]["high"]
            assert low <= reported[metric] <= high and low < high
    # SASRec: validation chose among the candidates, on the ranks it handed over (recomputed here, not taken)
    sasrec = models["SASRec (RecTools)"]
    report = sasrec["provenance"]
    assert [row["epochs"] for row in report["validation"]] == [1, 3]
    chosen = next(row for row in report["validation"] if row["epochs"] == report["chosen_epochs"])
    assert chosen["val_ndcg10"] == max(row["val_ndcg10"] for row in report["validation"])
    assert sasrec["val"]["ndcg10"]["value"] == pytest.approx(chosen["val_ndcg10"], abs=1e-9)
    assert report["library"]["rectools"] == "0.19.0"
    difference = models["tiny"]["test"]["minus_sasrec"]["ndcg10"]["value"]
    assert difference == pytest.approx(models["tiny"]["test"]["ndcg10"]["value"] - sasrec["test"]["ndcg10"]["value"])
    table = (out / "utility.md").read_text()
    assert all(f"| {name} |" in table for name in models)


def test_models_on_different_splits_or_without_a_peer_are_refused_with_a_reason(template_home, tmp_path):
    params = write_params(tmp_path / "params.yaml")
    other = tmp_path / "other"
    for part in ("data/snapshot", "models/base"):
        shutil.copytree(template_home / part, other / part)
    manifest = other / "data" / "snapshot" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "content_hash": "0" * 64}))
    refused = lethe(template_home, params, "utility", "--model", f"tiny={template_home}", "--model", f"other={other}")
    assert refused.returncode == 2 and "different data snapshots: not one split" in refused.stderr, refused.stderr
    empty = lethe(template_home, params, "utility", "--model", f"none={tmp_path / 'empty'}")
    assert empty.returncode == 2 and "holds no trained base model" in empty.stderr, empty.stderr
    missing = tmp_path / "no-peer" / "bin" / "python"
    alone = lethe(template_home, params, "utility", "--model", f"tiny={template_home}", "--peer-python", str(missing))
    assert alone.returncode == 2 and "`make peer` builds it" in alone.stderr, alone.stderr
    assert "Traceback" not in refused.stderr + empty.stderr + alone.stderr
