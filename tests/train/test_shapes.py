"""The ShapesWorld recipe's data: multi-question dialogues, generation examples, the model's init."""

from __future__ import annotations

import random

import pytest
import torch

from zuoyou.config import get_config
from zuoyou.models.vq import VQModel
from zuoyou.processor import Message, Processor, to_pil
from zuoyou.tokenizer import train_tokenizer
from zuoyou.train.batch import collate
from zuoyou.train.recipes import RECIPES
from zuoyou.train.shapes import ShapesData, build_shapes_model, corpus, stages


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes_tok")
    train_tokenizer(corpus(n=300), vocab_size=512).save(str(folder / "tokenizer.json"))
    proc = Processor.from_folder(folder, num_image_tokens=64, image_size=64, system_prompt="")
    torch.manual_seed(0)
    return ShapesData(proc, VQModel(get_config("shapes").vq).eval(), questions=RECIPES["v2"].questions)


def test_understanding_dialogue_targets_are_the_answers(data):
    proc = data.processor
    ex = data.examples("und", 12, random.Random(0), stages(10)[1])
    assert {len(torch.tensor(e.loss_mask).nonzero()) > 0 for e in ex} == {True}
    turns = []
    for e in ex:
        assert e.image.shape == (3, 64, 64) and e.ids.count(proc.image_id) == 64
        targets = [i for i, m in zip(e.ids, e.loss_mask) if m]
        answers = proc.tokenizer.decode(targets, skip_special_tokens=False).split(proc.tokenizer.id_to_token(proc.eos))
        turns.append(len(answers) - 1)
        assert targets[-1] == proc.eos and all(a.startswith(" ") and a.strip() for a in answers[:-1])
        # the first turn is exactly the prompt inference builds for that question
        first_q = proc.tokenizer.decode(e.ids, skip_special_tokens=False).split("<|User|>: ")[1].split("\n\n")[0]
        question = first_q.split("<end_of_image>\n", 1)[1]
        want, _ = proc.understanding_inputs([Message("user", question, to_pil(e.image[None]))], system="")
        assert e.ids[:len(want)] == want and e.loss_from == len(want)
    assert set(turns) == {1, 2, 3}


def test_text_examples_give_the_scene_in_words(data):
    ex = data.examples("text", 4, random.Random(1), stages(10)[1])
    for e in ex:
        assert e.image is None and proc_text(data, e).startswith("<|User|>: Scene: ")


def proc_text(data, e):
    return data.processor.tokenizer.decode(e.ids[1:], skip_special_tokens=False)


def test_generation_examples_and_cfg_dropout(data):
    rng = random.Random(2)
    ex = data.examples("gen", 40, rng, stages(10)[0])
    proc = data.processor
    assert all(e.codes.shape == (64,) and e.ids[-1] == proc.image_start for e in ex)
    dropped = [e for e in ex if proc.pad in e.ids]
    assert 0 < len(dropped) < 15  # 10 % prompt dropout
    for e in dropped:
        assert e.ids == proc.uncond_ids(e.ids)
    b = collate(ex, proc)
    assert b.gen_codes.numel() == 40 * 64 and int((b.code_targets >= 0).sum()) == 40 * 64


def test_single_question_recipe_matches_the_inference_prompt(data):
    one = ShapesData(data.processor, data.vq)  # v1: one question per example
    ex = one.examples("und", 6, random.Random(3), stages(10)[2])
    eos = data.processor.eos
    assert all(sum(1 for i, m in zip(e.ids, e.loss_mask) if m and i == eos) == 1 for e in ex)
    assert stages(10, recipe=RECIPES["v1"])[2].mix == (5, 1, 4) and stages(10, recipe=RECIPES["v2"])[2].mix == (3, 1, 6)


def test_gen_embed_starts_from_the_codebook(data):
    vq = data.vq
    vocab = data.processor.tokenizer.get_vocab_size(with_added_tokens=True)
    model = build_shapes_model(None, vq, vocab, seed=0, embed_from_codebook=True)
    assert torch.equal(model.gen_embed.weight, vq.quantize.codebook())
    plain = build_shapes_model(None, vq, vocab, seed=0)
    assert plain.gen_embed.weight.std() < 0.05 and not torch.equal(plain.gen_embed.weight, vq.quantize.codebook())
    assert torch.equal(model.gen_vision_model.quantize.embedding.weight, vq.quantize.embedding.weight)


