"""The recommender: a causal LM whose vocabulary holds one token per item (after PAD and BOS), item head tied.

It reads a user's history and scores every item for the next position. Everything here is plain
`transformers` + torch so that circuits can later hook the very same modules. The transformer is the `tiny`
Llama trained from scratch or a pretrained one (pipeline/backbones.py); nothing past `build_model` asks which.

A pretrained backbone may read a text prefix (model.prefix) in front of every window: its token rows sit after the
items in the vocabulary, their ids in the saved config (`lethe_prefix`), and the transformer itself puts them in
front of whatever it reads (`attach_prefix`), so windows, losses, circuits and serving never see them.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from pipeline.data import BOS_TOKEN, FIRST_ITEM_TOKEN, PAD_TOKEN
from pipeline.recipe import META_FILE
from pipeline.settings import DEVICES, ModelSettings

IGNORE = -100
# Any backbone's recommender: a transformers causal LM with the Llama family's modules (pipeline/backbones.py)
Recommender = PreTrainedModel


def resolve_device(choice: str = "auto") -> torch.device:
    """`auto`: the first CUDA device when one is visible, else the CPU. Asking for `cuda` without one is an
    error, never a silent fall back to the CPU."""
    if choice not in DEVICES:
        raise ValueError(f"unknown device {choice!r}; choose one of {list(DEVICES)}")
    cuda = torch.cuda.is_available()
    if choice == "cuda" and not cuda:
        raise ValueError("--device cuda: no CUDA device is visible to torch (torch.cuda.is_available() is False)")
    if choice == "cpu" or not cuda:
        return torch.device("cpu")
    # deterministic cuBLAS (torch.use_deterministic_algorithms needs it); read when cuBLAS starts
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return torch.device("cuda")


def precision(model: Recommender) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA (bf16 autocast; the weights and the optimiser stay fp32); full fp32 on the CPU,
    where the reference figures come from."""
    if model.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def device_facts(model: Recommender) -> dict:
    """What a manifest records of where a step computed."""
    cuda = model.device.type == "cuda"
    return {"device": str(model.device), "precision": "bf16-autocast" if cuda else "fp32",
            **({"gpu": torch.cuda.get_device_name(model.device)} if cuda else {})}  # fmt: skip


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    torch.use_deterministic_algorithms(True)
    return torch.Generator().manual_seed(seed)


def build_model(catalogue: pd.DataFrame, settings: ModelSettings, seed: int) -> Recommender:
    """The untrained recommender for this item catalogue (item_id, title, genres in token order): `tiny` from a
    seeded initialisation, a pretrained backbone from its weights with item rows from the titles."""
    seed_everything(seed)
    if settings.backbone != "tiny":
        from pipeline.backbones import build_pretrained

        return build_pretrained(catalogue, settings, seed)
    tiny = settings.tiny
    config = LlamaConfig(
        vocab_size=FIRST_ITEM_TOKEN + len(catalogue),
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_hidden_layers,
        num_attention_heads=tiny.num_attention_heads,
        num_key_value_heads=tiny.num_attention_heads,
        max_position_embeddings=settings.max_len + 1,
        pad_token_id=PAD_TOKEN,
        bos_token_id=BOS_TOKEN,
        eos_token_id=None,
        tie_word_embeddings=True,
        use_cache=False,
    )
    return LlamaForCausalLM(config)


PREFIX_CONFIG = "lethe_prefix"  # the config key holding the prefix's token ids (after the items in the vocabulary)


def prefix_ids(model: Recommender) -> list[int]:
    return list(getattr(model.config, PREFIX_CONFIG, None) or [])


def head_size(model: Recommender) -> int:
    """The item head's columns: PAD, BOS and the items; the prefix's rows are read, never predicted."""
    return model.config.vocab_size - len(prefix_ids(model))


def _prepend_prefix(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of the transformer (model.model): the prefix's embedding rows, detached (frozen: no
    gradient reaches them), in front of every sequence, attended to by every position. Reads everything from
    `module` itself, so a deep copy runs on its own weights."""
    if args:
        raise TypeError("a prefixed transformer takes its inputs as keywords (input_ids=, inputs_embeds=)")
    if kwargs.get("position_ids") is not None or kwargs.get("past_key_values") is not None:
        raise TypeError("a prefixed transformer places its own positions: no position_ids or past_key_values")
    embeds = kwargs.pop("inputs_embeds", None)
    input_ids = kwargs.pop("input_ids", None)
    if embeds is None:
        embeds = module.embed_tokens(input_ids)
    ids = torch.tensor(module.config.lethe_prefix, device=embeds.device)
    prefix = module.embed_tokens.weight[ids].detach().to(embeds.dtype).expand(embeds.shape[0], -1, -1)
    kwargs["inputs_embeds"] = torch.cat([prefix, embeds], dim=1)
    mask = kwargs.get("attention_mask")
    if mask is not None:
        kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], len(ids)), mask], dim=1)
    return args, kwargs


def _strip_prefix(module: torch.nn.Module, args: tuple, kwargs: dict, output):
    """Forward hook of the transformer: the hidden states of the window's own positions only."""
    output.last_hidden_state = output.last_hidden_state[:, len(module.config.lethe_prefix) :]
    return output


