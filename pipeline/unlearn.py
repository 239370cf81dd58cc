"""Unlearning methods behind one interface, and the loop and stopping rule they share.

Each method is one small class, registered by name and chosen in params.yaml (`unlearn.method`), as in
open-unlearning. Most override `loss` (a forget batch and a retain batch become one loss); a method that
is more than a loss overrides `step` (CURE, gradient projection) or the whole `run` (retrain, SSD).
The shared loop owns the rest: sampling, the optimiser, progress, and the stopping rule. The rule reads
the gate's own tests (pipeline.leakage): each attack's deviation from the strangers' centre in units of its
null standard deviation, z. It drives the largest |z| to within `stop_tolerance_z`, so every attack ends
where a model that never saw the users would put it, each in its own noise; attacks that disagree are
reconciled by that maximum (the checkpoint kept is the one whose furthest attack is closest). It never
stops on absence of evidence: with one user the per-user attacks' noise is wide, but item_rank averages
every scored position and stays tight, so an untouched model is far from the centre. It stops there, or once
`patience` checks in a row have not come closer, keeping the closest checkpoint. A check that finds every
attack below the centre (z < -tolerance) goes back to the last check with none below and goes on at a
smaller learning rate (`backtracks` times at most): near the centre one update can cross it.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from pipeline.circuits import Circuits, circuits_for
from pipeline.evaluate import Estimate, attack_scores, membership_auc
from pipeline.leakage import USER_ATTACKS, LeakageEvidence, Positions, leakage_evidence, norm_quantile
from pipeline.model import (
    Recommender,
    Windows,
    build_model,
    make_windows,
    position_stats,
    scored_labels,
    scored_logits,
    seed_everything,
    window_loss,
    window_nll,
)
from pipeline.pii import user_key
from pipeline.progress import progress as progress_bar
from pipeline.settings import Settings
from pipeline.splits import UnlearningData

log = logging.getLogger(__name__)

METHODS: dict[str, type[UnlearningMethod]] = {}
# How a loop that started without evidence of the model's memory says it ended (lethe calibrate reads it)
CENTRE_TARGET = "the centre itself was the target"
UPDATED = ("forget_specific", "shared", "retain_specific")  # the groups CURE updates, each by its rule; inert stays
EMBEDDING = "model.embed_tokens.weight"  # the tied item embedding, which is also the item head


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


def token_log_probs(model: Recommender, windows: Windows, grad_rows: torch.Tensor | None = None) -> torch.Tensor:
    log_p = torch.log_softmax(scored_logits(model, windows, grad_rows), -1)
    return log_p.gather(1, scored_labels(windows).to(log_p.device).unsqueeze(1)).squeeze(1)


class LeakageProbe:
    """Forgotten users against non-members: the gate's tests (pipeline.leakage) on the current model."""

    def __init__(self, data: UnlearningData, settings: Settings) -> None:
        self.settings = settings
        max_len = settings.model.max_len
        self.forget_windows = make_windows(data.forget_sequences, max_len, data.forget_scored)
        self.non_member_windows = make_windows(data.non_member_sequences, max_len)
        self.forgotten, self.non_members = data.forgotten_users, data.non_members
        self.whole = data.whole_users  # what the per-user attacks score (pipeline.leakage)

    def evidence(self, model: Recommender) -> LeakageEvidence:
        return self.measure(model)[1]

    def measure(self, model: Recommender) -> tuple[dict[str, dict[int, float]], LeakageEvidence]:
        """Every forgotten user's and non-member's per-user attack scores (the benchmark compares them with
        retrain's on the same users, partly forgotten users included), and the gate's evidence."""
        batch_size, fraction = self.settings.eval.attack_batch_size, self.settings.eval.mink_fraction
        forgotten = position_stats(model, self.forget_windows, batch_size)
        strangers = position_stats(model, self.non_member_windows, batch_size)
        forgotten_scores, stranger_scores = attack_scores(forgotten, fraction), attack_scores(strangers, fraction)
        scores = {attack: {**stranger_scores[attack], **forgotten_scores[attack]} for attack in USER_ATTACKS}
        return scores, leakage_evidence(
            scores,
            self.whole,
            self.non_members,
            Positions(forgotten.users, forgotten.items, forgotten.log_prob),
            Positions(strangers.users, strangers.items, strangers.log_prob),
            self.settings.gate.alpha,
            self.settings.gate.power,
        )

    def with_intervals(self, model: Recommender, seed: int) -> dict:
        """The evidence, each user-level AUC with a bootstrap interval over users, and the per-user scores
        (values only, no user id) that the report's histograms draw."""
        config = self.settings.eval
        scores, evidence = self.measure(model)
        intervals = membership_auc(
            {a: scores[a] for a in USER_ATTACKS if evidence.tests[a].applies},
            self.whole,
            self.non_members,
            config.bootstrap_samples,
            config.confidence,
            seed,
        )
        item = evidence.tests["item_rank"]
        half = norm_quantile((1 + config.confidence) / 2) * item.null_sd  # normal, with the null's spread
        intervals["item_rank"] = Estimate(item.auc, item.auc - half, item.auc + half)
        return {
            "mia_auc": {attack: estimate.as_dict() for attack, estimate in intervals.items()},
            "leakage": evidence.as_dict(),
            "scores": {
                attack: {side: sorted(values.values()) for side, values in sides.items()}
                for attack, sides in evidence.user_scores.items()
            },
            # per forgotten user, by keyed hash (no raw id): what each request's honoring event keeps
            "per_user": {user_key(user): figures for user, figures in evidence.user_z.items()},
        }


