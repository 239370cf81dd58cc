"""What a trained model was built from: its recipe hash and the metadata saved beside its weights.

Without torch, so that `lethe nightly` can check the base model it finds before it loads any.
"""

from __future__ import annotations

import hashlib
import json

from pipeline.data import Snapshot
from pipeline.settings import Settings

META_FILE = "lethe_model.json"
RECIPE = ("data", "model", "train")  # the settings sections a trained model depends on


def recipe_hash(settings: Settings) -> str:
    """What decides a trained model's weights besides the data snapshot: the seed and the data, model and
    train settings (on one kind of processor: another rounds floats otherwise)."""
    recipe = {"seed": settings.seed, **{part: getattr(settings, part).model_dump(mode="json") for part in RECIPE}}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def model_meta(snapshot: Snapshot, settings: Settings, lineage: str) -> dict:
    """What serving and the auditor need to know about a saved model."""
    return {
        "lineage": lineage,
        "recipe": recipe_hash(settings),
        "backbone": settings.model.backbone,
        "max_len": settings.model.max_len,
        "snapshot_hash": snapshot.manifest["content_hash"],
        "seed": settings.seed,
        "item_tokens": {str(item): token for item, token in snapshot.item_to_token().items()},
    }
