"""`lethe bench --quick` end to end on the tiny config: every method, one row each, logged to MLflow."""

import json

import mlflow
import pytest

from components import bench
from pipeline.bench import ROW_KEYS, jensen_shannon
from tests.conftest import write_params

pytestmark = pytest.mark.e2e


def test_jensen_shannon_on_known_distributions():
    import torch

    same = torch.tensor([[0.5, 0.5]], dtype=torch.double)
    disjoint = (torch.tensor([[1.0, 0.0]], dtype=torch.double), torch.tensor([[0.0, 1.0]], dtype=torch.double))
    assert jensen_shannon(same, same) == pytest.approx(0.0)
    assert jensen_shannon(*disjoint) == pytest.approx(1.0)


def test_quick_benchmark_writes_rows_table_plot_and_runs(tmp_path, monkeypatch):
    params = write_params(tmp_path / "params.yaml")
    home, out = tmp_path / ".lethe", tmp_path / "results"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = bench.main(["--params", str(params), "--home", str(home), "--quick", "--out", str(out)])

    rows = json.loads((out / "benchmark.json").read_text())
    methods = [row["method"] for row in rows]
    assert methods == [
        "original", "retrain", "finetune", "grad_ascent", "grad_diff", "npo", "ssd", "grad_projection", "cure"
    ]  # fmt: skip
    assert all(set(ROW_KEYS) <= set(row) for row in rows)
    original, retrain = rows[0], rows[1]
    assert retrain["jsd_to_retrain"] == pytest.approx(0.0) and retrain["privleak"] == pytest.approx(0.0)
    assert retrain["speedup_vs_retrain"] == pytest.approx(1.0) and retrain["ndcg10_vs_retrain"] == pytest.approx(1.0)
    assert retrain["ndcg10_vs_retrain_ci"] == pytest.approx([1.0, 1.0])
    assert original["wall_s"] == 0.0 and original["speedup_vs_retrain"] is None
    # the model before unlearning remembers its members: it leaks more than the retrained model
    assert original["mia_auc_loss_minus_retrain"] > 0
    for row in rows:
        assert 0.0 <= row["jsd_to_retrain"] <= 1.0
        low, high = row["ndcg10_retain_ci"]
        assert low <= row["ndcg10_retain"] <= high
        for attack in ("loss", "mink", "minkpp"):
            low, high = row[f"mia_auc_{attack}_ci"]
            assert low <= row[f"mia_auc_{attack}"] <= high
    assert all(row["peak_mem_mb"] > 0 for row in rows[1:])
    summary = json.loads((out / "benchmark_summary.json").read_text())
    assert summary["retrain_floor"] and 0.0 <= summary["circuit_stability"]["jaccard_successive_batches"] <= 1.0
    table = (out / "benchmark.md").read_text()
    assert "| cure | user | 0.05 |" in table and "| original | user | 0.05 |" in table
    floor = summary["retrain_floor"][0]
    assert floor["ndcg10_ratio_ci"][0] <= floor["ndcg10_ratio"] <= floor["ndcg10_ratio_ci"][1]
    assert (out / "pareto.png").stat().st_size > 0

    mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
    children = mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{result['run_id']}'")
    assert len(children) == len(rows)
