"""The Python API: ``pipe = zuoyou.load(...)``, then ``pipe.generate``, ``pipe.ask``, ``pipe.chat``.

A model folder may carry ``generation_defaults.json`` (e.g. ``{"cfg": 2.0, "temperature": 0.8}``);
those values are used whenever the caller passes none. Absent keys fall back to the official
Janus-Pro defaults (CFG 5, temperature 1 for images; greedy text, the default system prompt).
``"self_check": "shapes", "best_of": 4`` draws 4 candidates per image and keeps the n best by the model's own
answers about them (``zuoyou.shapes.checks``; ``best_of`` per call overrides); ``"redraws": 2`` draws up
to two more rounds of candidates while some kept image still fails that check. ``"cpu_dtype": "bf16"``: on CPU,
when the caller names no dtype, compute in bf16 where this CPU's native bf16 matrix products beat fp32
(``zuoyou.quantize.cpu_bf16_gemm_faster``), else in the checkpoint's dtype.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator

import torch

from .engine import Engine, ImageRequest, TextRequest
from .errors import CheckpointError, ConfigError, InputError
from .fused import fuse
from .kernels.int4 import built as kernels_built
from .loading import load_model, resolve_device, resolve_dtype, resolve_folder
from .memory import release_freed_memory
from .processor import Message, Processor

BUNDLED = Path(__file__).parent / "assets" / "shapes"


@dataclass
class GenerationDefaults:
    cfg: float = 5.0
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    text_temperature: float = 0.0
    max_new_tokens: int = 512
    system_prompt: str | None = None  # None = the official default system prompt
    best_of: int = 1  # candidates drawn per image, the n best of all n * best_of kept by the model's own check
    redraws: int = 0  # more rounds of best_of candidates per kept image that still fails the check
    self_check: str | None = None  # which check (a key of ``SELF_CHECKS``); None = none
    cpu_dtype: str | None = None  # compute dtype on CPU when the caller names none, where it is the faster one

    @classmethod
    def from_folder(cls, folder: Path) -> "GenerationDefaults":
        path = folder / "generation_defaults.json"
        if not path.is_file():
            return cls()
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _shapes_checks():
    from .shapes.checks import self_checks

    return self_checks


# ``generation_defaults.json``'s "self_check" -> a factory of the prompt -> [(question, answer)] check
SELF_CHECKS = {"shapes": _shapes_checks}


def _pick(value, default):
    return default if value is None else value


class Pipeline:
    def __init__(self, engine: Engine, defaults: GenerationDefaults, folder: Path):
        self.engine, self.defaults, self.folder = engine, defaults, folder

    @property
    def config(self):
        return self.engine.config

    # ---------------------------------------------------------------------- text -> image
    def image_request(self, prompt: str, n: int = 1, cfg=None, temperature=None, top_k=None, top_p=None,
                      seed=None, best_of=None, redraws=None) -> ImageRequest:
        d = self.defaults
        return ImageRequest(prompt, n, _pick(cfg, d.cfg), _pick(temperature, d.temperature),
                            _pick(top_k, d.top_k), _pick(top_p, d.top_p), seed, _pick(best_of, d.best_of),
                            _pick(redraws, d.redraws))

    def generate(self, prompt: str, n: int = 1, cfg: float | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 progress: bool = False, preview=None, preview_every: int = 0, best_of: int | None = None,
                 redraws: int | None = None):
        """Draw ``n`` images for ``prompt`` -> list of PIL images. ``temperature=0`` is argmax.
        ``best_of=K``: draw n * K candidates and keep the n the model's own check rates best, best first
        (models whose folder names a ``self_check``; see ``Engine.generate_images``); ``redraws=R``: up to R
        more rounds of K candidates for each kept image that fails the check."""
        req = self.image_request(prompt, n, cfg, temperature, top_k, top_p, seed, best_of, redraws)
        return self.engine.generate_images([req], progress=progress, preview=preview, preview_every=preview_every)[0]

    # ---------------------------------------------------------------------- understanding
    def text_request(self, messages, max_new_tokens=None, temperature=None, top_k=None, top_p=None,
                     seed=None) -> TextRequest:
        d = self.defaults
        return TextRequest(to_messages(messages), _pick(max_new_tokens, d.max_new_tokens),
                           _pick(temperature, d.text_temperature), top_k, top_p, seed, d.system_prompt)

    def chat(self, messages, **kw) -> str:
        """Multi-turn: ``[{"role": "user", "content": "...", "images": [img, ...]}, {"role": "assistant", ...}, ...]``."""
        return self.engine.generate_text([self.text_request(messages, **kw)])[0]

    def chat_stream(self, messages, **kw) -> Iterator[str]:
        return self.engine.stream_text(self.text_request(messages, **kw))

    def ask(self, image_or_images, question: str, **kw) -> str:
        """Answer ``question`` about one image or a list of images (paths, bytes or PIL)."""
        return self.chat(_question(image_or_images, question), **kw)

    def ask_stream(self, image_or_images, question: str, **kw) -> Iterator[str]:
        return self.chat_stream(_question(image_or_images, question), **kw)


def _question(images, question):
    if not isinstance(question, str) or not question.strip():
        raise InputError("the question is empty")
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    return [{"role": "user", "content": question, "images": images}]


def to_messages(messages) -> list[Message]:
    if not messages:
        raise InputError("no messages")
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, Message):
            out.append(m)
            continue
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant") or not isinstance(m.get("content", ""), str):
            raise InputError(f"message {i}: expected {{'role': 'user'|'assistant', 'content': str, 'images': [...]}}")
        out.append(Message(m["role"], m.get("content", ""), list(m.get("images") or [])))
    if out[-1].role != "user":
        raise InputError("the last message must be the user's")
    return out


def _dtype(dtype, dev: torch.device, quantize: str | None, defaults: GenerationDefaults, folder: Path):
    """The compute dtype: the caller's; else, on CPU in a float mode, the folder's ``cpu_dtype`` where it is the
    faster one here (bf16 only with native bf16 matrix products that beat fp32: emulated bf16 is ~4x slower);
    else None (the checkpoint's)."""
    if dtype is not None or dev.type != "cpu" or quantize is not None or defaults.cpu_dtype is None:
        return resolve_dtype(dtype)
    try:
        preferred = resolve_dtype(defaults.cpu_dtype)
    except ConfigError as e:
        raise ConfigError(f"{folder / 'generation_defaults.json'}: cpu_dtype: {e}") from None
    from .quantize import cpu_bf16_gemm_faster

    if preferred == torch.float16 or (preferred == torch.bfloat16 and not cpu_bf16_gemm_faster()):
        return None  # (fp16 matrix products are not native on CPUs)
    return preferred


def load(name_or_path: str | Path | None = None, device: str = "auto", dtype=None, quantize: str | None = None,
         compile: bool | str = False, kv_cache: str = "model") -> Pipeline:
    """Load a checkpoint folder or hub id (None: the bundled ShapesWorld model) into a ``Pipeline``.

    ``dtype`` None: the checkpoint's, except on CPU in a float mode where the folder's ``generation_defaults.json``
    names a ``"cpu_dtype"`` that is the faster here (the bundled model: bf16 where native bf16 beats fp32).

    ``quantize="int8"``: int8 weight-only LM linears, heads and image-code aligner (``zuoyou.quantize``),
    bf16 activations; ``quantize="int4"`` (CPU): group-wise int4 decoder linears, int8 text head and aligner,
    the image head left in float (``zuoyou.quantize.quantized_part``).
    Both are applied layer by layer while loading (the float checkpoint is never all in memory); decode
    steps run on zuoyou's AVX-512 VNNI kernels (AMX tiles for 5-8 rows where the CPU has them; built on
    first use) where the CPU, a C++ compiler and bf16 compute allow,
    else on ATen's kernels (``zuoyou.quantize.Int8Linear`` / ``Int4Linear``); on CPU these modes also run RMSNorm
    and RoPE as one kernel call each in eager inference (``zuoyou.fused``), and one-token attention on zuoyou's
    kernel (``zuoyou.kvcache.KernelKVCache``). A float model on CPU takes those too (and, in bf16, the 1-4 row
    linear kernel) where the kernels are built already (``zuoyou.kernels.int4.built``); it never waits for a build.
    ``compile=True``: ``torch.compile`` the one-token decode step (first call of each batch shape compiles);
    ``compile="max-autotune"``: autotuned, with frozen weights (see ``zuoyou.engine.Engine``).
    ``kv_cache="int8"``: keys and values stored as int8 (``zuoyou.kvcache``): about half the cache's memory
    and reads, which grow with the number of images drawn at once; "model" keeps them in the compute dtype.
    """
    from .quantize import check_mode

    quantize = check_mode(quantize)
    if name_or_path is None:
        if not (BUNDLED / "config.json").is_file():
            raise CheckpointError("this install has no bundled model; pass a checkpoint folder or hub id")
        name_or_path = BUNDLED
    folder = resolve_folder(name_or_path)
    dev = resolve_device(device)
    defaults = GenerationDefaults.from_folder(folder)
    model, config = load_model(folder, dev, _dtype(dtype, dev, quantize, defaults, folder), quantize)
    dtype_used = model.language_model.model.embed_tokens.weight.dtype
    if dev.type in ("cpu", "cuda"):
        # the VQ's convolutions in channels-last (NHWC), oneDNN's / cuDNN's own layout: no reorders around
        # each conv (same values; Janus-Pro-1B int4, one image, CPU: the request's peak RSS 2819 -> 2628
        # MiB, the VQ decode ~35 % faster). Here, not in the Engine: a model in training keeps its layout.
        # One weight at a time (what Module.to does to 4-d tensors), each old copy handed back to the OS
        # at once, so that old and new copies of the whole VQ never coexist: that had been the peak of
        # loading Janus-Pro-1B in int4 (+72 MiB above the loaded model).
        for t in list(model.gen_vision_model.parameters()) + list(model.gen_vision_model.buffers()):
            if t.dim() == 4:
                t.data = t.data.contiguous(memory_format=torch.channels_last)
                release_freed_memory()
    kernels = False
    if dev.type == "cpu" and (quantize or kernels_built()):
        # RMSNorm and RoPE in one kernel call each in eager inference (zuoyou/fused.py), one-token attention on
        # zuoyou's kernel (zuoyou/kvcache.py) and bf16 linears of 1-4 rows on its GEMV: the quantised modes build
        # the kernels; a float model takes them only where they are built already (it never waits for a C++
        # build). The bundled model, 16 candidates drawn: ~20 % faster, the same images (README "Self-check")
        kernels = fuse(model) > 0
    processor = Processor.from_folder(folder, config.vision.num_patches, config.vision.image_size,
                                      defaults.system_prompt)
    n_tok = processor.tokenizer.get_vocab_size(with_added_tokens=True)
    if n_tok > config.lm.vocab_size:
        raise CheckpointError(f"{folder}: tokenizer has {n_tok} tokens but the model embeds only {config.lm.vocab_size}")
    engine = Engine(model, processor, dev, dtype_used, compile=compile, kv_cache=kv_cache, kernels=kernels)
    if defaults.self_check is not None:
        if defaults.self_check not in SELF_CHECKS:
            raise ConfigError(f"{folder / 'generation_defaults.json'}: self_check={defaults.self_check!r}; "
                              f"known: {', '.join(SELF_CHECKS)}")
        engine.checker = SELF_CHECKS[defaults.self_check]()
    return Pipeline(engine, defaults, folder)