def attach_prefix(model: Recommender) -> Recommender:
    """Make the transformer read the prefix its config names (if any) in front of every input. Called wherever a
    recommender comes to be (built or loaded), since hooks are not saved with the weights."""
    if prefix_ids(model) and not getattr(model.model, "lethe_prefixed", False):  # once: twice would read it twice
        model.model.register_forward_pre_hook(_prepend_prefix, with_kwargs=True)
        model.model.register_forward_hook(_strip_prefix, with_kwargs=True)
        model.model.lethe_prefixed = True
    return model


def save_model(model: Recommender, directory: Path, meta: dict) -> None:
    """Weights as safetensors (never pickle) plus a small JSON of where they came from."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))


def load_model(directory: Path, device: torch.device | str = "cpu") -> tuple[Recommender, dict]:
    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise FileNotFoundError(f"{directory}: no saved model here (config.json missing)")
    model = attach_prefix(AutoModelForCausalLM.from_pretrained(directory)).to(device)
    model.eval()
    meta_path = directory / META_FILE
    return model, json.loads(meta_path.read_text()) if meta_path.exists() else {}


@dataclass(frozen=True)
class Windows:
    """Fixed-length training windows cut from user sequences; labels are -100 where not scored."""

    users: torch.Tensor  # (n,)
    input_ids: torch.Tensor  # (n, max_len)
    labels: torch.Tensor  # (n, max_len)

    def __len__(self) -> int:
        return len(self.users)

    def batch(self, index: torch.Tensor | slice) -> Windows:
        return Windows(self.users[index], self.input_ids[index], self.labels[index])

    def to(self, device: torch.device) -> Windows:
        """The windows on `device` (themselves when they are there already). Windows live on the CPU; the model
        helpers move each batch to the model's device."""
        if self.input_ids.device == device:
            return self
        return Windows(self.users.to(device), self.input_ids.to(device), self.labels.to(device))

    def batches(self, size: int) -> Iterator[Windows]:
        """Consecutive batches of at most `size` windows, in order."""
        for start in range(0, len(self), size):
            yield self.batch(slice(start, start + size))

    @property
    def attention_mask(self) -> torch.Tensor:
        return (self.input_ids != PAD_TOKEN).long()


def make_windows(
    sequences: dict[int, list[int]],
    max_len: int,
    scored: dict[int, list[bool]] | None = None,
) -> Windows:
    """Cut [BOS] + sequence into non-overlapping next-item windows of max_len positions.

    `scored[user][i]` says whether the i-th item of the user's sequence carries a label (the
    interaction-scope forget set scores only the listed items); by default every item does.
    """
    users, inputs, labels = [], [], []
    for user, sequence in sequences.items():
        tokens = [BOS_TOKEN, *sequence]
        mask = scored[user] if scored is not None else [True] * len(sequence)
        for start in range(0, len(sequence), max_len):
            chunk_inputs = tokens[start : start + max_len]
            chunk_labels = [
                token if mask[start + offset] else IGNORE
                for offset, token in enumerate(tokens[start + 1 : start + max_len + 1])
            ]
            if all(label == IGNORE for label in chunk_labels):
                continue
            users.append(user)
            inputs.append(chunk_inputs + [PAD_TOKEN] * (max_len - len(chunk_inputs)))
            labels.append(chunk_labels + [IGNORE] * (max_len - len(chunk_labels)))
    if not users:
        return Windows(
            torch.zeros(0, dtype=torch.long),
            torch.zeros(0, max_len, dtype=torch.long),
            torch.zeros(0, max_len, dtype=torch.long),
        )
    return Windows(torch.tensor(users), torch.tensor(inputs), torch.tensor(labels))