@dataclass
class UnlearnResult:
    steps: int
    stopped: str  # why the loop ended
    best_step: int
    aucs: dict[str, float]  # at the kept checkpoint
    history: list[dict] = field(default_factory=list)
    circuits: Circuits | None = None


def _sample(windows: Windows, size: int, generator: torch.Generator) -> Windows:
    return windows.batch(torch.randint(len(windows), (size,), generator=generator))


def _flat_dot(first: list[torch.Tensor], second: list[torch.Tensor]) -> torch.Tensor:
    return sum((a * b).sum() for a, b in zip(first, second, strict=True))


def project_out(gradient: list[torch.Tensor], direction: list[torch.Tensor]) -> list[torch.Tensor]:
    """`gradient` minus its component along `direction` (both flattened across the tensors given)."""
    norm = _flat_dot(direction, direction)
    if norm <= 1e-20:
        return gradient
    coefficient = _flat_dot(gradient, direction) / norm
    return [g - coefficient * d for g, d in zip(gradient, direction, strict=True)]


class UnlearningMethod:
    """One unlearning method: override `loss`, or `step` / `run` when it is more than a loss."""

    name: ClassVar[str]
    needs_circuits: ClassVar[bool] = False
    needs_reference: ClassVar[bool] = False  # keep a frozen copy of the model before unlearning

    def __init__(
        self, model: Recommender, settings: Settings, data: UnlearningData, circuits: Circuits | None = None
    ) -> None:
        self.model, self.full_settings, self.settings, self.data = model, settings, settings.unlearn, data
        self.circuits = circuits
        self.generator = seed_everything(settings.seed)
        max_len = settings.model.max_len
        self.forget = make_windows(data.forget_sequences, max_len, data.forget_scored)
        self.retain = make_windows(data.retain_sequences, max_len)
        self.reference = None
        if self.settings.retain_loss == "kl" or self.needs_reference:
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        self.forget_ceiling, self.reached_ceiling = None, False
        if self.settings.forget_objective == "non_member_level":
            strangers = make_windows(data.non_member_sequences, max_len)
            model.eval()
            with torch.no_grad():  # in batches: one (positions x items) block for every non-member is slow
                losses = [window_nll(model, batch) for batch in strangers.batches(settings.eval.attack_batch_size)]
            self.forget_ceiling = float(torch.cat(losses).mean()) if losses else None

    # -- the pieces a method combines -------------------------------------------------------------
    def forget_rows(self, forget: Windows) -> torch.Tensor | None:
        """With `forget_item_rows: scored`, the item embedding rows the forget objective may move: those of
        the items scored in this forget batch. Ascending their loss through the softmax otherwise lifts the
        row of every other item toward the forgotten users' contexts, and item rows are shared by every user."""
        if self.settings.forget_item_rows == "all":
            return None
        rows = torch.zeros(self.model.get_input_embeddings().weight.shape[0], dtype=torch.bool)
        rows[scored_labels(forget)] = True
        return rows

    def forget_loss(self, forget: Windows) -> torch.Tensor:
        """The loss a method ascends on the forget set. With `non_member_level`, each window's loss counts
        only up to the non-members' mean loss under the model before unlearning: a window that already looks
        like a stranger's stops pulling, so the model is not pushed past what a model that never saw the
        user would predict (unbounded ascent overshoots and drags utility down with it)."""
        rows = self.forget_rows(forget)
        if self.forget_ceiling is None:
            return window_loss(self.model, forget, rows)
        losses = window_nll(self.model, forget, rows)
        self.reached_ceiling = bool(losses.detach().mean() >= self.forget_ceiling)
        return losses.clamp(max=self.forget_ceiling).mean()

    def retain_terms(self, retain: Windows) -> tuple[torch.Tensor, torch.Tensor]:
        """From one forward pass: the retain task loss (NLL) and the term that holds utility in place, which
        is that NLL or the mean KL(model before unlearning || model) at the scored positions."""
        log_p = torch.log_softmax(scored_logits(self.model, retain), -1)
        task = torch.nn.functional.nll_loss(log_p, scored_labels(retain).to(log_p.device))
        if self.settings.retain_loss == "nll":
            return task, task
        with torch.no_grad():
            target = torch.log_softmax(scored_logits(self.reference, retain), -1)
        return task, torch.nn.functional.kl_div(log_p, target, log_target=True, reduction="batchmean")

    def retain_loss(self, retain: Windows) -> torch.Tensor:
        return self.retain_terms(retain)[1]

    def loss(self, forget: Windows, retain: Windows) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must override loss, step or run")

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def parameter_groups(self) -> list[dict]:
        """The optimiser's groups: the item embedding at the learning rate, the transformer layers at
        `layer_lr_scale` of it. Every user's every position passes through the layers, while an item's row
        serves only the contexts that hold or score that item; AdamW moves every parameter by about the
        learning rate whatever its gradient's size, so at one rate for both the layers' changes cost most of
        the utility that unlearning loses."""
        embedding, config = self.model.get_input_embeddings().weight, self.settings
        items = [p for p in self.parameters() if p is embedding]
        layers = [p for p in self.parameters() if p is not embedding]
        groups = [(items, config.learning_rate), (layers, config.learning_rate * config.layer_lr_scale)]
        return [{"params": params, "lr": lr} for params, lr in groups if params]

    def step(self, forget: Windows, retain: Windows, optimizer: torch.optim.Optimizer) -> float:
        loss = self.loss(forget, retain)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters(), 1.0)
        optimizer.step()
        return float(loss.detach())

    def gradients(self, loss: torch.Tensor, retain_graph: bool = False) -> list[torch.Tensor]:
        grads = torch.autograd.grad(loss, self.parameters(), allow_unused=True, retain_graph=retain_graph)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(self.parameters(), grads, strict=True)]

    # -- the shared loop --------------------------------------------------------------------------
    def run(self, probe: LeakageProbe, progress: bool = True) -> UnlearnResult:
        config, model = self.settings, self.model
        tolerance = config.stop_tolerance_z
        optimizer = torch.optim.AdamW(self.parameter_groups(), lr=config.learning_rate, weight_decay=0.0)
        base_rates = [group["lr"] for group in optimizer.param_groups]
        evidence = probe.evidence(model)
        history = [check_row(0, None, 1.0, evidence)]
        # how far the furthest attack is from the strangers' centre, in that attack's own null noise
        distance = evidence.worst_z()
        # Where the untouched model already passes the gate's test, or sits within the tolerance, that is no
        # evidence of forgetting: the model trained on these rows, and a batch this small (a user or two, an
        # interaction request of a few items) cannot show it. The target is then the centre itself: every attack
        # at or below it, and the model it started from is never kept.
        no_evidence = not evidence.leak or distance <= tolerance
        if no_evidence and highest_z(evidence) <= 0:
            return UnlearnResult(0, "already at or below the strangers' centre before any update", 0, evidence.aucs(),
                                 history)  # fmt: skip
        best = (float("inf") if no_evidence else distance, 0, evidence.aucs(), copy.deepcopy(model.state_dict()))

        def arrived(evidence: LeakageEvidence) -> bool:
            return highest_z(evidence) <= 0 if no_evidence else evidence.worst_z() <= tolerance

        # Where to go back to when a check overshoots: the last one with no attack below the tolerance, with
        # the optimiser's state and the trajectory's length (`done`, which the warm-up reads) at that point.
        before_band = (0, copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()))
        # step counts every update; done only those the model still holds (a backtrack undoes some);
        # stale counts the checks in a row since the best one.
        stopped, step, stale, done, scale, backtracks = "max_steps reached", 0, 0, 0, 1.0, 0
        bar = progress_bar(range(1, config.max_steps + 1), f"unlearn[{self.name}]", "step", progress)
        for step in bar:
            model.train()
            done += 1
            # Linear warm-up: a small batch (a few users) can reach the centre within the first full-size steps.
            for group, rate in zip(optimizer.param_groups, base_rates, strict=True):
                group["lr"] = rate * scale * min(1.0, done / config.warmup_steps)
            loss = self.step(
                _sample(self.forget, config.batch_size, self.generator),
                _sample(self.retain, config.retain_batch_size, self.generator),
                optimizer,
            )
            if not np.isfinite(loss):
                stopped = f"loss became {loss} at step {step}"
                break
            # The probe is the expensive part: run it every eval_every steps, and at every step once the
            # forget batch's mean loss has reached the non-members' level, or after a backtrack, where the
            # centre is likely near.
            if step % config.eval_every and step != config.max_steps and not (self.reached_ceiling or backtracks):
                continue
            evidence = probe.evidence(model)
            z = evidence.z()
            history.append(check_row(step, loss, scale, evidence))
            distance = evidence.worst_z()
            bar.set_postfix(loss=f"{loss:.3f}", worst_z=f"{distance:.2f}", refresh=False)
            closer = distance < best[0]
            none_below = all(value >= -tolerance for value in z.values())
            # one copy of the weights serves both checkpoints (neither is changed once taken)
            weights = copy.deepcopy(model.state_dict()) if closer or none_below else None
            if closer:
                best, stale = (distance, step, evidence.aucs(), weights), 0
            else:
                stale += 1
            if arrived(evidence):
                stopped = (
                    "at the strangers' centre: every attack at or below it (before any update the test had no "
                    f"evidence of the model's memory, so {CENTRE_TARGET})"
                    if no_evidence
                    else "at the strangers' centre: every attack within the tolerance"
                )
                break
            if none_below:
                before_band = (done, weights, copy.deepcopy(optimizer.state_dict()))
            elif all(value < -tolerance for value in z.values()):
                if backtracks == config.backtracks:
                    stopped = "overshot below the strangers' centre; kept the checkpoint closest to it"
                    break
                # Near the centre one full step can cross it: go back and approach it again in smaller steps.
                backtracks, scale, stale = backtracks + 1, scale * config.backtrack_lr_factor, 0
                done = before_band[0]
                model.load_state_dict(before_band[1])
                optimizer.load_state_dict(copy.deepcopy(before_band[2]))  # it would alias them
                log.info(
                    "%s overshot at step %d; back to update %d at %.3g x the learning rate",
                    self.name,
                    step,
                    done,
                    scale,
                )
                continue
            if stale >= config.patience:
                stopped = f"{stale} checks without coming closer to the centre; kept the checkpoint closest to it"
                break
        model.load_state_dict(best[3])
        model.eval()
        log.info("%s stopped after %d steps (%s); kept step %d", self.name, step, stopped, best[1])
        return UnlearnResult(step, stopped, best[1], best[2], history)


