"""Parity with the transformers port of Janus (``JanusForConditionalGeneration``), on CPU in fp32.

One small random transformers model is written twice: in the official key layout (through
``zuoyou.convert.hf_to_official``) with an official-structure config.json, and in the transformers
layout (``save_pretrained``). zuoyou loads both; every path is compared with the port on the same
inputs: SigLIP features, aligned image embeddings, understanding logits (one forward and every
cached decode step), greedy answers, CFG image logits (every cached step, teacher-forced on the HF
side), greedy image codes, VQ decoding and the VQ encoder.

Known, documented differences (zuoyou follows the official code, see ``zuoyou.convert``):
- VQ encode: the official quantiser L2-normalises latents and codebook before the nearest-neighbour
  search, the port does not; only the pre-quantisation latents are compared with the port.
- Image preprocessing: the port rounds the resized short side, the official code truncates it.

Weights are drawn with std 0.3 (instead of the 0.02 init) so that greedy choices are not near-ties;
the greedy image loop is transformers' own ``generate(generation_mode="image", do_sample=False)``.
The port needs ``tie_word_embeddings=False`` at the top level (it ties lm_head otherwise) and
``attn_implementation="sdpa"`` (eager differs by ~2e-5).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "JanusForConditionalGeneration"):
    pytest.skip("this transformers has no Janus port", allow_module_level=True)

import zuoyou.api
from zuoyou.config import JanusConfig, LMConfig, VisionConfig, VQConfig
from zuoyou.convert import hf_config_to_official, hf_to_official, official_to_hf
from zuoyou.errors import CheckpointError
from zuoyou.processor import BOS, EOS, IMAGE_START, IMAGE_TAG, PAD, ImageProcessor, Message
from zuoyou.tokenizer import train_tokenizer

TOL = 1e-4
CFG = 5.0
WORDS = ["a photo of a red circle", "a blue square left of a green cross", "How many objects are there?",
         "What color is the circle?", "one two three four zero yes no", "Describe the image."]
QUESTION = "What color is the circle?"
PROMPT = "a blue square left of a green cross"
MEASURED: dict[str, float] = {}  # check -> max abs diff (printed with -s)


def diff(name: str, a, b) -> float:
    d = (a.detach().float() - b.detach().float()).abs().max().item()
    MEASURED[name] = d
    print(f"{name}: max abs diff {d:.3g}")
    return d


def zuoyou_config() -> JanusConfig:
    """The same sizes as ``hf_model`` below, written by hand in zuoyou's terms."""
    return JanusConfig(
        lm=LMConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=512),
        vision=VisionConfig(image_size=32, patch_size=4, width=32, layers=2, heads=2),
        vq=VQConfig(codebook_size=64, codebook_embed_dim=8, ch=32, ch_mult=(1, 2), z_channels=32, num_res_blocks=1,
                    image_size=16),
        aligner_input_dim=32, gen_embed_dim=8, image_token_size=64, image_token_embed=64, torch_dtype="float32",
    )


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(WORDS * 20, vocab_size=300)


@pytest.fixture(scope="module")
def hf_model(tok):
    from transformers import JanusConfig as HFConfig
    from transformers import JanusForConditionalGeneration, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig

    vocab = tok.get_vocab()
    ids = dict(bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[PAD])
    text = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
                       **ids)
    # vision 32 px / patch 4 = 8x8 patches; the port decodes VQ codes on that same 8x8 grid -> 16 px images
    vision = JanusVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=4,
                               projection_dim=64, num_image_tokens=64)
    vq = JanusVQVAEConfig(embed_dim=8, num_embeddings=64, latent_channels=32, base_channels=32, channel_multiplier=[1, 2],
                          num_res_blocks=1, projection_dim=64, image_token_embed_dim=64)
    cfg = HFConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=vocab[IMAGE_TAG],
                   tie_word_embeddings=False)
    torch.manual_seed(0)
    model = JanusForConditionalGeneration._from_config(cfg, attn_implementation="sdpa")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.3)
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = ids["bos_token_id"], ids["eos_token_id"], ids["pad_token_id"]
    gc.boi_token_id = vocab[IMAGE_START]
    gc.generation_kwargs = {"boi_token_id": vocab[IMAGE_START]}  # what the port's image generate() reads
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def official_dir(tmp_path_factory, hf_model, tok):
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("official")
    sd = {k: v.contiguous() for k, v in hf_to_official(hf_model.state_dict()).items()}
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    zuoyou_config().save(folder / "config.json")
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, hf_model, tok):
    folder = tmp_path_factory.mktemp("hf")
    hf_model.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def pipe(official_dir):
    return zuoyou.api.load(official_dir, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (23, 37, 3), dtype=np.uint8))  # odd size: resize + pad


