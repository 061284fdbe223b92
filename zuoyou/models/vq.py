"""VQ image tokenizer (LlamaGen "VQ-16" layout), used by Janus for image generation.

Encoder: conv_in -> levels of ResnetBlocks (attention at the deepest level) with stride-2
downsampling -> mid [Res, Attn, Res] -> GN/swish/conv_out -> quant_conv -> l2-normalised
nearest-codebook quantisation. Decoder mirrors it with nearest-neighbour upsampling.
Key names are the official ones (``gen_vision_model.*``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import VQConfig


def swish(x):
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with 1x1 conv projections."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.q, self.k, self.v = (nn.Conv2d(c, c, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(B, 1, C, H * W).transpose(2, 3)  # (B, 1, HW, C)
        k = self.k(h).reshape(B, 1, C, H * W).transpose(2, 3)
        v = self.v(h).reshape(B, 1, C, H * W).transpose(2, 3)
        y = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        y = y.transpose(2, 3).reshape(B, C, H, W)  # (B, C, H, W)
        return x + self.proj_out(y)


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric zero pad, as upstream


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        # Upstream interpolates in fp32 and casts to bf16 (which breaks fp16 decoding). Nearest neighbours
        # only copy values, so interpolating in the input's own dtype gives that round trip's result exactly,
        # without its two fp32 copies (Janus-Pro-1B, last level: 75 + 19 MiB per 384 x 384 image).
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    def __init__(self, c: VQConfig):
        super().__init__()
        g, n = c.norm_groups, len(c.ch_mult)
        self.conv_in = nn.Conv2d(3, c.ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        cin = c.ch
        for i, mult in enumerate(c.ch_mult):
            block = nn.Module()
            block.res, block.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(c.num_res_blocks):
                block.res.append(ResnetBlock(cin, c.ch * mult, g))
                cin = c.ch * mult
                if i == n - 1:
                    block.attn.append(AttnBlock(cin, g))
            if i != n - 1:
                block.downsample = Downsample(cin)
            self.conv_blocks.append(block)
        self.mid = nn.ModuleList([ResnetBlock(cin, cin, g), AttnBlock(cin, g), ResnetBlock(cin, cin, g)])
        self.norm_out = nn.GroupNorm(g, cin, eps=1e-6)
        self.conv_out = nn.Conv2d(cin, c.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for block in self.conv_blocks:
            for j, res in enumerate(block.res):
                h = res(h)
                if len(block.attn):
                    h = block.attn[j](h)
            if hasattr(block, "downsample"):
                h = block.downsample(h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, c: VQConfig):
        super().__init__()
        g, n = c.norm_groups, len(c.ch_mult)
        cin = c.ch * c.ch_mult[-1]
        self.conv_in = nn.Conv2d(c.z_channels, cin, 3, padding=1)
        self.mid = nn.ModuleList([ResnetBlock(cin, cin, g), AttnBlock(cin, g), ResnetBlock(cin, cin, g)])
        self.conv_blocks = nn.ModuleList()
        for i, mult in enumerate(reversed(c.ch_mult)):
            block = nn.Module()
            block.res, block.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(c.num_res_blocks + 1):
                block.res.append(ResnetBlock(cin, c.ch * mult, g))
                cin = c.ch * mult
                if i == 0:
                    block.attn.append(AttnBlock(cin, g))
            if i != n - 1:
                block.upsample = Upsample(cin)
            self.conv_blocks.append(block)
        self.norm_out = nn.GroupNorm(g, cin, eps=1e-6)
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for block in self.conv_blocks:
            for j, res in enumerate(block.res):
                h = res(h)
                if len(block.attn):
                    h = block.attn[j](h)
            if hasattr(block, "upsample"):
                h = block.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, c: VQConfig):
        super().__init__()
        self.l2_norm = c.codebook_l2_norm
        self.embedding = nn.Embedding(c.codebook_size, c.codebook_embed_dim)

    def codebook(self):
        w = self.embedding.weight
        return F.normalize(w, p=2, dim=-1) if self.l2_norm else w

    def forward(self, z):
        """z: (B, D, h, w) -> (z_q straight-through (B, D, h, w), codes (B, h*w), z normalised (B, h, w, D))."""
        z = z.permute(0, 2, 3, 1)  # (B, h, w, D)
        if self.l2_norm:
            z = F.normalize(z, p=2, dim=-1)
        e = self.codebook()
        flat = z.reshape(-1, z.shape[-1])  # (B*h*w, D)
        d = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.t()  # (B*h*w, K)
        codes = d.argmin(1)
        z_q = e[codes].view(z.shape)
        z_q_st = z + (z_q - z).detach()
        return z_q_st.permute(0, 3, 1, 2), codes.view(z.shape[0], -1), z, z_q

    def get_codebook_entry(self, codes, shape):
        """codes (B, h*w) raster order -> (B, D, h, w) with D, h, w from ``shape`` = [B, D, h, w]."""
        z_q = self.codebook()[codes]  # (B, h*w, D)
        B, D, h, w = shape
        return z_q.reshape(B, h, w, D).permute(0, 3, 1, 2).contiguous()  # (B, D, h, w)


class VQModel(nn.Module):
    def __init__(self, c: VQConfig):
        super().__init__()
        self.config = c
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.quantize = VectorQuantizer(c)
        self.quant_conv = nn.Conv2d(c.z_channels, c.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(c.codebook_embed_dim, c.z_channels, 1)

    def encode(self, x):
        """Images in [-1, 1] (B, 3, S, S) -> quantiser outputs (see VectorQuantizer.forward)."""
        return self.quantize(self.quant_conv(self.encoder(x)))

    def decode(self, z_q):
        return self.decoder(self.post_quant_conv(z_q))

    def decode_code(self, codes, chunk: int | None = None):
        """Codes (B, grid*grid) -> images (B, 3, S, S) in about [-1, 1]. ``chunk`` bounds memory."""
        c = self.config
        chunk = chunk or codes.shape[0]
        out = []
        for part in codes.split(chunk):
            z_q = self.quantize.get_codebook_entry(part, [part.shape[0], c.codebook_embed_dim, c.grid, c.grid])
            out.append(self.decode(z_q.to(self.post_quant_conv.weight.dtype)))
        return torch.cat(out)

    def forward(self, x):
        z_q, codes, z, zq_raw = self.encode(x)
        return self.decode(z_q), codes, z, zq_raw
