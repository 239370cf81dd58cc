"""What the text prefix costs: forward+backward item tokens/s of the 6-layer SmolLM2 recommender reading items only,
with Lethe's prefix (model.prefix) and with the experiment's own wrapper (experiments/text_prefix.py), on the same
12 batches of 32 training windows (the first 2 of each run not timed), twice over.

    LETHE_HOME=.lethe-smollm2-prefix .venv/bin/python experiments/prefix_speed.py   (a home with a snapshot)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from pipeline.backbones import pretrained_source
from pipeline.data import read_snapshot
from pipeline.model import Recommender, Windows, build_model, make_windows, window_loss
from pipeline.settings import Home, load_settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from text_prefix import PREFIX, Prefixed, token_rows  # noqa: E402

BATCH, BATCHES, UNTIMED = 32, 12, 2


def item_tokens_per_s(model: Recommender, windows: Windows, order: torch.Tensor) -> float:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    tokens, started = 0, time.perf_counter()
    for index, start in enumerate(range(0, len(order), BATCH)):
        if index == UNTIMED:
            tokens, started = 0, time.perf_counter()
        batch = windows.batch(order[start : start + BATCH])
        loss = window_loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        tokens += int(batch.attention_mask.sum())
    return tokens / (time.perf_counter() - started)


def main() -> None:
    settings, home = load_settings(Path(__file__).resolve().parent.parent / "params.smollm2-bench.yaml"), Home()
    snapshot = read_snapshot(home.snapshot)
    windows = make_windows(snapshot.sequences(("train",), snapshot.members), settings.model.max_len)
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(0))[: BATCH * BATCHES]
    items_only = settings.model.model_copy(update={"prefix": None})
    source = pretrained_source(items_only, home)
    ids = AutoTokenizer.from_pretrained(source)(PREFIX, add_special_tokens=False)["input_ids"]
    for _ in range(2):
        arms = {
            "items only": build_model(snapshot.items, items_only, settings.seed),
            "model.prefix (Lethe)": build_model(snapshot.items, settings.model, settings.seed),
            "experiment's wrapper": build_model(snapshot.items, items_only, settings.seed),
        }
        arms["experiment's wrapper"].model = Prefixed(arms["experiment's wrapper"].model, token_rows(source, ids))
        for name, model in arms.items():
            print(f"{name}: {item_tokens_per_s(model, windows, order):.0f} item tokens/s", flush=True)


if __name__ == "__main__":
    main()