def margin(name: str, logits: torch.Tensor) -> float:
    """Smallest top-1 / top-2 gap over the greedy steps: how far the argmax is from a near-tie."""
    top = logits.float().topk(2, dim=-1).values
    m = (top[..., 0] - top[..., 1]).min().item()
    print(f"{name}: smallest top-2 margin {m:.3g}")
    return m


def understanding_inputs(pipe, image):
    ids, px = pipe.engine.processor.understanding_inputs([Message("user", QUESTION, [image])])
    return torch.tensor([ids]), px


# ---------------------------------------------------------------------------------------------- config / keys
def test_config_and_key_mapping(hf_model):
    got = JanusConfig.from_dict(hf_config_to_official(hf_model.config.to_dict()))
    want = zuoyou_config()
    assert (got.lm, got.vq) == (want.lm, want.vq)
    assert (got.vision.image_size, got.vision.patch_size, got.vision.width, got.vision.layers, got.vision.heads) == (32, 4, 32, 2, 2)
    assert (got.aligner_input_dim, got.gen_embed_dim, got.image_token_size, got.image_token_embed) == (32, 8, 64, 64)
    hf_sd = hf_model.state_dict()
    back = official_to_hf(hf_to_official(hf_sd))
    assert set(back) == set(hf_sd) and all(torch.equal(back[k], hf_sd[k]) for k in hf_sd)


def test_tied_hf_file_fills_lm_head(hf_model):
    sd = dict(hf_model.state_dict())
    del sd["lm_head.weight"]
    out = hf_to_official(sd)
    assert out["language_model.lm_head.weight"] is out["language_model.model.embed_tokens.weight"]


# ---------------------------------------------------------------------------------------------- vision
@torch.no_grad()
def test_vision_features_and_aligner(pipe, hf_model, image):
    _, px = understanding_inputs(pipe, image)
    model = pipe.engine.model
    assert diff("siglip features", model.vision_model(px), hf_model.model.vision_model(px).last_hidden_state) <= TOL
    hf_emb = hf_model.model.get_image_features(px).pooler_output
    assert diff("aligned image embeddings", model.embed_images(px), hf_emb) <= TOL


# ---------------------------------------------------------------------------------------------- understanding
@torch.no_grad()
def test_understanding_logits(pipe, hf_model, image):
    ids, px = understanding_inputs(pipe, image)
    model = pipe.engine.model
    x = model.prepare_inputs_embeds(ids, px, ids == pipe.engine.processor.image_id)
    ours = model.text_logits(model.hidden(x))
    ref = hf_model(input_ids=ids, pixel_values=px).logits
    assert diff("understanding logits", ours, ref) <= TOL


def test_greedy_answer(pipe, hf_model, image, monkeypatch):
    n_new = 12
    model, proc = pipe.engine.model, pipe.engine.processor
    steps = []
    orig = model.text_logits
    monkeypatch.setattr(model, "text_logits", lambda h: steps.append(orig(h)) or steps[-1])
    answer = pipe.ask(image, QUESTION, temperature=0, max_new_tokens=n_new)
    monkeypatch.undo()
    ours = [int(s[0].argmax()) for s in steps]
    if ours[-1] == proc.eos:
        ours = ours[:-1]

    ids, px = understanding_inputs(pipe, image)
    L = ids.shape[1]
    with torch.no_grad():
        out = hf_model.generate(input_ids=ids, pixel_values=px, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=n_new)
    ref = [int(t) for t in out[0, L:] if int(t) != proc.eos]
    assert ours == ref, (ours, ref, margin("greedy text", torch.cat(steps)))
    margin("greedy text", torch.cat(steps))
    assert answer == proc.decode(ref)
    assert len(ref) >= 3, "degenerate random model: pick another seed"
    # every cached decode step vs a teacher-forced full forward of the port
    assert proc.image_id not in ours
    full = torch.tensor([ids[0].tolist() + ours])
    with torch.no_grad():
        tf = hf_model(input_ids=full, pixel_values=px).logits[0, L - 1: L - 1 + len(steps)]
    assert diff("understanding logits, cached steps", torch.cat(steps), tf) <= TOL


