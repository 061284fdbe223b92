"""Config registry, published parameter counts, and reading the official config.json (spec §3.1)."""

from __future__ import annotations

import copy
import json

import pytest

from zuoyou.config import CONFIGS, JanusConfig, LMConfig, VisionConfig, VQConfig, get_config
from zuoyou.errors import ConfigError
from zuoyou.models.janus import build, count_params

# The Janus-Pro-1B config.json as published (spec §3.1): sizes the official code hard-codes are absent.
OFFICIAL_PRO_1B = {
    "aligner_config": {"cls": "MlpProjector", "model_type": "aligner",
                       "params": {"depth": 2, "input_dim": 1024, "n_embed": 2048, "projector_type": "mlp_gelu"}},
    "architectures": ["MultiModalityCausalLM"],
    "gen_aligner_config": {"cls": "MlpProjector", "model_type": "gen_aligner",
                           "params": {"depth": 2, "input_dim": 8, "n_embed": 2048, "projector_type": "mlp_gelu"}},
    "gen_head_config": {"cls": "vision_head", "model_type": "gen_head",
                        "params": {"image_token_embed": 2048, "image_token_size": 16384, "n_embed": 2048}},
    "gen_vision_config": {"cls": "VQ-16", "model_type": "gen_vision",
                          "params": {"image_token_size": 16384, "n_embed": 8}},
    "language_config": {"hidden_size": 2048, "intermediate_size": 5632, "max_position_embeddings": 16384,
                        "model_type": "llama", "num_attention_heads": 16, "num_hidden_layers": 24,
                        "num_key_value_heads": 16, "torch_dtype": "bfloat16", "vocab_size": 102400,
                        "_attn_implementation": "flash_attention_2"},  # keys we don't know are ignored
    "model_type": "multi_modality",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "vision_config": {"cls": "CLIPVisionTower", "model_type": "vision",
                      "params": {"image_size": 384, "model_name": "siglip_large_patch16_384",
                                 "select_feature": "same", "select_layer": -1}},
}


def official_pro_7b() -> dict:
    """The Janus-Pro-7B file: 4096-wide parts, and a language_config that relies on LlamaConfig defaults."""
    d = copy.deepcopy(OFFICIAL_PRO_1B)
    for k in ("aligner_config", "gen_aligner_config"):
        d[k]["params"]["n_embed"] = 4096
    d["gen_head_config"]["params"].update(image_token_embed=4096, n_embed=4096)
    d["language_config"] = {"max_position_embeddings": 16384, "model_type": "llama", "num_hidden_layers": 30,
                            "torch_dtype": "bfloat16", "vocab_size": 102400}
    return d


def test_registry_names():
    assert set(CONFIGS) == {"janus-1.3b", "janus-pro-1b", "janus-pro-7b", "shapes", "tiny"}
    for name in CONFIGS:
        assert isinstance(get_config(name), JanusConfig)
    assert get_config("tiny") is not get_config("tiny")  # fresh objects: callers may edit them
    with pytest.raises(ConfigError, match="unknown config 'janus-9b'.*janus-pro-1b"):
        get_config("janus-9b")


def test_published_parameter_counts():
    """The meta-device builds, plus the unused attn_pool/codebook_used tensors, match the released files."""
    assert count_params(build(get_config("janus-pro-1b"), "meta"), published=True) == 2_089_297_547
    assert count_params(build(get_config("janus-pro-7b"), "meta"), published=True) == 7_420_434_059


def test_official_1b_file_reads_as_the_registry_config():
    cfg = JanusConfig.from_dict(OFFICIAL_PRO_1B)
    assert cfg == get_config("janus-pro-1b")
    assert cfg.vision.num_patches == 576 and cfg.vq.num_tokens == 576 and cfg.vq.grid == 24


def test_round_trip(tmp_path):
    for name in CONFIGS:
        cfg = get_config(name)
        d = cfg.to_dict()
        assert JanusConfig.from_dict(json.loads(json.dumps(d))) == cfg
        cfg.save(tmp_path / "config.json")
        assert JanusConfig.from_file(tmp_path / "config.json") == cfg
    # official file -> ours -> dict: the official structure and values are kept (sizes are added)
    out = JanusConfig.from_dict(OFFICIAL_PRO_1B).to_dict()
    assert out["model_type"] == "multi_modality" and out["architectures"] == ["MultiModalityCausalLM"]
    for key, section in OFFICIAL_PRO_1B.items():
        if not key.endswith("_config") or key == "language_config":
            continue
        assert (out[key]["cls"], out[key]["model_type"]) == (section["cls"], section["model_type"])
        for k, v in section["params"].items():
            assert out[key]["params"][k] == v, (key, k)
    for k, v in OFFICIAL_PRO_1B["language_config"].items():
        if not k.startswith("_"):
            assert out["language_config"][k] == v, k
    assert JanusConfig.from_dict(out) == JanusConfig.from_dict(OFFICIAL_PRO_1B)