def test_wide_gen_embed_of_recipe_v4(data, tmp_path):
    """v4's gen_embed is 256 wide, drawn from N(0, 1); it is a config size (n_embed), so the model
    folder loads back through the ordinary loader."""
    from zuoyou.loading import load_model, save_model

    rec = RECIPES["v4"]
    vocab = data.processor.tokenizer.get_vocab_size(with_added_tokens=True)
    model = build_shapes_model(None, data.vq, vocab, seed=0, gen_embed_dim=rec.gen_embed_dim,
                               gen_embed_std=rec.gen_embed_std)
    assert model.gen_embed.weight.shape == (4096, 256) and 0.9 < model.gen_embed.weight.std() < 1.1
    assert model.gen_aligner.layers[0].weight.shape[1] == 256
    save_model(model, tmp_path)
    back, cfg = load_model(tmp_path, torch.device("cpu"))
    assert cfg.gen_embed_dim == 256 and torch.equal(back.gen_embed.weight, model.gen_embed.weight)
    # v1-v3 draw the numbers they were built with: the default init is untouched
    v3 = build_shapes_model(None, data.vq, vocab, seed=0)
    assert v3.gen_embed.weight.shape == (4096, 8) and v3.gen_embed.weight.std() < 0.05


def test_recipe_v5_adds_a_warm_restart_stage(data, monkeypatch):
    """v5 = v4's three stages, then stage3b: lr warmed up to 3e-4 and decayed, more GenEval-style prompts."""
    import zuoyou.train.shapes as recipe

    v4, v5 = stages(80, recipe=RECIPES["v4"]), stages(80, recipe=RECIPES["v5"])
    assert [s.name for s in v5] == ["stage1", "stage2", "stage3", "stage3b"] and len(v4) == 3
    assert [(s.minutes, s.lr, s.mix) for s in v5[:3]] == [(s.minutes, s.lr, s.mix) for s in v4]
    last = v5[3]
    assert (last.minutes, last.lr, last.warmup, last.decay, last.mix) == (70.0, 3e-4, 50, True, (3, 1, 6))
    assert last.lr_at(0, 0.0) < last.lr_at(49, 0.0) and last.lr_at(4000, 1.0) == pytest.approx(3e-4 * 0.02)
    # the share of GenEval-style prompts (vs captions of random scenes) follows the stage's option
    captions = []
    real = recipe.caption
    monkeypatch.setattr(recipe, "caption", lambda rng, scene: captions.append(1) or real(rng, scene))
    st = stages(10, recipe=RECIPES["v5"])[3]
    for share, want in ((1.0, 0), (0.0, 40), (0.7, None)):
        captions.clear()
        st.options["prompt_share"] = share
        data.examples("gen", 40, random.Random(0), st)
        assert len(captions) == want if want is not None else 4 <= len(captions) <= 22


