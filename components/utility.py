"""Every base model's utility on one split, beside MostPop and a library SASRec: NDCG@10 and HR@10 on the validation
and test items with 95% bootstrap intervals over users, and each model's paired difference to SASRec.

    lethe utility --model tiny=.lethe --model smollm2-135m=.lethe-smollm2 --out results/utility

Each --model names a LETHE_HOME whose base model is measured. All must hold the same data snapshot (same data,
seed and split settings), else the comparison would not be on one split and is refused. SASRec (RecTools) runs in
its own environment (`make peer`), fed the members' interactions of that snapshot (peer/sasrec.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from components._common import context, entry_point, parser
from pipeline.settings import Home

PEER_SCRIPT = Path(__file__).resolve().parent.parent / "peer" / "sasrec.py"
PARTS = {"val": ("train",), "test": ("train", "val")}  # the held-out item, and the history a model reads before it
METRICS = ("ndcg10", "hr10")


def per_user(ranks: np.ndarray) -> dict[str, np.ndarray]:
    from pipeline.evaluate import hit_at, ndcg_at

    return {"ndcg10": ndcg_at(ranks, 10), "hr10": hit_at(ranks, 10)}


def model_ranks(home: Home, snapshot, settings) -> tuple[dict, dict]:
    """A home's base model: its ranks per part (users in order) and its provenance."""
    from components.bench import base_provenance
    from pipeline.evaluate import rank_users
    from pipeline.model import load_model

    model, meta = load_model(home.base_model)
    members = snapshot.members
    ranks = {}
    for part, history in PARTS.items():
        ranked = rank_users(model, snapshot.sequences(history, members), snapshot.targets(part, members),
                            meta["max_len"], settings.eval.batch_size)  # fmt: skip
        ranks[part] = np.array([ranked[user] for user in sorted(ranked)])
    provenance = base_provenance(home.base_model, meta, model)
    train = json.loads((home.base_model / "train.json").read_text())
    provenance.update(
        backbone=meta.get("backbone"), recipe=meta.get("recipe"), max_len=meta.get("max_len"),
        pretrained=model.config.to_dict().get("lethe_backbone"), best_epoch=train.get("best_epoch"),
        history=train.get("history"),
    )  # fmt: skip
    return ranks, provenance


def most_popular_ranks(snapshot) -> dict:
    from pipeline.evaluate import most_popular_scores, ranks_of_targets

    members = snapshot.members
    counts = most_popular_scores(snapshot.sequences(("train",), members), len(snapshot.items))
    ranks = {}
    for part, history in PARTS.items():
        histories, targets = snapshot.sequences(history, members), snapshot.targets(part, members)
        users = sorted(targets)
        ranks[part] = ranks_of_targets(counts.expand(len(users), -1), [targets[u] for u in users],
                                       [histories[u] for u in users])  # fmt: skip
    return ranks


def sasrec_ranks(snapshot, settings, python: Path, work: Path) -> tuple[dict, dict]:
    """SASRec in its own environment on the members' interactions; its ranks per part and what it reported."""
    if not Path(python).exists():
        raise FileNotFoundError(f"{python}: no SASRec environment; `make peer` builds it (requirements/peer.txt)")
    members = snapshot.interactions[snapshot.interactions.member]
    source, output = work / "members.csv", work / "sasrec_ranks.csv"
    members[["user_id", "item_id", "position", "split"]].to_csv(source, index=False)
    config = settings.utility.sasrec.model_dump(mode="json")
    command = [str(python), str(PEER_SCRIPT), str(source), str(output), "--config", json.dumps(config),
               "--seed", str(settings.seed)]  # fmt: skip
    with tempfile.TemporaryFile("w+") as errors:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True)
        lines = []
        for line in process.stdout:  # its progress as it goes: one line per epoch candidate
            print(line, end="", flush=True)
            lines.append(line)
        if process.wait():
            errors.seek(0)
            tail = errors.read().strip().splitlines()
            sys.stderr.write("\n".join(tail[-30:]) + "\n")
            raise RuntimeError(f"peer/sasrec.py exited {process.returncode}: {tail[-1:]}")
    import pandas as pd

    frame = pd.read_csv(output).sort_values("user_id")
    ranks = {}
    for part in PARTS:  # paired with every other model user by user: the same users, in the same order
        rows = frame[frame.part == part]
        if rows.user_id.tolist() != sorted(snapshot.targets(part, snapshot.members)):
            raise RuntimeError(f"peer/sasrec.py ranked other users than the members with a {part} item")
        ranks[part] = rows["rank"].to_numpy()
    return ranks, json.loads(lines[-1])


def estimates(ranks: dict, reference: dict | None, settings) -> dict:
    """Per part: each metric's mean with its bootstrap interval; with a reference (ranks of the same users in the
    same order), the paired difference to it."""
    from pipeline.evaluate import bootstrap_mean

    ev = settings.eval
    out = {}
    for part, values in ranks.items():
        scores = per_user(values)
        out[part] = {name: bootstrap_mean(scores[name], ev.bootstrap_samples, ev.confidence, settings.seed).as_dict()
                     for name in METRICS}  # fmt: skip
        out[part]["users"] = int(len(values))
        if reference is not None:
            other = per_user(reference[part])
            out[part]["minus_sasrec"] = {
                name: bootstrap_mean(scores[name] - other[name], ev.bootstrap_samples, ev.confidence,
                                     settings.seed).as_dict()
                for name in METRICS
            }  # fmt: skip
    return out


