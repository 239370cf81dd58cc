"""`lethe`: the command line for the people who run Lethe.

lethe nightly [--deletion-log PATH]   bootstrap if needed, run the nightly DAG once, print the summary
lethe bootstrap                       prepare, train and register the base model as champion, if none is
                                      (what a running scheduler needs before its first night)
lethe sample-log --out PATH           write a deletion log for a few random members (a demo batch)
lethe prepare | lethe train           the first two steps on their own
lethe bench [--quick|--tuning|--judge]  every unlearning method against retraining
lethe calibrate [--out DIR]           the gate's leakage test on retrained models, and its power (resumable)
lethe ingest PATH_OR_URI              take a deletion log into the ledger and validate it (no batch)
lethe ledger status                   requests by state, as JSON
lethe ledger show REQUEST_ID          one request's history: states, times, batch, model version, reason
lethe ledger verify                   recompute the events' hash chain; name the first broken event (exit 1)
lethe audit [--since DATE] [--request ID]  every honored request's evidence in one cumulative test; the report
lethe receipt REQUEST_ID [--out F]    a signed deletion receipt (JSON and HTML) for an honored request
lethe receipt --verify F              check a receipt's signature and its ledger entry (exit 1 if it fails)
lethe receipt --keygen DIR            write an Ed25519 key pair for receipts (LETHE_RECEIPT_KEY_FILE names it)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from components._common import lost_tracking_server
from pipeline.settings import STEPS, Home, Settings, SettingsError, default_params_path, load_settings

DAGS_FOLDER = Path(__file__).resolve().parent.parent / "dags"
DAG_ID = "nightly_forgetting"


def airflow_env(home: Home, params: Path) -> dict[str, str]:
    """Airflow on a SQLite metadata database under LETHE_HOME, reading our dags/ folder only."""
    return {
        **os.environ,
        "LETHE_HOME": str(home.root),
        "LETHE_PARAMS": str(params),
        "AIRFLOW_HOME": str(home.airflow),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home.airflow / 'airflow.db'}",
        "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "120",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
    }


def _airflow(env: dict[str, str], *args: str) -> None:
    command = [str(Path(sys.executable).with_name("airflow")), *args]
    result = subprocess.run(command, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"`airflow {' '.join(args[:2])}` failed with exit code {result.returncode}")


def ensure_airflow(home: Home, env: dict[str, str]) -> None:
    marker = home.airflow / ".migrated"
    if marker.exists():
        return
    home.airflow.mkdir(parents=True, exist_ok=True)
    print("lethe: migrating the Airflow metadata database (first run only)", flush=True)
    _airflow(env, "db", "migrate")
    marker.write_text(datetime.now(UTC).isoformat())


def ensure_champion(settings: Settings, home: Home, params: Path) -> str:
    """Prepare data, train and register the base model when the registry has no champion yet."""
    from pipeline.registry import Registry

    registry = Registry(home, settings.mlflow)
    existing = registry.champion()
    if existing is not None:
        return existing.version
    import mlflow

    from components.train import ensure_base_model  # torch and transformers: only when there is work

    ensure_base_model(params, home, settings)
    report = json.loads((home.base_model / "train.json").read_text())
    with mlflow.start_run(run_name="base-model", tags={"lethe.lineage": "base"}):
        mlflow.log_dict(report, "train.json")
        mlflow.log_metrics({f"test.{k}": v for k, v in report["test"].items()})
        mlflow.log_metrics({f"mostpop_test.{k}": v for k, v in report["mostpop_test"].items()})
        mlflow.log_artifact(str(home.snapshot / "manifest.json"), artifact_path="data")
        uri = registry.log_recommender(home.base_model)
    version = registry.register(uri, {"lethe.lineage": "base", "ndcg10": f"{report['test']['ndcg10']:.5f}"})
    registry.promote(version.version)
    print(f"lethe: registered base model as version {version.version} (champion)", flush=True)
    return version.version


def _chosen(args: argparse.Namespace) -> tuple[Path, Settings, Home]:
    """The params file, its settings and the home this command works on, also exported to the steps it runs."""
    params = (args.params or default_params_path()).resolve()
    settings, home = load_settings(params), Home(args.home)
    os.environ.update({"LETHE_HOME": str(home.root), "LETHE_PARAMS": str(params)})
    return params, settings, home


def bootstrap(args: argparse.Namespace) -> int:
    params, settings, home = _chosen(args)
    version = ensure_champion(settings, home, params)
    print(f"lethe: the champion is version {version} of {settings.mlflow.registered_model}", flush=True)
    return 0


def nightly(args: argparse.Namespace) -> int:
    params, settings, home = _chosen(args)
    ensure_champion(settings, home, params)
    env = airflow_env(home, params)
    ensure_airflow(home, env)
    batch_id = args.batch_id or datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    deletion_log = args.deletion_log or str(home.landing)
    if "://" not in deletion_log:  # s3://bucket/prefix/ stays as it is; a local path is made absolute
        deletion_log = str(Path(deletion_log).resolve())
    conf = {"deletion_log": deletion_log, "batch_id": batch_id, "params": str(params)}
    print(f"lethe: running DAG {DAG_ID} for batch {batch_id} on {deletion_log}", flush=True)
    _airflow(env, "dags", "test", DAG_ID, "--conf", json.dumps(conf))
    summary_path = home.batch(batch_id) / "summary.json"
    if not summary_path.exists():
        print(f"lethe: the DAG run left no summary at {summary_path}; see the task logs above", file=sys.stderr)
        return 1
    print_summary(json.loads(summary_path.read_text()), summary_path)
    return 0


def print_summary(summary: dict, path: Path) -> None:
    def figure(value) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    print("\n== Lethe nightly summary ==")
    print(f"batch            {summary['batch_id']}")
    print(
        f"requests         {summary['requests_total']} received, {summary['requests_rejected']} quarantined, "
        f"{summary['requests_duplicate']} duplicates; {summary['requests_claimed']} in this batch: "
        f"{summary['requests_honored']} honored, {summary['requests_pending']} pending retry, "
        f"{summary['requests_needs_retrain']} need a retrain; {summary['requests_already_honored']} already honored"
    )
    for rejection in summary["rejections"]:
        print(
            f"  quarantined    {rejection['source']}:{rejection['line']}: {rejection['reason']}: {rejection['message']}"
        )
    print(f"erased           {summary['rows_erased']} rows of honored requests (every copy in the stores Lethe keeps)")
    print(f"NDCG@10          {figure(summary['ndcg10_before'])} -> {figure(summary['ndcg10_after'])}")
    print(
        f"MIA AUC (worst)  {figure(summary['mia_auc_before'])} -> {figure(summary['mia_auc_after'])}  (0.5 = stranger)"
    )
    print(f"gate             {summary['gate']}" + "".join(f"\n  - {reason}" for reason in summary["gate_reasons"]))
    print(f"model version    {summary['model_version']}")
    print(f"summary          {path}\n")


def sample_log(args: argparse.Namespace) -> int:
    """A deletion log for a few seeded random members, with stable request ids."""
    from components import prepare
    from pipeline.data import read_snapshot

    params = (args.params or default_params_path()).resolve()
    settings, home = load_settings(params), Home(args.home)
    snapshot_dir = args.snapshot or home.snapshot
    if not (snapshot_dir / "manifest.json").exists():
        prepare.main(["--params", str(params), "--home", str(home.root), "--out", str(snapshot_dir)])
    snapshot = read_snapshot(snapshot_dir)
    users = np.random.default_rng(settings.seed).choice(
        snapshot.members, args.users or settings.nightly.sample_users, replace=False
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC).isoformat()
    with out.open("w") as handle:
        for number, user in enumerate(sorted(users.tolist()), start=1):
            handle.write(
                json.dumps(
                    {
                        "request_id": f"sample-{settings.seed}-{number}",  # no user id in it: ids are PII
                        "user_id": user,
                        "scope": "user",
                        "received_at": now,
                    }
                )
                + "\n"
            )
    print(f"lethe: wrote {len(users)} deletion requests to {out}")
    return 0


def ledger_for(args: argparse.Namespace):
    from components._common import open_ledger

    settings, home = load_settings(args.params), Home(args.home)
    return open_ledger(settings, home), settings, home


def ingest(args: argparse.Namespace) -> int:
    """Parse, check against the data snapshot and record every request of a log; print JSON counts."""
    from functools import partial

    from pipeline.contracts import DeletionLogContract
    from pipeline.data import read_snapshot
    from pipeline.requests import parse_lines
    from pipeline.storage import read_logs

    ledger, settings, home = ledger_for(args)
    snapshot = read_snapshot(args.snapshot or home.snapshot)
    files = read_logs(args.source, settings.landing)
    parse = partial(parse_lines, max_line_bytes=settings.ledger.max_line_bytes)
    contract = DeletionLogContract(snapshot, settings.ledger.max_clock_skew_s, honored=ledger.honored())
    counts = ledger.ingest(files, parse, contract)
    print(json.dumps(counts.as_dict()))
    return 0


def ledger_command(args: argparse.Namespace) -> int:
    ledger, _, _ = ledger_for(args)
    if args.ledger_command == "status":
        print(json.dumps({**ledger.counts(), "schema_version": ledger.schema_version()}))
        return 0
    if args.ledger_command == "verify":
        result = ledger.verify()
        print(json.dumps(result, indent=2))
        if not result["ok"]:
            broken = result["first_broken_event"] or result["first_inconsistent_request"]
            print(f"lethe ledger verify: the ledger was altered: {broken}", file=sys.stderr)
        return 0 if result["ok"] else 1
    history = ledger.history(args.request_id)
    if history is None:
        print(f"lethe ledger show: no request {args.request_id!r} in the ledger", file=sys.stderr)
        return 1
    print(json.dumps(history, indent=2))
    return 0


def erase_command(args: argparse.Namespace) -> int:
    """Everything the ledger holds as honored, out of LETHE_HOME, the snapshot and the given DVC workspaces; the
    nightly's gate does this itself after honoring, and every claim catches up on what a crash left."""
    from components._common import erase_honored

    ledger, _, home = ledger_for(args)
    record = erase_honored(ledger, home, args.snapshot or home.snapshot, tuple(args.dvc_root))
    print(json.dumps(record, indent=2))
    return 0


