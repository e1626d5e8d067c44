"""The MLflow model of a trained T5 or Reformer: text in, generated text out (an MLflow "model from code").

MLflow logs this file itself, not a pickled object: `mlflow.pyfunc.load_model` runs it, and `load_context` reads
the logged `model.safetensors` + `config.json` (`models.load_pretrained`, no pickle) and the SentencePiece
tokenizer. `pipeline/tracking/logged.py` logs it with the `models` package as code, so loading needs only torch,
safetensors and sentencepiece. It deliberately imports nothing else from `pipeline/`.

    import mlflow
    model = mlflow.pyfunc.load_model("models:/t5-vs-reformer-t5/1")
    model.predict(["listops: [MAX 2 9 [MIN 4 7 ] 0 ]"])
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


class TextToTextModel(PythonModel):
    """Greedy or beam-search generation from a list of input strings."""

    def load_context(self, context: Any) -> None:
        """Load the weights (safetensors) and the tokenizer logged as this model's artifacts."""
        import sentencepiece as spm

        import models

        _, self.model = models.load_pretrained(context.artifacts["model"])
        self.model.eval()
        tokenizer_dir = Path(context.artifacts["tokenizer"])
        self.sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "spm.model"))
        info = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
        self.eos_id = int(info.get("eos_id", 1))
        self.pad_id = int(info.get("pad_id", 0))

    def predict(self, context: Any, model_input: list[str], params: dict[str, Any] | None = None) -> list[str]:
        """Generate one output string per input string (`params`: `max_new_tokens`, `num_beams`)."""
        import torch

        texts = [model_input] if isinstance(model_input, str) else [str(t) for t in model_input]
        params = params or {}
        ids = [self.sp.encode(t) + [self.eos_id] for t in texts]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([x + [self.pad_id] * (width - len(x)) for x in ids])
        mask = input_ids.ne(self.pad_id) | (torch.arange(width)[None, :] == 0)
        with torch.no_grad():
            out = self.model.generate(
                input_ids,
                attention_mask=mask,
                max_new_tokens=int(params.get("max_new_tokens", 32)),
                num_beams=int(params.get("num_beams", 1)),
                eos_token_id=self.eos_id,
                pad_token_id=self.pad_id,
            )
        pieces = self.sp.get_piece_size()
        special = {self.pad_id, self.eos_id}
        return [self.sp.decode([int(t) for t in row if int(t) < pieces and int(t) not in special]) for row in out]


mlflow.models.set_model(TextToTextModel())
