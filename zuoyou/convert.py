"""Map between the official Janus layout and the transformers port (``JanusForConditionalGeneration``).

Pure key / config bookkeeping (no transformers import). ``hf_to_official`` is the inverse of
transformers' ``convert_janus_weights_to_hf.py``; ``official_to_hf`` is that converter again (used by
tests to write transformers-layout folders). Key correspondence (official -> HF):

- ``vision_model.vision_tower.`` -> ``model.vision_model.``: ``pos_embed`` (1, N, C) ->
  ``embeddings.position_embedding.weight`` (N, C, an nn.Embedding); ``patch_embed.proj`` ->
  ``embeddings.patch_embedding``; ``blocks.i`` -> ``encoder.layers.i`` with ``norm1/2`` ->
  ``layer_norm1/2``, ``attn.qkv`` -> ``self_attn.{q,k,v}_proj`` (split along dim 0 in that order),
  ``attn.proj`` -> ``self_attn.projection_layer``, ``mlp.fc1/fc2`` kept; ``norm`` -> ``post_layernorm``;
  ``attn_pool.*`` (SigLIP MAP head, unused) dropped.
- ``aligner`` / ``gen_aligner`` ``layers.0`` / ``layers.2`` -> ``model.aligner`` /
  ``model.generation_aligner`` ``fc1`` / ``hidden_layers.0``.
- ``gen_head.output_mlp_projector`` / ``vision_head`` -> ``model.generation_head.proj_out`` / ``vision_head``;
  ``gen_embed`` -> ``model.generation_embeddings``.
- ``gen_vision_model.`` -> ``model.vqmodel.``: ``encoder.conv_blocks`` -> ``encoder.down``,
  ``decoder.conv_blocks`` -> ``decoder.up`` (same order: ``up.0`` is the deepest level in both),
  ``res`` -> ``block``, ``mid.0/1/2`` -> ``mid.block_1/attn_1/block_2``; ``quantize.codebook_used`` dropped.
- ``language_model.model.`` -> ``model.language_model.``; ``language_model.lm_head`` -> ``lm_head``.

Differences between the port and the official code (zuoyou follows the official code):
- VQ *encode*: the official quantiser L2-normalises the latents and the codebook before the
  nearest-neighbour search (``codebook_l2_norm=True``); the port's ``JanusVQVAEVectorQuantizer.forward``
  does not (its decode path does normalise, so decoding agrees).
- The port's VQ always uses 32 GroupNorm groups and a VQ grid equal to the ViT patch grid
  (``vq_config.num_patches = image_size // patch_size``); the official code fixes neither.
- The port's image processor rounds the resized side (``round``) where the official one truncates (``int``).
- transformers >= 5 ties ``lm_head`` to ``embed_tokens`` unless the top-level config says
  ``tie_word_embeddings: false`` *or* both tensors are stored with different values; official Janus
  never ties. We use ``lm_head.weight`` when the file has it and copy the embedding otherwise.
"""

from __future__ import annotations

import re

import torch

from .errors import CheckpointError, ConfigError

