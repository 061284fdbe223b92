"""Checkpoint folders (spec §3): every weight layout, ignored official tensors, bad folders, dtypes, devices.

Missing / unexpected / mis-shaped keys in an official-layout file are covered in ``tests/test_parity.py``.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import zuoyou.api
from zuoyou.errors import CheckpointError, ConfigError
from zuoyou.loading import load_model, resolve_device, resolve_dtype, resolve_folder, weight_files

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def ref_sd(tiny_dir):
    return load_file(str(tiny_dir / "model.safetensors"))


def folder_with(tiny_dir, dst, files: dict):
    """A copy of the tiny checkpoint's config and tokenizer, with ``files`` (name -> dict | bytes | str) as weights."""
    dst.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(tiny_dir / name, dst / name)
    for name, content in files.items():
        if isinstance(content, dict) and name.endswith(".safetensors"):
            save_file(content, str(dst / name), metadata={"format": "pt"})
        elif isinstance(content, dict) and name.endswith(".bin"):
            torch.save(content, dst / name)
        elif isinstance(content, dict):
            (dst / name).write_text(json.dumps(content))
        else:
            (dst / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return dst


def shards(sd: dict, n: int, ext: str) -> dict:
    """``n`` shard files plus their index, as ``save_pretrained`` writes them."""
    keys = sorted(sd)
    stem = "model" if ext == "safetensors" else "pytorch_model"
    names = [f"{stem}-{i + 1:05d}-of-{n:05d}.{ext}" for i in range(n)]
    files = {name: {} for name in names}
    weight_map = {}
    for i, k in enumerate(keys):
        files[names[i * n // len(keys)]][k] = sd[k]
        weight_map[k] = names[i * n // len(keys)]
    index = "model.safetensors.index.json" if ext == "safetensors" else "pytorch_model.bin.index.json"
    files[index] = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
                    "weight_map": weight_map}
    return files


def assert_same_weights(model, sd):
    got = model.state_dict()
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize("layout", ["safetensors", "sharded-safetensors", "bin", "sharded-bin"])
def test_every_layout_gives_the_same_weights(tiny_dir, ref_sd, tmp_path, layout):
    files = {"safetensors": {"model.safetensors": ref_sd},
             "bin": {"pytorch_model.bin": ref_sd},
             "sharded-safetensors": shards(ref_sd, 3, "safetensors"),
             "sharded-bin": shards(ref_sd, 2, "bin")}[layout]
    folder = folder_with(tiny_dir, tmp_path / layout, files)
    if layout.startswith("sharded"):
        assert len(weight_files(folder)) == (3 if layout.endswith("safetensors") else 2)
    model, cfg = load_model(folder, CPU)
    assert_same_weights(model, ref_sd)
    assert cfg.lm.vocab_size == 300 and not any(p.requires_grad for p in model.parameters()) and not model.training


def test_unused_official_tensors_are_ignored(tiny_dir, ref_sd, tmp_path):
    sd = dict(ref_sd)
    w = 32
    sd.update({"vision_model.vision_tower.attn_pool.latent": torch.zeros(1, 1, w),
               "vision_model.vision_tower.attn_pool.q.weight": torch.zeros(w, w),
               "vision_model.vision_tower.attn_pool.kv.bias": torch.zeros(2 * w),
               "vision_model.vision_tower.attn_pool.mlp.fc1.weight": torch.zeros(4 * w, w),
               "gen_vision_model.quantize.codebook_used": torch.zeros(65536)})
    folder = folder_with(tiny_dir, tmp_path / "extra", {"model.safetensors": sd})
    model, _ = load_model(folder, CPU)
    assert_same_weights(model, ref_sd)


def test_tied_lm_head_is_filled_from_the_embedding(tiny_dir, ref_sd, tmp_path):
    sd = {k: v for k, v in ref_sd.items() if k != "language_model.lm_head.weight"}
    folder = folder_with(tiny_dir, tmp_path / "tied", {"model.safetensors": sd})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["language_config"]["tie_word_embeddings"] = True
    (folder / "config.json").write_text(json.dumps(cfg))
    model, _ = load_model(folder, CPU)
    lm = model.language_model
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    assert torch.equal(lm.lm_head.weight, ref_sd["language_model.model.embed_tokens.weight"])


def test_bad_weight_files(tiny_dir, ref_sd, tmp_path):
    idx = shards(ref_sd, 2, "safetensors")
    gone = dict(idx)
    del gone["model-00002-of-00002.safetensors"]
    cases = {
        "no weights": ({}, "no weights"),
        "shard missing": (gone, "model-00002-of-00002.safetensors"),
        "bad index": ({"model.safetensors.index.json": "{oops", "model.safetensors": ref_sd}, "malformed index"),
        "corrupt safetensors": ({"model.safetensors": b"\x00" * 64}, "cannot read weights"),
        "corrupt bin": ({"pytorch_model.bin": b"PK\x03\x04 truncated zip"}, "cannot read weights"),
    }
    for i, (name, (files, fragment)) in enumerate(cases.items()):
        folder = folder_with(tiny_dir, tmp_path / f"case{i}", files)
        with pytest.raises(CheckpointError, match=fragment) as e:
            zuoyou.api.load(folder, device="cpu")
        assert "\n" not in str(e.value), name


def test_not_a_checkpoint_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        zuoyou.api.load(tmp_path, device="cpu")
    with pytest.raises(CheckpointError, match="is a file"):
        zuoyou.api.load(tmp_path / "notes.txt", device="cpu")
    with pytest.raises(CheckpointError, match="no such folder"):
        zuoyou.api.load(tmp_path / "missing" / "deeper", device="cpu")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ConfigError, match="not a Janus model"):
        zuoyou.api.load(tmp_path, device="cpu")


def test_tokenizer_larger_than_the_embedding(tiny_dir, ref_sd, tmp_path):
    from tokenizers import Tokenizer

    folder = folder_with(tiny_dir, tmp_path / "bigtok", {"model.safetensors": ref_sd})
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_tokens([f"<extra_{i}>" for i in range(400)])
    tok.save(str(folder / "tokenizer.json"))
    with pytest.raises(CheckpointError, match=r"tokenizer has \d+ tokens but the model embeds only 300"):
        zuoyou.api.load(folder, device="cpu")


def test_hub_id_offline(monkeypatch, tmp_path):
    import huggingface_hub

    calls = []

    def offline(repo_id, **kw):
        calls.append(repo_id)
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline: cannot reach the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)  # the id is not a local folder here
    with pytest.raises(CheckpointError) as e:
        zuoyou.api.load("nobody-xyz/not-a-janus-model", device="cpu")
    msg = str(e.value)
    assert calls == ["nobody-xyz/not-a-janus-model"]
    assert "nobody-xyz/not-a-janus-model" in msg and "pass a local checkpoint folder" in msg and "\n" not in msg
    assert e.value.__suppress_context__
    # a local folder of that name wins over the hub
    (tmp_path / "nobody-xyz" / "not-a-janus-model").mkdir(parents=True)
    assert resolve_folder("nobody-xyz/not-a-janus-model").resolve() == (tmp_path / "nobody-xyz" / "not-a-janus-model").resolve()
    assert len(calls) == 1


@pytest.mark.parametrize("dtype,want", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("float32", torch.float32)])
def test_low_precision_loads_and_draws(tiny_dir, ref_sd, dtype, want):
    pipe = zuoyou.api.load(tiny_dir, device="cpu", dtype=dtype)
    model = pipe.engine.model
    assert {p.dtype for p in model.parameters()} == {want} and pipe.engine.dtype == want
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref_sd[k].to(want)), k
    # VQ decoding in that dtype (the official Upsample casts to bf16 and breaks fp16): finite, close to fp32
    codes = torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        px = model.decode_images(codes)
        ref = zuoyou.api.load(tiny_dir, device="cpu").engine.model.decode_images(codes) if want != torch.float32 else px
    assert px.dtype == want and px.shape == (2, 3, 16, 16) and torch.isfinite(px).all()
    assert (px.float() - ref).abs().max() < 0.1
    images = pipe.generate("a red circle", n=2, seed=0)
    assert [im.size for im in images] == [(16, 16)] * 2


