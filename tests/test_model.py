import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import KERNELS, X86
from pipeline.data import BOS_TOKEN, FIRST_ITEM_TOKEN, PAD_TOKEN
from pipeline.evaluate import rank_users
from pipeline.model import (
    IGNORE,
    build_model,
    load_model,
    make_windows,
    next_item_logits,
    position_stats,
    save_model,
    window_loss,
    window_nll,
)
from pipeline.recipe import model_meta
from pipeline.train import learning_rate_factor


def test_windows_cut_sequences_and_respect_masks():
    windows = make_windows({7: [10, 11, 12, 13, 14]}, max_len=3, scored={7: [True, False, True, True, False]})
    assert windows.users.tolist() == [7, 7]
    assert windows.input_ids.tolist() == [[BOS_TOKEN, 10, 11], [12, 13, 14]]
    assert windows.labels.tolist() == [[10, IGNORE, 12], [13, IGNORE, IGNORE]]
    padded = make_windows({1: [5, 6]}, max_len=4)
    assert padded.input_ids.tolist() == [[BOS_TOKEN, 5, 6, PAD_TOKEN]]
    assert padded.labels.tolist() == [[5, 6, IGNORE, IGNORE]]
    assert len(make_windows({1: [5, 6]}, max_len=4, scored={1: [False, False]})) == 0


def test_same_seed_same_model_other_seed_other_model(snapshot, settings):
    first = build_model(snapshot.items, settings.model, seed=1)
    again = build_model(snapshot.items, settings.model, seed=1)
    other = build_model(snapshot.items, settings.model, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True))
    assert not torch.equal(first.model.embed_tokens.weight, other.model.embed_tokens.weight)


def _capability(env: dict) -> str:
    """The kernels torch picks in a fresh process that imports the pipeline first, as every entry point does."""
    code = "import pipeline, torch; print(torch.backends.cpu.get_cpu_capability())"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def _has_avx2() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    return X86 and cpuinfo.exists() and " avx2" in cpuinfo.read_text()


@pytest.mark.skipif(not _has_avx2(), reason="the kernel pin is for x86 processors with AVX2")
def test_the_pipeline_pins_the_kernels_so_every_x86_processor_rounds_alike():
    # AVX512 kernels train other weights from the same seed than AVX2 ones; the pipeline pins AVX2 unless told
    env = {name: value for name, value in os.environ.items() if name not in KERNELS}
    assert _capability(env) == "AVX2"
    assert _capability({**env, "ATEN_CPU_CAPABILITY": "default"}) == "DEFAULT"


