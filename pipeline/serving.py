"""The registered model, as an MLflow models-from-code pyfunc.

Weights stay safetensors (`save_pretrained`); nothing is pickled. Input: a DataFrame with a `history`
column of MovieLens movie ids in time order. Output: the top-k movie ids per row, seen ones excluded.
"""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

TOP_K = 10


class RecommenderModel(PythonModel):
    def load_context(self, context) -> None:
        from pipeline.model import load_model

        self.model, meta = load_model(context.artifacts["model_dir"])
        self.max_len = meta["max_len"]
        self.token_of = {int(item): token for item, token in meta["item_tokens"].items()}
        self.item_of = {token: item for item, token in self.token_of.items()}

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from pipeline.data import FIRST_ITEM_TOKEN
        from pipeline.model import next_item_logits

        k = int((params or {}).get("k", TOP_K))
        histories = [[self.token_of[item] for item in row if item in self.token_of] for row in model_input["history"]]
        logits = next_item_logits(self.model, histories, self.max_len, batch_size=128)
        for row, history in enumerate(histories):
            logits[row, [token - FIRST_ITEM_TOKEN for token in history]] = float("-inf")
        top = logits.topk(k, dim=1).indices + FIRST_ITEM_TOKEN
        return pd.DataFrame({"recommended": [[self.item_of[int(t)] for t in row] for row in top]})


mlflow.models.set_model(RecommenderModel())
