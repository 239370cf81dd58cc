"""What every step shares: arguments, settings, manifests, and one-line errors instead of tracebacks.

A step's contract: inputs and outputs are paths (or URIs) plus a small JSON manifest named after the
step, written into the batch folder (or next to its output) and echoed on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from components.contract import decision
from pipeline.erasure import ErasureFailed
from pipeline.jsonsafe import plain_numbers
from pipeline.settings import DEVICES, Home, Settings, SettingsError, load_settings

CRASH_VARIABLE = "LETHE_TEST_CRASH_AT"  # tests only: the hook point at which the whole run dies
PAUSE_VARIABLE = "LETHE_TEST_PAUSE_AT"  # tests only: name:folder, the hook point at which a step waits
MANIFEST_COPY_VARIABLE = "LETHE_MANIFEST_COPY"  # a path where the step also writes its manifest (a pod's XCom)
CHAMPION_DIR = "champion"  # in a batch folder: the champion's weights the batch started from
CANDIDATE_DIR = "candidate"  # ... and the unlearned model the gate judges


def parser(step: str, doc: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m components.{step}", description=doc)
    parser.add_argument(
        "--params", type=Path, default=None, help="params.yaml (default: $LETHE_PARAMS or ./params.yaml)"
    )
    parser.add_argument("--home", type=Path, default=None, help="state folder (default: $LETHE_HOME or ./.lethe)")
    return parser


def device_argument(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--device of the steps that run torch: auto (CUDA when torch sees one, else the CPU), cpu or cuda (an error
    without one). bf16 autocast on CUDA, fp32 on the CPU; the manifest records which."""
    parser.add_argument("--device", choices=DEVICES, default="auto", help="where torch computes (default: auto)")
    return parser


def batch_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--batch-dir", type=Path, required=True, help="the batch's working folder")
    parser.add_argument("--snapshot", type=Path, default=None, help="data snapshot folder (default: under home)")
    return parser


def context(args: argparse.Namespace) -> tuple[Settings, Home]:
    return load_settings(args.params), Home(args.home)


def snapshot_dir(args: argparse.Namespace, home: Home) -> Path:
    return args.snapshot if args.snapshot is not None else home.snapshot


def open_ledger(settings: Settings, home: Home, actor: str | None = None):
    """The ledger at its configured URL, with params.yaml's bounds on waiting for a lost database."""
    from pipeline.ledger import Ledger

    return Ledger(home.ledger_url(settings.ledger.url), actor=actor, settings=settings.ledger)


def forgotten(settings: Settings, home: Home, user_ids) -> tuple[set[int], dict[int, set[int]]]:
    """Users and (user, item) interactions the ledger holds as honored, as ids of the given population."""
    from pipeline.pii import user_keys

    users, pairs = open_ledger(settings, home).honored()
    if not users and not pairs:
        return set(), {}
    ids = user_keys(user_ids)
    return {ids[k] for k in users if k in ids}, {ids[k]: items for k, items in pairs.items() if k in ids}


def erase_honored(ledger, home: Home, snapshot: Path, dvc_roots: tuple[Path, ...] = ()) -> dict:
    """Purge everything the ledger holds as honored from Lethe's stores: LETHE_HOME (batch folders, the local
    MLflow artifacts), the snapshot wherever it lives, and the given DVC workspaces (pipeline.erasure)."""
    from pipeline.erasure import erase

    record = erase([home.root, snapshot], ledger.honored(), list(dvc_roots))
    if record["rows"] or record["claimed"]:
        print(f"erased {record['rows']} honored rows from {len(record['tables'])} tables and "
              f"{sum(record['claimed'].values())} claimed requests", flush=True)  # fmt: skip
    return record


def load_snapshot(args: argparse.Namespace, home: Home, settings: Settings):
    """The data snapshot minus everything honored: every step that trains or evaluates reads it this way,
    so that no forgotten user or interaction comes back through a later retrain or batch."""
    from pipeline.data import read_snapshot

    snapshot = read_snapshot(snapshot_dir(args, home))
    return snapshot.excluding(*forgotten(settings, home, snapshot.interactions.user_id.unique()))


