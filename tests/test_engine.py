"""Engine behaviour on the tiny random model: progressive previews, seeds, greedy batches, compile flag.

The tiny model draws 16x16 images from an 8x8 grid of codes (64 decode steps).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import zuoyou.api
from zuoyou.errors import ConfigError, InputError
from zuoyou.kernels import int4 as int4_kernel
from zuoyou.quantize import Int4Linear


def pixels(images):
    return [np.asarray(im) for im in images]


def same(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(pixels(a), pixels(b)))


def capture_codes(pipe, monkeypatch):
    """Record the codes of every ``decode_images`` call (previews and the final one)."""
    calls = []
    model = pipe.engine.model
    orig = model.decode_images
    monkeypatch.setattr(model, "decode_images", lambda c, chunk=None: calls.append(c.clone()) or orig(c, chunk))
    return calls


def greedy_codes(pipe, monkeypatch, prompt: str = "a red circle") -> torch.Tensor:
    """The (2, T) codes of a greedy two-image request."""
    calls = capture_codes(pipe, monkeypatch)
    pipe.generate(prompt, n=2, temperature=0)
    monkeypatch.undo()
    return calls[-1]


@pytest.mark.parametrize("every", [1, 2, 3])
def test_preview(tiny_pipe, monkeypatch, every):
    """``preview(rows_done, images)`` every ``every`` code rows while drawing, never for the finished grid
    (the result itself is the complete image; the server relies on rows_done < grid). Each preview
    is exactly the final codes' first ``rows_done`` rows, decoded with the undrawn rows set to the
    placeholder code (the first code)."""
    grid = tiny_pipe.config.vq.grid
    engine = tiny_pipe.engine
    seen = []
    codes = capture_codes(tiny_pipe, monkeypatch)
    images = tiny_pipe.generate("a red circle", n=2, seed=7, preview=lambda r, imgs: seen.append((r, imgs)),
                                preview_every=every)
    monkeypatch.undo()
    rows = [r for r, _ in seen]
    assert rows == list(range(every, grid, every))  # rows_done < grid: (grid - 1) // every calls
    assert len(seen) == (grid - 1) // every
    final = codes[-1]
    assert final.shape == (2, grid * grid) and len(codes) == len(seen) + 1
    for (r, imgs), c in zip(seen, codes):
        assert len(imgs) == 2 and imgs[0].size == images[0].size
        # the codes drawn so far are the final ones; the rest is the placeholder
        assert torch.equal(c[:, : r * grid], final[:, : r * grid])
        assert (c[:, r * grid:] == final[:, :1]).all()
        placeholder = final.clone()
        placeholder[:, r * grid:] = final[:, :1]
        assert same(imgs, engine._decode(placeholder))
    # the final image is the last codes with no placeholder row left. (Pixels of a preview differ
    # from the final image's everywhere, a little: the VQ decoder's mid block attends globally.)
    assert same(images, engine._decode(final, upto=grid * grid))
    # a preview callback does not change the result
    assert same(images, tiny_pipe.generate("a red circle", n=2, seed=7))


def test_no_preview_without_every(tiny_pipe):
    calls = []
    tiny_pipe.generate("a red circle", seed=1, preview=lambda r, imgs: calls.append(r), preview_every=0)
    assert calls == []


def test_same_seed_same_images(tiny_pipe):
    a = tiny_pipe.generate("a blue square left of a green cross", n=2, seed=3, temperature=1.0)
    b = tiny_pipe.generate("a blue square left of a green cross", n=2, seed=3, temperature=1.0)
    assert same(a, b)
    assert not np.array_equal(*pixels(a))  # two samples of one batch differ
    c = tiny_pipe.generate("a blue square left of a green cross", n=2, seed=4, temperature=1.0)
    assert not same(a, c)


def test_greedy_is_the_same_image_for_every_n(tiny_pipe):
    one = tiny_pipe.generate("a red circle", n=1, temperature=0)
    three = tiny_pipe.generate("a red circle", n=3, temperature=0, seed=5)
    assert all(np.array_equal(pixels(one)[0], p) for p in pixels(three))


def test_batched_requests_match_single_ones(tiny_pipe):
    """Two requests of different prompt lengths in one decode batch (left padding) give each the
    images it gets alone with the same seed."""
    engine = tiny_pipe.engine
    r1 = tiny_pipe.image_request("a red circle", n=2, seed=11)
    r2 = tiny_pipe.image_request("a blue square left of a green cross", n=1, seed=12, temperature=0)
    both = engine.generate_images([r1, r2])
    assert same(both[0], engine.generate_images([r1])[0]) and same(both[1], engine.generate_images([r2])[0])


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_decode_step_gives_the_same_images(tiny_dir):
    """``compile=True`` (torch.compile of the decode step): same greedy images and answer. ~20-60 s."""
    eager = zuoyou.api.load(tiny_dir, device="cpu")
    compiled = zuoyou.api.load(tiny_dir, device="cpu", compile=True)
    a, b = eager.generate("a red circle", n=2, temperature=0), compiled.generate("a red circle", n=2, temperature=0)
    assert same(a, b)
    assert eager.ask(a[0], "What color?", max_new_tokens=4) == compiled.ask(a[0], "What color?", max_new_tokens=4)
    with pytest.raises(ConfigError):
        zuoyou.api.load(tiny_dir, device="cpu", compile="fast")


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_autotuned_int8_decode_step(tiny_dir, monkeypatch):
    """``compile="max-autotune"`` (frozen weights, inductor's GEMM templates) on the int8 model: the
    autotuned kernels may round differently, so greedy codes agree with eager's, nearly all, and a
    second request of another shape runs too. ~30-90 s."""
    eager = zuoyou.api.load(tiny_dir, device="cpu", quantize="int8")
    tuned = zuoyou.api.load(tiny_dir, device="cpu", quantize="int8", compile="max-autotune")
    codes = [greedy_codes(pipe, monkeypatch) for pipe in (eager, tuned)]
    assert (codes[0] == codes[1]).float().mean() >= 0.9
    assert len(tuned.generate("a blue square left of a green cross", n=1, seed=0)) == 1


@pytest.mark.skipif(not int4_kernel.available(), reason="no AVX-512 VNNI or no C++ compiler")
def test_compiled_int4_decode_step_with_the_vnni_kernel(tiny_dir, monkeypatch):
    """int4 on the VNNI kernel, eager and compiled (the kernel as a custom op inside the graph):
    the same greedy codes. ~20-60 s."""
    eager = zuoyou.api.load(tiny_dir, device="cpu", quantize="int4")
    kernels = {m.kernel for m in eager.engine.model.modules() if isinstance(m, Int4Linear)}
    assert kernels == {"vnni"}
    compiled = zuoyou.api.load(tiny_dir, device="cpu", quantize="int4", compile=True)
    codes = [greedy_codes(pipe, monkeypatch) for pipe in (eager, compiled)]
    assert torch.equal(codes[0], codes[1])


@pytest.mark.skipif(not int4_kernel.available(), reason="no AVX-512 VNNI or no C++ compiler")
def test_compiled_decode_step_reads_the_int8_cache_on_its_kernel(tiny_dir, monkeypatch):
    """int4 weights + the int8 KV cache, compiled: the cache's one-token attention stays on its kernel
    (a custom op inside the graph, writing the cache in place) and draws what eager draws. ~20-60 s."""
    module = int4_kernel._module()
    calls = []

    class Counting:  # the extension, counting its kv8_attend calls
        def __getattr__(self, name):
            fn = getattr(module, name)
            if name != "kv8_attend":
                return fn
            return lambda *a: calls.append(1) or fn(*a)

    eager = zuoyou.api.load(tiny_dir, device="cpu", quantize="int4", kv_cache="int8")
    compiled = zuoyou.api.load(tiny_dir, device="cpu", quantize="int4", kv_cache="int8", compile=True)
    codes = []
    for pipe in (eager, compiled):
        monkeypatch.setattr(int4_kernel, "_module", lambda: Counting())
        calls.clear()
        codes.append(greedy_codes(pipe, monkeypatch))
        assert len(calls) > 0
    assert torch.equal(codes[0], codes[1])


def test_vq_decode_chunks_hold_about_one_janus_image(tiny_pipe, monkeypatch):
    engine = tiny_pipe.engine
    assert engine.decode_chunk == (384 * 384) // 16 ** 2  # tiny: 16 px images
    monkeypatch.setattr(engine.model.config.vq, "image_size", 384)
    assert engine.decode_chunk == 1  # Janus: one 384 x 384 image per decoder call
    monkeypatch.setattr(engine.model.config.vq, "image_size", 64)
    assert engine.decode_chunk == 36  # the bundled ShapesWorld model


def test_answer_logprobs_are_the_trained_targets_under_padding(tiny_pipe):
    """``answer_logprobs`` scores exactly the tokens training puts after a question (`` {answer}<eos>``,
    ``zuoyou.train.batch.conversation``), and a batch of different prompt lengths (left padding) gives
    each row what an unpadded forward pass of that row alone gives."""
    from zuoyou.processor import Message
    from zuoyou.train.batch import conversation

    engine, proc, model = tiny_pipe.engine, tiny_pipe.engine.processor, tiny_pipe.engine.model
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    cases = [("How many objects are there?", "two"), ("Describe the image.", "a small red circle and a blue square")]
    reqs = [tiny_pipe.text_request([{"role": "user", "content": q, "images": [img]}]) for q, _ in cases]
    got = engine.answer_logprobs(reqs, [a for _, a in cases])
    for (q, a), r, lp in zip(cases, reqs, got):
        ids, mask = conversation(proc, [Message("user", q, [img]), Message("assistant", a)], r.system)
        prompt, px = proc.understanding_inputs(r.messages, r.system)
        assert ids[:len(prompt)] == prompt and not any(mask[:len(prompt)]) and all(mask[len(prompt):])
        t = torch.tensor([ids])
        with torch.inference_mode():
            x = model.prepare_inputs_embeds(t, px, t == proc.image_id)
            logp = model.text_logits(model.hidden(x)).float().log_softmax(-1)[0]  # (T, V)
        want = sum(logp[i - 1, ids[i]].item() for i in range(len(prompt), len(ids)))
        assert lp == pytest.approx(want, abs=1e-4)
    assert got == pytest.approx([engine.answer_logprobs([r], [a])[0] for r, (_, a) in zip(reqs, cases)], abs=1e-4)


def test_best_of_keeps_the_candidates_the_model_rates_best(tiny_pipe, monkeypatch):
    """``best_of=K``: the n*K candidates are the images an n*K request draws with the same seed; the n
    images kept are, of all n*K, the ones with the highest summed log P(expected answer), best first (the
    random tiny model passes no check, so no candidate is preferred for passing); previews show candidates
    0, K, ... Prompts the check cannot read are drawn once."""
    engine = tiny_pipe.engine
    checks = [("How many objects are there?", "two"), ("What color is the circle?", "red")]
    monkeypatch.setattr(engine, "checker", lambda prompt: checks if "circle" in prompt else [])
    cands = tiny_pipe.generate("a red circle", n=6, seed=5, temperature=1.0)
    seen = []
    kept = tiny_pipe.generate("a red circle", n=2, seed=5, temperature=1.0, best_of=3,
                              preview=lambda r, imgs: seen.append(imgs), preview_every=4)
    scores = [sum(engine.answer_logprobs([tiny_pipe.text_request([{"role": "user", "content": q, "images": [c]}])],
                                         [a])[0] for q, a in checks) for c in cands]
    best = sorted(range(6), key=scores.__getitem__, reverse=True)[:2]
    assert same(kept, [cands[j] for j in best])
    assert seen and all(len(imgs) == 2 for imgs in seen)
    plain = tiny_pipe.generate("a blue square", n=2, seed=5)
    assert same(tiny_pipe.generate("a blue square", n=2, seed=5, best_of=3), plain)


def test_best_of_prefers_passing_candidates_from_the_whole_pool(tiny_pipe, monkeypatch):
    """A candidate passes when every expected answer has P >= 1/2; every passing candidate is kept before any
    failing one, however high the failing one's sum, wherever in the pool it was drawn: both passing candidates
    here are among the first three, so keeping the best of each run of K = 3 would have kept a failing one."""
    from zuoyou.engine import _best

    engine = tiny_pipe.engine
    logp = torch.tensor([[-0.01, -0.8], [-0.6, -0.6], [-0.5, -0.65],  # 2 pass (b, c)
                         [-0.01, -5.0], [-2.0, -2.0], [-0.9, -0.1]])  # none passes
    monkeypatch.setattr(engine, "check_scores", lambda images, checks: logp[:len(images)])
    ranked = engine._ranked(list("abcdef"), [("q1", "a1"), ("q2", "a2")])
    assert [ok for ok, _, _ in ranked] == [False, True, True, False, False, False]
    assert ranked[2][1] == pytest.approx(-1.15)
    assert [im for _, _, im in _best(ranked, 2)] == ["c", "b"]
    assert [im for _, _, im in _best(ranked, 4)] == ["c", "b", "a", "f"]  # then the failing ones by their sums


def test_redraws_keep_the_best_of_every_round(tiny_pipe, monkeypatch):
    """``redraws=R``, one image: while the kept candidate fails, K more are drawn per round, each round seeded
    ``_round_seed(seed, round)``; the image kept is the best of all its candidates. An image that passes is
    not drawn again."""
    from zuoyou import engine as engine_mod

    engine = tiny_pipe.engine
    checks = [("How many objects are there?", "two"), ("What color is the circle?", "red")]
    monkeypatch.setattr(engine, "checker", lambda prompt: checks)
    kw = dict(temperature=1.0, best_of=2)
    rounds = [tiny_pipe.generate("a red circle", n=2, seed=engine_mod._round_seed(5, r), temperature=1.0)
              for r in range(3)]
    cands = [c for rnd in rounds for c in rnd]
    score = engine.check_scores(cands, checks).sum(-1)
    assert (engine.check_scores(cands, checks) < engine_mod.PASS_LOGP).all()  # the random model fails every check
    draws = []
    real = engine._draw
    monkeypatch.setattr(engine, "_draw", lambda reqs, *a: draws.append([r.n for r in reqs]) or real(reqs, *a))
    before = engine.rounds_drawn
    kept = tiny_pipe.generate("a red circle", n=1, seed=5, redraws=2, **kw)
    assert draws == [[2], [2], [2]] and engine.rounds_drawn - before == 3
    assert same(kept, [cands[int(score.argmax())]])
    draws.clear()  # everything passes: no second round, the same image as without redraws
    monkeypatch.setattr(engine_mod, "PASS_LOGP", float("-inf"))
    assert same(tiny_pipe.generate("a red circle", n=1, seed=5, redraws=2, **kw),
                tiny_pipe.generate("a red circle", n=1, seed=5, redraws=0, **kw))
    assert draws == [[2], [2]]


def test_redraws_draw_again_only_for_the_images_that_fail(tiny_pipe, monkeypatch):
    """n=2, K=2: one of the first round's 4 candidates passes, so one image fails and the second round draws
    2 candidates (1 * K, seeded ``_round_seed(seed, 1)``); one of them passes, and the two passing ones are kept."""
    from zuoyou import engine as engine_mod

    engine = tiny_pipe.engine
    monkeypatch.setattr(engine, "checker", lambda prompt: [("How many objects are there?", "two")])
    first = tiny_pipe.generate("a red circle", n=4, seed=5, temperature=1.0)
    second = tiny_pipe.generate("a red circle", n=2, seed=engine_mod._round_seed(5, 1), temperature=1.0)
    verdicts = iter([[-3.0], [-0.1], [-2.0], [-1.0], [-5.0], [-0.3]])  # candidates in the order they are checked
    monkeypatch.setattr(engine, "check_scores",
                        lambda images, checks: torch.tensor([next(verdicts) for _ in images]))
    draws = []
    real = engine._draw
    monkeypatch.setattr(engine, "_draw", lambda reqs, *a: draws.append([r.n for r in reqs]) or real(reqs, *a))
    kept = tiny_pipe.generate("a red circle", n=2, seed=5, temperature=1.0, best_of=2, redraws=2)
    assert draws == [[4], [2]]
    assert same(kept, [first[1], second[1]])


def test_best_of_errors(tiny_pipe, monkeypatch):
    with pytest.raises(InputError, match="best_of=0"):
        tiny_pipe.generate("a red circle", best_of=0)
    with pytest.raises(InputError, match="best_of=17"):
        tiny_pipe.generate("a red circle", best_of=17)
    for bad in (-1, 9, 1.5):
        with pytest.raises(InputError, match=f"redraws={bad}"):
            tiny_pipe.generate("a red circle", best_of=2, redraws=bad)
    monkeypatch.setattr(tiny_pipe.engine, "checker", None)
    with pytest.raises(InputError, match="self-check"):
        tiny_pipe.generate("a red circle", best_of=2)
