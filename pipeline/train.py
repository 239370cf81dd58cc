"""Training the base recommender: next-item prediction on every position, early stopping on validation.

A plain loop, nanoGPT style: every hyperparameter comes from params.yaml and is visible here.
"""

from __future__ import annotations

import copy
import logging
import math
import time

import numpy as np
import torch

from pipeline.data import Snapshot
from pipeline.evaluate import most_popular_scores, ndcg_at, rank_users, ranks_of_targets, utility_metrics
from pipeline.model import Recommender, build_model, device_facts, make_windows, seed_everything, window_loss
from pipeline.progress import progress as progress_bar
from pipeline.settings import Settings, TrainSettings

log = logging.getLogger(__name__)


def learning_rate_factor(step: int, total_steps: int, config: TrainSettings) -> float:
    """The learning rate's share after `step` updates: a linear warm-up, then constant, or a cosine decay that
    reaches zero at the end of the configured epochs (early stopping may end sooner)."""
    warmup = min(1.0, (step + 1) / max(1, config.warmup_steps))
    if config.schedule == "constant":
        return warmup
    return warmup * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def with_adapters(model: Recommender, config: TrainSettings):
    """`train.method: lora`: peft's LoRA adapters injected into `model`'s attention and MLP projections (in place:
    `model` itself now runs them), everything else frozen but the item rows, which are new and train in full (the
    head is tied to them). Returns the peft wrapper, whose `merge_and_unload` folds the adapters back in."""
    from peft import LoraConfig, get_peft_model

    lora = config.lora
    adapted = get_peft_model(
        model,
        LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(LORA_MODULES)),
    )
    model.get_input_embeddings().weight.requires_grad_(True)
    return adapted


def fit(
    model: Recommender,
    train_sequences: dict[int, list[int]],
    val_histories: dict[int, list[int]],
    val_targets: dict[int, int],
    settings: Settings,
    progress: bool = True,
) -> list[dict]:
    """Train in place; leave the model at the epoch with the best validation NDCG@10. With `train.method: lora` the
    adapters are merged into the weights at the end: the model leaves as plain as it came (same modules, same
    parameter names), so circuits, unlearning and serving never ask how it was fine-tuned."""
    generator = seed_everything(settings.seed)
    windows = make_windows(train_sequences, settings.model.max_len)
    config = settings.train
    adapted = with_adapters(model, config) if config.method == "lora" else None
    trained = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=config.learning_rate, weight_decay=config.weight_decay)
    total_steps = config.epochs * math.ceil(len(windows) / config.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, total_steps, config)
    )
    best_ndcg, best_state, history, stale = -1.0, None, [], 0
    bar = progress_bar(None, "train", "step", progress, total=total_steps)
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(len(windows), generator=generator)
        losses, tokens, started = [], 0, time.perf_counter()
        for start in range(0, len(windows), config.batch_size):
            batch = windows.batch(order[start : start + config.batch_size])
            loss = window_loss(model, batch)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            tokens += int(batch.attention_mask.sum())
            bar.update(1)
            bar.set_postfix(
                epoch=epoch, loss=f"{losses[-1]:.3f}", tokens_s=f"{tokens / (time.perf_counter() - started):.0f}",
                refresh=False,
            )  # fmt: skip
        tokens_per_s = tokens / (time.perf_counter() - started)
        ranks = np.array(
            list(
                rank_users(model, val_histories, val_targets, settings.model.max_len, settings.eval.batch_size).values()
            )
        )
        val_ndcg = float(ndcg_at(ranks, 10).mean())
        history.append(
            {
                "epoch": epoch,
                "train_loss": float(np.mean(losses)),
                "val_ndcg10": val_ndcg,
                "learning_rate": optimizer.param_groups[0]["lr"],
                "tokens_per_s": tokens_per_s,  # forward and backward, the training step's own throughput
            }
        )
        log.info("epoch %d: train loss %.4f, validation NDCG@10 %.4f, %.0f tokens/s", epoch, np.mean(losses),
                 val_ndcg, tokens_per_s)  # fmt: skip
        if val_ndcg > best_ndcg:
            best_ndcg, best_state, stale = val_ndcg, copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= config.patience:
                log.info("early stop after epoch %d: no validation gain for %d epochs", epoch, stale)
                break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    if adapted is not None:
        adapted.merge_and_unload()  # the adapters folded into the base weights, the peft modules swapped back out
        model.requires_grad_(True)  # as it came: unlearning may update any weight
    model.eval()
    return history


def train_base(
    snapshot: Snapshot, settings: Settings, progress: bool = True, device: torch.device | str = "cpu"
) -> tuple[Recommender, dict]:
    """Train on members' training items (on `device`); report test utility of the model and of MostPop."""
    members = snapshot.members
    train_sequences = snapshot.sequences(("train",), members)
    model = build_model(snapshot.items, settings.model, settings.seed).to(device)  # initialised on the CPU
    history = fit(model, train_sequences, train_sequences, snapshot.targets("val", members), settings, progress)

    test_histories = snapshot.sequences(("train", "val"), members)
    test_targets = snapshot.targets("test", members)
    ranks = np.array(
        list(rank_users(model, test_histories, test_targets, settings.model.max_len, settings.eval.batch_size).values())
    )
    users = sorted(test_targets)
    popularity = most_popular_scores(train_sequences, len(snapshot.items)).expand(len(users), -1)
    pop_ranks = ranks_of_targets(popularity, [test_targets[u] for u in users], [test_histories[u] for u in users])
    report = {
        "history": history,
        "best_epoch": int(max(history, key=lambda row: row["val_ndcg10"])["epoch"]),
        "test": utility_metrics(ranks, settings.eval.ks),
        "mostpop_test": utility_metrics(pop_ranks, settings.eval.ks),
        "members": int(len(members)),
        **device_facts(model),
        "train_windows": int(len(make_windows(train_sequences, settings.model.max_len))),
    }
    return model, report
