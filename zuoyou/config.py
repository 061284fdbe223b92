"""Configuration of a Janus-style unified model, read from and written to the official config.json.

The official file (``model_type: "multi_modality"``) holds one sub-config per part, each shaped
``{"cls": ..., "model_type": ..., "params": {...}}``, plus a plain ``LlamaConfig`` dict as
``language_config``. The official code hard-codes the SigLIP-L and VQ-16 sizes; we read them from
explicit extra ``params`` when present and fall back to the official defaults when absent, so one
loader serves the published checkpoints and our own small models.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from .errors import ConfigError


# --------------------------------------------------------------------------------------------- parts
@dataclass
class LMConfig:
    """LLaMA decoder. Defaults are HF ``LlamaConfig``'s: the Janus-Pro-7B file relies on them."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None -> MHA (= num_attention_heads)
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False

    def __post_init__(self):
        _positive_ints(self, "language_config", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                       "num_attention_heads", "max_position_embeddings")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError("language_config: hidden_size must be a multiple of num_attention_heads")
            self.head_dim = self.hidden_size // self.num_attention_heads
        _positive_ints(self, "language_config", "num_key_value_heads", "head_dim")
        if self.hidden_act != "silu":
            raise ConfigError(f"language_config.hidden_act={self.hidden_act!r}: only 'silu' is supported")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("language_config: num_attention_heads must be a multiple of num_key_value_heads")


@dataclass
class VisionConfig:
    """SigLIP ViT for understanding. Official file gives only image_size/model_name/select_*."""

    image_size: int = 384
    patch_size: int = 16
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    select_layer: int = -1
    model_name: str = "siglip_large_patch16_384"
    select_feature: str = "same"

    def __post_init__(self):
        _positive_ints(self, "vision_config", "image_size", "patch_size", "width", "layers", "heads")
        if self.width % self.heads:
            raise ConfigError("vision_config: width must be a multiple of heads")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def depth_used(self) -> int:
        # the official tower keeps layers + select_layer + 1 blocks (all of them for -1)
        return min(self.layers, self.layers + self.select_layer + 1)


@dataclass
class VQConfig:
    """LlamaGen VQ-16. ``VQ_16()`` is called with no arguments upstream, hence these defaults."""

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    z_channels: int = 256
    num_res_blocks: int = 2
    norm_groups: int = 32
    image_size: int = 384  # generated image side in pixels

    def __post_init__(self):
        self.ch_mult = tuple(self.ch_mult)
        _positive_ints(self, "gen_vision_config.vq", "codebook_size", "codebook_embed_dim", "ch", "z_channels",
                       "num_res_blocks", "norm_groups", "image_size")
        if not self.ch_mult or not all(type(m) is int and m > 0 for m in self.ch_mult):
            raise ConfigError(f"gen_vision_config.vq.ch_mult={list(self.ch_mult)}: must be positive integers")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid(self) -> int:
        return self.image_size // self.downsample

    @property
    def num_tokens(self) -> int:
        return self.grid**2