def highest_z(evidence: LeakageEvidence) -> float:
    """The attack furthest on the members' side (signed z; NaN left out, none: +inf)."""
    return max((z for z in evidence.z().values() if not math.isnan(z)), default=float("inf"))


def check_row(step: int, loss: float | None, scale: float, evidence: LeakageEvidence) -> dict:
    """One check of the stopping rule, as the unlearn manifest and the report keep it."""
    return {
        "step": step,
        "loss": loss,
        "lr_scale": scale,
        **{f"auc_{attack}": value for attack, value in evidence.aucs().items()},
        **{f"z_{attack}": value for attack, value in evidence.z().items()},
    }


@register("grad_ascent")
class GradientAscent(UnlearningMethod):
    """Ascend the loss on the forget set; nothing holds utility in place."""

    def loss(self, forget: Windows, retain: Windows) -> torch.Tensor:
        return -self.forget_loss(forget)


@register("grad_diff")
class GradientDifference(UnlearningMethod):
    """Ascend the loss on the forget set while holding the retain set (NLL or KL to the old model)."""

    def loss(self, forget: Windows, retain: Windows) -> torch.Tensor:
        return -self.forget_loss(forget) + self.settings.retain_weight * self.retain_loss(retain)


@register("finetune")
class RetainFinetune(UnlearningMethod):
    """Keep training on the retain set only and hope the forget set fades (it rarely does quickly)."""

    def loss(self, forget: Windows, retain: Windows) -> torch.Tensor:
        return window_loss(self.model, retain)


