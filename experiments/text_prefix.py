"""Does a short text prefix help the pretrained recommender? (issue: "Measure whether a short text prefix helps.
Keep it only if it does.") An experiment, not a part of Lethe: the recommender keeps reading item tokens only
unless this says otherwise (docs/experiments.md, "A text prefix for SmolLM2").

Both arms start from the same pretrained backbone, item rows and seed (`build_model`) and train by the same loop
(`fit`) under the same params; the prefix arm puts the embeddings of a fixed text (the pretrained model's own
token rows, frozen) in front of every window, so the item positions read it through attention. Both are then
ranked on the same members' validation and test items; the test comparison is paired user by user.

    LETHE_PARAMS=params.smollm2-bench.yaml LETHE_HOME=.lethe-smollm2-bench \\
        .venv/bin/python experiments/text_prefix.py --out results/text_prefix.json

Each arm's result goes to --out as it finishes; a rerun skips the arms already there.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from pipeline.backbones import pretrained_source
from pipeline.data import read_snapshot
from pipeline.evaluate import bootstrap_mean, ndcg_at, rank_users
from pipeline.model import build_model
from pipeline.settings import Home, default_params_path, load_settings
from pipeline.train import fit

PREFIX = "A viewer's films, in the order they watched them:"


class Prefixed(torch.nn.Module):
    """The backbone's transformer with fixed embeddings in front of every window; outputs only the windows'
    positions, so the item head, the losses and the ranking see the shapes they always do."""

    def __init__(self, inner: torch.nn.Module, prefix: torch.Tensor) -> None:
        super().__init__()
        self.inner = inner
        self.embed_tokens = inner.embed_tokens  # what get_input_embeddings() returns: the tied item rows
        self.register_buffer("prefix", prefix, persistent=False)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **_):
        embedded = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        n, width = embedded.shape[0], self.prefix.shape[0]
        embedded = torch.cat([self.prefix.to(embedded.dtype).expand(n, -1, -1), embedded], dim=1)
        mask = torch.cat([attention_mask.new_ones(n, width), attention_mask], dim=1)
        hidden = self.inner(inputs_embeds=embedded, attention_mask=mask).last_hidden_state
        return SimpleNamespace(last_hidden_state=hidden[:, width:])


def prefix_rows(source: Path, text: str) -> torch.Tensor:
    """The pretrained model's own embedding rows of `text`'s tokens."""
    ids = AutoTokenizer.from_pretrained(source)(text, add_special_tokens=False)["input_ids"]
    with safe_open(str(source / "model.safetensors"), framework="pt") as weights:
        name = next(k for k in weights.keys() if k.endswith("embed_tokens.weight"))  # noqa: SIM118 (not iterable)
        return weights.get_tensor(name)[ids].float().clone()


def arm(snapshot, settings, prefix: torch.Tensor | None) -> dict:
    members = snapshot.members
    train_sequences = snapshot.sequences(("train",), members)
    model = build_model(snapshot.items, settings.model, settings.seed)
    if prefix is not None:
        model.model = Prefixed(model.model, prefix)
    started = time.perf_counter()
    history = fit(model, train_sequences, train_sequences, snapshot.targets("val", members), settings)
    histories, targets = snapshot.sequences(("train", "val"), members), snapshot.targets("test", members)
    ranks = rank_users(model, histories, targets, settings.model.max_len, settings.eval.batch_size)
    return {
        "history": history,
        "val_ndcg10_best": max(row["val_ndcg10"] for row in history),
        "test_ranks": [int(ranks[user]) for user in sorted(ranks)],  # by user, without the ids: they are PII
        "wall_s": time.perf_counter() - started,
    }


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--out", type=Path, required=True)
    cli.add_argument("--prefix", default=PREFIX)
    args = cli.parse_args()
    params = default_params_path()
    settings, home = load_settings(params), Home()
    snapshot = read_snapshot(home.snapshot)
    source = pretrained_source(settings.model, home)
    record = json.loads(args.out.read_text()) if args.out.exists() else {}
    record.update(params=str(params), prefix=args.prefix, snapshot=snapshot.manifest["content_hash"])
    rows = prefix_rows(source, args.prefix)
    record["prefix_tokens"] = int(rows.shape[0])
    for name, prefix in (("items only", None), ("text prefix", rows)):
        if name not in record:
            print(f"text_prefix: training the {name!r} arm", flush=True)
            record[name] = arm(snapshot, settings, prefix)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(record, indent=1))
    for name in ("items only", "text prefix"):  # a file from before the ids were left out: the same order, no ids
        ranks = record[name]["test_ranks"]
        if isinstance(ranks, dict):
            record[name]["test_ranks"] = [ranks[user] for user in sorted(ranks, key=int)]
    base, prefixed = (np.array(record[a]["test_ranks"]) for a in ("items only", "text prefix"))
    ev = settings.eval
    record["test"] = {
        a: bootstrap_mean(ndcg_at(r, 10), ev.bootstrap_samples, ev.confidence, settings.seed).as_dict()
        for a, r in (("items only", base), ("text prefix", prefixed))
    }
    record["test_prefix_minus_items_only"] = bootstrap_mean(
        ndcg_at(prefixed, 10) - ndcg_at(base, 10), ev.bootstrap_samples, ev.confidence, settings.seed
    ).as_dict()
    args.out.write_text(json.dumps(record, indent=1))
    summary = {k: record[k] for k in ("prefix_tokens", "test", "test_prefix_minus_items_only")}
    summary["val_best"] = {a: record[a]["val_ndcg10_best"] for a in ("items only", "text prefix")}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
