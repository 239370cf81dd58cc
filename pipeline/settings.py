"""Typed, frozen settings loaded once from params.yaml, plus where Lethe keeps its state.

Every tunable number lives in params.yaml; this module only gives it types and bounds so that a typo
fails loudly at start-up instead of steering a nightly run with a silent default.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class SettingsError(ValueError):
    """params.yaml is missing, unreadable or invalid; the message says which key and why."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataSettings(_Frozen):
    source: Literal["movielens", "file"]
    path: str | None = None  # data.source file: Parquet or CSV, a local path or s3://bucket/key
    min_users: int = Field(ge=2)  # a file must hold this many users with 3 interactions or more
    min_rating: float = Field(ge=0.0, le=5.0)
    min_item_interactions: int = Field(ge=1)
    non_member_share: float = Field(gt=0.0, lt=1.0)
    max_users: int | None = Field(default=None, ge=10)

    @model_validator(mode="after")
    def _file_has_a_path(self) -> DataSettings:
        if self.source == "file" and not self.path:
            raise ValueError("data.source file needs data.path: a Parquet or CSV file, local or s3://bucket/key")
        return self


class TinyBackbone(_Frozen):
    hidden_size: int = Field(ge=8)
    intermediate_size: int = Field(ge=8)
    num_hidden_layers: int = Field(ge=1)
    num_attention_heads: int = Field(ge=1)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TinyBackbone:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        return self


class HfBackbone(_Frozen):
    path: str | None = None  # a local Hugging Face causal-LM directory (model.backbone hf)


class ModelSettings(_Frozen):
    backbone: Literal["tiny", "smollm2-135m", "hf"]
    max_len: int = Field(ge=4, le=2048)
    layers: int | None = Field(ge=1)  # a pretrained backbone: keep only its first k layers (None: all)
    prefix: str | None = None  # a pretrained backbone: this text, frozen, in front of every window (None: none)
    tiny: TinyBackbone
    hf: HfBackbone

    @model_validator(mode="after")
    def _hf_has_a_path(self) -> ModelSettings:
        if self.backbone == "hf" and not self.hf.path:
            raise ValueError("model.backbone hf needs model.hf.path: a local Hugging Face causal-LM directory")
        if self.backbone == "tiny" and self.layers is not None:
            raise ValueError("model.layers keeps the first k layers of a pretrained backbone; tiny sets its own "
                             "(model.tiny.num_hidden_layers)")
        if self.prefix is not None and not self.prefix.strip():
            raise ValueError("model.prefix is empty: give the text to put in front of every window, or null for none")
        if self.backbone == "tiny" and self.prefix is not None:
            raise ValueError("model.prefix is text a pretrained backbone reads with its own tokenizer; tiny has no "
                             "text vocabulary (set model.prefix: null)")
        return self


class LoraSettings(_Frozen):
    """`train.method: lora`: peft adapters on every attention and MLP projection (the item rows train in full)."""

    rank: int = Field(ge=1)
    alpha: float = Field(gt=0.0)
    dropout: float = Field(ge=0.0, lt=1.0)


class TrainSettings(_Frozen):
    method: Literal["full", "lora"]
    lora: LoraSettings
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    learning_rate: float = Field(gt=0.0)
    weight_decay: float = Field(ge=0.0)
    warmup_steps: int = Field(ge=0)
    schedule: Literal["constant", "cosine"]
    patience: int = Field(ge=1)


class EvalSettings(_Frozen):
    ks: tuple[int, ...] = Field(min_length=1)
    mink_fraction: float = Field(gt=0.0, le=1.0)
    bootstrap_samples: int = Field(ge=100)
    confidence: float = Field(gt=0.5, lt=1.0)
    batch_size: int = Field(ge=1)
    attack_batch_size: int = Field(ge=1)

    @model_validator(mode="after")
    def _ten_is_reported(self) -> EvalSettings:
        if 10 not in self.ks:
            raise ValueError("eval.ks must contain 10: the gate and the summary use NDCG@10")
        return self


def _check_band(band: tuple[float, float], name: str) -> None:
    low, high = band
    if not 0.0 <= low < 0.5 < high <= 1.0:
        raise ValueError(f"{name} must satisfy 0 <= low < 0.5 < high <= 1, got {list(band)}")


class UnlearnSettings(_Frozen):
    method: str
    learning_rate: float = Field(gt=0.0)
    layer_lr_scale: float = Field(ge=0.0)
    max_steps: int = Field(ge=1)
    warmup_steps: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    retain_batch_size: int = Field(ge=1)
    retain_weight: float = Field(ge=0.0)
    retain_loss: Literal["nll", "kl"]
    forget_objective: Literal["ascent", "non_member_level"]
    forget_item_rows: Literal["all", "scored"]
    eval_every: int = Field(ge=1)
    patience: int = Field(ge=1)
    stop_tolerance_z: float = Field(gt=0.0)
    backtracks: int = Field(ge=0)
    backtrack_lr_factor: float = Field(gt=0.0, lt=1.0)
    npo_beta: float = Field(gt=0.0)
    ssd_alpha: float = Field(gt=0.0)
    ssd_lambda: float = Field(gt=0.0)