@register("npo")
class NegativePreferenceOptimization(UnlearningMethod):
    """NPO: a bounded forget loss, -2/beta log sigmoid(-beta log(p/p_old)), plus the retain term."""

    needs_reference = True

    def loss(self, forget: Windows, retain: Windows) -> torch.Tensor:
        beta = self.settings.npo_beta
        ratio = token_log_probs(self.model, forget, self.forget_rows(forget))
        with torch.no_grad():
            ratio_ref = token_log_probs(self.reference, forget)
        forget_term = -(2.0 / beta) * torch.nn.functional.logsigmoid(-beta * (ratio - ratio_ref)).mean()
        return forget_term + self.settings.retain_weight * self.retain_loss(retain)


@register("grad_projection")
class GradientProjection(UnlearningMethod):
    """Over all parameters: forget ascent projected orthogonal to the retain gradient, plus retain descent."""

    def masks(self) -> dict[str, list[torch.Tensor]] | None:
        return None  # every parameter is treated as task-shared

    def step(self, forget: Windows, retain: Windows, optimizer: torch.optim.Optimizer) -> float:
        forget_loss = self.forget_loss(forget)
        g_forget = self.gradients(forget_loss)
        task, keep = self.retain_terms(retain)
        keep = self.settings.retain_weight * keep
        g_keep = self.gradients(keep, retain_graph=True)
        g_retain_task = self.gradients(task)
        masks = self.masks()
        if masks is None:
            ascent = project_out(g_forget, g_retain_task)
            update = [-a + k for a, k in zip(ascent, g_keep, strict=True)]
        else:
            shared = [m * g for m, g in zip(masks["shared"], g_forget, strict=True)]
            shared_retain = [m * g for m, g in zip(masks["shared"], g_retain_task, strict=True)]
            projected = project_out(shared, shared_retain)
            update = [
                -(mf * gf) - p + (ms + mr) * gk
                for mf, gf, p, ms, mr, gk in zip(
                    masks["forget_specific"],
                    g_forget,
                    projected,
                    masks["shared"],
                    masks["retain_specific"],
                    g_keep,
                    strict=True,
                )
            ]
        optimizer.zero_grad()
        for parameter, direction in zip(self.parameters(), update, strict=True):
            parameter.grad = direction
        torch.nn.utils.clip_grad_norm_(self.parameters(), 1.0)
        optimizer.step()
        return float(keep.detach() - forget_loss.detach())