def table(record: dict) -> str:
    def cell(e: dict) -> str:
        return f"{e['value']:.4f} [{e['low']:.4f}, {e['high']:.4f}]"

    lines = [
        "| model | what it is | val NDCG@10 | test NDCG@10 | test HR@10 | test NDCG@10 minus SASRec's (paired) |",
        "|---|---|---|---|---|---|",
    ]
    for entry in record["models"]:
        test, val = entry["test"], entry["val"]
        minus = cell(test["minus_sasrec"]["ndcg10"]) if "minus_sasrec" in test else "—"
        lines.append(f"| {entry['name']} | {entry['what']} | {cell(val['ndcg10'])} | {cell(test['ndcg10'])} | "
                     f"{cell(test['hr10'])} | {minus} |")  # fmt: skip
    split = record["split"]
    return (
        f"Utility on one split (snapshot {split['snapshot_hash'][:12]}, {split['members']} members; the test item "
        f"after train + validation history, seen items excluded, ranked among all {split['items']} items; "
        f"mean over users "
        f"[{record['confidence']:.0%} bootstrap interval over users]):\n\n" + "\n".join(lines) + "\n\n"
        + "Provenance (utility.json has all of it):\n\n" + "\n".join(provenance_lines(record)) + "\n"
    )


def provenance_lines(record: dict) -> list[str]:
    lines = []
    for entry in record["models"]:
        source = entry.get("provenance")
        if source is None:
            continue
        if "library" in source:
            config = ", ".join(f"{k} {v}" for k, v in source["config"].items())
            lines.append(f"- {entry['name']}: RecTools {source['library']['rectools']}, torch "
                         f"{source['library']['torch']}; {config}")  # fmt: skip
            continue
        machine = source["machine"]
        lines.append(f"- {entry['name']}: weights sha256 {source['weights_sha256'][:16]}, recipe "
                     f"{source['recipe'][:12]}, seed {source['seed']}, max_len {source['max_len']}; measured on "
                     f"{machine['cpu']} ({machine['cpu_capability']}, {machine['threads']} threads, torch "
                     f"{machine['torch']})")  # fmt: skip
    return lines


def describe(provenance: dict) -> str:
    pretrained = provenance.get("pretrained")
    if provenance.get("backbone") == "tiny" or not pretrained:
        return f"{provenance.get('backbone')}, trained from scratch, best epoch {provenance.get('best_epoch')}"
    return (f"{pretrained['backbone']}, first {pretrained['layers_kept']} pretrained layers, fine-tuned, best epoch "
            f"{provenance.get('best_epoch')}")  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    cli = parser("utility", __doc__)
    cli.add_argument("--model", action="append", required=True, metavar="NAME=HOME",
                     help="a LETHE_HOME whose base model to measure, under this name (repeatable)")  # fmt: skip
    cli.add_argument("--peer-python", type=Path, default=Path(".venv-peer/bin/python"),
                     help="the SASRec environment's python (default: from `make peer`)")  # fmt: skip
    cli.add_argument("--out", type=Path, default=Path("results/utility"))
    args = cli.parse_args(argv)
    from pipeline.data import read_snapshot

    settings, _ = context(args)
    named = []
    for spec in args.model:
        name, _, folder = spec.partition("=")
        if not name or not folder:
            raise ValueError(f"--model {spec!r}: give NAME=HOME, e.g. tiny=.lethe")
        home = Home(Path(folder))
        if not (home.base_model / "train.json").exists():
            raise FileNotFoundError(f"--model {spec}: {home.base_model} holds no trained base model (lethe train)")
        named.append((name, home, read_snapshot(home.snapshot)))
    hashes = {snapshot.manifest["content_hash"] for _, _, snapshot in named}
    if len(hashes) > 1:
        raise ValueError(f"the homes hold {len(hashes)} different data snapshots: not one split; compare models "
                         f"prepared with the same data, seed and split settings")  # fmt: skip
    snapshot = named[0][2]
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        peer, peer_report = sasrec_ranks(snapshot, settings, args.peer_python, Path(work))
    models = [
        {"name": "MostPop", "what": "items by members' training counts",
         **estimates(most_popular_ranks(snapshot), peer, settings)},
        {"name": "SASRec (RecTools)", "what": f"library peer, {peer_report['chosen_epochs']} epochs (on validation)",
         **estimates(peer, None, settings), "provenance": peer_report},
    ]  # fmt: skip
    for name, home, snap in named:
        ranks, provenance = model_ranks(home, snap, settings)
        models.append({"name": name, "what": describe(provenance), **estimates(ranks, peer, settings),
                       "provenance": provenance})  # fmt: skip
    record = {
        "split": {"snapshot_hash": snapshot.manifest["content_hash"], "members": int(len(snapshot.members)),
                  "items": int(len(snapshot.items))},
        "confidence": settings.eval.confidence, "models": models,
    }  # fmt: skip
    (args.out / "utility.json").write_text(json.dumps(record, indent=2))
    (args.out / "utility.md").write_text(table(record))
    print(table(record))
    return {"out": str(args.out), "models": [m["name"] for m in models]}


if __name__ == "__main__":
    entry_point("utility", main)
