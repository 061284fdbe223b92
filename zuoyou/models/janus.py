"""The unified Janus model: one LLaMA transformer, two visual paths ("decoupled visual encoding").

- understanding: image -> SigLIP ViT -> ``aligner`` -> embeddings spliced into the text sequence,
  answered through ``lm_head``;
- generation: image codes -> ``gen_embed`` -> ``gen_aligner`` -> LM -> ``gen_head`` -> next code,
  codes -> VQ decoder -> pixels.

Attribute names are the official state_dict prefixes. The model is plain: no sampling, no cache
policy, no dtype juggling. Those live in ``zuoyou.engine`` around it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import JanusConfig
from .llama import LlamaForCausalLM
from .projectors import GenHead, MlpProjector
from .siglip import CLIPVisionTower
from .vq import VQModel


class Janus(nn.Module):
    def __init__(self, config: JanusConfig):
        super().__init__()
        self.config = config
        D = config.hidden
        self.vision_model = CLIPVisionTower(config.vision)
        self.aligner = MlpProjector(config.aligner_input_dim, D)
        self.gen_vision_model = VQModel(config.vq)
        self.gen_aligner = MlpProjector(config.gen_embed_dim, D)
        self.gen_head = GenHead(D, config.image_token_embed, config.image_token_size)
        self.gen_embed = nn.Embedding(config.image_token_size, config.gen_embed_dim)
        self.language_model = LlamaForCausalLM(config.lm)

    # ------------------------------------------------------------------ embeddings
    def embed_text(self, ids):
        return self.language_model.model.embed_tokens(ids)  # (B, T, D)

    def embed_images(self, pixel_values):
        """(N, 3, S, S) -> (N, num_patches, D) understanding embeddings."""
        return self.aligner(self.vision_model(pixel_values))

    def embed_image_codes(self, codes):
        """(B, T) VQ codes -> (B, T, D) generation-input embeddings."""
        return self.gen_aligner(self.gen_embed(codes))

    def prepare_inputs_embeds(self, input_ids, pixel_values=None, image_mask=None):
        """Text embeddings with the rows at ``image_mask`` replaced by image features, in order.

        input_ids: (B, T); pixel_values: (N, 3, S, S) for the N images in reading order;
        image_mask: (B, T) bool, exactly N * num_patches True positions.
        """
        x = self.embed_text(input_ids.clamp(min=0))
        if pixel_values is not None and pixel_values.shape[0] > 0:
            feats = self.embed_images(pixel_values.to(x.dtype))  # (N, P, D)
            x = x.clone()
            x[image_mask] = feats.reshape(-1, feats.shape[-1]).to(x.dtype)
        return x

    # ------------------------------------------------------------------ heads
    def hidden(self, x, input_pos=None, mask=None, positions=None):
        return self.language_model.model(x, input_pos=input_pos, mask=mask, positions=positions)

    def text_logits(self, h):
        return self.language_model.lm_head(h)

    def image_logits(self, h):
        return self.gen_head(h)

    def decode_images(self, codes, chunk: int | None = None):
        """(B, grid*grid) codes -> (B, 3, S, S) float pixels in about [-1, 1]."""
        return self.gen_vision_model.decode_code(codes, chunk=chunk)


# Parameters that the published checkpoints hold but Janus never uses: we don't build them.
def unused_official_params(config: JanusConfig) -> int:
    """Size of ``vision_model.vision_tower.attn_pool.*`` (SigLIP MAP head) + ``quantize.codebook_used``."""
    w, hid = config.vision.width, int(config.vision.width * config.vision.mlp_ratio)
    attn_pool = (
        w  # latent (1, 1, w)
        + (w * w + w)  # q
        + (2 * w * w + 2 * w)  # kv
        + (w * w + w)  # proj
        + 2 * w  # norm
        + (hid * w + hid) + (w * hid + w)  # mlp fc1, fc2
    )
    return attn_pool + 65536  # codebook_used: fixed 65536-float usage buffer


def count_params(model: nn.Module, published: bool = False) -> int:
    """Parameters of ``model``; ``published=True`` adds the unused tensors official files carry."""
    n = sum(p.numel() for p in model.parameters())
    if published:
        n += unused_official_params(model.config)
    return n


def build(config: JanusConfig, device="meta") -> Janus:
    """Build on ``device`` (meta: no memory, ready for ``load_state_dict(assign=True)``)."""
    with torch.device(device):
        return Janus(config)
