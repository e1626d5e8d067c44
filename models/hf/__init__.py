"""Import from and export to `transformers` checkpoints (optional dependency).

`transformers` is imported lazily inside the converters, so `models` itself only needs torch.
"""

from models.hf.reformer import reformer_from_hf, reformer_to_hf
from models.hf.t5 import load_t5_checkpoint, save_t5_pretrained, t5_from_hf, t5_to_hf

__all__ = [
    "load_t5_checkpoint",
    "reformer_from_hf",
    "reformer_to_hf",
    "save_t5_pretrained",
    "t5_from_hf",
    "t5_to_hf",
]