# ---------------------------------------------------------------------------------------------- generation
def generation_rows(pipe):
    proc = pipe.engine.processor
    cond = proc.generation_ids(PROMPT)
    return torch.tensor([cond, proc.uncond_ids(cond)])  # (2, L): cond, uncond = BOS + pads + <begin_of_image>


@torch.no_grad()
def hf_cfg_logits(hf_model, rows, codes):
    """Teacher-forced port logits after CFG for every image step: (T, K)."""
    m = hf_model.model
    x = torch.cat([m.get_input_embeddings()(rows),
                   hf_model.prepare_embeddings_for_image_generation(codes[:-1].expand(2, -1))], dim=1)
    h = m.language_model(inputs_embeds=x).last_hidden_state[:, rows.shape[1] - 1:]
    logits = m.generation_head(h)  # (2, T, K)
    return logits[1] + CFG * (logits[0] - logits[1]), logits[:, 0]


def test_image_generation(pipe, hf_model, monkeypatch):
    model = pipe.engine.model
    steps, decoded = [], []
    orig_logits, orig_decode = model.image_logits, model.decode_images
    monkeypatch.setattr(model, "image_logits", lambda h: steps.append(orig_logits(h)) or steps[-1])
    monkeypatch.setattr(model, "decode_images", lambda c, chunk=None: decoded.append(c.clone()) or orig_decode(c, chunk))
    images = pipe.generate(PROMPT, n=1, cfg=CFG, temperature=0)
    monkeypatch.undo()
    codes = decoded[-1][0]  # (T,)
    T = model.config.vq.num_tokens
    assert codes.shape == (T,) and len(steps) == T and images[0].size == (16, 16)

    rows = generation_rows(pipe)
    with torch.no_grad():
        ref = hf_model.generate(input_ids=rows[:1], attention_mask=torch.ones_like(rows[:1]), generation_mode="image",
                                do_sample=False, guidance_scale=CFG)
    cfg_steps = torch.stack([s[1] + CFG * (s[0] - s[1]) for s in steps])  # engine rows: cond half, then uncond half
    assert codes.tolist() == ref[0].tolist(), margin("greedy image codes", cfg_steps)
    margin("greedy image codes", cfg_steps)  # ~2e-3 with seed 0, vs logit diffs ~1e-5
    assert len(set(codes.tolist())) > 4, "degenerate random model: pick another seed"

    tf, first = hf_cfg_logits(hf_model, rows, codes)
    assert diff("image logits, first step cond/uncond", steps[0], first) <= TOL
    assert diff("image logits after CFG, all cached steps", cfg_steps, tf) <= TOL
    with torch.no_grad():
        px = hf_model.model.vqmodel.decode(codes[None])
    assert diff("decoded generated image", model.decode_images(codes[None]), px) <= TOL


# ---------------------------------------------------------------------------------------------- VQ
@torch.no_grad()
def test_vq_decode_and_encoder(pipe, hf_model):
    model = pipe.engine.model
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 64, (2, 64), generator=g)
    assert diff("VQ decode", model.decode_images(codes), hf_model.model.vqmodel.decode(codes)) <= TOL
    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    vq, hvq = model.gen_vision_model, hf_model.model.vqmodel
    assert diff("VQ encoder + quant_conv", vq.quant_conv(vq.encoder(x)), hvq.quant_conv(hvq.encoder(x))) <= TOL
    # quantisation follows the official code: nearest L2-normalised codebook row to the normalised latent
    _, ours, z, _ = vq.encode(x)
    e = torch.nn.functional.normalize(vq.quantize.embedding.weight, dim=-1)
    assert torch.equal(ours, torch.cdist(z.reshape(-1, 8), e).argmin(-1).view(2, -1))