@register("cure")
class CircuitAwareUnlearning(GradientProjection):
    """CURE: forget-specific units follow the forget objective; task-shared units take the forget gradient
    projected orthogonal to the retain gradient plus retain descent; retain-specific units take retain
    descent only; everything else is frozen. Units are heads (their rows of q/k/v, columns of o), MLP
    neurons (their rows of gate/up, column of down) and, with `circuits.item_units`, items (their row of
    the tied embedding). With `unlearn.forget_item_rows: scored` every item row is task-shared instead: the
    forget gradient reaches only the rows of the items being forgotten, and every user's retain objective
    holds every row."""

    needs_circuits = True

    def __init__(self, model, settings, data, circuits=None) -> None:
        super().__init__(model, settings, data, circuits)
        if self.circuits is None:
            self.circuits = circuits_for(model, self.forget, self.retain, settings.circuits, settings.seed)
        self._masks = parameter_masks(model, self.circuits, items_shared=self.settings.forget_item_rows == "scored")
        self._trainable = [name for name, _ in model.named_parameters() if name in self._masks["shared"]]

    def parameters(self) -> list[torch.nn.Parameter]:
        named = dict(self.model.named_parameters())
        return [named[name] for name in self._trainable]

    def masks(self) -> dict[str, list[torch.Tensor]]:
        return {group: [self._masks[group][name] for name in self._trainable] for group in UPDATED}

    def run(self, probe: LeakageProbe, progress: bool = True) -> UnlearnResult:
        result = super().run(probe, progress)
        result.circuits = self.circuits
        return result


