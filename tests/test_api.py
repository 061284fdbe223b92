"""The Python API (``zuoyou.load`` -> ``Pipeline``) on the tiny checkpoint.

Seeded sampling of one request, previews and a two-request image batch are in ``tests/test_engine.py``;
here: sampling options through the API, text answers (ask / ask_stream / chat), folder generation
defaults, and request independence inside merged batches (per-request CFG, text conversations).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

import zuoyou
from zuoyou.engine import TextRequest
from zuoyou.errors import ConfigError, InputError
from zuoyou.processor import Message

QUESTION = "What color is the circle?"


def arrays(images):
    return [np.asarray(im) for im in images]


def same(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(arrays(a), arrays(b)))


@pytest.fixture(scope="module")
def pics():
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in [(24, 16), (10, 30)]]


# ------------------------------------------------------------------------------------------ text -> image
def test_generate_n_seed_and_greedy(tiny_pipe):
    p = "a blue square left of a green cross"
    three = tiny_pipe.generate(p, n=3, seed=21)
    assert len(three) == 3 and all(im.size == (16, 16) and im.mode == "RGB" for im in three)
    assert same(three, tiny_pipe.generate(p, n=3, seed=21))
    assert not same(tiny_pipe.generate(p, seed=None), tiny_pipe.generate(p, seed=None))  # unseeded: fresh draws
    greedy = tiny_pipe.generate(p, temperature=0, seed=1)
    assert same(greedy, tiny_pipe.generate(p, temperature=0, seed=2))  # the seed is irrelevant at temperature 0
    assert same(greedy, tiny_pipe.generate(p, temperature=1.0, top_k=1, seed=3))  # top-k 1 is argmax
    assert not same(greedy, tiny_pipe.generate("a red circle", temperature=0))  # the prompt matters
    assert not same(greedy, tiny_pipe.generate(p, temperature=0, cfg=1.0))  # and so does CFG


def test_bad_generation_arguments(tiny_pipe):
    for kw, fragment in [(dict(n=0), "n=0"), (dict(cfg=-1), "cfg=-1"), (dict(temperature=-0.5), "temperature"),
                         (dict(top_k=0), "top_k"), (dict(top_p=1.5), "top_p")]:
        with pytest.raises(InputError, match=fragment):
            tiny_pipe.generate("a red circle", **kw)
    with pytest.raises(InputError, match="empty"):
        tiny_pipe.generate("  ")


# ------------------------------------------------------------------------------------------ understanding
def test_ask_stream_and_chat_agree(tiny_pipe, pics):
    answer = tiny_pipe.ask(pics[0], QUESTION, temperature=0, max_new_tokens=8)
    pieces = list(tiny_pipe.ask_stream(pics[0], QUESTION, temperature=0, max_new_tokens=8))
    assert answer and "".join(pieces) == answer and all(pieces)
    assert tiny_pipe.chat([{"role": "user", "content": QUESTION, "images": [pics[0]]}], temperature=0,
                          max_new_tokens=8) == answer
    assert "".join(tiny_pipe.chat_stream([{"role": "user", "content": QUESTION, "images": [pics[0]]}],
                                         temperature=0, max_new_tokens=8)) == answer
    assert tiny_pipe.ask([pics[0]], QUESTION, temperature=0, max_new_tokens=8) == answer  # a list of one
    # two images, and a second turn
    two = tiny_pipe.ask(pics, QUESTION, temperature=0, max_new_tokens=8)
    assert "".join(tiny_pipe.ask_stream(pics, QUESTION, temperature=0, max_new_tokens=8)) == two
    turns = [{"role": "user", "content": QUESTION, "images": [pics[0]]}, {"role": "assistant", "content": answer},
             {"role": "user", "content": "Describe the image."}]
    again = tiny_pipe.chat(turns, temperature=0, max_new_tokens=8)
    assert isinstance(again, str) and "".join(tiny_pipe.chat_stream(turns, temperature=0, max_new_tokens=8)) == again
    # sampled answers are reproducible with a seed
    a = tiny_pipe.ask(pics[0], QUESTION, temperature=1.0, seed=5, max_new_tokens=8)
    assert a == tiny_pipe.ask(pics[0], QUESTION, temperature=1.0, seed=5, max_new_tokens=8)
    assert "".join(tiny_pipe.ask_stream(pics[0], QUESTION, temperature=1.0, seed=5, max_new_tokens=8)) == a


def test_bad_messages(tiny_pipe, pics):
    with pytest.raises(InputError, match="empty"):
        tiny_pipe.ask(pics[0], " ")
    with pytest.raises(InputError, match="no messages"):
        tiny_pipe.chat([])
    with pytest.raises(InputError, match="last message"):
        tiny_pipe.chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    with pytest.raises(InputError, match="message 0"):
        tiny_pipe.chat([{"role": "system", "content": "hi"}])
    with pytest.raises(InputError, match="max_new_tokens"):
        tiny_pipe.ask(pics[0], QUESTION, max_new_tokens=0)


# ------------------------------------------------------------------------------------------ defaults
@pytest.fixture(scope="module")
def tuned(tiny_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tuned") / "model"
    shutil.copytree(tiny_dir, folder)
    (folder / "generation_defaults.json").write_text(json.dumps(
        {"cfg": 2.0, "temperature": 0.0, "max_new_tokens": 3, "system_prompt": "Answer in one word.",
         "validation_geneval": 0.5}))  # an unknown key (written by training) is ignored
    return zuoyou.load(folder, device="cpu")


def test_generation_defaults_from_the_folder(tiny_pipe, tuned, pics):
    d = tuned.defaults
    assert (d.cfg, d.temperature, d.max_new_tokens, d.system_prompt) == (2.0, 0.0, 3, "Answer in one word.")
    assert (tiny_pipe.defaults.cfg, tiny_pipe.defaults.temperature) == (5.0, 1.0)  # no file: the official ones
    # used when the caller passes nothing ...
    r = tuned.image_request("a red circle")
    assert (r.cfg, r.temperature) == (2.0, 0.0)
    img = tuned.generate("a red circle")
    assert same(img, tiny_pipe.generate("a red circle", cfg=2.0, temperature=0))
    assert same(img, tuned.generate("a red circle", seed=99))  # greedy by default
    # ... and explicit arguments override them
    assert same(tuned.generate("a red circle", cfg=5.0, temperature=0), tiny_pipe.generate("a red circle", temperature=0))
    assert not same(tuned.generate("a red circle", cfg=5.0), img)
    req = tuned.text_request([{"role": "user", "content": QUESTION}])
    assert (req.max_new_tokens, req.system) == (3, "Answer in one word.")
    assert tuned.text_request([{"role": "user", "content": QUESTION}], max_new_tokens=7).max_new_tokens == 7
    assert tuned.engine.processor.chat_prompt([Message("user", "hi")]).startswith("Answer in one word.\n\n")
    steps = list(tuned.engine.stream_tokens([req]))
    assert 1 <= len(steps) <= 3


def test_bad_defaults_file(tiny_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    (folder / "generation_defaults.json").write_text("{cfg: 2")
    with pytest.raises(ConfigError, match="generation_defaults.json"):
        zuoyou.load(folder, device="cpu")


# ------------------------------------------------------------------------------------------ merged batches
def test_merged_image_requests_keep_their_own_cfg(tiny_pipe):
    """Requests of different prompt lengths, n and CFG in one batch: each as if alone."""
    eng = tiny_pipe.engine
    reqs = [tiny_pipe.image_request("a red circle", n=1, cfg=1.5, temperature=0),
            tiny_pipe.image_request("a blue square left of a green cross", n=2, cfg=5.0, seed=4),
            tiny_pipe.image_request("a green cross", n=1, cfg=0.0, temperature=0.7, top_p=0.9, seed=8)]
    both = eng.generate_images(reqs)
    assert [len(x) for x in both] == [1, 2, 1]
    for r, got in zip(reqs, both):
        assert same(got, eng.generate_images([r])[0]), r


def test_merged_text_requests_match_single_ones(tiny_pipe, pics):
    """Conversations of different lengths (two images; multi-turn; no system prompt), answer lengths, samplers."""
    eng = tiny_pipe.engine
    r1 = TextRequest([Message("user", QUESTION, [pics[0], pics[1]])], max_new_tokens=8, temperature=0)
    r2 = TextRequest([Message("user", "How many objects are there?", [pics[1]]), Message("assistant", "two"),
                      Message("user", "Describe the image.")], max_new_tokens=5, temperature=0)
    r3 = TextRequest([Message("user", "hi")], max_new_tokens=6, temperature=0.8, seed=3, system="")  # ~200 fewer tokens
    alone = [eng.generate_text([r])[0] for r in (r1, r2, r3)]
    assert eng.generate_text([r1, r2]) == alone[:2]
    assert eng.generate_text([r2, r3, r1]) == [alone[1], alone[2], alone[0]]
    assert len(set(alone)) == 3


def test_load_puts_the_vq_in_channels_last_with_the_same_images(tiny_pipe):
    """``zuoyou.load`` converts the VQ's 4-d weights to channels-last one at a time (oneDNN's own layout,
    lower peak memory than converting the module at once); the decoded images do not change."""
    import copy

    import torch

    vq = tiny_pipe.engine.model.gen_vision_model
    four_d = [t for t in list(vq.parameters()) + list(vq.buffers()) if t.dim() == 4]
    assert four_d and all(t.is_contiguous(memory_format=torch.channels_last) for t in four_d)
    plain = copy.deepcopy(vq)
    for t in list(plain.parameters()) + list(plain.buffers()):
        t.data = t.data.contiguous()
    codes = torch.randint(0, vq.quantize.embedding.weight.shape[0], (2, tiny_pipe.engine.model.config.vq.num_tokens))
    with torch.no_grad():
        assert torch.allclose(vq.decode_code(codes), plain.decode_code(codes), atol=1e-5)


def test_a_float_model_takes_the_kernels_once_built_and_draws_the_same(monkeypatch):
    """On CPU, ``zuoyou.load`` runs a float model's RMSNorm, RoPE and one-token attention on zuoyou's kernels
    where they are built already, never building them for it; the bundled model then draws the same images and
    its self-check scores agree. In fp32, where the kernels keep PyTorch's sums exactly enough for the same images
    (in bf16 they sum in another order and round once: near-ties flip)."""
    import torch

    from zuoyou import api
    from zuoyou.fused import FusedRMSNorm
    from zuoyou.kernels import int4
    from zuoyou.kvcache import KernelKVCache

    if not int4.available():  # (builds them where they can be built)
        pytest.skip("zuoyou's kernels cannot be built here")
    fast = zuoyou.load(None, device="cpu", dtype="fp32")
    monkeypatch.setattr(api, "kernels_built", lambda: False)
    plain = zuoyou.load(None, device="cpu", dtype="fp32")
    for pipe, on in ((fast, True), (plain, False)):
        assert (pipe.engine._cache is KernelKVCache) == on
        assert any(isinstance(m, FusedRMSNorm) for m in pipe.engine.model.modules()) == on
    prompt = "a photo of a red circle left of a blue square"
    a, b = (p.generate(prompt, n=3, seed=11, best_of=1) for p in (fast, plain))
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    checks = fast.engine.checker(prompt)
    torch.testing.assert_close(fast.engine.check_scores(a, checks), plain.engine.check_scores(a, checks),
                               rtol=1e-4, atol=1e-4)


def test_the_bundled_model_computes_in_bf16_on_cpu_only_where_bf16_is_the_faster(monkeypatch, tmp_path):
    """Its ``generation_defaults.json`` says ``"cpu_dtype": "bf16"``: taken on CPU when the caller names no dtype
    and this CPU's bf16 matrix products beat fp32; a dtype the caller names, or a quantised mode, wins."""
    import shutil

    import torch

    from zuoyou import quantize
    from zuoyou.errors import ConfigError

    for faster, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(quantize, "cpu_bf16_gemm_faster", lambda f=faster: f)
        pipe = zuoyou.load(None, device="cpu")
        assert pipe.defaults.cpu_dtype == "bf16"
        assert pipe.engine.dtype == want and pipe.engine.model.gen_head.output_mlp_projector.weight.dtype == want
    monkeypatch.setattr(quantize, "cpu_bf16_gemm_faster", lambda: True)
    assert zuoyou.load(None, device="cpu", dtype="fp32").engine.dtype == torch.float32
    assert zuoyou.load(None, device="cpu", quantize="int8").engine.dtype == torch.float32  # the checkpoint's
    folder = tmp_path / "m"
    shutil.copytree(zuoyou.api.BUNDLED, folder)
    path = folder / "generation_defaults.json"
    path.write_text(path.read_text().replace('"cpu_dtype": "bf16"', '"cpu_dtype": "bf17"'))
    with pytest.raises(ConfigError, match="generation_defaults.json: cpu_dtype"):
        zuoyou.load(folder, device="cpu")
