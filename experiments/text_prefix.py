"""Does a short text prefix help the pretrained recommender? (issue: "Measure whether a short text prefix helps.
Keep it only if it does.") The experiment that decided it (docs/experiments.md, "A text prefix for SmolLM2"); it
did help, and Lethe now builds it in (model.prefix, pipeline/model.py `attach_prefix`). This file keeps its own
wrapper, as measured, and runs every arm with model.prefix off, so that its baseline stays "items only".

Both arms start from the same pretrained backbone, item rows and seed (`build_model`) and train by the same loop
(`fit`) under the same params; the prefix arm puts the embeddings of a fixed text (the pretrained model's own
token rows, frozen) in front of every window, so the item positions read it through attention. Both are then
ranked on the same members' validation and test items; the test comparison is paired user by user.

    LETHE_PARAMS=params.smollm2-bench.yaml LETHE_HOME=.lethe-smollm2-bench \\
        .venv/bin/python experiments/text_prefix.py --out results/text_prefix.json

Each arm's result goes to --out as it finishes; a rerun skips the arms already there. `--control` adds an arm
whose prefix is as many tokens drawn at random from the vocabulary: whether it is the text that helps, or
only a fixed start in front of the items; `--start` one whose prefix is the model's start-of-text token alone.
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


def token_rows(source: Path, ids: list[int]) -> torch.Tensor:
    """The pretrained model's own embedding rows of the tokens `ids`."""
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
    cli.add_argument("--control", action="store_true", help="also a prefix of as many random vocabulary tokens")
    cli.add_argument("--start", action="store_true", help="also a prefix of the model's one start token")
    cli.add_argument("--seed", type=int, help="another training seed than params' (the data split stays)")
    args = cli.parse_args()
    params = default_params_path()
    settings, home = load_settings(params), Home()
    # every arm from the items-only recommender; the arms add their own prefix (the overlay now sets model.prefix)
    settings = settings.model_copy(update={"model": settings.model.model_copy(update={"prefix": None})})
    if args.seed is not None:
        settings = settings.model_copy(update={"seed": args.seed})
    snapshot = read_snapshot(home.snapshot)
    source = pretrained_source(settings.model, home)
    record = json.loads(args.out.read_text()) if args.out.exists() else {}
    snapshot_hash = snapshot.manifest["content_hash"]
    record.update(params=str(params), seed=settings.seed, prefix=args.prefix, snapshot=snapshot_hash)
    tokenizer = AutoTokenizer.from_pretrained(source)
    ids = tokenizer(args.prefix, add_special_tokens=False)["input_ids"]
    record["prefix_tokens"] = len(ids)
    arms = [("items only", None), ("text prefix", token_rows(source, ids))]
    if args.control:  # as many rows, of tokens drawn at random from the vocabulary: a start without a meaning
        generator = torch.Generator().manual_seed(settings.seed)
        drawn = torch.randint(0, tokenizer.vocab_size, (len(ids),), generator=generator)
        record["control_tokens"] = tokenizer.decode(drawn)
        arms.append(("random tokens", token_rows(source, drawn.tolist())))
    if args.start:  # the pretrained start-of-text row alone: a window that always opens the same way, in one row
        record["start_token"] = tokenizer.decode([tokenizer.bos_token_id])
        arms.append(("start token", token_rows(source, [tokenizer.bos_token_id])))
    for name, prefix in arms:
        if name not in record:
            print(f"text_prefix: training the {name!r} arm", flush=True)
            record[name] = arm(snapshot, settings, prefix)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(record, indent=1))
    names = [name for name, _ in arms]
    ndcg = {name: ndcg_at(np.array(record[name]["test_ranks"]), 10) for name in names}
    ev = settings.eval

    def estimate(values: np.ndarray) -> dict:
        return bootstrap_mean(values, ev.bootstrap_samples, ev.confidence, settings.seed).as_dict()

    record["test"] = {name: estimate(values) for name, values in ndcg.items()}
    record["test_prefix_minus_items_only"] = estimate(ndcg["text prefix"] - ndcg["items only"])
    for control in ("random tokens", "start token"):
        if control in ndcg:
            record[f"test_text_minus_{control.replace(' ', '_')}"] = estimate(ndcg["text prefix"] - ndcg[control])
    args.out.write_text(json.dumps(record, indent=1))
    summary = {k: v for k, v in record.items() if k.startswith("test") and k != "test_ranks"}
    summary["val_best"] = {name: record[name]["val_ndcg10_best"] for name in names}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
