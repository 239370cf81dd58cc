"""Benchmark every unlearning method against retraining on MovieLens; write JSON, Markdown and a Pareto plot."""

from __future__ import annotations

import hashlib
import itertools
import json
import platform
import time
from pathlib import Path

import mlflow
import torch

from components._common import context, device_argument, entry_point, parser
from components.train import ensure_base_model
from pipeline.bench import (
    TUNING_KEYS,
    acceptance,
    acceptance_table,
    benchmark_setting,
    choose,
    circuit_faithfulness,
    circuit_stability,
    grid,
    head_to_head,
    head_to_head_table,
    markdown_table,
    pareto_plot,
    retrain_floor,
    summarise,
    tune,
    tuning_table,
    tuning_variants,
    with_privleak,
)
from pipeline.data import read_snapshot
from pipeline.leakage import TEST_VERSION
from pipeline.model import device_facts, load_model, resolve_device
from pipeline.progress import RowLog
from pipeline.registry import Registry


def _lines(records: list[dict]) -> str:
    return "\n".join(
        f"- {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()})}" for r in records
    )


def base_provenance(directory: Path, meta: dict, model) -> dict:
    """Which base model every row started from: a base trained elsewhere (another ledger, older params, another
    CPU: the same seed gives other float rounding, hence other weights, on another processor) gives other
    figures, so the results name its weights' hash, its data snapshot, its own test utility and the machine."""
    train = json.loads((directory / "train.json").read_text())
    return {
        "machine": {
            "cpu": _cpu_model(),
            # the kernels torch picked (AVX2, AVX512, ...): two processors of one name can differ here, and so
            # round floats otherwise and train other weights
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            **device_facts(model),  # where the grid computed: CUDA's bf16 rounds otherwise than the CPU's fp32
        },
        "weights_sha256": hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest(),
        "snapshot_hash": meta.get("snapshot_hash"),
        "seed": meta.get("seed"),
        "members": train.get("members"),
        "test": train.get("test"),
    }


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def tuning(base, snapshot, settings, out: Path, provenance: dict) -> dict:
    """Every bench.tuning variant on the tuning seeds; the rule's choice in tuning.json and tuning.md."""
    started = time.perf_counter()
    with mlflow.start_run(run_name="benchmark-tuning") as parent:
        tuning = settings.bench.tuning
        total = len(tuning.deletion_rates) * len(tuning.seeds) * len(tuning_variants(settings))
        done = itertools.count(1)

        def report(row: dict) -> None:
            aucs = " / ".join(f"{row[f'mia_auc_{a}']:.3f}" for a in ("loss", "mink", "minkpp"))
            print(
                f"tune [{next(done)}/{total}] {row['deletion_rate']:.0%} seed {row['seed']} {row['method']} "
                f"retain weight {row['retain_weight']} lr {row['learning_rate']} "
                f"fractions {row['forget_fraction']}/{row['retain_fraction']}: "
                f"NDCG vs retrain {row['ndcg10_vs_retrain']:.3f}, AUC {aucs}",
                flush=True,
            )

        rows, faithful = tune(base, snapshot, settings, report)
        out.mkdir(parents=True, exist_ok=True)
        measured = {
            "rows": rows, "faithfulness": faithful, "base_model": provenance,
            "wall_s_total": time.perf_counter() - started,
        }  # fmt: skip
        record = write_tuning(out, measured, settings)
        mlflow.log_artifact(str(out / "tuning.json"))
        mlflow.log_artifact(str(out / "tuning.md"))
    print(json.dumps(record["choice"]))
    return {"rows": len(rows), "choice": record["choice"], "out": str(out), "run_id": parent.info.run_id}


def write_tuning(out: Path, record: dict, settings) -> dict:
    """The tuning rule's decision on a record's rows, written with the record to tuning.json and tuning.md.
    Returns the record with the decision (the means it decided on and the choice)."""
    lacking = sorted({key for row in record["rows"] for key in TUNING_KEYS if key not in row})
    lacking += [] if "faithfulness" in record else ["the circuits' faithfulness"]
    if lacking:
        raise ValueError(
            f"{out / 'tuning.json'}: it lacks {', '.join(lacking)}, which the tuning rule compares (written by "
            f"an older `lethe bench --tuning`); run it again to judge it"
        )
    band, rate = settings.bench.auc_band, settings.bench.acceptance.rate
    record = {**record, **choose(record["rows"], record["faithfulness"], band, rate)}
    (out / "tuning.json").write_text(json.dumps(record, indent=2))
    (out / "tuning.md").write_text(tuning_table(record, settings))
    return record


RECORD_KEYS = ("retrain_floor", "circuit_stability", "circuit_faithfulness", "base_model", "wall_s_total")