def attention_shape(config) -> tuple[int, int, int]:
    """(query heads, key/value heads, head width) of a config: grouped-query attention (SmolLM2: 9 and 3) shares each
    key/value head among heads // kv_heads query heads."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return heads, kv_heads, getattr(config, "head_dim", None) or config.hidden_size // heads


def kv_head_groups(circuits: Circuits, site: str, heads: int, kv_heads: int) -> dict[str, torch.Tensor]:
    """Per updated group, the key/value heads it owns. A key/value head takes part in exactly the objectives of the
    query heads it serves: it follows their one group besides inert, is task-shared when they fall in more than one,
    and stays frozen when all are inert. Without grouping (one query head each) this is the heads' own grouping."""
    served = {group: circuits.groups[group][site].reshape(kv_heads, heads // kv_heads).any(1) for group in UPDATED}
    spans = sum(member.int() for member in served.values())
    return {
        group: (member & (spans == 1)) | ((spans > 1) if group == "shared" else False)
        for group, member in served.items()
    }


def parameter_masks(
    model: Recommender, circuits: Circuits, items_shared: bool = False
) -> dict[str, dict[str, torch.Tensor]]:
    """Per group, a 0/1 mask over each parameter tensor that a head, neuron or item of that group owns;
    with `items_shared`, every item row is task-shared whatever its group.

    Every group holds the same parameter names (the q/k/v/o and gate/up/down weights of every layer, q/k/v biases
    where the architecture has them, and the item embedding when items are units). A head owns its rows of q_proj
    and its columns of o_proj; k_proj's and v_proj's rows belong to key/value heads (`kv_head_groups`).
    """
    heads, kv_heads, head_dim = attention_shape(model.config)
    masks: dict[str, dict[str, torch.Tensor]] = {g: {} for g in UPDATED}
    params = dict(model.named_parameters())

    def add(group: str, name: str, mask: torch.Tensor) -> None:
        if name in params:
            masks[group][name] = masks[group].get(name, 0) + mask.expand_as(params[name])

    for group in masks:
        for site, units in circuits.groups[group].items():
            if site == "items":  # an item's row of the tied embedding, which is also its row of the item head
                rows = torch.full(units.shape, float(group == "shared")) if items_shared else units.float()
                add(group, EMBEDDING, rows[:, None])
                continue
            layer = int(site.split(".")[0].removeprefix("layer"))
            prefix = f"model.layers.{layer}"
            if site.endswith("heads"):
                query = units.float().repeat_interleave(head_dim)
                kv = kv_head_groups(circuits, site, heads, kv_heads)[group].float().repeat_interleave(head_dim)
                for proj, rows in (("q_proj", query), ("k_proj", kv), ("v_proj", kv)):
                    add(group, f"{prefix}.self_attn.{proj}.weight", rows[:, None])
                    add(group, f"{prefix}.self_attn.{proj}.bias", rows)
                add(group, f"{prefix}.self_attn.o_proj.weight", query[None, :])
            else:
                rows = units.float()
                for proj in ("gate_proj", "up_proj"):
                    add(group, f"{prefix}.mlp.{proj}.weight", rows[:, None])
                add(group, f"{prefix}.mlp.down_proj.weight", rows[None, :])
    names = set().union(*(set(m) for m in masks.values()))
    for group in masks:
        for name in names:
            mask = torch.as_tensor(masks[group].get(name, torch.zeros_like(params[name])))
            masks[group][name] = mask.to(params[name].device, copy=True)
    return masks


@register("ssd")
class SelectiveSynapticDampening(UnlearningMethod):
    """SSD: dampen parameters far more important (diagonal Fisher) to the forget set than to all training
    data: where F_forget > alpha F_all, scale by min(lambda F_all / F_forget, 1). One shot, no training."""

    def fisher(self, windows: Windows) -> list[torch.Tensor]:
        totals = [torch.zeros_like(p) for p in self.parameters()]
        size = self.full_settings.eval.batch_size
        for batch in windows.batches(size):
            grads = self.gradients(window_loss(self.model, batch))
            totals = [t + g.square() for t, g in zip(totals, grads, strict=True)]
        batches = max(1, -(-len(windows) // size))
        return [t / batches for t in totals]

    def run(self, probe: LeakageProbe, progress: bool = True) -> UnlearnResult:
        alpha, dampening = self.settings.ssd_alpha, self.settings.ssd_lambda
        before = probe.evidence(self.model)
        everything = Windows(
            *(
                torch.cat([a, b])
                for a, b in zip(
                    (self.forget.users, self.forget.input_ids, self.forget.labels),
                    (self.retain.users, self.retain.input_ids, self.retain.labels),
                    strict=True,
                )
            )
        )
        fisher_forget, fisher_all = self.fisher(self.forget), self.fisher(everything)
        with torch.no_grad():
            for parameter, f_forget, f_all in zip(self.parameters(), fisher_forget, fisher_all, strict=True):
                selected = f_forget > alpha * f_all
                scale = torch.clamp(dampening * f_all / f_forget.clamp_min(1e-30), max=1.0)
                parameter.mul_(torch.where(selected, scale, torch.ones_like(scale)))
        self.model.eval()
        after = probe.evidence(self.model)
        history = [check_row(0, None, 1.0, before), check_row(1, None, 1.0, after)]
        return UnlearnResult(1, "one-shot dampening", 1, after.aucs(), history)


@register("retrain")
class RetrainFromScratch(UnlearningMethod):
    """The gold standard: the same recipe as the base model, from scratch, on the retain set only."""

    def run(self, probe: LeakageProbe, progress: bool = True) -> UnlearnResult:
        from pipeline.train import fit

        settings = self.full_settings
        # initialised on the CPU, as the base was: the same seed gives the same start on any device
        fresh = build_model(self.data.catalogue, settings.model, settings.seed).to(self.model.device)
        fit(fresh, self.data.retain_sequences, self.data.val_histories, self.data.val_targets, settings, progress)
        self.model.load_state_dict(fresh.state_dict())
        self.model.eval()
        evidence = probe.evidence(self.model)
        history = [check_row(1, None, 1.0, evidence)]
        return UnlearnResult(1, "retrained from scratch on the retain set", 1, evidence.aucs(), history)


def run_unlearning(
    model: Recommender,
    data: UnlearningData,
    settings: Settings,
    progress: bool = True,
    circuits: Circuits | None = None,
) -> UnlearnResult:
    """Unlearn in place with the configured method; leave the model at the kept checkpoint."""
    if not data.forget_sequences:
        return UnlearnResult(0, "nothing to forget: no member interactions in this batch", 0, {})
    method = method_named(settings.unlearn.method)(model, settings, data, circuits)
    return method.run(LeakageProbe(data, settings), progress)
