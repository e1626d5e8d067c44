"""The Reformer's position embeddings: axial (a factored table, Kitaev et al. 2020, section 5 and the trax code)
or a plain learned table. Each maps a sequence length L to an (L, D) table added to the token embeddings.

Parameter names follow `transformers`' Reformer (`weights.0`, `weights.1`; `embedding`), as in `models/reformer.py`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class AxialPositionEmbeddings(nn.Module):
    """Axial positions (section 5): position p = (i, j) on a grid, embedding = [e1_i, e2_j] (dims concatenated)."""

    def __init__(self, config: Any):
        super().__init__()
        self.shape = config.axial_pos_shape
        rows, cols = config.axial_pos_shape
        self.weights = nn.ParameterList(
            [
                nn.Parameter(torch.ones(rows, 1, config.axial_pos_dims[0])),
                nn.Parameter(torch.ones(1, cols, config.axial_pos_dims[1])),
            ]
        )

    def forward(self, length: int) -> torch.Tensor:
        rows, cols = self.shape
        if length > rows * cols:
            raise ValueError(f"sequence length {length} exceeds the axial position grid {self.shape} ({rows * cols})")
        used_rows = -(-length // cols)  # only the rows that hold positions < length
        w0, w1 = self.weights
        table = torch.cat([w0[:used_rows].expand(-1, cols, -1), w1.expand(used_rows, -1, -1)], dim=-1)
        return table.reshape(used_rows * cols, -1)[:length]  # (L, D)


class PositionEmbeddings(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        self.embedding = nn.Embedding(config.max_position_embeddings, config.d_model)

    def forward(self, length: int) -> torch.Tensor:
        if length > self.embedding.num_embeddings:
            limit = self.embedding.num_embeddings
            raise ValueError(f"sequence length {length} exceeds max_position_embeddings {limit}")
        return self.embedding.weight[:length]