class DriftSettings(_Frozen):
    max_popularity_jsd: float = Field(ge=0.0, le=1.0)
    max_unseen_item_share: float = Field(ge=0.0, le=1.0)
    max_activity_psi: float = Field(ge=0.0)
    max_forgotten_member_share: float = Field(ge=0.0, le=1.0)


class CircuitSettings(_Frozen):
    forget_fraction: float = Field(gt=0.0, le=1.0)
    retain_fraction: float = Field(gt=0.0, le=1.0)
    retain_windows: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    item_units: bool = False  # also score and partition item embedding rows (the item head's logits)
    drift: DriftSettings


class TuningSettings(_Frozen):
    """Where the benchmark's hyperparameters are chosen (`lethe bench --tuning`): never on reported seeds."""

    seeds: tuple[int, ...] = Field(min_length=1)
    deletion_rates: tuple[float, ...] = Field(min_length=1)  # user deletion rates at which every method must forget
    methods: tuple[str, ...] = Field(min_length=1)  # whose mean AUC must reach the band at every rate
    retain_weights: tuple[float, ...] = Field(min_length=1)  # candidates for bench.unlearn.retain_weight
    learning_rates: tuple[float, ...] = Field(min_length=1)  # candidates for bench.unlearn.learning_rate
    cure_forget_fractions: tuple[float, ...] = Field(min_length=1)  # candidates for circuits.forget_fraction
    cure_retain_fractions: tuple[float, ...] = Field(min_length=1)  # candidates for circuits.retain_fraction
    npo_betas: tuple[float, ...] = Field(min_length=1)  # candidates for NPO's per-item unlearn.npo_beta

    @model_validator(mode="after")
    def _cure_is_tuned(self) -> TuningSettings:
        if "cure" not in self.methods:
            raise ValueError(f"bench.tuning.methods {list(self.methods)} lack cure, whose utility the rule compares")
        return self


class AcceptanceSettings(_Frozen):
    """What CURE must show at one user deletion rate (means over bench.seeds and extra_seeds) to count as working."""

    rate: float = Field(gt=0.0, lt=1.0)
    min_ndcg_ratio: float = Field(gt=0.0)  # NDCG@10 on retained users, as a share of retrain's
    max_auc_gap: float = Field(ge=0.0)  # |MIA AUC - retrain's|, every attack
    min_speedup: float = Field(gt=0.0)  # retrain's wall time over CURE's, circuit extraction included
    max_grid_minutes: float = Field(gt=0.0)  # the whole `lethe bench` grid
    extra_seeds: tuple[int, ...]  # the judged batch runs these too, beyond bench.seeds


class CalibrationSettings(_Frozen):
    seeds: tuple[int, ...] = Field(min_length=1)
    pool_rate: float = Field(gt=0.0, lt=1.0)
    batch_sizes: tuple[int, ...] = Field(min_length=1)


class SasrecSettings(_Frozen):
    """The outside anchor's recipe (peer/sasrec.py, RecTools' SASRecModel arguments); validation picks the epochs."""

    epochs: tuple[int, ...] = Field(min_length=1)
    n_blocks: int = Field(ge=1)
    n_heads: int = Field(ge=1)
    n_factors: int = Field(ge=1)
    dropout_rate: float = Field(ge=0.0, lt=1.0)
    session_max_len: int = Field(ge=2)
    lr: float = Field(gt=0.0)
    batch_size: int = Field(ge=1)


class UtilitySettings(_Frozen):
    sasrec: SasrecSettings


