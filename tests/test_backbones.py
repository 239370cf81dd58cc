"""Pretrained backbones: SmolLM2's real weights through the code path every step uses, a team's own Hugging Face
directory (Llama family, Qwen2), and a clear refusal of an architecture the circuits cannot hook.

One layer of SmolLM2 keeps these tests in seconds; the weights are the GGUF file's, checked against an independent
reader of that file."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.backbones import BackboneError, build_pretrained, convert_smollm2, smollm2_gguf, weights_digest
from pipeline.data import BOS_TOKEN, FIRST_ITEM_TOKEN
from pipeline.settings import Home, Settings
from tests.conftest import tiny_params


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One LETHE_HOME for the module: SmolLM2 is converted into it once."""
    root = tmp_path_factory.mktemp("backbones")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LETHE_HOME", str(root))
        yield Home(root)


@pytest.fixture(scope="module")
def converted(home):
    return convert_smollm2(home)


def pretrained_settings(**overrides) -> Settings:
    return Settings.model_validate(
        tiny_params(
            **{"model.backbone": "smollm2-135m", "model.layers": 1, "model.max_len": 16, "train.epochs": 1, **overrides}
        )
    )


def test_the_converted_weights_are_the_gguf_files_and_conversion_happens_once(converted, home):
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import load_file

    tensors = {tensor.name: tensor for tensor in GGUFReader(smollm2_gguf()).tensors}
    weights = load_file(converted / "model.safetensors")
    assert len([name for name in weights if name.endswith("mlp.down_proj.weight")]) == 30
    for layer in (0, 29):  # llama.cpp stores down_proj as it is (q and k it permutes for its rotary layout)
        raw = tensors[f"blk.{layer}.ffn_down.weight"]
        expected = dequantize(raw.data, raw.tensor_type)
        np.testing.assert_array_equal(weights[f"model.layers.{layer}.mlp.down_proj.weight"].numpy(), expected)
    stamp = (converted / "model.safetensors").stat().st_mtime_ns
    assert convert_smollm2(home) == converted
    assert (converted / "model.safetensors").stat().st_mtime_ns == stamp, "converted again"
    assert not list(converted.parent.glob("*.partial"))