def test_named_order_scenes_meet_the_first_named_object_first():
    import random

    from zuoyou.shapes import all_prompts, check, scene_for_prompt
    from zuoyou.train.shapes import CODE_PX, in_named_order

    rng = random.Random(0)
    for category in ("two_object", "color_attr"):
        for p in all_prompts(category)[:40]:
            scene = scene_for_prompt(rng, p)
            named = in_named_order(scene, p)
            assert check(p, named.objects)
            # places and sizes are the scene's; the first-named object is met first in raster order
            assert sorted((o.x0, o.y0, o.s, o.size) for o in named.objects) == sorted(
                (o.x0, o.y0, o.s, o.size) for o in scene.objects)
            a, b = named.objects
            assert (a.y0 // CODE_PX, a.x0) < (b.y0 // CODE_PX, b.x0)
            assert a.shape == p.objects[0][0] and b.shape == p.objects[1][0]
            if category == "color_attr":
                assert (a.color, b.color) == (p.objects[0][1], p.objects[1][1])


def test_named_order_applies_to_its_stages_only(monkeypatch):
    """Generation scenes of a stage with the option come in the named order; without it, in any order."""
    import random

    import zuoyou.train.shapes as ts
    from zuoyou.train.loop import Stage

    drawn = []
    monkeypatch.setattr(ts, "encode_scenes", lambda vq, scenes: drawn.extend(scenes) or [None] * len(scenes))
    monkeypatch.setattr(ts, "generation_example", lambda *a: None)
    prompt = ts.sample_prompt  # two_object and color_attr prompts only
    monkeypatch.setattr(ts, "sample_prompt", lambda rng, category=None: prompt(rng, rng.choice(ts.NAMED_ORDER)))
    data = ts.ShapesData(processor=None, vq=None)
    for named in (False, True):
        drawn.clear()
        options = {"prompt_share": 1.0, **({"named_order": True} if named else {})}
        data.examples("gen", 400, random.Random(3), Stage("s", lr=1e-3, options=options))
        assert len(drawn) == 400 and all(len(s.objects) == 2 for s in drawn)
        share = sum((a.y0 // ts.CODE_PX, a.x0) < (b.y0 // ts.CODE_PX, b.x0) for a, b in (s.objects for s in drawn)) / 400
        assert share == 1.0 if named else 0.4 < share < 0.6


def test_category_weights_set_the_share_of_each_prompt_category(monkeypatch):
    """A stage with ``category_weights`` draws its GenEval-style prompts' categories in those proportions."""
    import collections
    import random

    import zuoyou.train.shapes as ts
    from zuoyou.shapes import CATEGORIES, parse_prompt
    from zuoyou.train.loop import Stage

    monkeypatch.setattr(ts, "encode_scenes", lambda vq, scenes: [None] * len(scenes))
    monkeypatch.setattr(ts, "generation_example", lambda proc, text, codes, drop: text)
    data = ts.ShapesData(processor=None, vq=None)
    weights = (0, 1, 0, 0, 1, 2)
    texts = data.examples("gen", 4000, random.Random(5), Stage("s", lr=1e-3, options={
        "prompt_share": 1.0, "category_weights": weights}))
    counts = collections.Counter(parse_prompt(t).category for t in texts)
    for category, w in zip(CATEGORIES, weights):
        assert abs(counts[category] / 4000 - w / sum(weights)) < 0.03, (category, counts)


def test_crowded_share_replaces_that_share_of_understanding_examples(data, monkeypatch):
    """A stage with ``crowded_share`` makes that share of its understanding examples crowded scenes' counts;
    without it, the data stream is the one recipes before v19 were trained on."""
    import random

    from zuoyou.train.loop import Stage

    monkeypatch.setattr(ShapesData, "_dialogue", lambda self, qas, image, prefix="": qas)
    plain = data.examples("und", 300, random.Random(2), Stage("s", lr=1e-3))
    assert plain == data.examples("und", 300, random.Random(2), Stage("s", lr=1e-3, options={"crowded_share": 0.0}))
    mixed = data.examples("und", 300, random.Random(2), Stage("s", lr=1e-3, options={"crowded_share": 0.25}))
    past_four = sum(any(a in ("five", "six") for _, a in qas) for qas in mixed)
    assert 0.15 < past_four / 300 < 0.35 and not any(a in ("five", "six") for qas in plain for _, a in qas)


def test_own_share_reads_the_stage_pool_of_the_models_judged_drawings(data, monkeypatch):
    """A stage with ``own_share`` draws its pool once (``own_pool`` drawings, seeded by the stage's name) and makes
    that share of its understanding examples those drawings, asked what the judge found in them."""
    import random

    from zuoyou.shapes import NUMBERS, sample_scene
    from zuoyou.train.loop import Stage
    from zuoyou.train.vq import scenes_to_tensor

    rng = random.Random(0)
    scenes = [sample_scene(rng) for _ in range(8)]
    pool = [(img, list(s.objects)) for img, s in zip(scenes_to_tensor(scenes), scenes)]
    calls = []
    monkeypatch.setattr(ShapesData, "_dialogue", lambda self, qas, image, prefix="": (qas, image))
    own = ShapesData(data.processor, data.vq, draw=lambda n, seed: calls.append((n, seed)) or pool)
    stage = Stage("s3", lr=1e-3, options={"own_share": 0.5, "own_pool": 8})
    out = own.examples("und", 200, random.Random(2), stage) + own.examples("und", 200, random.Random(3), stage)
    assert len(calls) == 1 and calls[0][0] == 8
    taken = [next((k for k, (img, _) in enumerate(pool) if torch.equal(img, image)), None) for _, image in out]
    assert 0.4 < sum(k is not None for k in taken) / 400 < 0.6
    for (qas, _), k in zip(out, taken):
        if k is not None:
            objs = pool[k][1]
            for q, a in qas:
                if q == "How many objects are there?":
                    assert a == NUMBERS[len(objs)]
    other = Stage("s4", lr=1e-3, options={"own_share": 0.5, "own_pool": 8})
    own.examples("und", 10, random.Random(4), other)
    assert len(calls) == 2 and calls[1][1] != calls[0][1]
    with pytest.raises(ValueError, match="no draw"):
        data.examples("und", 10, random.Random(4), other)
