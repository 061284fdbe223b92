"""The small MLPs around the LM: understanding aligner, generation aligner, generation head."""

from __future__ import annotations

import torch.nn as nn


class MlpProjector(nn.Module):
    """``mlp_gelu`` of depth 2: Linear -> GELU -> Linear, stored as ``layers.0`` / ``layers.2``."""

    def __init__(self, input_dim: int, n_embed: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(input_dim, n_embed), nn.GELU(), nn.Linear(n_embed, n_embed))

    def forward(self, x):
        return self.layers(x)


class GenHead(nn.Module):
    """Image-token head (official ``vision_head``): replaces ``lm_head`` for image positions."""

    def __init__(self, n_embed: int, image_token_embed: int, image_token_size: int):
        super().__init__()
        self.output_mlp_projector = nn.Linear(n_embed, image_token_embed)
        self.vision_activation = nn.GELU()
        self.vision_head = nn.Linear(image_token_embed, image_token_size)

    def forward(self, x):
        return self.vision_head(self.vision_activation(self.output_mlp_projector(x)))