class BenchSettings(_Frozen):
    methods: tuple[str, ...] = Field(min_length=1)
    user_rates: tuple[float, ...] = Field(min_length=1)
    interaction_rate: float | None = Field(gt=0.0, lt=1.0)  # None: no interaction-scope batches (a costly backbone)
    interaction_item_share: float = Field(gt=0.0, le=1.0)
    seeds: tuple[int, ...] = Field(min_length=1)
    floor_rate: float = Field(gt=0.0, lt=1.0)
    quick_rate: float = Field(gt=0.0, lt=1.0)
    quick_max_steps: int = Field(ge=1)
    auc_band: tuple[float, float]
    # unlearn keys the benchmark sets differently from the nightly (its batches are far larger)
    unlearn: dict[str, float | int | str] = Field(default_factory=dict)
    tuning: TuningSettings
    acceptance: AcceptanceSettings

    @model_validator(mode="after")
    def _band(self) -> BenchSettings:
        _check_band(self.auc_band, "bench.auc_band")
        return self

    @model_validator(mode="after")
    def _seeds_are_kept_apart(self) -> BenchSettings:
        if shared := sorted(set(self.tuning.seeds) & set(self.seeds)):
            raise ValueError(f"bench.tuning.seeds {shared} are also reported bench.seeds; keep them apart")
        extra = self.acceptance.extra_seeds
        if shared := sorted(set(self.tuning.seeds) & set(extra)):
            raise ValueError(f"bench.acceptance.extra_seeds {shared} are also bench.tuning.seeds; keep them apart")
        if repeated := sorted(seed for seed in set(extra) if seed in self.seeds or extra.count(seed) > 1):
            raise ValueError(f"bench.acceptance.extra_seeds {repeated} would run a batch twice; list each seed once")
        return self

    @model_validator(mode="after")
    def _tuning_covers_the_judged_rate(self) -> BenchSettings:
        if self.acceptance.rate not in self.tuning.deletion_rates:
            raise ValueError(
                f"bench.tuning.deletion_rates {list(self.tuning.deletion_rates)} lack bench.acceptance.rate "
                f"{self.acceptance.rate}, where the tuning rule compares CURE's utility"
            )
        return self


class LandingSettings(_Frozen):
    s3_endpoint_url: str | None = None  # null: boto3's own resolution (AWS_ENDPOINT_URL, profile, AWS)
    s3_connect_timeout_s: float = Field(gt=0.0)
    s3_read_timeout_s: float = Field(gt=0.0)
    s3_max_attempts: int = Field(ge=1)


class LedgerSettings(_Frozen):
    url: str | None = None  # SQLAlchemy URL; null: SQLite under LETHE_HOME (LETHE_LEDGER_URL overrides both)
    max_failed_nights: int = Field(ge=1)
    max_line_bytes: int = Field(ge=256)
    max_clock_skew_s: float = Field(ge=0.0)
    connect_timeout_s: int = Field(ge=1)
    attempts: int = Field(ge=1)
    retry_backoff_s: float = Field(ge=0.0)


class GateSettings(_Frozen):
    max_ndcg_drop: float = Field(ge=0.0, lt=1.0)
    alpha: float = Field(gt=0.0, lt=0.5)
    power: float = Field(gt=0.5, lt=1.0)


class MlflowSettings(_Frozen):
    experiment: str = Field(min_length=1)
    registered_model: str = Field(min_length=1)
    http_timeout_s: int = Field(ge=1)  # MLflow reads these three as integers
    http_max_retries: int = Field(ge=0, le=10)
    http_backoff_factor: int = Field(ge=0, le=120)


class NightlySettings(_Frozen):
    sample_users: int = Field(ge=1)
    schedule: str | None = Field(min_length=1)  # None: no schedule, runs only when triggered
    executor: Literal["local", "kubernetes"] = "local"


class PodResources(_Frozen):
    cpu: str = Field(min_length=1)
    memory: str = Field(min_length=1)
    cpu_limit: str = Field(min_length=1)
    memory_limit: str = Field(min_length=1)
    gpus: int = Field(ge=0)


class Toleration(_Frozen):
    key: str
    operator: Literal["Exists", "Equal"]
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


DEVICES = ("auto", "cpu", "cuda")  # --device of the torch steps: auto is CUDA when torch sees one
STEPS = ("ingest", "claim", "split", "drift", "extract_circuits", "unlearn", "retrain", "evaluate", "gate", "report")


class TrainingJobSettings(_Frozen):
    nodes: int = Field(ge=1)
    gpus_per_node: int = Field(ge=1)
    backoff_limit: int = Field(ge=0)
    ttl_after_finished_s: int = Field(ge=0)


class KubernetesSettings(_Frozen):
    namespace: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    service_account: str = Field(min_length=1)
    launcher_account: str = Field(min_length=1)
    images: dict[Literal["cpu", "gpu"], str]
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"]
    home_claim: str = Field(min_length=1)
    home_size: str = Field(min_length=1)
    home_storage_class: str | None = None
    home_mount: str = Field(pattern=r"^/")
    params_config_map: str = Field(min_length=1)
    secret: str = Field(min_length=1)
    secret_env: tuple[str, ...]
    secret_env_optional: tuple[str, ...] = ()
    gpu_steps: tuple[str, ...]
    resources: dict[Literal["cpu", "gpu"], PodResources]
    gpu_node_selector: dict[str, str]
    gpu_tolerations: tuple[Toleration, ...]
    get_logs: bool
    on_finish_action: Literal["delete_pod", "delete_succeeded_pod", "keep_pod"]
    startup_timeout_s: int = Field(ge=1)
    retries: int = Field(ge=0)
    retry_delay_s: float = Field(ge=0.0)
    run_as_user: int = Field(ge=1)
    training_job: TrainingJobSettings

    @model_validator(mode="after")
    def _known_steps(self) -> KubernetesSettings:
        if unknown := set(self.gpu_steps) - set(STEPS):
            raise ValueError(f"gpu_steps: unknown steps {sorted(unknown)}; the steps are {list(STEPS)}")
        if set(self.images) != {"cpu", "gpu"} or set(self.resources) != {"cpu", "gpu"}:
            raise ValueError("images and resources each need a cpu and a gpu entry")
        return self

    def kind(self, step: str) -> Literal["cpu", "gpu"]:
        return "gpu" if step in self.gpu_steps else "cpu"