def provenance_lines(out: Path, base: dict, settings) -> str:
    """What the figures below came from, for a reader of benchmark.md alone: the backbone and recipe (from the
    params judged with), the base model's weights hash, the data snapshot, the machine, and the row log's
    fingerprint, which ties every row to one set of params, one base and one machine across sittings."""
    model, train = settings.model, settings.train
    depth = "all layers" if model.layers is None else f"first {model.layers} pretrained layers"
    backbone = "tiny" if model.backbone == "tiny" else f"{model.backbone}, {depth}"
    machine = base.get("machine", {})
    fingerprints = {record.get("fingerprint") for _, record in RowLog.records(out / ROW_LOG)}
    lines = [
        f"Backbone: {backbone}; fine-tune {train.method}, learning rate {train.learning_rate:g}, {train.epochs} "
        f"epochs, windows of {model.max_len} items.",
        f"Base model: weights sha256 {base.get('weights_sha256')}, data snapshot {base.get('snapshot_hash')}, "
        f"{base.get('members')} members, its test NDCG@10 {base.get('test', {}).get('ndcg10', float('nan')):.4f}.",
        f"Machine: {machine.get('cpu')} ({machine.get('cpu_capability')}, {machine.get('threads')} threads, torch "
        f"{machine.get('torch')}, {machine.get('device', 'cpu')} {machine.get('precision', 'fp32')}).",
    ]
    if fingerprints:
        lines.append(f"Row log {ROW_LOG}: fingerprint {', '.join(sorted(map(str, fingerprints)))}.")
    return "\n".join(lines) + "\n"


def write_report(out: Path, rows: list[dict], record: dict, settings) -> tuple[str, list[dict]]:
    """From the rows and what else the run measured (`RECORD_KEYS`): the summary across seeds, the acceptance
    verdicts, benchmark_summary.json, benchmark.md and pareto.png. Returns the Markdown table of means and
    the verdicts."""
    summary = summarise(rows)
    criteria = acceptance(rows, summary, record["wall_s_total"], settings)
    rivals = head_to_head(rows, summary, settings)
    (out / "benchmark_summary.json").write_text(
        json.dumps({"summary": summary, **record, "acceptance": criteria, "head_to_head": rivals}, indent=2)
    )
    table = markdown_table(summary)
    (out / "benchmark.md").write_text(
        f"{provenance_lines(out, record['base_model'], settings)}\n"
        f"{acceptance_table(criteria, rows, settings.bench.acceptance.rate)}\n"
        f"{head_to_head_table(rivals, settings.bench.acceptance.rate)}\n"
        f"{table}\n\nRetrain vs retrain (different seeds), the floor no method can beat:\n"
        f"{_lines(record['retrain_floor'])}\n\n"
        f"Circuit stability (Jaccard of forget-specific units): {json.dumps(record['circuit_stability'])}\n\n"
        f"Circuit faithfulness (mean ablation of CURE's circuits on their own model):\n"
        f"{_lines(record['circuit_faithfulness'])}\n"
    )
    pareto_plot(summary, out / "pareto.png")
    return table, criteria


def judge(out: Path, settings) -> dict:
    """Rewrite what the rules decide from a finished run's files, e.g. after bench.acceptance or the tuning rule
    changed: the grid's summary, verdicts and plot, and the tuning's choice. Judging needs no rerun, and the
    measured rows are read, never changed."""
    paths, tuning_path = [out / "benchmark.json", out / "benchmark_summary.json"], out / "tuning.json"
    missing = [str(path) for path in paths if not path.exists()]
    if missing and not tuning_path.exists():
        raise FileNotFoundError(f"{', '.join(missing)}: run `lethe bench --out {out}` (or --tuning) first")
    judged = {"out": str(out)}
    if tuning_path.exists():
        record = write_tuning(out, json.loads(tuning_path.read_text()), settings)
        print(json.dumps(record["choice"]))
        judged["tuning_choice"] = record["choice"]
    if missing:
        return judged
    rows, previous = (json.loads(path.read_text()) for path in paths)
    rows = with_privleak(rows)  # derived, so it follows the definition in force; the measured figures stay
    paths[0].write_text(json.dumps(rows, indent=2))
    record = {key: previous[key] for key in RECORD_KEYS}
    _, criteria = write_report(out, rows, record, settings)
    print(acceptance_table(criteria, rows, settings.bench.acceptance.rate))
    return {**judged, "rows": len(rows), "criteria": len(criteria)}


ROW_LOG = "benchmark_rows.jsonl"  # each (scope, rate, seed) batch as it finishes: a rerun resumes after it