def receipt_command(args: argparse.Namespace) -> int:
    from pipeline import receipts

    if args.keygen:
        secret, public = receipts.generate_keys(Path(args.keygen))
        print(f"lethe: wrote {secret} (keep it secret: set {receipts.KEY_VARIABLE} to it) and {public} (publish it)")
        return 0
    ledger, settings, _ = ledger_for(args)
    try:
        if args.verify:
            receipt = json.loads(Path(args.verify).read_text())
            checked = receipts.verify(receipt, ledger, receipts.load_public_key(args.public_key))
            print(json.dumps({"verified": True, **checked}))
            return 0
        if not args.request_id:
            raise receipts.ReceiptError("name a request id, or --verify FILE, or --keygen DIR")
        receipt = receipts.issue(ledger, args.request_id, settings.mlflow.registered_model)
    except (receipts.ReceiptError, json.JSONDecodeError) as error:
        print(f"lethe receipt: {'verification failed: ' if args.verify else ''}{error}", file=sys.stderr)
        return 1
    out = Path(args.out or f"receipt-{receipt['payload']['request']['hashed_id']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(receipt, indent=2))
    out.with_suffix(".html").write_text(receipts.render_html(receipt))
    print(f"lethe: wrote {out} and {out.with_suffix('.html')}")
    return 0


def k8s_command(args: argparse.Namespace) -> int:
    import yaml

    from components.pods import bootstrap_pod, cluster_objects, render, step_pod, training_job

    settings = load_settings(args.params)
    if args.k8s_command == "write":
        args.folder.mkdir(parents=True, exist_ok=True)
        for name, objects in cluster_objects(settings).items():
            text = yaml.safe_dump_all([render(obj) for obj in objects], sort_keys=False)
            (args.folder / name).write_text(
                f"# Written by `lethe k8s write` from params.yaml: edit params.yaml, not this.\n{text}"
            )
            print(f"lethe: wrote {args.folder / name}")
        return 0
    if args.bootstrap:
        print(yaml.safe_dump(render(bootstrap_pod(settings)), sort_keys=False), end="")
        return 0
    if args.training_job:
        print(yaml.safe_dump(training_job(args.training_job, settings, args.batch_id), sort_keys=False), end="")
        return 0
    landing = args.deletion_log or f"{settings.kubernetes.home_mount}/landing"
    steps = [args.step] if args.step else list(STEPS)
    objects = [render(step_pod(step, settings, args.batch_id, landing)) for step in steps]
    if not args.step:
        objects += [render(obj) for group in cluster_objects(settings).values() for obj in group]
    print(yaml.safe_dump_all(objects, sort_keys=False), end="")
    return 0


def main(argv: list[str] | None = None) -> None:
    cli = argparse.ArgumentParser(
        prog="lethe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_argument("--params", type=Path, default=None, help="params.yaml (default: $LETHE_PARAMS or ./params.yaml)")
    cli.add_argument("--home", type=Path, default=None, help="state folder (default: $LETHE_HOME or ./.lethe)")
    commands = cli.add_subparsers(dest="command", required=True)
    run = commands.add_parser("nightly", help="run the nightly batch once, for real, through Airflow")
    run.add_argument("--deletion-log", default=None, help="a .jsonl file or folder (default: $LETHE_HOME/landing)")
    run.add_argument("--batch-id", default=None, help="batch folder name (default: UTC timestamp)")
    commands.add_parser("bootstrap", help="register the base model as champion if the registry has none")
    sample = commands.add_parser("sample-log", help="write a demo deletion log of random members")
    sample.add_argument("--out", required=True)
    sample.add_argument("--snapshot", type=Path, default=None, help="data snapshot (default: under home)")
    sample.add_argument("--users", type=int, default=None, help="how many (default: nightly.sample_users)")
    for step in ("prepare", "train"):
        commands.add_parser(step, help=f"run the {step} step alone")
    bench = commands.add_parser("bench", help="benchmark every unlearning method against retraining")
    bench.add_argument("--quick", action="store_true", help="one rate, one seed, few steps")
    bench.add_argument("--tuning", action="store_true", help="choose hyperparameters on bench.tuning.seeds")
    bench.add_argument("--judge", action="store_true", help="the verdicts again from --out's rows, no rerun")
    bench.add_argument("--out", default="results")
    audit = commands.add_parser("audit", help="combine every honored request's evidence; write the auditor's report")
    audit.add_argument("--since", default=None, help="only requests honored from this date (YYYY-MM-DD, UTC)")
    audit.add_argument("--request", default=None, help="only this request")
    audit.add_argument("--out", default=None, help="report folder (default: $LETHE_HOME/audit)")
    utility = commands.add_parser("utility", help="base models' NDCG@10 and HR@10 beside MostPop and SASRec, one split")
    utility.add_argument("--model", action="append", required=True, metavar="NAME=HOME",
                         help="a LETHE_HOME whose base model to measure (repeatable)")  # fmt: skip
    utility.add_argument("--peer-python", default=".venv-peer/bin/python", help="the SASRec environment (make peer)")
    utility.add_argument("--out", default="results/utility")
    calibrate = commands.add_parser("calibrate", help="the gate's leakage test on retrained models, and its power")
    calibrate.add_argument("--out", default="results")
    intake = commands.add_parser("ingest", help="take a deletion log into the ledger and validate it")
    intake.add_argument("source", help="a .jsonl file, a folder of them, or s3://bucket/prefix/")
    intake.add_argument("--snapshot", type=Path, default=None, help="data snapshot (default: under home)")
    book = commands.add_parser("ledger", help="what the ledger holds")
    book_commands = book.add_subparsers(dest="ledger_command", required=True)
    book_commands.add_parser("status", help="requests by state, as JSON")
    show = book_commands.add_parser("show", help="one request's history, as JSON")
    show.add_argument("request_id")
    book_commands.add_parser("verify", help="recompute the hash chain; name the first broken event")
    receipt = commands.add_parser("receipt", help="a signed deletion receipt, or check one")
    receipt.add_argument("request_id", nargs="?", default=None)
    receipt.add_argument("--out", default=None, help="receipt file (default: ./receipt-<hashed id>.json; .html beside)")
    receipt.add_argument("--verify", default=None, metavar="FILE", help="check this receipt instead")
    receipt.add_argument("--public-key", type=Path, default=None, help="the team's public key (default: from the key)")
    receipt.add_argument("--keygen", default=None, metavar="DIR", help="write a new key pair into DIR")
    erase = commands.add_parser("erase", help="purge every honored request's rows from the stores Lethe keeps")
    erase.add_argument("--snapshot", type=Path, default=None, help="data snapshot (default: under home)")
    erase.add_argument("--dvc-root", type=Path, action="append", default=[],
                       help="a DVC workspace whose outputs and cache to purge too (repeatable)")  # fmt: skip
    kube = commands.add_parser("k8s", help="the Kubernetes objects of `nightly.executor: kubernetes`, as YAML")
    kube_commands = kube.add_subparsers(dest="k8s_command", required=True)
    render = kube_commands.add_parser("render", help="print the step pods and the cluster objects")
    render.add_argument("--step", choices=STEPS, default=None, help="only this step's pod")
    render.add_argument("--batch-id", default="<batch-id>", help="the batch the pods run (default: a placeholder)")
    render.add_argument("--deletion-log", default=None, help="the ingest pod's log (default: the volume's landing)")
    render.add_argument("--bootstrap", action="store_true", help="only the one-off pod that registers the base")
    render.add_argument("--training-job", choices=("unlearn", "retrain"), default=None,
                        help="only the step as a Kubeflow PyTorchJob (multi-GPU backbones)")  # fmt: skip
    write = kube_commands.add_parser("write", help="write the cluster objects into a folder (infra/k8s)")
    write.add_argument("folder", type=Path)
    args = cli.parse_args(argv)
    try:
        if args.command == "k8s":
            sys.exit(k8s_command(args))
        if args.command == "ingest":
            sys.exit(ingest(args))
        if args.command == "ledger":
            sys.exit(ledger_command(args))
        if args.command == "receipt":
            sys.exit(receipt_command(args))
        if args.command == "erase":
            sys.exit(erase_command(args))
        if args.command == "nightly":
            sys.exit(nightly(args))
        if args.command == "bootstrap":
            sys.exit(bootstrap(args))
        if args.command == "sample-log":
            sys.exit(sample_log(args))
        from components import audit, bench, calibrate, prepare, train, utility

        common = [
            *(["--params", str(args.params)] if args.params else []),
            *(["--home", str(args.home)] if args.home else []),
        ]
        if args.command == "utility":
            models = [part for spec in args.model for part in ("--model", spec)]
            utility.main([*common, *models, "--peer-python", args.peer_python, "--out", args.out])
            return
        if args.command == "bench":
            bench.main(
                [
                    *common,
                    "--out",
                    args.out,
                    *(["--quick"] if args.quick else []),
                    *(["--tuning"] if args.tuning else []),
                    *(["--judge"] if args.judge else []),
                ]
            )
            return
        if args.command == "audit":
            options = [("--since", args.since), ("--request", args.request), ("--out", args.out)]
            audit.main([*common, *(part for name, value in options if value for part in (name, value))])
            return
        if args.command == "calibrate":
            calibrate.main([*common, "--out", args.out])
            return
        step = {"prepare": prepare, "train": train}[args.command]
        step.main(common)
    except (SettingsError, FileNotFoundError, ConnectionError, ValueError, RuntimeError) as error:
        print(f"lethe {args.command}: error: {error}", file=sys.stderr)
        sys.exit(2)
    except Exception as error:
        if (reason := lost_tracking_server(error)) is None:
            raise
        print(f"lethe {args.command}: error: {reason}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