class Settings(_Frozen):
    seed: int
    data: DataSettings
    model: ModelSettings
    train: TrainSettings
    eval: EvalSettings
    unlearn: UnlearnSettings
    circuits: CircuitSettings
    bench: BenchSettings
    calibration: CalibrationSettings
    utility: UtilitySettings
    gate: GateSettings
    ledger: LedgerSettings
    landing: LandingSettings
    mlflow: MlflowSettings
    nightly: NightlySettings
    kubernetes: KubernetesSettings

    @model_validator(mode="after")
    def _bench_unlearn_is_valid(self) -> Settings:
        self.for_bench()
        if self.model.prefix is not None and self.train.weight_decay > 0:
            raise ValueError("model.prefix with train.weight_decay > 0: the prefix rows are frozen (no gradient), but "
                             "AdamW's decay would still shrink them every step; set train.weight_decay: 0")
        return self

    def for_bench(self) -> Settings:
        """These settings with bench.unlearn laid over unlearn, validated like the rest."""
        unlearn = UnlearnSettings.model_validate({**self.unlearn.model_dump(), **self.bench.unlearn})
        return self.model_copy(update={"unlearn": unlearn})


def default_params_path() -> Path:
    """params.yaml named by LETHE_PARAMS, else the one in the working directory."""
    return Path(os.environ.get("LETHE_PARAMS", "params.yaml")).resolve()


def _merged(base: dict, overlay: dict) -> dict:
    """`overlay` laid over `base`, mapping by mapping; any other value (a list too) replaces the base's."""
    merged = dict(base)
    for key, value in overlay.items():
        nested = isinstance(value, dict) and isinstance(base.get(key), dict)
        merged[key] = _merged(base[key], value) if nested else value
    return merged


def read_params(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A params file as a mapping. `extends: OTHER.yaml` (relative to this file) makes it an overlay: only the keys
    it names differ from OTHER's, e.g. params.smollm2.yaml for the pretrained backbone."""
    path = path.resolve()
    if path in seen:
        raise SettingsError(f"{path}: `extends` loops back to itself ({' -> '.join(map(str, (*seen, path)))})")
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SettingsError(f"{path}: no such params file (set LETHE_PARAMS or pass --params)") from None
    except yaml.YAMLError as error:
        raise SettingsError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise SettingsError(f"{path}: expected a mapping at the top level")
    base = raw.pop("extends", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise SettingsError(f"{path}: `extends` must name one params file, got {base!r}")
    return _merged(read_params(path.parent / base, (*seen, path)), raw)


def load_settings(path: str | Path | None = None) -> Settings:
    path = Path(path) if path is not None else default_params_path()
    raw = read_params(path)
    try:
        return Settings.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item['loc']) or '<root>'}: {item['msg']}" for item in error.errors()
        )
        raise SettingsError(f"{path}: {problems}") from None


class Home:
    """Where Lethe keeps its state: LETHE_HOME (default ./.lethe). One place for every path."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root or os.environ.get("LETHE_HOME", ".lethe")).resolve()

    @cached_property
    def snapshot(self) -> Path:
        return self.root / "data" / "snapshot"

    @cached_property
    def base_model(self) -> Path:
        return self.root / "models" / "base"

    @cached_property
    def landing(self) -> Path:
        return self.root / "landing"

    @cached_property
    def batches(self) -> Path:
        return self.root / "batches"

    @cached_property
    def circuits(self) -> Path:
        """The cached circuits of the champion's lineage, reused until the data drifts."""
        return self.root / "circuits" / "current"

    @cached_property
    def airflow(self) -> Path:
        return self.root / "airflow"

    def ledger_url(self, configured: str | None = None) -> str:
        """LETHE_LEDGER_URL (a deployment's secret), else ledger.url from params, else SQLite under home."""
        return os.environ.get("LETHE_LEDGER_URL") or configured or f"sqlite:///{self.root / 'ledger.db'}"

    @property
    def tracking_uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def artifact_root(self) -> str:
        return (self.root / "mlartifacts").as_uri()

    def batch(self, batch_id: str) -> Path:
        return self.batches / batch_id
