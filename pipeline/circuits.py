"""Circuits: which attention heads and MLP neurons carry an objective, by attribution patching.

Plain `transformers` modules and forward hooks, no model conversion. A head's activation is its slice
of the attention output before `o_proj`; a neuron's is its entry of the input of `down_proj`; an item's
(with `circuits.item_units`) is its logit on the tied item head. The score
of a module for an objective is |(activation - its mean) . gradient of the objective|, averaged over the
scored positions: the first-order estimate of how much the loss would move if the module were replaced
by its mean (mean ablation). A forward pass for the means, then one forward and one backward per batch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline.model import IGNORE, Recommender, Windows, precision, window_loss
from pipeline.settings import CircuitSettings

GROUPS = ("forget_specific", "retain_specific", "shared", "inert")


def _sites(model: Recommender, items: bool = False) -> dict[str, torch.nn.Module]:
    """Where each kind of unit lives. Heads and neurons are the inputs of o_proj and down_proj; item units
    (with `items`) are the outputs of the (tied) item head: one logit per item token, so a unit is an item's
    embedding row, which is where a next-item model keeps most of what it knows about one item."""
    sites: dict[str, torch.nn.Module] = {}
    for index, layer in enumerate(model.model.layers):
        sites[f"layer{index}.heads"] = layer.self_attn.o_proj
        sites[f"layer{index}.neurons"] = layer.mlp.down_proj
    if items:
        sites["items"] = model.lm_head
    return sites


def _per_unit(model: Recommender, site: str, values: torch.Tensor) -> torch.Tensor:
    """(..., features) -> (..., units): heads sum their head_dim slice, neurons and items are already units."""
    if not site.endswith("heads"):
        return values
    heads = model.config.num_attention_heads
    return values.reshape(*values.shape[:-1], heads, values.shape[-1] // heads).sum(-1)


def _on_activation(
    module: torch.nn.Module, site: str, hook: Callable[[torch.Tensor], torch.Tensor | None]
) -> torch.utils.hooks.RemovableHandle:
    """Call `hook` on a site's activation (the item head's output; a layer's input otherwise); a tensor it
    returns replaces the activation."""
    if site == "items":
        return module.register_forward_hook(lambda module, args, output: hook(output))

    def pre_hook(module, args):
        replaced = hook(args[0])
        return None if replaced is None else (replaced, *args[1:])

    return module.register_forward_pre_hook(pre_hook)


def _scored(activation: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """A layer's activation at the scored positions of the windows, (scored positions, features). A prefixed
    transformer (pipeline.model.attach_prefix) runs its prefix's positions in front of each window's: those are
    never scored and come first, so the window's positions are the last ones."""
    return activation[:, activation.shape[1] - scored.shape[1] :][scored]


