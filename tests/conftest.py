"""Shared fixtures: a tiny config derived from the real params.yaml, real MovieLens, a briefly trained model."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.data import load_movielens, prepare_snapshot
from pipeline.settings import Settings

REPO = Path(__file__).resolve().parent.parent
torch.set_num_threads(2)


# `make test` gives whole files to its pytest workers, two units each to start with. The end-to-end files take
# 5-10 minutes each (one Python process per DAG step); started late, one of them would hold up the whole run, so
# they go first, one per worker, and the shorter long files (a few minutes) last, for whichever worker frees up
# first. --no-loadscope-reorder keeps this order instead of ordering files by how many tests they hold.
LONGEST_FIRST = ("test_e2e_recovery.py", "test_e2e.py", "test_e2e_fallback.py", "test_e2e_servers.py")
LONG_LAST = ("test_bench.py", "test_dvc.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)} | dict.fromkeys(LONG_LAST, len(LONGEST_FIRST) + 1)
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable: a file keeps its order


def tiny_params(**overrides) -> dict:
    """The repository's params.yaml shrunk to run in seconds; overrides are dotted keys."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["max_users"] = 250
    params["model"]["max_len"] = 32
    params["model"]["tiny"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    params["train"].update(epochs=8, patience=8, batch_size=32, learning_rate=0.005, warmup_steps=5)
    params["eval"]["bootstrap_samples"] = 200
    params["unlearn"].update(max_steps=40, eval_every=2)
    for dotted, value in overrides.items():
        node = params
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return params


def write_params(path: Path, **overrides) -> Path:
    path.write_text(yaml.safe_dump(tiny_params(**overrides)))
    return path


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings.model_validate(tiny_params())


@pytest.fixture(scope="session")
def ratings():
    return load_movielens()


@pytest.fixture(scope="session")
def snapshot(ratings, settings):
    return prepare_snapshot(ratings, settings.data, settings.seed)


@pytest.fixture(scope="session")
def trained(snapshot, template_home):
    """The base model of the tiny config with its training report (read-only: copy to mutate): the one the
    end-to-end template trained with `lethe train` on this same snapshot, the same weights to the bit as
    training here (checked 2026-12-06), so every worker loads it instead of training its own."""
    from pipeline.model import load_model

    model, meta = load_model(template_home / "models" / "base")
    assert meta["snapshot_hash"] == snapshot.manifest["content_hash"], "the template was built on other data"
    return model, json.loads((template_home / "models" / "base" / "train.json").read_text())


@pytest.fixture
def fresh_model(trained):
    return copy.deepcopy(trained[0])


@pytest.fixture(scope="session")
def template_home(tmp_path_factory) -> Path:
    """The end-to-end tests' starting home (tests/e2e.py), built once for all pytest-xdist workers: each
    worker's basetemp is a child of the session's."""
    from tests.e2e import build_template

    base = tmp_path_factory.getbasetemp()
    return build_template(base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base)


def with_unlearn(settings: Settings, **changes) -> Settings:
    """The same settings with some `unlearn` values changed."""
    return settings.model_copy(update={"unlearn": settings.unlearn.model_copy(update=changes)})
