"""The outside anchor for utility: SASRec from RecTools, trained on the very split Lethe's models train on.

Runs in its own environment (`make peer`, locked by requirements/peer.txt): RecTools 0.19 pins numpy<2 and
attrs<24, which Airflow's and MLflow's pins exclude. It imports nothing of Lethe. `lethe utility` writes its input
(the members' interactions with their split, as CSV) and reads its output (each member's rank of the held-out item among
all items not yet seen, the same ranking Lethe's evaluation uses).

    python peer/sasrec.py INPUT.csv OUTPUT.csv --config '{"epochs": [25, 50], ...}' --seed 42

Validation chooses the number of epochs: one seeded fit on the training items is ranked on the validation item as
it reaches each candidate; the best is then ranked on the test item with train + validation as the history.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import numpy as np
import pandas as pd


def ranks(model, history: pd.DataFrame, targets: pd.Series, dataset_type) -> pd.Series:
    """Each user's 1-based rank of its target among every item the model knows, seen items excluded; a target the
    model cannot rank (seen before, or never in training) ranks last, as in Lethe's evaluation."""
    from rectools import Columns

    dataset = dataset_type.construct(history)
    users = targets.index.to_numpy()
    known = dataset.item_id_map.external_ids
    recommended = model.recommend(users=users, dataset=dataset, k=len(known), filter_viewed=True,
                                  on_unsupported_targets="warn")  # fmt: skip
    found = recommended.merge(targets.rename(Columns.Item).reset_index(), on=[Columns.User, Columns.Item])
    worst = len(known)
    return found.set_index(Columns.User)[Columns.Rank].reindex(users).fillna(worst).astype(int)


def frame(rows: pd.DataFrame):
    from rectools import Columns

    return pd.DataFrame({
        Columns.User: rows.user_id, Columns.Item: rows.item_id, Columns.Weight: 1.0,
        Columns.Datetime: pd.to_datetime(rows.position, unit="s"),  # the order is what matters
    })  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("input", help="CSV: user_id, item_id, position, split (train / val / test), members only")
    cli.add_argument("output", help="CSV written: user_id, part (val / test), rank")
    cli.add_argument("--config", required=True, help="JSON: epochs (candidates), and SASRecModel's other arguments")
    cli.add_argument("--seed", type=int, required=True)
    args = cli.parse_args(argv)
    import torch
    from pytorch_lightning import seed_everything
    from rectools.dataset import Dataset
    from rectools.models import SASRecModel

    rows = pd.read_csv(args.input)
    missing = {"user_id", "item_id", "position", "split"} - set(rows.columns)
    if missing:
        print(f"sasrec: {args.input} lacks the columns {sorted(missing)}", file=sys.stderr)
        return 2
    config = json.loads(args.config)
    candidates = config.pop("epochs")
    part = {name: rows[rows.split == name] for name in ("train", "val", "test")}
    train = frame(part["train"])
    target = {name: part[name].set_index("user_id").item_id for name in ("val", "test")}

    # one seeded run, validated as it reaches each candidate (Adam at a constant rate: resuming is training on)
    seed_everything(args.seed, workers=True)
    dataset = Dataset.construct(train)
    model = SASRecModel(epochs=max(candidates), deterministic=True, verbose=0, **config)
    chosen, best, report, done, started = None, -1.0, [], 0, time.perf_counter()
    for epochs in sorted(candidates):
        model.fit_partial(dataset, min_epochs=epochs - done, max_epochs=epochs - done)
        done = epochs
        val = ranks(model, train, target["val"], Dataset)
        ndcg = float(np.where(val <= 10, 1 / np.log2(val + 1.0), 0.0).mean())
        report.append({"epochs": epochs, "val_ndcg10": ndcg, "elapsed_s": time.perf_counter() - started})
        print(f"sasrec: {epochs} epochs: validation NDCG@10 {ndcg:.4f}", flush=True)
        if ndcg > best:
            chosen, best, chosen_val = (epochs, copy.deepcopy(model)), ndcg, val
    epochs, model = chosen
    test = ranks(model, pd.concat([train, frame(part["val"])]), target["test"], Dataset)
    out = pd.concat([
        pd.DataFrame({"user_id": chosen_val.index, "part": "val", "rank": chosen_val.to_numpy()}),
        pd.DataFrame({"user_id": test.index, "part": "test", "rank": test.to_numpy()}),
    ])  # fmt: skip
    out.to_csv(args.output, index=False)
    import rectools

    library = {"rectools": rectools.__version__, "torch": torch.__version__, "numpy": np.__version__}
    print(json.dumps({"chosen_epochs": epochs, "validation": report, "library": library, "config": config}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