@contextmanager
def _capture(model: Recommender, items: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Record each site's activation (a layer's input; the item head's output), still in the autograd graph."""
    captured: dict[str, torch.Tensor] = {}

    def record(site: str, activation: torch.Tensor) -> None:
        captured[site] = activation

    handles = [
        _on_activation(module, site, lambda activation, site=site: record(site, activation))
        for site, module in _sites(model, items).items()
    ]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def attribution_scores(
    model: Recommender, windows: Windows, batch_size: int, items: bool = False
) -> dict[str, torch.Tensor]:
    """Per site, a score per unit (head, neuron, and with `items` item) for the next-item loss on `windows`.

    Each scored position contributes |(activation - the mean over all of `windows`) . its own loss's gradient|,
    and the scores are the mean over positions, so they do not depend on `batch_size`: a forward pass without
    gradients first takes the means (as mean ablation uses them), then each batch's summed loss is differentiated.
    The backward pass asks for the activations' gradients only: no weight gradient is computed."""
    model.eval()
    means = site_means(model, windows, batch_size, items)
    totals: dict[str, torch.Tensor] = {}
    count = 0
    sites = list(_sites(model, items))
    for batch in windows.batches(batch_size):
        batch = batch.to(model.device)
        scored = batch.labels != IGNORE
        with _capture(model, items) as captured:
            loss = window_loss(model, batch) * scored.sum()  # the sum: each position's gradient is its own
        gradients = torch.autograd.grad(loss, [captured[site] for site in sites])
        for site, gradient in zip(sites, gradients, strict=True):
            activation, gradient = captured[site].detach().float(), gradient.float()  # bf16 under CUDA autocast
            if site != "items":  # the item head runs on the scored positions only (model.scored_logits)
                activation, gradient = _scored(activation, scored), _scored(gradient, scored)
            centred = activation - means[site]
            contribution = _per_unit(model, site, centred * gradient).abs().sum(dim=0)
            totals[site] = totals.get(site, 0) + contribution
        count += int(scored.sum())
    return {site: (total / max(count, 1)).cpu() for site, total in totals.items()}


def top_units(scores: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """Boolean masks of the top `fraction` of each kind of unit (heads among heads, neurons among neurons,
    items among items)."""
    masks = {}
    for kind in ("heads", "neurons", "items"):
        sites = [site for site in scores if site.endswith(kind)]
        if not sites:
            continue
        flat = torch.cat([scores[site] for site in sites])
        keep = max(1, int(round(fraction * len(flat))))
        threshold = torch.topk(flat, keep).values.min()
        for site in sites:
            masks[site] = scores[site] >= threshold
    return masks


@dataclass
class Circuits:
    """Scores per objective and the partition of modules into the four CURE groups."""

    forget_scores: dict[str, torch.Tensor]
    retain_scores: dict[str, torch.Tensor]
    groups: dict[str, dict[str, torch.Tensor]]  # group -> site -> boolean mask over units
    meta: dict

    def with_fractions(self, forget_fraction: float, retain_fraction: float) -> Circuits:
        """The partition of these scores at other top fractions: one extraction serves every pair."""
        top_forget, top_retain = (
            top_units(self.forget_scores, forget_fraction),
            top_units(self.retain_scores, retain_fraction),
        )
        groups = {group: {} for group in GROUPS}
        for site in self.forget_scores:
            f, r = top_forget[site], top_retain[site]
            groups["forget_specific"][site] = f & ~r
            groups["retain_specific"][site] = r & ~f
            groups["shared"][site] = f & r
            groups["inert"][site] = ~f & ~r
        meta = {**self.meta, "forget_fraction": forget_fraction, "retain_fraction": retain_fraction}
        return Circuits(self.forget_scores, self.retain_scores, groups, meta)

    def group_sizes(self) -> dict[str, int]:
        return {group: int(sum(mask.sum() for mask in masks.values())) for group, masks in self.groups.items()}

    def sizes_by_site(self) -> dict[str, dict[str, int]]:
        """Per group, the units of each site (layerN.heads, layerN.neurons, items): the circuits per layer."""
        return {group: {site: int(mask.sum()) for site, mask in masks.items()} for group, masks in self.groups.items()}

    def units(self, group: str) -> set[tuple[str, int]]:
        return {(site, int(i)) for site, mask in self.groups[group].items() for i in torch.nonzero(mask).flatten()}

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"forget/{s}": t for s, t in self.forget_scores.items()}
        tensors |= {f"retain/{s}": t for s, t in self.retain_scores.items()}
        tensors |= {f"{g}/{s}": m.to(torch.uint8) for g, masks in self.groups.items() for s, m in masks.items()}
        save_file({k: v.contiguous() for k, v in tensors.items()}, directory / "circuits.safetensors")
        sizes = {"sizes": self.group_sizes(), "sizes_by_site": self.sizes_by_site()}
        (directory / "circuits.json").write_text(json.dumps({**self.meta, **sizes}, indent=2))

    @classmethod
    def load(cls, directory: Path) -> Circuits:
        directory = Path(directory)
        if not (directory / "circuits.json").exists():
            raise FileNotFoundError(f"{directory}: no circuits here (circuits.json missing)")
        tensors = load_file(directory / "circuits.safetensors")
        split: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            prefix, site = key.split("/", 1)
            split.setdefault(prefix, {})[site] = value if prefix in ("forget", "retain") else value.bool()
        meta = json.loads((directory / "circuits.json").read_text())
        for derived in ("sizes", "sizes_by_site"):
            meta.pop(derived, None)
        return cls(split["forget"], split["retain"], {g: split.get(g, {}) for g in GROUPS}, meta)


def extract_circuits(
    model: Recommender,
    forget: Windows,
    retain: Windows,
    forget_fraction: float,
    retain_fraction: float,
    batch_size: int,
    meta: dict | None = None,
    items: bool = False,
) -> Circuits:
    forget_scores = attribution_scores(model, forget, batch_size, items)
    retain_scores = attribution_scores(model, retain, batch_size, items)
    info = {
        "extracted_at": datetime.now(UTC).isoformat(),
        "item_units": items,
        "forget_positions": int((forget.labels != IGNORE).sum()),
        "retain_positions": int((retain.labels != IGNORE).sum()),
        **(meta or {}),
    }
    return Circuits(forget_scores, retain_scores, {}, info).with_fractions(forget_fraction, retain_fraction)


def retain_sample(retain: Windows, settings: CircuitSettings, seed: int) -> Windows:
    """The seeded sample of retain windows that scores the retain objective."""
    generator = torch.Generator().manual_seed(seed)
    return retain.batch(torch.randint(len(retain), (settings.retain_windows,), generator=generator))


def circuits_for(
    model: Recommender,
    forget: Windows,
    retain: Windows,
    settings: CircuitSettings,
    seed: int,
    meta: dict | None = None,
) -> Circuits:
    """Extract with params.yaml's fractions on a seeded sample of the retain windows: same inputs, same circuits."""
    return extract_circuits(
        model,
        forget,
        retain_sample(retain, settings, seed),
        settings.forget_fraction,
        settings.retain_fraction,
        settings.batch_size,
        meta,
        settings.item_units,
    )


def jaccard(first: set, second: set) -> float:
    return len(first & second) / len(first | second) if first | second else 1.0


# --- mean ablation, for faithfulness -------------------------------------------------------------


def site_means(
    model: Recommender, windows: Windows, batch_size: int, items: bool = False
) -> dict[str, torch.Tensor]:
    """Mean activation per site over the scored positions (the value mean ablation writes in)."""
    sums: dict[str, torch.Tensor] = {}
    count = 0
    with torch.no_grad(), _capture(model, items) as captured:
        for batch in windows.batches(batch_size):
            batch = batch.to(model.device)
            with precision(model):
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            scored = batch.labels != IGNORE
            for site in _sites(model, items):
                sums[site] = sums.get(site, 0) + _scored(captured[site], scored).float().sum(0)
            count += int(scored.sum())
    return {site: total / max(count, 1) for site, total in sums.items()}


@contextmanager
def mean_ablated(model: Recommender, units: set[tuple[str, int]], means: dict[str, torch.Tensor]):
    """Replace the chosen heads' slices, neurons' entries and items' logits by their mean activation."""
    handles = []
    for site, module in _sites(model, "items" in means).items():
        chosen = sorted(index for name, index in units if name == site)
        if not chosen:
            continue
        features = torch.zeros(means[site].shape[0], dtype=torch.bool, device=means[site].device)
        if site.endswith("heads"):
            head_dim = means[site].shape[0] // model.config.num_attention_heads
            for head in chosen:
                features[head * head_dim : (head + 1) * head_dim] = True
        else:
            features[chosen] = True

        def ablate(activation: torch.Tensor, features=features, mean=means[site]) -> torch.Tensor:
            activation = activation.clone()
            activation[..., features] = mean[features].to(activation.dtype)
            return activation

        handles.append(_on_activation(module, site, ablate))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def mean_loss(model: Recommender, windows: Windows, batch_size: int) -> float:
    total, count = 0.0, 0
    for batch in windows.batches(batch_size):
        positions = int((batch.labels != IGNORE).sum())
        total += float(window_loss(model, batch)) * positions
        count += positions
    return total / max(count, 1)


def faithfulness(
    model: Recommender,
    partitions: Sequence[Circuits],
    forget: Windows,
    retain: Windows,
    batch_size: int,
    seed: int,
    random_sets: int = 10,
) -> list[dict[str, float]]:
    """Does ablating the forget circuit hurt the forget loss more than a random set of the same size,
    and the retain loss less than ablating the retain circuit? One report per partition.

    Asked twice: of the whole circuits (each objective's top fraction, so both hold the task-shared units),
    and of their specific parts alone (forget-specific against retain-specific, the same size when the two
    fractions are equal). With large fractions the shared units dominate both whole circuits and ablating
    either breaks the model alike; the specific parts show whether the split itself separates the objectives.

    The partitions are one extraction's scores at several fractions (`Circuits.with_fractions`): they share the
    model's own losses, the site means and every ablation of a unit set they have in common, which is computed
    once. Each draws its random sets from a generator seeded with `seed`, so its report is the one it would get
    alone (partitions with the same forget fraction draw the same random sets for their whole forget circuit)."""
    if not partitions:
        return []
    means = site_means(model, retain, batch_size, items="items" in partitions[0].forget_scores)
    losses = {
        "forget": (forget, mean_loss(model, forget, batch_size)),
        "retain": (retain, mean_loss(model, retain, batch_size)),
    }
    rises: dict[tuple[frozenset, str], float] = {}

    def rise(units: set, objective: str) -> float:
        """How much mean-ablating these units raises the loss of this objective ("forget" or "retain")."""
        key = (frozenset(units), objective)
        if key not in rises:
            windows, before = losses[objective]
            with mean_ablated(model, units, means):
                rises[key] = mean_loss(model, windows, batch_size) - before
        return rises[key]

    return [_faithfulness_of(circuits, rise, seed, random_sets) for circuits in partitions]


def _faithfulness_of(
    circuits: Circuits, rise: Callable[[set, str], float], seed: int, random_sets: int
) -> dict[str, float]:
    forget_specific, retain_specific = circuits.units("forget_specific"), circuits.units("retain_specific")
    shared = circuits.units("shared")
    everything = sorted(forget_specific | retain_specific | shared | circuits.units("inert"))
    rng = np.random.default_rng(seed)

    def random_rise(size: int) -> float:
        """The forget loss's mean rise over `random_sets` random unit sets of this size."""
        picks = [rng.choice(len(everything), size, replace=False) for _ in range(random_sets)]
        return float(np.mean([rise({everything[i] for i in pick}, "forget") for pick in picks]))

    forget_circuit, retain_circuit = forget_specific | shared, retain_specific | shared
    whole_forget = rise(forget_circuit, "forget"), rise(forget_circuit, "retain")
    whole_retain = rise(retain_circuit, "retain")
    random_whole = random_rise(len(forget_circuit))
    specific_forget = rise(forget_specific, "forget"), rise(forget_specific, "retain")
    specific_retain = rise(retain_specific, "forget"), rise(retain_specific, "retain")
    random_specific = random_rise(len(forget_specific))
    return {
        "forget_loss_rise_forget_circuit": whole_forget[0],
        "forget_loss_rise_random_mean": random_whole,
        "ratio_forget_vs_random": whole_forget[0] / max(random_whole, 1e-9),
        "retain_loss_rise_forget_circuit": whole_forget[1],
        "retain_loss_rise_retain_circuit": whole_retain,
        "ratio_retain_forget_vs_retain_circuit": whole_forget[1] / max(whole_retain, 1e-9),
        "forget_specific_units": len(forget_specific),
        "retain_specific_units": len(retain_specific),
        "forget_loss_rise_forget_specific": specific_forget[0],
        "forget_loss_rise_random_specific_mean": random_specific,
        "ratio_forget_specific_vs_random": specific_forget[0] / max(random_specific, 1e-9),
        "retain_loss_rise_forget_specific": specific_forget[1],
        "retain_loss_rise_retain_specific": specific_retain[1],
        "ratio_retain_forget_specific_vs_retain_specific": specific_forget[1] / max(specific_retain[1], 1e-9),
        "forget_loss_rise_retain_specific": specific_retain[0],
    }
