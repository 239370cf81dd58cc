"""MLflow: one experiment, a run per batch, the registered recommender and its `champion` alias.

Gates are our own code (pipeline.gate); this adapter only reads and writes the tracking store.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model, infer_signature

from pipeline.settings import Home, MlflowSettings

CHAMPION = "champion"
SERVING_CODE = Path(__file__).with_name("serving.py")
PACKAGE_DIR = Path(__file__).parent
RUN_FILE = "mlflow_run.json"
SERVING_REQUIREMENTS = ["torch==2.13.0", "transformers>=5,<6", "safetensors", "pandas", "pydantic>=2", "pyyaml"]


class Registry:
    def __init__(self, home: Home, settings: MlflowSettings) -> None:
        """Point MLflow at LETHE_HOME's store (or MLFLOW_TRACKING_URI); create the experiment once.

        Against a tracking server, every request is bounded by params.yaml (MLflow's own defaults retry for
        minutes), and the server keeps the artifacts where it was told to (--serve-artifacts)."""
        self.tracking_uri = home.tracking_uri
        self.remote = self.tracking_uri.startswith(("http://", "https://"))
        if self.remote:
            os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(settings.http_timeout_s)
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(settings.http_max_retries)
            os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = str(settings.http_backoff_factor)
        mlflow.set_tracking_uri(self.tracking_uri)
        self.client = MlflowClient()
        self.model_name = settings.registered_model
        experiment = self.client.get_experiment_by_name(settings.experiment)
        self.experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self.client.create_experiment(
                settings.experiment, artifact_location=None if self.remote else home.artifact_root
            )
        )
        mlflow.set_experiment(experiment_id=self.experiment_id)

    def champion(self) -> ModelVersion | None:
        try:
            return self.client.get_model_version_by_alias(self.model_name, CHAMPION)
        except MlflowException as error:
            if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None  # no such model or alias yet; a lost server is an error, never "no champion"
            raise

    def batch_run_id(self, batch_dir: Path, batch_id: str) -> str:
        """The batch's run, created by the first step that needs it and reused by the others."""
        path = batch_dir / RUN_FILE
        if path.exists():
            return json.loads(path.read_text())["run_id"]
        run = self.client.create_run(
            self.experiment_id, run_name=f"batch-{batch_id}", tags={"lethe.batch_id": batch_id}
        )
        batch_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"run_id": run.info.run_id}))
        return run.info.run_id

    def log_recommender(self, model_dir: Path) -> str:
        """Log a saved model dir as a models-from-code pyfunc in the active run; returns its URI."""
        info = mlflow.pyfunc.log_model(
            name="recommender",
            python_model=str(SERVING_CODE),
            artifacts={"model_dir": str(model_dir)},
            code_paths=[str(PACKAGE_DIR)],
            pip_requirements=SERVING_REQUIREMENTS,
            signature=infer_signature(
                pd.DataFrame({"history": [[1, 2, 3]]}), pd.DataFrame({"recommended": [[4, 5]]}), params={"k": 10}
            ),
        )
        return info.model_uri

    def register(self, model_uri: str, tags: dict[str, str]) -> ModelVersion:
        version = mlflow.register_model(model_uri, self.model_name, tags=tags)
        return self.client.get_model_version(self.model_name, version.version)

    def download_model_dir(self, version: str, destination: Path) -> Path:
        """The safetensors directory of a registered version, copied to `destination`."""
        with tempfile.TemporaryDirectory() as scratch:
            local = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=f"models:/{self.model_name}/{version}", dst_path=scratch
                )
            )
            artifacts = Model.load(local / "MLmodel").flavors["python_function"]["artifacts"]
            if destination.exists():
                shutil.rmtree(destination)
            shutil.copytree(local / artifacts["model_dir"]["path"], destination)
        return destination

    def tag_version(self, version: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(self.model_name, version, key, value)

    def lineage_root(self, version: str) -> str:
        """The base version a model descends from, following `lethe.parent_version` tags."""
        seen: set[str] = set()
        version = str(version)
        while version not in seen:
            seen.add(version)
            tags = self.client.get_model_version(self.model_name, version).tags
            parent = tags.get("lethe.parent_version")
            if tags.get("lethe.lineage") == "base" or parent in (None, "", "None"):
                return version
            version = parent
        return version

    def promoted_for_batch(self, batch_id: str) -> str | None:
        """The version a batch's gate passed and promoted (the champion or an ancestor of it), if any."""
        champion = self.champion()
        if champion is None:
            return None
        lineage, version = set(), str(champion.version)
        while version not in lineage and version not in (None, "", "None"):
            lineage.add(version)
            version = self.client.get_model_version(self.model_name, version).tags.get("lethe.parent_version")
        for candidate in lineage:
            tags = self.client.get_model_version(self.model_name, candidate).tags
            if tags.get("lethe.batch_id") == batch_id and tags.get("gate") == "passed":
                return candidate
        return None

    def promote(self, version: str) -> None:
        self.client.set_registered_model_alias(self.model_name, CHAMPION, version)
