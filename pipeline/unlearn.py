"""Unlearning methods behind one interface, and the loop and stopping rule they share.

Each method is one small class that says how a forget batch and a retain batch become a loss,
registered by name and chosen in params.yaml (`unlearn.method`), as in open-unlearning. The loop
owns everything else: sampling, the optimiser, progress, and the stopping rule: stop once the
forgotten users' membership-inference AUC against non-members lies inside the target band around 0.5
for every attack, and keep the checkpoint that came closest if it never does.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import LlamaForCausalLM

from pipeline.evaluate import ATTACKS, attack_scores, auc, membership_auc
from pipeline.model import IGNORE, Windows, make_windows, position_stats, seed_everything, window_loss
from pipeline.settings import Settings, UnlearnSettings
from pipeline.splits import UnlearningData

log = logging.getLogger(__name__)

METHODS: dict[str, type[UnlearningMethod]] = {}


def register(name: str):
    def decorate(cls: type[UnlearningMethod]) -> type[UnlearningMethod]:
        if name in METHODS:
            raise ValueError(f"unlearning method {name!r} registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls

    return decorate


def method_named(name: str) -> type[UnlearningMethod]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown unlearning method {name!r}; known: {sorted(METHODS)}") from None


class UnlearningMethod:
    """One unlearning method: override `loss` (or `step` when a method is more than a loss)."""

    name: ClassVar[str]

    def __init__(self, model: LlamaForCausalLM, settings: UnlearnSettings) -> None:
        self.model = model
        self.settings = settings
        self.reference = None
        if settings.retain_loss == "kl":
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)

    def retain_loss(self, retain: Windows) -> torch.Tensor:
        """NLL on retained data, or KL to the model before unlearning (keeps what it knew, no drift)."""
        if self.reference is None:
            return window_loss(self.model, retain)
        return kl_to_reference(self.model, self.reference, retain)

    def loss(self, forget: Windows, retain: Windows) -> torch.Tensor:
        raise NotImplementedError

    def step(self, forget: Windows, retain: Windows, optimizer: torch.optim.Optimizer) -> float:
        loss = self.loss(forget, retain)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        optimizer.step()
        return float(loss.detach())


@register("grad_diff")
class GradientDifference(UnlearningMethod):
    """Ascend the loss on the forget set while descending it on the retain set."""

    def loss(self, forget: Windows, retain: Windows) -> torch.Tensor:
        return -window_loss(self.model, forget) + self.settings.retain_weight * self.retain_loss(retain)


def kl_to_reference(model: LlamaForCausalLM, reference: LlamaForCausalLM, windows: Windows) -> torch.Tensor:
    """Mean KL(reference || model) of the next-item distributions at the scored positions."""
    scored = windows.labels != IGNORE
    logits = model(input_ids=windows.input_ids, attention_mask=windows.attention_mask).logits[scored]
    with torch.no_grad():
        target = reference(input_ids=windows.input_ids, attention_mask=windows.attention_mask).logits[scored]
    return torch.nn.functional.kl_div(
        torch.log_softmax(logits, -1), torch.log_softmax(target, -1), log_target=True, reduction="batchmean"
    )


class LeakageProbe:
    """Forgotten users against non-members under the LOSS, Min-K% and Min-K%++ attacks."""

    def __init__(self, data: UnlearningData, settings: Settings) -> None:
        self.settings = settings
        max_len = settings.model.max_len
        self.forget_windows = make_windows(data.forget_sequences, max_len, data.forget_scored)
        self.non_member_windows = make_windows(data.non_member_sequences, max_len)
        self.forgotten, self.non_members = data.forgotten_users, data.non_members

    def scores(self, model: LlamaForCausalLM) -> dict[str, dict[int, float]]:
        batch_size, fraction = self.settings.eval.batch_size, self.settings.eval.mink_fraction
        forgotten = attack_scores(position_stats(model, self.forget_windows, batch_size), fraction)
        strangers = attack_scores(position_stats(model, self.non_member_windows, batch_size), fraction)
        return {attack: {**strangers[attack], **forgotten[attack]} for attack in ATTACKS}

    def point(self, model: LlamaForCausalLM) -> dict[str, float]:
        scores = self.scores(model)
        return {
            attack: auc(
                np.array([scores[attack][u] for u in self.forgotten]),
                np.array([scores[attack][u] for u in self.non_members]),
            )
            for attack in ATTACKS
        }

    def with_intervals(self, model: LlamaForCausalLM, seed: int) -> dict[str, dict[str, float]]:
        config = self.settings.eval
        estimates = membership_auc(
            self.scores(model), self.forgotten, self.non_members, config.bootstrap_samples, config.confidence, seed
        )
        return {attack: estimate.as_dict() for attack, estimate in estimates.items()}


def worst_deviation(aucs: dict[str, float]) -> float:
    return max(abs(value - 0.5) for value in aucs.values())


def in_band(aucs: dict[str, float], band: tuple[float, float]) -> bool:
    return all(band[0] <= value <= band[1] for value in aucs.values())


@dataclass
class UnlearnResult:
    steps: int
    stopped: str  # why the loop ended
    best_step: int
    aucs: dict[str, float]  # at the kept checkpoint
    history: list[dict] = field(default_factory=list)


def _sample(windows: Windows, size: int, generator: torch.Generator) -> Windows:
    return windows.batch(torch.randint(len(windows), (size,), generator=generator))


def run_unlearning(
    model: LlamaForCausalLM, data: UnlearningData, settings: Settings, progress: bool = True
) -> UnlearnResult:
    """Unlearn in place with the configured method; leave the model at the kept checkpoint."""
    config = settings.unlearn
    if not data.forget_sequences:
        return UnlearnResult(0, "nothing to forget: no member interactions in this batch", 0, {})
    generator = seed_everything(settings.seed)
    forget = make_windows(data.forget_sequences, settings.model.max_len, data.forget_scored)
    retain = make_windows(data.retain_sequences, settings.model.max_len)
    probe = LeakageProbe(data, settings)
    method = method_named(config.method)(model, config)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=config.learning_rate, weight_decay=0.0
    )

    aucs = probe.point(model)
    history = [{"step": 0, "loss": None, **{f"auc_{a}": v for a, v in aucs.items()}}]
    best = (worst_deviation(aucs), 0, aucs, copy.deepcopy(model.state_dict()))
    if in_band(aucs, config.target_auc_band):
        return UnlearnResult(0, "already inside the target band before any update", 0, aucs, history)

    stopped, step = "max_steps reached", 0
    bar = tqdm(range(1, config.max_steps + 1), desc=f"unlearn[{config.method}]", unit="step", disable=not progress)
    for step in bar:
        model.train()
        loss = method.step(
            _sample(forget, config.batch_size, generator),
            _sample(retain, config.retain_batch_size, generator),
            optimizer,
        )
        if not np.isfinite(loss):
            stopped = f"loss became {loss} at step {step}"
            break
        if step % config.eval_every and step != config.max_steps:
            continue
        aucs = probe.point(model)
        history.append({"step": step, "loss": loss, **{f"auc_{a}": v for a, v in aucs.items()}})
        bar.set_postfix(loss=f"{loss:.3f}", worst_auc_gap=f"{worst_deviation(aucs):.3f}")
        if worst_deviation(aucs) < best[0]:
            best = (worst_deviation(aucs), step, aucs, copy.deepcopy(model.state_dict()))
        if in_band(aucs, config.target_auc_band):
            stopped = "inside the target band"
            break
        if all(value < config.target_auc_band[0] for value in aucs.values()):
            stopped = "overshot below the target band; kept the checkpoint closest to 0.5"
            break
    model.load_state_dict(best[3])
    model.eval()
    log.info("unlearning stopped after %d steps (%s); kept step %d", step, stopped, best[1])
    return UnlearnResult(step, stopped, best[1], best[2], history)
