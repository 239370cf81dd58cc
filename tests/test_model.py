import torch

from pipeline.data import BOS_TOKEN, PAD_TOKEN
from pipeline.evaluate import rank_users
from pipeline.model import IGNORE, build_model, load_model, make_windows, next_item_logits, save_model


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
    first = build_model(snapshot.n_tokens, settings.model, seed=1)
    again = build_model(snapshot.n_tokens, settings.model, seed=1)
    other = build_model(snapshot.n_tokens, settings.model, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True))
    assert not torch.equal(first.model.embed_tokens.weight, other.model.embed_tokens.weight)


def test_trained_model_beats_most_popular_and_round_trips(tmp_path, trained, snapshot, settings):
    model, report = trained
    assert report["test"]["ndcg10"] > report["mostpop_test"]["ndcg10"]
    assert report["history"][report["best_epoch"]]["val_ndcg10"] == max(r["val_ndcg10"] for r in report["history"])
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