_VIT, _HVIT = "vision_model.vision_tower.", "model.vision_model."
# (official regex, HF replacement) and (HF regex, official replacement); applied first match only.
_O2H = [
    (r"^vision_model\.vision_tower\.pos_embed$", "model.vision_model.embeddings.position_embedding.weight"),
    (r"^vision_model\.vision_tower\.patch_embed\.proj\.", "model.vision_model.embeddings.patch_embedding."),
    (r"^vision_model\.vision_tower\.blocks\.(\d+)\.norm([12])\.", r"model.vision_model.encoder.layers.\1.layer_norm\2."),
    (r"^vision_model\.vision_tower\.blocks\.(\d+)\.attn\.proj\.", r"model.vision_model.encoder.layers.\1.self_attn.projection_layer."),
    (r"^vision_model\.vision_tower\.blocks\.(\d+)\.mlp\.", r"model.vision_model.encoder.layers.\1.mlp."),
    (r"^vision_model\.vision_tower\.norm\.", "model.vision_model.post_layernorm."),
    (r"^aligner\.layers\.0\.", "model.aligner.fc1."),
    (r"^aligner\.layers\.2\.", "model.aligner.hidden_layers.0."),
    (r"^gen_aligner\.layers\.0\.", "model.generation_aligner.fc1."),
    (r"^gen_aligner\.layers\.2\.", "model.generation_aligner.hidden_layers.0."),
    (r"^gen_head\.output_mlp_projector\.", "model.generation_head.proj_out."),
    (r"^gen_head\.vision_head\.", "model.generation_head.vision_head."),
    (r"^gen_embed\.", "model.generation_embeddings."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
]
_H2O = [
    (r"^model\.vision_model\.embeddings\.position_embedding\.weight$", "vision_model.vision_tower.pos_embed"),
    (r"^model\.vision_model\.embeddings\.patch_embedding\.", "vision_model.vision_tower.patch_embed.proj."),
    (r"^model\.vision_model\.encoder\.layers\.(\d+)\.layer_norm([12])\.", r"vision_model.vision_tower.blocks.\1.norm\2."),
    (r"^model\.vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection_layer\.", r"vision_model.vision_tower.blocks.\1.attn.proj."),
    (r"^model\.vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"vision_model.vision_tower.blocks.\1.mlp."),
    (r"^model\.vision_model\.post_layernorm\.", "vision_model.vision_tower.norm."),
    (r"^model\.aligner\.fc1\.", "aligner.layers.0."),
    (r"^model\.aligner\.hidden_layers\.0\.", "aligner.layers.2."),
    (r"^model\.generation_aligner\.fc1\.", "gen_aligner.layers.0."),
    (r"^model\.generation_aligner\.hidden_layers\.0\.", "gen_aligner.layers.2."),
    (r"^model\.generation_head\.proj_out\.", "gen_head.output_mlp_projector."),
    (r"^model\.generation_head\.vision_head\.", "gen_head.vision_head."),
    (r"^model\.generation_embeddings\.", "gen_embed."),
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
]
_VQ_O2H = [(r"\.res\.", ".block."), (r"\.mid\.0\.", ".mid.block_1."),
           (r"\.mid\.1\.", ".mid.attn_1."), (r"\.mid\.2\.", ".mid.block_2.")]
_QKV = re.compile(r"^model\.vision_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")


def _sub(key: str, rules) -> str:
    for pat, rep in rules:
        new, n = re.subn(pat, rep, key)
        if n:
            return new
    return key


def _vq_o2h(key: str) -> str:  # key after "gen_vision_model."
    part = key.split(".", 1)[0]
    if part in ("encoder", "decoder"):
        key = key.replace(f"{part}.conv_blocks.", f"{part}.{'down' if part == 'encoder' else 'up'}.", 1)
        for pat, rep in _VQ_O2H:
            key = re.sub(pat, rep, key)
    return "model.vqmodel." + key


def _vq_h2o(key: str) -> str:  # key after "model.vqmodel."
    key = re.sub(r"^(encoder\.down|decoder\.up)\.", lambda m: m.group(1).split(".")[0] + ".conv_blocks.", key)
    key = re.sub(r"\.block\.(\d+)\.", r".res.\1.", key)
    for i, name in enumerate(("block_1", "attn_1", "block_2")):
        key = key.replace(f".mid.{name}.", f".mid.{i}.")
    return "gen_vision_model." + key


def official_to_hf(sd: dict) -> dict:
    """Official ``MultiModalityCausalLM`` state_dict -> ``JanusForConditionalGeneration`` state_dict."""
    out = {}
    for k, v in sd.items():
        if ".attn_pool." in k or k.endswith("quantize.codebook_used"):
            continue
        m = re.match(r"^vision_model\.vision_tower\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", k)
        if m:
            q, kk, vv = v.chunk(3, dim=0)
            for name, t in zip("qkv", (q, kk, vv)):
                out[f"model.vision_model.encoder.layers.{m[1]}.self_attn.{name}_proj.{m[2]}"] = t
        elif k.startswith("gen_vision_model."):
            out[_vq_o2h(k[len("gen_vision_model."):])] = v
        elif k == _VIT + "pos_embed":
            out[_sub(k, _O2H)] = v.reshape(v.shape[-2], v.shape[-1])
        else:
            out[_sub(k, _O2H)] = v
    return out


def hf_to_official(sd: dict) -> dict:
    """``JanusForConditionalGeneration`` state_dict -> official layout. Unknown keys pass through unchanged
    (the loader then reports them by name); ``rotary_emb.inv_freq`` buffers are dropped."""
    out, qkv = {}, {}
    for k, v in sd.items():
        if k.endswith("rotary_emb.inv_freq"):
            continue
        m = _QKV.match(k)
        if m:
            qkv.setdefault((m[1], m[3]), {})[m[2]] = (k, v)
        elif k.startswith("model.vqmodel."):
            out[_vq_h2o(k[len("model.vqmodel."):])] = v
        elif k == _HVIT + "embeddings.position_embedding.weight":
            out[_sub(k, _H2O)] = v.unsqueeze(0) if v.dim() == 2 else v
        else:
            out[_sub(k, _H2O)] = v
    for (layer, kind), parts in qkv.items():
        if set(parts) != set("qkv"):  # incomplete: keep the HF names so that the loader names them
            out.update({hf_key: t for hf_key, t in parts.values()})
            continue
        tensors = [parts[c][1] for c in "qkv"]
        if len({t.shape[1:] for t in tensors}) != 1:
            raise CheckpointError("vision attention q/k/v projections of different shapes: " + ", ".join(
                f"{parts[c][0]} {tuple(parts[c][1].shape)}" for c in "qkv"))
        out[f"{_VIT}blocks.{layer}.attn.qkv.{kind}"] = torch.cat(tensors, dim=0)
    emb, head = "language_model.model.embed_tokens.weight", "language_model.lm_head.weight"
    if head not in out and emb in out:  # tied in the file (transformers' default): lm_head = embeddings
        out[head] = out[emb]
    return out


# --------------------------------------------------------------------------------------------- config
def hf_config_to_official(d: dict) -> dict:
    """A transformers ``JanusConfig`` dict (``model_type: "janus"``) -> our official-structure dict.

    Absent keys take the transformers defaults (Janus-Pro-1B sizes; LlamaConfig's for the LM), the
    sizes the official code hard-codes go to explicit ``params`` (see ``zuoyou.config``).
    """
    tc, vc, qc = (dict(d.get(k) or {}) for k in ("text_config", "vision_config", "vq_config"))

    def bad(what):
        raise ConfigError(f"config.json (transformers Janus): {what} is not supported")

    rope = tc.get("rope_parameters") or tc.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        bad(f"text_config rope_type {rope.get('rope_type', rope.get('type'))!r}")
    if tc.get("attention_bias") or tc.get("mlp_bias"):
        bad("text_config attention_bias / mlp_bias")
    lm = {k: tc[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                             "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps")
          if tc.get(k) is not None}
    lm["rope_theta"] = rope.get("rope_theta", tc.get("rope_theta", 10000.0))
    lm.update(model_type="llama", tie_word_embeddings=False)  # lm_head filled by hf_to_official when absent
    D = lm.get("hidden_size", 4096)

    def side(x):
        return x[0] if isinstance(x, (list, tuple)) else x

    image_size, patch = side(vc.get("image_size", 384)), side(vc.get("patch_size", 16))
    if vc.get("use_qk_norm") or not vc.get("attention_bias", True) or vc.get("hidden_act", "gelu") != "gelu":
        bad("vision_config use_qk_norm / attention_bias=false / hidden_act other than gelu")
    if vc.get("layer_norm_eps", 1e-6) != 1e-6 or vc.get("num_channels", 3) != 3:
        bad("vision_config layer_norm_eps other than 1e-6 / num_channels other than 3")
    if vc.get("depth", 2) != 2 or qc.get("num_hidden_layers", 2) != 2:
        bad("aligner depth other than 2")
    if qc.get("double_latent") or qc.get("in_channels", 3) != 3 or qc.get("out_channels", 3) != 3:
        bad("vq_config double_latent / in_channels / out_channels")
    if qc.get("hidden_act", "gelu") != "gelu":
        bad("vq_config hidden_act other than gelu")
    width = vc.get("hidden_size", 1024)
    vision = {"image_size": image_size, "patch_size": patch, "width": width, "layers": vc.get("num_hidden_layers", 24),
              "heads": vc.get("num_attention_heads", 16), "mlp_ratio": vc.get("mlp_ratio", 4.0), "select_layer": -1,
              "select_feature": "same",
              "model_name": "siglip_large_patch16_384" if (image_size, patch, width) == (384, 16, 1024) else "janus_vit"}
    ch_mult = list(qc.get("channel_multiplier", (1, 1, 2, 2, 4)))
    grid = image_size // patch  # the port decodes on the ViT's patch grid
    K, e = qc.get("num_embeddings", 16384), qc.get("embed_dim", 8)
    vq = {"codebook_size": K, "codebook_embed_dim": e, "codebook_l2_norm": True, "ch": qc.get("base_channels", 128),
          "ch_mult": ch_mult, "z_channels": qc.get("latent_channels", 256), "num_res_blocks": qc.get("num_res_blocks", 2),
          "norm_groups": 32, "image_size": grid * 2 ** (len(ch_mult) - 1)}
    for name, value in (("vision_config.projection_dim", vc.get("projection_dim", 2048)),
                        ("vq_config.projection_dim", qc.get("projection_dim", 2048)),
                        ("vq_config.image_token_embed_dim", qc.get("image_token_embed_dim", 2048))):
        if value != D:
            raise ConfigError(f"config.json (transformers Janus): {name}={value} differs from the LM width {D}")

    def mlp(kind, cin):
        return {"cls": "MlpProjector", "model_type": kind,
                "params": {"depth": 2, "input_dim": cin, "n_embed": D, "projector_type": "mlp_gelu"}}

    dtype = d.get("dtype") or d.get("torch_dtype") or tc.get("dtype") or tc.get("torch_dtype") or "bfloat16"
    lm["torch_dtype"] = dtype
    return {
        "architectures": ["MultiModalityCausalLM"], "model_type": "multi_modality", "torch_dtype": dtype,
        "vision_config": {"cls": "CLIPVisionTower", "model_type": "vision", "params": vision},
        "aligner_config": mlp("aligner", width),
        "gen_vision_config": {"cls": "VQ-16", "model_type": "gen_vision",
                              "params": {"image_token_size": K, "n_embed": e, "vq": vq}},
        "gen_aligner_config": mlp("gen_aligner", e),
        "gen_head_config": {"cls": "vision_head", "model_type": "gen_head",
                            "params": {"image_token_embed": D, "image_token_size": K, "n_embed": D}},
        "language_config": lm,
    }
