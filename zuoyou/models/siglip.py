"""SigLIP vision transformer, the understanding encoder (timm ``VisionTransformer`` layout).

Key names follow the official checkpoint: ``vision_model.vision_tower.{patch_embed,pos_embed,
blocks.N,norm}``. No class token, learned absolute positions, pre-norm blocks, exact GELU,
final LayerNorm applied; the MAP head (``attn_pool``) stored in official files is never used
by Janus and is not built here (the loader skips its keys by name).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import VisionConfig


class PatchEmbed(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, c.width, kernel_size=c.patch_size, stride=c.patch_size)

    def forward(self, x):
        x = self.proj(x)  # (B, C, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, N, C), row-major patches


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, nh, N, hs)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(y.transpose(1, 2).reshape(B, N, C))  # (B, N, C)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU, as the official tower
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.patch_embed = PatchEmbed(c)
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_patches, c.width))
        self.blocks = nn.ModuleList(Block(c.width, c.heads, c.mlp_ratio) for _ in range(c.depth_used))
        self.norm = nn.LayerNorm(c.width, eps=1e-6)

    def forward(self, pixel_values):
        """(B, 3, S, S) normalised to [-1, 1] -> (B, N, width) patch features after the final norm."""
        x = self.patch_embed(pixel_values) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class CLIPVisionTower(nn.Module):
    """Holds the ViT as ``.vision_tower`` so that the official key prefix is reproduced."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.vision_tower = VisionTransformer(c)

    def forward(self, pixel_values):
        return self.vision_tower(pixel_values)