# ---------------------------------------------------------------------------------------------- HF layout
@torch.no_grad()
def test_hf_layout_folder_loads(hf_dir, pipe, hf_model, image):
    assert json.loads((hf_dir / "config.json").read_text())["model_type"] == "janus"
    hp = zuoyou.api.load(hf_dir, device="cpu", dtype="fp32")
    a, b = hp.engine.model.state_dict(), pipe.engine.model.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    ids, px = understanding_inputs(hp, image)
    model = hp.engine.model
    x = model.prepare_inputs_embeds(ids, px, ids == hp.engine.processor.image_id)
    assert diff("understanding logits (HF-layout folder)", model.text_logits(model.hidden(x)),
                hf_model(input_ids=ids, pixel_values=px).logits) <= TOL
    rows = generation_rows(hp)
    h = model.hidden(model.embed_text(rows))[:, -1]
    _, first = hf_cfg_logits(hf_model, rows, torch.zeros(1, dtype=torch.long))
    assert diff("image logits (HF-layout folder)", model.image_logits(h), first) <= TOL


# ---------------------------------------------------------------------------------------------- bad weights
def _edit(src, dst, fn):
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    fn(sd)
    save_file(sd, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize("case", ["missing", "unexpected", "mis-shaped"])
def test_bad_official_key_is_named(official_dir, tmp_path, case):
    key = "gen_head.vision_head.weight"

    def fn(sd):
        if case == "missing":
            del sd[key]
        elif case == "unexpected":
            sd["gen_head.extra.weight"] = torch.zeros(2)
        else:
            sd[key] = torch.zeros(3, 3)

    folder = _edit(official_dir, tmp_path / case, fn)
    with pytest.raises(CheckpointError, match=case) as e:
        zuoyou.api.load(folder, device="cpu", dtype="fp32")
    assert (key if case != "unexpected" else "gen_head.extra.weight") in str(e.value)


def test_bad_hf_key_is_named(hf_dir, tmp_path):
    def fn(sd):
        sd["model.foo.weight"] = torch.zeros(2)
        del sd["model.generation_head.vision_head.bias"]

    folder = _edit(hf_dir, tmp_path / "hfbad", fn)
    with pytest.raises(CheckpointError) as e:
        zuoyou.api.load(folder, device="cpu", dtype="fp32")
    assert "model.foo.weight" in str(e.value) and "gen_head.vision_head.bias" in str(e.value)


# ---------------------------------------------------------------------------------------------- preprocessing
def test_image_processor_matches_port_and_spec():
    """Same numbers as the port's PIL processor where both resize to the same size; on sizes where
    ``round`` and ``int`` disagree we follow the official truncation (spec §5.1), checked by hand."""
    from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

    ours = ImageProcessor(image_size=384)
    port = JanusImageProcessorPil(size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    rng = np.random.default_rng(0)
    same = Image.fromarray(rng.integers(0, 256, (37, 100, 3), dtype=np.uint8))  # 37*3.84 = 142.08: int == round
    ref = torch.as_tensor(np.asarray(port(same, return_tensors="np")["pixel_values"][0]))
    assert diff("image processor vs port", ours(same), ref) <= 1e-6

    odd = Image.fromarray(rng.integers(0, 256, (39, 100, 3), dtype=np.uint8))  # 39*3.84 = 149.76: int 149, round 150
    x = ours(odd)
    new_h, top = int(39 / 100 * 384), (384 - int(39 / 100 * 384)) // 2  # 149, 117
    grey = (127 / 255 - 0.5) / 0.5
    assert x.shape == (3, 384, 384)
    assert torch.allclose(x[:, :top], torch.tensor(grey)) and torch.allclose(x[:, top + new_h:], torch.tensor(grey))
    content = np.asarray(odd.resize((384, new_h), Image.BICUBIC), dtype=np.float32) / 255
    assert torch.allclose(x[:, top:top + new_h], torch.from_numpy(content).permute(2, 0, 1) * 2 - 1, atol=1e-6)
    port_x = np.asarray(port(odd, return_tensors="np")["pixel_values"][0])
    assert not np.allclose(port_x[:, top + new_h], grey)  # the port's resized image is one row taller
