from pathlib import Path

import pytest
import yaml

from pipeline.settings import Settings, SettingsError, load_settings
from tests.conftest import REPO, tiny_params


def test_repository_params_load():
    settings = load_settings(REPO / "params.yaml")
    assert settings.eval.ks[0] == 10 and settings.unlearn.method == "grad_diff"


def test_settings_are_frozen(settings: Settings):
    with pytest.raises(Exception, match="frozen"):
        settings.seed = 1


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: p["train"].update(epochs=0), "train.epochs"),
        (lambda p: p["data"].update(typo_key=1), "data.typo_key"),
        (lambda p: p["gate"].update(alpha=0.7), "gate.alpha"),
        (lambda p: p["unlearn"].update(stop_tolerance_z=0), "unlearn.stop_tolerance_z"),
        (lambda p: p["bench"].update(auc_band=[0.6, 0.7]), "auc_band"),
        (lambda p: p["model"]["tiny"].update(hidden_size=30, num_attention_heads=4), "divisible"),
        (lambda p: p["eval"].update(ks=[5, 20]), "must contain 10"),
        (lambda p: p["bench"]["tuning"].update(seeds=[0, p["bench"]["seeds"][0]]), "also reported bench.seeds"),
        (lambda p: p["bench"]["acceptance"].update(extra_seeds=[p["bench"]["tuning"]["seeds"][0]]), "also bench.tun"),
        (lambda p: p["bench"]["acceptance"].update(extra_seeds=[p["bench"]["seeds"][0], 99]), "batch twice"),
        (lambda p: p["bench"]["acceptance"].update(extra_seeds=[99, 99]), r"\[99\] would run a batch twice"),
        (lambda p: p["bench"]["tuning"].update(deletion_rates=[0.1]), "lack bench.acceptance.rate 0.05"),
        (lambda p: p["bench"]["tuning"].update(methods=["grad_diff"]), "lack cure"),
        (lambda p: p["model"].update(backbone="hf"), r"needs model\.hf\.path"),
        (lambda p: p["model"].update(layers=3), "keeps the first k layers of a pretrained backbone"),
        (lambda p: p["data"].update(source="file"), r"needs data\.path"),
        (lambda p: p["data"].pop("source"), r"data\.source: Field required"),
    ],
)
def test_invalid_params_name_the_key(tmp_path: Path, mutate, message):
    params = tiny_params()
    mutate(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(SettingsError, match=message) as error:
        load_settings(path)
    assert str(path) in str(error.value)


def test_missing_and_broken_files(tmp_path: Path):
    with pytest.raises(SettingsError, match="no such params file"):
        load_settings(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("seed: [unclosed")
    with pytest.raises(SettingsError, match="not valid YAML"):
        load_settings(broken)


def test_an_overlay_names_only_what_differs(tmp_path: Path):
    """`extends:` lays a file over another (relative to itself), mapping by mapping; lists are replaced whole;
    a loop is refused by name."""
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    overlay = tmp_path / "smollm2.yaml"
    overlay.write_text(
        "extends: base/params.yaml\nmodel: {backbone: smollm2-135m, layers: 2}\neval: {ks: [10]}\n"
    )
    settings, base = load_settings(overlay), load_settings(tmp_path / "base" / "params.yaml")
    assert (settings.model.backbone, settings.model.layers, settings.eval.ks) == ("smollm2-135m", 2, (10,))
    assert settings.model.max_len == base.model.max_len and settings.train == base.train  # the rest is the base's
    assert load_settings(REPO / "params.smollm2.yaml").model.backbone == "smollm2-135m"
    loop = tmp_path / "loop.yaml"
    loop.write_text("extends: loop.yaml\n")
    with pytest.raises(SettingsError, match="loops back to itself"):
        load_settings(loop)