def scored_logits(model: Recommender, windows: Windows, grad_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Logits at the scored positions only, shape (scored positions, head_size), in row-major order of
    (window, position). The item head over the whole vocabulary is most of a small model's cost, and padded
    or unscored positions need none of it.

    `grad_rows` (a boolean mask over the vocabulary): gradients reach only these rows of the tied item
    embedding, in both its roles (history input and item head); every other parameter gets its usual gradient."""
    windows, columns = windows.to(model.device), head_size(model)
    with precision(model):
        if grad_rows is None:
            hidden = model.model(input_ids=windows.input_ids, attention_mask=windows.attention_mask).last_hidden_state
            return model.lm_head(hidden[windows.labels != IGNORE])[:, :columns].float()
        weight = model.get_input_embeddings().weight
        weight = torch.where(grad_rows.to(model.device)[:, None], weight, weight.detach())
        embedded = torch.nn.functional.embedding(windows.input_ids, weight)
        hidden = model.model(inputs_embeds=embedded, attention_mask=windows.attention_mask).last_hidden_state
        return (hidden[windows.labels != IGNORE] @ weight[:columns].T).float()


def scored_labels(windows: Windows) -> torch.Tensor:
    """The labels of the scored positions, in the order of `scored_logits`' rows."""
    return windows.labels[windows.labels != IGNORE]


def window_loss(model: Recommender, windows: Windows, grad_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-item cross-entropy over the scored positions of a batch of windows; `grad_rows` as in
    `scored_logits`."""
    windows = windows.to(model.device)
    return torch.nn.functional.cross_entropy(scored_logits(model, windows, grad_rows), scored_labels(windows))


def window_nll(model: Recommender, windows: Windows, grad_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Per window: mean next-item cross-entropy over its scored positions, shape (n,); `grad_rows` as in
    `scored_logits`."""
    windows = windows.to(model.device)
    scored = windows.labels != IGNORE
    logits = scored_logits(model, windows, grad_rows)
    losses = torch.nn.functional.cross_entropy(logits, scored_labels(windows), reduction="none")
    rows = torch.arange(len(windows), device=scored.device).unsqueeze(1).expand_as(scored)[scored]
    return losses.new_zeros(len(windows)).index_add(0, rows, losses) / scored.sum(1).clamp_min(1)


@torch.no_grad()
def next_item_logits(
    model: Recommender, histories: list[list[int]], max_len: int, batch_size: int
) -> torch.Tensor:
    """Scores over item tokens (column j is token FIRST_ITEM_TOKEN + j) after each history."""
    model.eval()
    items = slice(FIRST_ITEM_TOKEN, head_size(model))
    rows = []
    for start in range(0, len(histories), batch_size):
        chunk = [([BOS_TOKEN, *history])[-max_len:] for history in histories[start : start + batch_size]]
        lengths = torch.tensor([len(tokens) for tokens in chunk])
        inputs = torch.full((len(chunk), max_len), PAD_TOKEN, dtype=torch.long)
        for row, tokens in enumerate(chunk):
            inputs[row, : len(tokens)] = torch.tensor(tokens)
        inputs, lengths = inputs.to(model.device), lengths.to(model.device)
        with precision(model):
            hidden = model.model(input_ids=inputs, attention_mask=(inputs != PAD_TOKEN).long()).last_hidden_state
            last = model.lm_head(hidden[torch.arange(len(chunk), device=model.device), lengths - 1])
        rows.append(last[:, items].float().cpu())  # scores go on to numpy: on the CPU
    return torch.cat(rows) if rows else torch.zeros(0, items.stop - items.start)


@dataclass(frozen=True)
class PositionStats:
    """Per scored position: the user, the true item's token, log p(true item), and mean/std of log p under
    the model."""

    users: np.ndarray
    items: np.ndarray
    log_prob: np.ndarray
    mean_log_prob: np.ndarray
    std_log_prob: np.ndarray


@torch.no_grad()
def position_stats(model: Recommender, windows: Windows, batch_size: int) -> PositionStats:
    """What the LOSS, Min-K% and Min-K%++ attacks need, in one forward pass per batch."""
    model.eval()
    users, items, log_probs, means, stds = [], [], [], [], []
    for batch in windows.batches(batch_size):
        batch = batch.to(model.device)
        scored = batch.labels != IGNORE
        log_p = torch.log_softmax(scored_logits(model, batch), dim=-1)
        p = log_p.exp()
        mean = torch.einsum("nv,nv->n", p, log_p)  # a batched dot: no (positions x vocabulary) temporary
        var = torch.einsum("nv,nv->n", p.mul_(log_p), log_p) - mean.square()  # E[(log p)^2] - E[log p]^2
        labels = scored_labels(batch)
        items.append(labels)
        log_probs.append(log_p.gather(1, labels.unsqueeze(1)).squeeze(1))
        means.append(mean)
        stds.append(var.clamp_min(1e-12).sqrt())
        users.append(batch.users.unsqueeze(1).expand_as(scored)[scored])
    if not users:
        empty = np.zeros(0)
        return PositionStats(empty.astype(int), empty.astype(int), empty, empty, empty)
    return PositionStats(*(torch.cat(part).cpu().numpy() for part in (users, items, log_probs, means, stds)))