def write_manifest(path: Path, manifest: dict) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=2, default=str))
    print(json.dumps(manifest, default=str))
    return manifest


def read_manifest(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path}: the step that writes it has not run for this batch")
    return json.loads(path.read_text())


def hook_point(name: str) -> None:
    """Where a test makes the run die or wait, by state and never by timing. Every step passes its own name once
    its work is done; the gate passes `gate.promoted` between promoting in the registry and honoring in the
    ledger. Nothing but these two test variables is read here:
    - LETHE_TEST_CRASH_AT=name: the whole process group (lethe nightly, Airflow, this step) is killed here, as a
      machine that loses power would: no cleanup, no exit code.
    - LETHE_TEST_PAUSE_AT=name:folder: the step writes folder/name.reached and waits for folder/name.resume
      (at most an hour), so that a test can take a server away at exactly this point."""
    if os.environ.get(CRASH_VARIABLE) == name:
        print(f"{CRASH_VARIABLE}={name}: killing process group {os.getpgrp()}", file=sys.stderr, flush=True)
        os.killpg(os.getpgrp(), signal.SIGKILL)
    point, _, folder = os.environ.get(PAUSE_VARIABLE, "").partition(":")
    if point == name and folder:
        (Path(folder) / f"{name}.reached").touch()
        deadline = time.monotonic() + 3600
        while not (Path(folder) / f"{name}.resume").exists() and time.monotonic() < deadline:
            time.sleep(0.05)


def lost_tracking_server(error: BaseException) -> str | None:
    """A one-line reason when `error` is MLflow failing to reach its tracking server, else None."""
    mlflow_errors = sys.modules.get("mlflow.exceptions")  # only a step that imported MLflow can have met one
    if mlflow_errors is None or not isinstance(error, mlflow_errors.MlflowException):
        return None
    message = " ".join(str(error.message).split())
    if not message.startswith("API request to") or "Max retries exceeded" not in message:
        return None
    cause = message.rsplit("Caused by ", 1)[-1][:160]
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "?")
    return f"MLflow tracking server {uri} is unavailable (after {retries} retries): {cause}"


def entry_point(step: str, main: Callable[[list[str] | None], dict]) -> None:
    """Run a step as a program: progress to stderr, a one-line reason and exit code 2 on bad input.

    Besides the step's own arguments it takes `--decision NAME PATH` (repeatable): write the step's branch
    decision NAME (components.contract.DECISIONS) to PATH as JSON, the output parameters a KFP component
    hands to `dsl.If`."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {step} %(levelname)s %(message)s")
    outputs = argparse.ArgumentParser(add_help=False)
    outputs.add_argument("--decision", nargs=2, action="append", default=[], metavar=("NAME", "PATH"))
    wanted, rest = outputs.parse_known_args()
    try:
        decisions = [(decision(step, name), Path(path)) for name, path in wanted.decision]  # before any work
        if (world := int(os.environ.get("WORLD_SIZE", "1"))) > 1:  # torchrun, e.g. in a PyTorchJob
            raise ValueError(
                f"started as one of {world} processes (WORLD_SIZE={world}), but the steps run one process: "
                "data-parallel unlearning is not built yet; set kubernetes.training_job to 1 node with 1 GPU"
            )
        manifest = main(rest)
    except (SettingsError, FileNotFoundError, ConnectionError, ValueError, ErasureFailed) as error:
        print(f"lethe {step}: error: {error}", file=sys.stderr)
        sys.exit(2)
    except Exception as error:
        if (reason := lost_tracking_server(error)) is None:
            raise
        print(f"lethe {step}: error: {reason}", file=sys.stderr)
        sys.exit(2)
    if copy := os.environ.get(MANIFEST_COPY_VARIABLE):  # in a pod, KubernetesPodOperator's sidecar reads it
        Path(copy).parent.mkdir(parents=True, exist_ok=True)
        Path(copy).write_text(json.dumps(plain_numbers(manifest), default=str))  # strict JSON: XCom has no NaN
    for decide, path in decisions:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(decide(manifest)))
    hook_point(step)