def test_the_cosine_schedule_warms_up_then_decays_to_zero_where_constant_holds(settings):
    cosine = settings.train.model_copy(update={"schedule": "cosine", "warmup_steps": 10})
    constant = cosine.model_copy(update={"schedule": "constant"})
    factors = [learning_rate_factor(step, 100, cosine) for step in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(math.cos(math.pi * 0.09) / 2 + 0.5)
    assert all(later <= earlier for earlier, later in zip(factors[9:], factors[10:], strict=False))
    assert factors[50] == pytest.approx(0.5) and factors[100] == pytest.approx(0.0, abs=1e-12)
    assert [learning_rate_factor(step, 100, constant) for step in (0, 9, 50, 100)] == pytest.approx([0.1, 1, 1, 1])


def test_trained_model_beats_most_popular_and_round_trips(tmp_path, trained, snapshot, settings):
    model, report = trained
    assert report["test"]["ndcg10"] > report["mostpop_test"]["ndcg10"]
    assert report["history"][report["best_epoch"]]["val_ndcg10"] == max(r["val_ndcg10"] for r in report["history"])
    rates = [row["learning_rate"] for row in report["history"]]  # the cosine decay, read off the optimiser
    assert rates == sorted(rates, reverse=True) and rates[-1] < 0.1 * settings.train.learning_rate
    save_model(model, tmp_path / "m", {"max_len": settings.model.max_len})
    assert (tmp_path / "m" / "model.safetensors").exists()
    loaded, meta = load_model(tmp_path / "m")
    histories = [[5, 6, 7], [8]]
    assert torch.allclose(next_item_logits(model, histories, 32, 8), next_item_logits(loaded, histories, 32, 8))
    assert meta == {"max_len": settings.model.max_len}


def test_ranks_ignore_history_length_padding(trained, snapshot, settings):
    model, _ = trained
    histories = snapshot.sequences(("train", "val"), snapshot.members[:6])
    targets = snapshot.targets("test", snapshot.members[:6])
    together = rank_users(model, histories, targets, settings.model.max_len, batch_size=6)
    one_by_one = rank_users(model, histories, targets, settings.model.max_len, batch_size=1)
    assert together == one_by_one


def test_losses_and_probe_statistics_skip_unscored_positions_without_changing_them(trained, snapshot, settings):
    """The item head runs on scored positions only: the figures must be those of the full forward pass."""
    model, _ = trained
    sequences = snapshot.sequences(("train",), snapshot.members[:5])
    scored = {user: [i % 3 != 1 for i in range(len(items))] for user, items in sequences.items()}
    windows = make_windows(sequences, settings.model.max_len, scored)
    assert (windows.input_ids == PAD_TOKEN).any() and (windows.labels == IGNORE).any()
    with torch.no_grad():
        logits = model(input_ids=windows.input_ids, attention_mask=windows.attention_mask).logits
        per_position = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), windows.labels, ignore_index=IGNORE, reduction="none"
        )
        mask = windows.labels != IGNORE
        assert torch.allclose(window_nll(model, windows), (per_position * mask).sum(1) / mask.sum(1), atol=1e-5)
        assert torch.isclose(window_loss(model, windows), per_position[mask].mean(), atol=1e-5)
        log_p = torch.log_softmax(logits[mask], -1)
        mean = (log_p.exp() * log_p).sum(-1)
        std = ((log_p.exp() * log_p.square()).sum(-1) - mean.square()).sqrt()
    stats = position_stats(model, windows, batch_size=2)
    assert stats.users.tolist() == windows.users.unsqueeze(1).expand_as(mask)[mask].tolist()
    assert torch.allclose(torch.from_numpy(stats.log_prob), log_p.gather(1, windows.labels[mask][:, None]).squeeze(1))
    assert torch.allclose(torch.from_numpy(stats.mean_log_prob), mean, atol=1e-4)
    assert torch.allclose(torch.from_numpy(stats.std_log_prob), std, atol=1e-4)
    histories = [[5, 6, 7], [8], list(range(5, 5 + 2 * settings.model.max_len))]
    last = torch.stack(
        [
            model(input_ids=torch.tensor([[BOS_TOKEN, *h][-settings.model.max_len :]])).logits[0, -1, FIRST_ITEM_TOKEN:]
            for h in histories
        ]
    )
    assert torch.allclose(next_item_logits(model, histories, settings.model.max_len, 2), last, atol=1e-5)


def test_a_base_model_from_other_settings_or_data_is_refused_not_reused(tmp_path, trained, snapshot):
    """A benchmark or a first champion built on a base left over from other params would not match a fresh run."""
    from components.train import ensure_base_model
    from pipeline.data import write_snapshot
    from pipeline.settings import Home, load_settings
    from tests.conftest import write_params

    model, report = trained
    home = Home(tmp_path / "home")
    write_snapshot(snapshot, home.snapshot)
    params = write_params(tmp_path / "params.yaml")
    save_model(model, home.base_model, model_meta(snapshot, load_settings(params), lineage="base"))
    (home.base_model / "train.json").write_text(json.dumps(report))
    assert ensure_base_model(params, home, load_settings(params)) == home.base_model

    for changed in ({"train.learning_rate": 0.01}, {"seed": 7}, {"model.max_len": 16}):
        with pytest.raises(ValueError, match="another data snapshot or with other seed"):
            other = write_params(tmp_path / "other.yaml", **changed)
            ensure_base_model(other, home, load_settings(other))
    manifest = json.loads((home.snapshot / "manifest.json").read_text())
    (home.snapshot / "manifest.json").write_text(json.dumps({**manifest, "content_hash": "0" * 64}))
    with pytest.raises(ValueError, match="another data snapshot"):
        ensure_base_model(params, home, load_settings(params))
