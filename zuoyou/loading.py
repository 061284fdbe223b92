"""Load a checkpoint folder (or a hub id) into a ``Janus`` model, strictly, without copying weights twice.

Accepted layouts: ``model.safetensors``, sharded ``model-*.safetensors`` with
``model.safetensors.index.json``, ``pytorch_model.bin`` or sharded ``.bin`` with its index
(pickles are read with ``weights_only=True``). Keys may be in the official layout or in the
transformers-converted one (``JanusForConditionalGeneration``); the latter is mapped back by
``zuoyou.convert``. The model is built on the meta device and the tensors assigned, so peak
memory is one copy of the weights; with ``quantize``, one quantised copy plus about one decoder
layer (``_load_quantized``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .config import JanusConfig
from .errors import CheckpointError, ConfigError
from .models.janus import Janus, build

IGNORED_SUFFIXES = ("quantize.codebook_used",)
IGNORED_PARTS = (".attn_pool.",)
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ConfigError(f"dtype {dtype!r}: use one of fp32, bf16, fp16") from None


def resolve_device(device: str | None = "auto") -> torch.device:
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        if hasattr(torch, "npu") and torch.npu.is_available():  # present once torch_npu is imported
            return torch.device("npu")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device {device!r}: use auto, cpu, cuda, cuda:N, mps or npu") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: CUDA is not available on this machine")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"device {device!r}: MPS is not available on this machine")
    return dev


def resolve_folder(name_or_path: str | os.PathLike) -> Path:
    """A local checkpoint folder, or a hub id downloaded through ``huggingface_hub``."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{p} is a file: pass the checkpoint folder that holds config.json")
    name = str(name_or_path)
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise CheckpointError(f"{name}: no such folder (and not a hub id like 'deepseek-ai/Janus-Pro-1B')")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model", "*.txt"]))
    except Exception as e:  # offline, unknown repo, auth...: one line, with the way out
        raise CheckpointError(
            f"could not download {name!r} from the Hugging Face hub ({type(e).__name__}); "
            "if this machine is offline, pass a local checkpoint folder instead"
        ) from None


def read_config(folder: Path) -> tuple[JanusConfig, bool]:
    """(config, is_hf_layout). The transformers port writes ``model_type: "janus"``."""
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: not a checkpoint folder (no config.json)")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if d.get("model_type") == "janus":
        from .convert import hf_config_to_official

        return JanusConfig.from_dict(hf_config_to_official(d)), True
    if d.get("model_type") not in (None, "multi_modality"):
        raise ConfigError(f"{path}: model_type {d.get('model_type')!r} is not a Janus model")
    return JanusConfig.from_dict(d), False