def test_7b_language_config_gets_llama_defaults():
    cfg = JanusConfig.from_dict(official_pro_7b())
    lm = cfg.lm
    assert (lm.hidden_size, lm.intermediate_size, lm.num_attention_heads, lm.num_key_value_heads) == (4096, 11008, 32, 32)
    assert (lm.num_hidden_layers, lm.vocab_size, lm.max_position_embeddings) == (30, 102400, 16384)
    assert (lm.rms_norm_eps, lm.rope_theta, lm.tie_word_embeddings, lm.head_dim) == (1e-6, 10000.0, False, 128)
    assert cfg.image_token_embed == 4096 and cfg == get_config("janus-pro-7b")


def test_missing_vision_and_vq_params_give_the_official_sizes():
    cfg = JanusConfig.from_dict(OFFICIAL_PRO_1B)
    v, q = cfg.vision, cfg.vq
    assert (v.image_size, v.patch_size, v.width, v.layers, v.heads, v.mlp_ratio) == (384, 16, 1024, 24, 16, 4.0)
    assert v.depth_used == 24 and v == VisionConfig()
    assert (q.codebook_size, q.codebook_embed_dim, q.ch, q.ch_mult, q.z_channels, q.num_res_blocks) == \
        (16384, 8, 128, (1, 1, 2, 2, 4), 256, 2)
    assert q == VQConfig() and q.downsample == 16
    assert (cfg.aligner_input_dim, cfg.gen_embed_dim, cfg.image_token_size) == (1024, 8, 16384)
    # LMConfig alone: HF LlamaConfig's defaults
    assert LMConfig(vocab_size=10).hidden_size == 4096 and LMConfig(vocab_size=10).num_key_value_heads == 32


def _edit(fn):
    d = get_config("tiny").to_dict()
    out = fn(d)
    return d if out is None else out


MALFORMED = {
    "no language_config": lambda d: d.pop("language_config"),
    "no gen_head_config": lambda d: d.pop("gen_head_config"),
    "no params in aligner": lambda d: d["aligner_config"].pop("params"),
    "top level is a list": lambda d: [d],
    "section is a string": lambda d: d.__setitem__("language_config", "llama"),
    "section is null": lambda d: d.__setitem__("vision_config", None),
    "params is a list": lambda d: d["vision_config"].__setitem__("params", [1, 2]),
    "hidden_size is a string": lambda d: d["language_config"].__setitem__("hidden_size", "64"),
    "zero heads": lambda d: d["language_config"].__setitem__("num_attention_heads", 0),
    "negative vocab": lambda d: d["language_config"].__setitem__("vocab_size", -1),
    "null layers": lambda d: d["language_config"].__setitem__("num_hidden_layers", None),
    "heads not dividing hidden": lambda d: d["language_config"].update(hidden_size=66, head_dim=None),
    "gqa mismatch": lambda d: d["language_config"].__setitem__("num_key_value_heads", 3),
    "gelu lm": lambda d: d["language_config"].__setitem__("hidden_act", "gelu"),
    "vision heads": lambda d: d["vision_config"]["params"].__setitem__("heads", 5),
    "ch_mult not a list": lambda d: d["gen_vision_config"]["params"]["vq"].__setitem__("ch_mult", 3),
    "ch_mult zero": lambda d: d["gen_vision_config"]["params"]["vq"].__setitem__("ch_mult", [1, 0]),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_config_is_a_config_error(case):
    with pytest.raises(ConfigError) as e:
        JanusConfig.from_dict(_edit(MALFORMED[case]))
    assert "\n" not in str(e.value)


def test_bad_json_file(tmp_path):
    p = tmp_path / "config.json"
    p.write_text('{"model_type": "multi_modality",')
    with pytest.raises(ConfigError, match="not valid JSON"):
        JanusConfig.from_file(p)