def test_item_rows_start_from_the_titles_and_the_layers_are_the_pretrained_ones(converted, snapshot, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.model import load_model, save_model

    settings = pretrained_settings()
    model = build_pretrained(snapshot.items, settings.model, seed=1)
    again = build_pretrained(snapshot.items, settings.model, seed=1)
    assert torch.equal(model.get_input_embeddings().weight, again.get_input_embeddings().weight)
    assert model.config.vocab_size == FIRST_ITEM_TOKEN + len(snapshot.items) and model.config.num_hidden_layers == 1
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight, "the item head is tied"
    provenance = model.config.lethe_backbone
    assert provenance["layers_kept"] == 1 and provenance["source"] == str(converted)
    assert provenance["weights_sha256"] == weights_digest(converted)
    save_model(model, tmp_path / "saved", {})
    assert load_model(tmp_path / "saved")[0].config.lethe_backbone == provenance, "kept in the saved config"

    source = AutoModelForCausalLM.from_pretrained(converted)
    for name, weight in model.model.layers[0].state_dict().items():
        assert torch.equal(weight, source.model.layers[0].state_dict()[name]), name
    tokenizer = AutoTokenizer.from_pretrained(converted)
    text = source.get_input_embeddings().weight
    rows = model.get_input_embeddings().weight.detach()
    assert torch.equal(rows[BOS_TOKEN], text[tokenizer.bos_token_id])
    titles = snapshot.items.title.tolist()
    toy_story = titles.index("Toy Story")
    ids = tokenizer("Toy Story, Adventure, Animation, Children, Comedy, Fantasy", add_special_tokens=False).input_ids
    assert torch.allclose(rows[FIRST_ITEM_TOKEN + toy_story], text[ids].mean(0))
    # the pretrained model's knowledge of the films: the sequel is among Toy Story's nearest rows
    items = rows[FIRST_ITEM_TOKEN:]
    similarity = torch.nn.functional.cosine_similarity(items[toy_story : toy_story + 1], items)
    nearest = [titles[index] for index in similarity.topk(4).indices.tolist()[1:]]
    assert "Toy Story 2" in nearest, nearest


def test_an_item_without_a_title_starts_from_a_seeded_random_row(converted):
    settings = pretrained_settings()
    catalogue = pd.DataFrame({"item_id": [10, 11], "title": ["Heat", None], "genres": [None, None]})
    first = build_pretrained(catalogue, settings.model, seed=3).get_input_embeddings().weight.detach()
    again = build_pretrained(catalogue, settings.model, seed=3).get_input_embeddings().weight.detach()
    other = build_pretrained(catalogue, settings.model, seed=4).get_input_embeddings().weight.detach()
    untitled = FIRST_ITEM_TOKEN + 1
    assert torch.equal(first[untitled], again[untitled]) and not torch.equal(first[untitled], other[untitled])
    assert torch.equal(first[FIRST_ITEM_TOKEN], other[FIRST_ITEM_TOKEN]), "a titled row does not depend on the seed"


def test_an_architecture_the_circuits_cannot_hook_is_refused_by_name(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    directory = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(
        directory
    )
    settings = pretrained_settings(**{"model.backbone": "hf", "model.hf.path": str(directory)})
    with pytest.raises(BackboneError, match=r"gpt2.*model\.embed_tokens.*model\.layers\.<i>\.self_attn\.o_proj"):
        build_pretrained(pd.DataFrame({"title": ["Heat"], "genres": [None]}), settings.model, seed=1)
    empty = tmp_path / "empty"
    empty.mkdir()
    settings = pretrained_settings(**{"model.backbone": "hf", "model.hf.path": str(empty)})
    with pytest.raises(BackboneError, match="not a Hugging Face model directory"):
        build_pretrained(pd.DataFrame({"title": ["Heat"], "genres": [None]}), settings.model, seed=1)
    with pytest.raises(ValueError, match=r"model\.hf\.path"):
        pretrained_settings(**{"model.backbone": "hf"})


def test_a_qwen2_directory_is_hooked_like_a_llama(converted, tmp_path):
    """Qwen2 has the Llama family's module names (and biases on q, k and v, which CURE's masks cover)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from pipeline.circuits import GROUPS, Circuits
    from pipeline.unlearn import UPDATED, parameter_masks

    directory = tmp_path / "qwen2"
    config = Qwen2Config(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(converted / name, directory / name)  # any tokenizer of the same vocabulary
    settings = pretrained_settings(**{"model.backbone": "hf", "model.hf.path": str(directory), "model.layers": None})
    catalogue = pd.DataFrame({"title": ["Heat", "Alien"], "genres": ["Action", "Horror|Sci-Fi"]})
    model = build_pretrained(catalogue, settings.model, seed=1)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    # query heads 0 and 1 share key/value head 0, heads 2 and 3 share head 1
    heads = {
        "forget_specific": torch.tensor([True, False, False, False]),
        "shared": torch.tensor([False, False, True, False]),
        "retain_specific": torch.tensor([False, True, False, False]),
        "inert": torch.tensor([False, False, False, True]),
    }
    groups = {group: {"layer0.heads": heads[group]} for group in GROUPS}
    masks = parameter_masks(model, Circuits({}, {}, groups, {}))
    head_dim = 16
    for group in UPDATED:
        query = masks[group]["model.layers.0.self_attn.q_proj.weight"][:, 0].reshape(4, head_dim)[:, 0]
        assert query.bool().tolist() == heads[group].tolist()
        bias = masks[group]["model.layers.0.self_attn.q_proj.bias"]
        assert bias.reshape(4, head_dim)[:, 0].tolist() == query.tolist()
        kv = masks[group]["model.layers.0.self_attn.k_proj.weight"][:, 0].reshape(2, head_dim)[:, 0].bool().tolist()
        # head 0 serves a forget and a retain query head: shared; head 1 a shared and an inert one: shared
        assert kv == ([True, True] if group == "shared" else [False, False]), group
    total = sum(masks[group]["model.layers.0.self_attn.v_proj.weight"] for group in UPDATED)
    assert total.max() == 1, "a parameter belongs to one group at most"


def test_a_llama_directory_trains_and_unlearns_with_cure(converted, ratings):
    """The converted SmolLM2 directory as a team's own (`hf`): a base fine-tune, circuits over its heads (9 per
    layer, grouped-query attention) and neurons, and CURE's update through the same interface as on tiny. On 60
    people and a small retain sample: the path is checked here, not the figures."""
    from pipeline.data import prepare_snapshot
    from pipeline.model import build_model, make_windows, window_loss
    from pipeline.train import train_base
    from pipeline.unlearn import LeakageProbe, method_named
    from tests.test_unlearn import forget_users

    settings = pretrained_settings(
        **{"model.backbone": "hf", "model.hf.path": str(converted), "data.max_users": 60,
           "circuits.retain_windows": 32, "train.learning_rate": 0.003}
    )  # fmt: skip
    snapshot = prepare_snapshot(ratings, settings.data, settings.seed)
    windows = make_windows(snapshot.sequences(("train",), snapshot.members[:40]), settings.model.max_len)
    untrained = build_model(snapshot.items, settings.model, settings.seed)
    with torch.no_grad():
        loss_before = window_loss(untrained, windows).item()
    model, report = train_base(snapshot, settings, progress=False)
    with torch.no_grad():
        loss_after = window_loss(model, windows).item()
    assert loss_after < loss_before - 0.5, (loss_before, loss_after)
    assert report["members"] == len(snapshot.members)

    data = forget_users(snapshot)
    before = copy.deepcopy(model.state_dict())
    cure = method_named("cure")(model, settings, data)
    assert cure.circuits.groups["inert"]["layer0.heads"].shape == (9,)
    assert cure.circuits.groups["inert"]["layer0.neurons"].shape == (1536,)
    optimizer = torch.optim.AdamW(cure.parameters(), lr=1e-3, weight_decay=0.0)
    for _ in range(2):
        cure.step(cure.forget.batch(slice(0, 8)), cure.retain.batch(slice(0, 8)), optimizer)
    after = model.state_dict()
    changed = {name for name in after if not torch.equal(after[name], before[name])}
    assert "model.layers.0.self_attn.k_proj.weight" in changed and "model.embed_tokens.weight" in changed
    assert "model.norm.weight" not in changed, "not a unit: frozen"
    evidence = LeakageProbe(data, settings).evidence(model)
    assert set(evidence.aucs()) == {"loss", "mink", "minkpp", "item_rank"}


def test_a_lora_fine_tune_merges_into_the_plain_model_before_anything_unlearns(converted, ratings):
    """`train.method: lora` on SmolLM2's real first layer: the adapters train the projections (the norms stay the
    pretrained ones), the item rows train in full, and what leaves `fit` is the plain model, the same parameters
    by name and shape, every one trainable again, so circuits and unlearning run on it unchanged. Merging is exact:
    the merged model's logits are the adapted model's."""
    from pipeline.data import prepare_snapshot
    from pipeline.model import build_model, make_windows, window_loss
    from pipeline.train import LORA_MODULES, fit, with_adapters

    settings = pretrained_settings(
        **{"train.method": "lora", "data.max_users": 60, "train.learning_rate": 0.01, "train.lora.rank": 4}
    )
    snapshot = prepare_snapshot(ratings, settings.data, settings.seed)
    sequences = snapshot.sequences(("train",), snapshot.members)
    windows = make_windows(sequences, settings.model.max_len)
    model = build_model(snapshot.items, settings.model, settings.seed)
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        loss_before = window_loss(model, windows).item()
    fit(model, sequences, sequences, snapshot.targets("val", snapshot.members), settings, progress=False)
    with torch.no_grad():
        loss_after = window_loss(model, windows).item()
    assert loss_after < loss_before - 0.5, (loss_before, loss_after)
    after = model.state_dict()
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}, "a plain model again"
    assert all(parameter.requires_grad for parameter in model.parameters())
    changed = {name for name in after if not torch.equal(after[name], before[name])}
    assert {f"model.layers.0.{part}.{name}.weight" for name in LORA_MODULES
            for part in ("self_attn", "mlp") if f"model.layers.0.{part}.{name}.weight" in after} <= changed  # fmt: skip
    assert "model.embed_tokens.weight" in changed
    assert not {"model.norm.weight", "model.layers.0.input_layernorm.weight"} & changed, "frozen under LoRA"

    adapted = with_adapters(copy.deepcopy(model), settings.train)
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: give the adapters something to merge
                parameter.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(len(name)))
        batch = windows.batch(torch.arange(16))
        unmerged = adapted(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        merged_model = adapted.merge_and_unload()
        merged = merged_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert not torch.allclose(merged, model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits)
    assert torch.allclose(merged, unmerged, atol=1e-4), float((merged - unmerged).abs().max())


def test_a_text_prefix_is_read_in_front_of_every_window_frozen_and_kept_by_saving(converted, snapshot, tmp_path):
    """model.prefix: the prefix's pretrained token rows sit after the items, and the transformer reads them in front of
    every window: the recommender's scores are the plain model's on [prefix, window], its head still scores PAD,
    BOS and the items only, no gradient reaches the prefix's rows, and a saved, loaded or copied model reads it too."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.circuits import attribution_scores
    from pipeline.model import (
        IGNORE,
        attach_prefix,
        load_model,
        make_windows,
        next_item_logits,
        save_model,
        scored_logits,
        window_loss,
    )

    text = "A viewer's films, in order:"
    plain = build_pretrained(snapshot.items, pretrained_settings().model, seed=1)
    model = build_pretrained(snapshot.items, pretrained_settings(**{"model.prefix": text}).model, seed=1)
    ids = AutoTokenizer.from_pretrained(converted)(text, add_special_tokens=False).input_ids
    items_end = FIRST_ITEM_TOKEN + len(snapshot.items)
    assert model.config.lethe_prefix == list(range(items_end, items_end + len(ids)))
    assert model.config.vocab_size == items_end + len(ids) and model.config.lethe_backbone["prefix"] == text
    pretrained_rows = AutoModelForCausalLM.from_pretrained(converted).get_input_embeddings().weight[ids]
    rows = model.get_input_embeddings().weight
    assert torch.equal(rows[items_end:], pretrained_rows)
    assert torch.equal(rows[:items_end], plain.get_input_embeddings().weight), "the items' rows are unchanged"

    sequences = snapshot.sequences(("train",), snapshot.members[:6])
    windows = make_windows(sequences, 16)
    with torch.no_grad():
        items_in = plain.model.embed_tokens(windows.input_ids)
        embeds = torch.cat([pretrained_rows.expand(len(windows), -1, -1), items_in], 1)
        mask = torch.cat([torch.ones(len(windows), len(ids), dtype=torch.long), windows.attention_mask], 1)
        hidden = plain.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state[:, len(ids) :]
        expected = plain.lm_head(hidden[windows.labels != IGNORE])
        scores = scored_logits(model, windows)
        assert scores.shape == expected.shape == (int((windows.labels != IGNORE).sum()), items_end)
        torch.testing.assert_close(scores, expected)
        assert not torch.allclose(scores, scored_logits(plain, windows), atol=1e-2), "the prefix changes nothing"
    histories = [sequence[:5] for sequence in sequences.values()]
    assert next_item_logits(model, histories, 16, 4).shape == (len(histories), len(snapshot.items))

    window_loss(model, windows).backward()
    gradient = rows.grad
    assert gradient[items_end:].abs().sum() == 0, "the prefix's rows are frozen"
    assert gradient[FIRST_ITEM_TOKEN:items_end].abs().sum() > 0
    scores = attribution_scores(model, windows, batch_size=4)
    assert scores["layer0.heads"].shape == (9,) and bool((scores["layer0.heads"] > 0).all())

    save_model(model, tmp_path / "saved", {})
    loaded, _ = load_model(tmp_path / "saved")
    attach_prefix(loaded)  # attached once, however often asked
    copied = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(scored_logits(loaded, windows), expected)
        torch.testing.assert_close(scored_logits(copied, windows), expected)
        copied.get_input_embeddings().weight[items_end:] += 1.0  # a copy reads its own prefix rows, not the original's
        assert not torch.allclose(scored_logits(copied, windows), expected, atol=1e-2)
        torch.testing.assert_close(scored_logits(model, windows), expected)


def test_a_prefix_needs_a_pretrained_tokenizer_and_no_weight_decay():
    with pytest.raises(ValueError, match="tiny has no text vocabulary"):
        Settings.model_validate(tiny_params(**{"model.prefix": "Films:"}))
    with pytest.raises(ValueError, match="model.prefix is empty"):
        pretrained_settings(**{"model.prefix": "  "})
    with pytest.raises(ValueError, match="weight_decay"):
        pretrained_settings(**{"model.prefix": "Films:", "train.weight_decay": 0.01})