def weight_files(folder: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            try:
                shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{folder / index}: malformed index ({e})") from None
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CheckpointError(f"{folder}: shards listed in {index} are missing: {', '.join(missing)}")
            return [folder / s for s in shards]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return [folder / single]
    raise CheckpointError(f"{folder}: no weights (model.safetensors, pytorch_model.bin or a sharded index)")


def read_state_dict(files: list[Path], keys: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The files' tensors, memory-mapped where the format allows; ``keys``: only those that are there
    (a safetensors file then opens just them: ~1.5 ms instead of ~30 for all of Janus-Pro-1B's 868)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    sd = {}
    for f in files:
        try:
            if f.suffix == ".safetensors" and keys is not None:
                with safe_open(str(f), framework="pt") as h:
                    sd.update({k: h.get_tensor(k) for k in keys & set(h.keys())})
            elif f.suffix == ".safetensors":
                sd.update(load_file(str(f)))
            else:
                sd.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
        except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as e:
            raise CheckpointError(f"{f}: cannot read weights ({str(e).splitlines()[0]})") from None
    return sd


def check_and_fix(model: Janus, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strict match against the model; unused official tensors dropped; tied lm_head filled."""
    sd = {k: v for k, v in sd.items() if not k.endswith(IGNORED_SUFFIXES) and not any(p in k for p in IGNORED_PARTS)}
    expected = model.state_dict()
    if model.config.lm.tie_word_embeddings and "language_model.lm_head.weight" not in sd:
        sd["language_model.lm_head.weight"] = sd.get("language_model.model.embed_tokens.weight")
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k} {tuple(sd[k].shape)} vs config {tuple(v.shape)}" for k, v in expected.items()
              if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    problems = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
        if keys:
            more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
            problems.append(f"{len(keys)} {what}: {', '.join(keys[:5])}{more}")
    if problems:
        raise CheckpointError("weights do not match config.json: " + "; ".join(problems))
    return sd


def load_model(folder: Path, device: torch.device, dtype: torch.dtype | None = None,
               quantize: str | None = None) -> tuple[Janus, JanusConfig]:
    """``quantize`` (``zuoyou.quantize`` modes): quantised part by part while loading (official layout;
    a transformers-layout checkpoint is loaded whole, then quantised)."""
    from .quantize import check_quantizable, quantize_model

    quantize = check_quantizable(device, quantize)
    config, hf_layout = read_config(folder)
    files = weight_files(folder)
    sd = read_state_dict(files)  # memory-mapped where the format allows: nothing read yet
    if hf_layout:
        from .convert import hf_to_official

        sd = hf_to_official(sd)
    model = build(config, "meta")
    sd = check_and_fix(model, sd)
    dtype = dtype or DTYPES.get(config.torch_dtype, torch.float32)
    if quantize and not hf_layout:
        sizes = {k: v.numel() * v.element_size() for k, v in sd.items()}
        del sd
        _load_quantized(model, files, sizes, device, dtype, quantize)
        return model.eval().requires_grad_(False), config
    # The tied lm_head shares embed_tokens' tensor: assign keeps the sharing.
    model.load_state_dict({k: _convert(v, device, dtype) for k, v in sd.items()}, strict=True, assign=True)
    if config.lm.tie_word_embeddings:
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
    return quantize_model(model.eval().requires_grad_(False), quantize), config


def _convert(v: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)


def _load_quantized(model: Janus, files: list[Path], sizes: dict[str, int], device, dtype, mode: str,
                    group_bytes: int | None = None) -> None:
    """Assign and quantise a meta-built model one part at a time (a decoder layer, or modules up to
    ``group_bytes``), each part read through a fresh memory map of the files that is dropped before
    the next: the float weights are never all resident at once (peak: the quantised model plus
    about one part), where loading first and quantising after held the whole float checkpoint.

    A weight that stays in float is copied out of the map, so it is resident twice (file pages and
    copy) until its part's map closes: parts of safetensors files are kept small (32 MiB; a part opens
    only its own tensors, ~1.5 ms): with ``zuoyou.load``'s channels-last VQ converted one weight at a time,
    the peak while loading Janus-Pro-1B in int4 went from 2536 to 2393 MiB (256 MiB parts before). A
    ``.bin`` is unpickled again for every part, so its parts are 256 MiB."""
    from .memory import release_freed_memory
    from .quantize import quantize_part, quantized_part

    if group_bytes is None:
        group_bytes = (32 if all(f.suffix == ".safetensors" for f in files) else 256) * 2**20

    emb = "language_model.model.embed_tokens.weight"
    # which file holds each key: a part re-opens only its own shards
    where = {k: f for f in files for k in _keys_of(f)} if len(files) > 1 else {}
    for keys in _parts(sizes, group_bytes):
        src = read_state_dict(sorted({where.get(k, where.get(emb)) for k in keys}) if where else files,
                              set(keys) | {emb})
        # (a tied text head is absent from the file: it starts as the embedding table, then is quantised)
        part = {k: _convert(src[k] if k in src else src[emb], device, dtype) for k in keys}
        del src
        model.load_state_dict(part, strict=False, assign=True)
        del part
        for name in sorted({_module_of(k) for k in keys}):
            if quantized_part(name, model.get_submodule(name), mode):
                quantize_part(model, name, mode)
        for k in keys:  # what stays in float gets its own memory, so that this part's map can close
            owner, _, attr = k.rpartition(".")
            t = getattr(model.get_submodule(owner), attr, None) if _has_module(model, owner) else None
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                t.data = t.data.clone()
        release_freed_memory()  # the quantisation's temporaries, before the next part comes on top


def _keys_of(f: Path) -> list[str]:
    """A weight file's key names: a safetensors header only (its tensors stay unread); a ``.bin``
    has no header, so it is unpickled (memory-mapped)."""
    if f.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(f), framework="pt") as h:
            return list(h.keys())
    return list(read_state_dict([f]))


def _module_of(key: str) -> str:
    """The name of the quantisable unit a weight belongs to: its decoder layer, else its module."""
    parts = key.split(".")
    if key.startswith("language_model.model.layers."):
        return ".".join(parts[:4])
    return ".".join(parts[:-1])


def _has_module(model: Janus, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def _parts(sizes: dict[str, int], limit: int) -> list[list[str]]:
    """Keys in groups: one per decoder layer (quantised as a whole); other modules packed in order up
    to ``limit`` bytes (fewer re-opened maps: a ``.bin`` is unpickled again per part)."""
    units: dict[str, list[str]] = {}
    for k in sizes:
        units.setdefault(_module_of(k), []).append(k)
    groups: list[list[str]] = []
    size = limit
    for unit, keys in units.items():
        nbytes = sum(sizes[k] for k in keys)
        layer = unit.startswith("language_model.model.layers.")
        if layer or size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1] += keys
        size = limit if layer else size + nbytes  # nothing joins a decoder layer
    return groups


def save_model(model: Janus, folder: Path) -> None:
    """Write config.json + model.safetensors atomically (tmp file, then rename)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.lm.tie_word_embeddings:
        sd.pop("language_model.lm_head.weight", None)
    tmp = folder / "model.safetensors.tmp"
    save_file(sd, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / "model.safetensors")
    model.config.save(folder / "config.json")