def test_resolve_device_and_dtype():
    assert resolve_device("cpu") == CPU and resolve_device(None).type in ("cpu", "cuda", "mps", "npu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda:1")
    with pytest.raises(ConfigError, match="use auto, cpu, cuda"):
        resolve_device("gpu0")
    assert resolve_dtype("bf16") == torch.bfloat16 and resolve_dtype("float16") == torch.float16
    assert resolve_dtype(None) is None and resolve_dtype(torch.float32) == torch.float32
    with pytest.raises(ConfigError, match="use one of fp32, bf16, fp16"):
        resolve_dtype("int4")


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("layout", ["safetensors", "safetensors-many-parts", "sharded-safetensors", "sharded-bin",
                                    "tied"])
def test_quantised_while_loading_equals_quantised_after(tiny_dir, ref_sd, tmp_path, monkeypatch, layout, mode):
    """``load_model(quantize=...)`` quantises part by part as it reads; the result is exactly
    ``quantize_model`` applied to the loaded model (also when the tiny model is cut into many parts, as
    a real checkpoint is)."""
    import functools

    import zuoyou.loading
    from zuoyou.quantize import quantize_model

    if layout == "safetensors-many-parts":
        monkeypatch.setattr(zuoyou.loading, "_load_quantized",
                            functools.partial(zuoyou.loading._load_quantized, group_bytes=4096))

    sd = {k: v for k, v in ref_sd.items() if layout != "tied" or k != "language_model.lm_head.weight"}
    files = (shards(sd, 2, "bin") if layout == "sharded-bin" else shards(sd, 3, "safetensors")
             if layout == "sharded-safetensors" else {"model.safetensors": sd})
    folder = folder_with(tiny_dir, tmp_path / layout, files)
    if layout == "tied":
        cfg = json.loads((folder / "config.json").read_text())
        cfg["language_config"]["tie_word_embeddings"] = True
        (folder / "config.json").write_text(json.dumps(cfg))
    streamed, _ = load_model(folder, CPU, torch.bfloat16, quantize=mode)
    after = quantize_model(load_model(folder, CPU, torch.bfloat16)[0], mode)
    assert [type(m).__name__ for m in streamed.modules()] == [type(m).__name__ for m in after.modules()]
    a, b = streamed.state_dict(), after.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert "Int" in type(streamed.language_model.lm_head).__name__
    assert streamed.language_model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_parts_of_a_quantised_load():
    from zuoyou.loading import _parts

    sizes = {"vision_model.a.weight": 10, "vision_model.b.weight": 10, "language_model.model.layers.0.q.weight": 5,
             "language_model.model.layers.0.norm.weight": 1, "language_model.model.layers.1.q.weight": 5,
             "gen_head.x.weight": 30, "gen_head.x.bias": 1, "gen_head.y.weight": 1}
    parts = _parts(sizes, limit=25)
    assert sorted(k for p in parts for k in p) == sorted(sizes)  # every key once
    assert ["language_model.model.layers.0.q.weight", "language_model.model.layers.0.norm.weight"] in parts
    assert ["language_model.model.layers.1.q.weight"] in parts  # a decoder layer is a part of its own
    assert ["vision_model.a.weight", "vision_model.b.weight"] in parts  # small modules share a part
    assert ["gen_head.x.weight", "gen_head.x.bias"] in parts  # a module is never split