@dataclass
class JanusConfig:
    lm: LMConfig = field(default_factory=LMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    vq: VQConfig = field(default_factory=VQConfig)
    aligner_input_dim: int = 1024  # = vision.width
    gen_embed_dim: int = 8  # gen_vision_config.params.n_embed (gen_embed width)
    image_token_size: int = 16384  # number of image codes (gen_embed rows, gen_head outputs)
    image_token_embed: int = 2048  # gen_head hidden width
    torch_dtype: str = "bfloat16"

    @property
    def hidden(self) -> int:
        return self.lm.hidden_size

    # ---------------------------------------------------------------- official config.json <-> dataclass
    @classmethod
    def from_dict(cls, d: dict) -> "JanusConfig":
        try:
            lm = _pick(LMConfig, d["language_config"])
            vp = dict(d["vision_config"].get("params", {}))
            vp.setdefault("width", d["aligner_config"]["params"].get("input_dim", 1024))
            vision = _pick(VisionConfig, vp)
            gvp = d["gen_vision_config"].get("params", {})
            # gen_vision params.n_embed / image_token_size describe gen_embed; the VQ's own sizes are
            # our extension under params.vq (absent in official files -> VQ-16 defaults)
            vq = _pick(VQConfig, gvp.get("vq", {}))
            head = d["gen_head_config"]["params"]
            return cls(
                lm=lm,
                vision=vision,
                vq=vq,
                aligner_input_dim=d["aligner_config"]["params"].get("input_dim", vision.width),
                gen_embed_dim=gvp.get("n_embed", 8),
                image_token_size=gvp.get("image_token_size", head.get("image_token_size", 16384)),
                image_token_embed=head.get("image_token_embed", lm.hidden_size),
                torch_dtype=d.get("torch_dtype", "bfloat16"),
            )
        except KeyError as e:
            raise ConfigError(f"config.json is missing the key {e} (not a Janus multi_modality config)") from None
        except (TypeError, AttributeError, ValueError) as e:  # e.g. a section that is not a dict
            raise ConfigError(f"config.json has a malformed section: {e}") from None

    def to_dict(self) -> dict:
        """The official structure, with explicit sizes added to the params the official code hard-codes."""
        D = self.hidden
        lm = asdict(self.lm)
        lm.update(model_type="llama", torch_dtype=self.torch_dtype)
        vq = asdict(self.vq)
        vq["ch_mult"] = list(vq["ch_mult"])
        return {
            "architectures": ["MultiModalityCausalLM"],
            "model_type": "multi_modality",
            "torch_dtype": self.torch_dtype,
            "vision_config": {"cls": "CLIPVisionTower", "model_type": "vision", "params": asdict(self.vision)},
            "aligner_config": {
                "cls": "MlpProjector", "model_type": "aligner",
                "params": {"depth": 2, "input_dim": self.aligner_input_dim, "n_embed": D, "projector_type": "mlp_gelu"},
            },
            "gen_vision_config": {
                "cls": "VQ-16", "model_type": "gen_vision",
                "params": {"image_token_size": self.image_token_size, "n_embed": self.gen_embed_dim, "vq": vq},
            },
            "gen_aligner_config": {
                "cls": "MlpProjector", "model_type": "gen_aligner",
                "params": {"depth": 2, "input_dim": self.gen_embed_dim, "n_embed": D, "projector_type": "mlp_gelu"},
            },
            "gen_head_config": {
                "cls": "vision_head", "model_type": "gen_head",
                "params": {"image_token_embed": self.image_token_embed, "image_token_size": self.image_token_size, "n_embed": D},
            },
            "language_config": lm,
        }

    @classmethod
    def from_file(cls, path: str | Path) -> "JanusConfig":
        try:
            d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _positive_ints(obj, section: str, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if type(v) is not int or v < 1:
            raise ConfigError(f"{section}.{n}={v!r}: must be a positive integer")


def _pick(dc, d: dict):
    """Build dataclass ``dc`` from the keys of ``d`` it knows; the rest keep their defaults."""
    names = {f.name for f in fields(dc)}
    return dc(**{k: copy.deepcopy(v) for k, v in d.items() if k in names})


# --------------------------------------------------------------------------------------------- registry
def _official(hidden: int, layers: int, heads: int, inter: int, lm_explicit: bool = True) -> JanusConfig:
    lm = LMConfig(
        vocab_size=102400, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=16384,
    )
    return JanusConfig(lm=lm, image_token_embed=hidden)


def janus_1_3b() -> JanusConfig:
    return _official(2048, 24, 16, 5632)


def janus_pro_1b() -> JanusConfig:
    return _official(2048, 24, 16, 5632)


def janus_pro_7b() -> JanusConfig:
    return _official(4096, 30, 32, 11008)


def tiny() -> JanusConfig:
    """A few-hundred-k-parameter model for tests: every part present, every shape small."""
    return JanusConfig(
        lm=LMConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
        vision=VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2, model_name="tiny"),
        vq=VQConfig(codebook_size=64, codebook_embed_dim=8, ch=32, ch_mult=(1, 2), z_channels=32,
                    num_res_blocks=1, image_size=16),
        aligner_input_dim=32, gen_embed_dim=8, image_token_size=64, image_token_embed=64, torch_dtype="float32",
    )


def shapes() -> JanusConfig:
    """The bundled ShapesWorld model: 64x64 images, 8x8 = 64 image tokens, ~7 M parameters."""
    return JanusConfig(
        lm=LMConfig(vocab_size=384, hidden_size=256, intermediate_size=704, num_hidden_layers=6,
                    num_attention_heads=4, max_position_embeddings=256),
        vision=VisionConfig(image_size=64, patch_size=8, width=128, layers=4, heads=4, model_name="shapes_vit"),
        vq=VQConfig(codebook_size=4096, codebook_embed_dim=8, ch=16, ch_mult=(1, 2, 4, 4), z_channels=64,
                    num_res_blocks=1, norm_groups=8, image_size=64),
        aligner_input_dim=128, gen_embed_dim=8, image_token_size=4096, image_token_embed=256, torch_dtype="float32",
    )


CONFIGS = {
    "janus-1.3b": janus_1_3b,
    "janus-pro-1b": janus_pro_1b,
    "janus-pro-7b": janus_pro_7b,
    "shapes": shapes,
    "tiny": tiny,
}


def get_config(name: str) -> JanusConfig:
    try:
        return CONFIGS[name]()
    except KeyError:
        raise ConfigError(f"unknown config {name!r}; known: {', '.join(CONFIGS)}") from None


__all__ = ["LMConfig", "VisionConfig", "VQConfig", "JanusConfig", "CONFIGS", "get_config", "replace"]