def measure_batch(base, snapshot, settings, setting, seed: int, quick: bool) -> dict:
    """One (scope, rate, seed) batch of the grid: every method's row, and on the reported seeds at the floor rate
    the retrain-vs-retrain floor and the circuits' faithfulness; each row is also a nested MLflow run."""
    bench, started = settings.bench, time.perf_counter()
    rows, extras = benchmark_setting(base, snapshot, settings, setting, seed, bench.methods)
    for row in rows:
        with mlflow.start_run(run_name=f"{row['method']}-{setting.scope}-{setting.deletion_rate}-{seed}", nested=True):
            mlflow.log_params({k: row[k] for k in ("method", "scope", "deletion_rate", "seed")})
            mlflow.log_metrics(
                {
                    k: float(v)
                    for k, v in row.items()
                    if isinstance(v, int | float) and not isinstance(v, bool) and k not in ("deletion_rate", "seed")
                }
            )
        print("  " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    floors, faithful = [], []
    # the floor and the circuits' faithfulness on the reported seeds; extra seeds only add rows
    if (setting.scope == "user" and setting.deletion_rate == bench.floor_rate and seed in bench.seeds) or quick:
        floors.append(retrain_floor(base, extras["data"], settings, setting, seed, extras["reference"]))
        if "circuits" in extras:
            faithful += circuit_faithfulness(base, extras["data"], [extras["circuits"]], settings, seed)
    return {"rows": rows, "floors": floors, "faithful": faithful, "wall_s": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> dict:
    cli = device_argument(parser("bench", __doc__))
    mode = cli.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="one rate, one seed, few steps: a smoke run")
    mode.add_argument(
        "--tuning",
        action="store_true",
        help="choose the retain weight, the learning rate and CURE's circuit fractions by bench.tuning's rule, "
        "on its seeds only",
    )
    mode.add_argument(
        "--judge",
        action="store_true",
        help="rewrite the acceptance verdicts, the summary and plot, and the tuning choice from the rows in --out; "
        "no rerun",
    )
    cli.add_argument("--out", type=Path, default=Path("results"), help="results folder (default: ./results)")
    args = cli.parse_args(argv)
    device = resolve_device(args.device)  # before any work: --device cuda without one is an error
    settings, home = context(args)
    settings, bench = settings.for_bench(), settings.bench
    if args.judge:
        return judge(args.out, settings)
    if args.quick:
        settings = settings.model_copy(
            update={"unlearn": settings.unlearn.model_copy(update={"max_steps": bench.quick_max_steps})}
        )
    base_dir = ensure_base_model(args.params, home, settings)
    base, meta = load_model(base_dir, device)
    snapshot = read_snapshot(home.snapshot)
    Registry(home, settings.mlflow)
    if args.tuning:
        return tuning(base, snapshot, settings, args.out, base_provenance(base_dir, meta, base))

    batches = grid(bench, args.quick)

    provenance = base_provenance(base_dir, meta, base)
    # one coherent result over any number of sittings: what decides the figures is the log's fingerprint
    identity = {"settings": settings.model_dump(mode="json"), "quick": args.quick, "leakage_test": TEST_VERSION,
                **{key: provenance[key] for key in ("weights_sha256", "snapshot_hash", "machine")}}  # fmt: skip
    log = RowLog(args.out / ROW_LOG, identity)
    rows, floors, faithful = [], [], []
    with mlflow.start_run(run_name="benchmark-quick" if args.quick else "benchmark") as parent:
        mlflow.log_params(
            {
                "methods": ",".join(bench.methods),
                "settings": ";".join(
                    f"{s.scope}:{s.deletion_rate}:seeds={','.join(map(str, seeds))}" for s, seeds in batches
                ),
                "quick": args.quick,
            }
        )
        for setting, seeds in batches:
            for seed in seeds:
                key = f"{setting.scope}:{setting.deletion_rate}:{seed}"
                if key in log.done:
                    print(f"bench: {key}: measured in an earlier sitting ({args.out / ROW_LOG}), kept", flush=True)
                else:
                    print(f"bench: {setting.scope} {setting.deletion_rate:.2%} seed {seed}", flush=True)
                    log.add(key, measure_batch(base, snapshot, settings, setting, seed, args.quick))
                rows += log.done[key]["rows"]
                floors += log.done[key]["floors"]
                faithful += log.done[key]["faithful"]
        if "stability" not in log.done:
            started = time.perf_counter()
            seeds = bench.seeds[:1] if args.quick else bench.seeds  # extraction seeds, compared pairwise
            pairs = seeds if len(seeds) > 1 else [seeds[0], seeds[0] + 1]
            stability = circuit_stability(base, snapshot, settings, pairs)
            log.add("stability", {"stability": stability, "wall_s": time.perf_counter() - started})
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "benchmark.json").write_text(json.dumps(rows, indent=2))
        grid_wall_s = sum(value["wall_s"] for value in log.done.values())  # measuring only, over every sitting
        record = dict(
            retrain_floor=floors, circuit_stability=log.done["stability"]["stability"], circuit_faithfulness=faithful,
            base_model=provenance, wall_s_total=grid_wall_s,
        )  # fmt: skip
        table, _ = write_report(args.out, rows, record, settings)
        for name in ("benchmark.json", "benchmark_summary.json", "benchmark.md", "pareto.png"):
            mlflow.log_artifact(str(args.out / name))
        mlflow.log_metric("wall_s_total", grid_wall_s)
    print(table)
    return {"rows": len(rows), "out": str(args.out), "run_id": parent.info.run_id}


if __name__ == "__main__":
    entry_point("bench", main)
