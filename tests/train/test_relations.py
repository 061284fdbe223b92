"""The relations curriculum (``zuoyou.train.relations``, recipes v25 and v26): its questions, ``keep_places``, the
stages that ask them, the training-only place heads, ``train(on_stage_start=...)`` and ``seed_from_model``."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch

from zuoyou.config import get_config
from zuoyou.errors import CheckpointError
from zuoyou.models.janus import build
from zuoyou.shapes import answer_question, sample_scene
from zuoyou.train.loop import Stage, train
from zuoyou.train.recipes import RECIPES
from zuoyou.train.batch import collate, loss_fn
from zuoyou.train.relations import (FURTHER, SIDES, PlaceHeads, keep_places, linear_read_r2, named_objects,
                                    relation_question, relation_questions)
from zuoyou.train.shapes import ShapesData, stages


def _named(scene, color, shape):
    (o,) = [o for o in scene.objects if (o.color, o.shape) == (color, shape)]
    return o


@pytest.mark.parametrize("kind", ["side", "sign", "relation"])
def test_questions_are_answered_by_the_scene_and_yes_about_half_the_time(kind):
    rng, yes, n = random.Random(0), 0, 0
    while n < 600:
        scene = sample_scene(rng)
        qa = relation_question(rng, scene, kind)
        if qa is None:  # no object (pair) that a question can name
            continue
        q, a = qa
        n, yes = n + 1, yes + (a == "yes")
        words = q[:-1].split()
        if kind == "side":  # Is the C S on the SIDE half?
            assert a == ("yes" if SIDES[words[6]](_named(scene, words[2], words[3])) else "no")
        elif kind == "sign":  # Is the C S <further left than | higher than | ...> the C S?
            rel = " ".join(words[4:-3])
            a_, b_ = _named(scene, words[2], words[3]), _named(scene, words[-2], words[-1])
            assert a == ("yes" if FURTHER[rel](a_, b_) else "no")
        else:
            assert answer_question(q, scene) == ("relation", a)
    assert 0.4 < yes / n < 0.6


def test_relation_questions_draw_kinds_by_weight_and_skip_what_does_not_apply():
    rng = random.Random(1)
    qs = [q for _ in range(300) for q, _ in relation_questions(rng, sample_scene(rng), {"side": 1, "sign": 3}, 2)]
    side = sum(" half?" in q for q in qs)
    assert 0.15 < side / len(qs) < 0.4 and len(qs) < 600  # single-object scenes have no sign question
    with pytest.raises(ValueError, match="unknown relation question kind"):
        relation_question(rng, sample_scene(random.Random(2), n=2), "where")


def test_linear_read_r2_is_one_for_a_linear_target_and_about_zero_for_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 8, generator=g)
    y = torch.stack([x @ torch.arange(8.0), torch.randn(2000, generator=g)], 1)
    exact, noise = linear_read_r2(x, y)
    assert exact > 0.999 and abs(noise) < 0.02


def test_keep_places_makes_every_token_carry_its_place_and_keeps_the_features_close():
    runs = []
    for keep_weight in (1.0, 0.0):
        torch.manual_seed(0)
        model = build(get_config("shapes"), device="cpu")
        with torch.no_grad():  # as in the trained encoder: position embeddings far below the patch embeddings
            model.vision_model.vision_tower.pos_embed.normal_(0, 0.02)
        runs.append(keep_places(model, steps=60, batch_size=4, lr=3e-3, keep_weight=keep_weight, log=lambda *a: None))
        assert not model.vision_model.training and not model.aligner.training
    kept, free = runs
    assert max(kept["r2_before"]) < 0.2 and min(kept["r2_after"]) > 0.6, kept
    # without the distillation term the features drift far more for the same place loss
    assert kept["relative_change"] < 0.6 * free["relative_change"], (kept, free)


def test_recipe_v25_is_v24_with_three_curriculum_stages_after_its_restarts():
    v24, v25 = RECIPES["v24"], RECIPES["v25"]
    names = ("stage3n", "stage3o", "stage3p")
    assert v25 == dataclasses.replace(
        v24, relation_stages=v25.relation_stages, place_steps=400, named_order=v24.named_order + names,
        weighted=v24.weighted + names)
    a, b = stages(80, recipe=v24), stages(80, recipe=v25)
    assert b[:len(a)] == a and [s.name for s in b[len(a):]] == list(names)
    n, o, p = b[len(a):]
    assert [s.options["relations"] for s in (n, o, p)] == [{"side": 1}, {"side": 1, "sign": 2},
                                                           {"side": 1, "sign": 1, "relation": 2}]
    assert n.options["keep_places"] == 400 and "keep_places" not in o.options | p.options
    assert (n.decay, o.decay, p.decay) == (False, False, True) and {s.lr for s in (n, o, p)} == {3e-4}
    assert all(s.options["named_order"] and s.mix == (6, 0, 4) for s in (n, o, p))
    assert all(not r.relation_stages and not r.place_steps for k, r in RECIPES.items() if k not in ("v25", "v26", "v27"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from zuoyou.models.vq import VQModel
    from zuoyou.processor import Processor
    from zuoyou.tokenizer import train_tokenizer
    from zuoyou.train.shapes import corpus

    folder = tmp_path_factory.mktemp("relations_tok")
    train_tokenizer(corpus(n=300), vocab_size=512).save(str(folder / "tokenizer.json"))
    proc = Processor.from_folder(folder, num_image_tokens=64, image_size=64, system_prompt="")
    return ShapesData(proc, VQModel(get_config("shapes").vq).eval(), questions=(1, 2))


def test_a_curriculum_stage_asks_that_share_of_images_its_questions(data, monkeypatch):
    monkeypatch.setattr(ShapesData, "_dialogue", lambda self, qas, image, prefix="": qas)
    plain = data.examples("und", 300, random.Random(2), Stage("s", lr=1e-3))
    assert not any(" half?" in q for qas in plain for q, _ in qas)
    st = Stage("s", lr=1e-3, options={"relations": {"side": 1}, "relation_share": 0.5, "relation_questions": 3})
    out = data.examples("und", 300, random.Random(2), st)
    side = [qas for qas in out if all(" half?" in q for q, _ in qas)]
    assert 0.4 < len(side) / 300 < 0.6 and all(len(qas) == 3 for qas in side)


def test_on_stage_start_runs_before_each_fresh_stage_not_on_resume(tiny_dir, tmp_path):
    from zuoyou.loading import load_model
    from zuoyou.processor import Processor

    from test_loop import RandomCodes

    model, cfg = load_model(tiny_dir, torch.device("cpu"))
    proc = Processor.from_folder(tiny_dir, num_image_tokens=cfg.vision.num_patches, image_size=cfg.vision.image_size)
    data = RandomCodes(proc, cfg.image_token_size, proc.num_image_tokens)
    plan = [Stage("a", lr=1e-3, steps=2, mix=(0, 1, 1), batch_size=2), Stage("b", lr=1e-3, steps=2, mix=(0, 1, 1), batch_size=2)]
    seen = []
    kw = dict(seed=0, autocast=False, progress=False, threads=None, log=lambda *a: None, checkpoint_steps=1,
              on_stage_start=lambda st: seen.append(st.name))
    train(model, plan, data, tmp_path, max_steps=3, **kw)  # stops inside stage b, checkpointed
    assert seen == ["a", "b"]
    train(model, plan, data, tmp_path, **kw)  # resumes inside b: its start is behind it
    assert seen == ["a", "b"]


def test_seed_from_model_starts_a_run_after_the_stages_the_model_went_through(tmp_path):
    from zuoyou.loading import save_model
    from zuoyou.tokenizer import train_tokenizer
    from zuoyou.train.checkpoint import load_checkpoint
    from zuoyou.train.shapes import corpus, seed_from_model

    torch.manual_seed(0)
    model = build(get_config("shapes"), device="cpu")
    folder = tmp_path / "model"
    save_model(model, folder)
    train_tokenizer(corpus(n=200), vocab_size=512).save(str(folder / "tokenizer.json"))
    done = [s.name for s in stages(80, recipe=RECIPES["v24"])]
    report = {"recipe": "v24", "vq_parse_rate": 0.99, "training": {"stages": [{"stage": s} for s in done], "seed": 1}}
    (folder / "training_report.json").write_text(json.dumps(report))
    seed_from_model(tmp_path / "run", folder, "v25", log=lambda *a: None)
    seed_from_model(tmp_path / "run26", folder, "v26", log=lambda *a: None)  # its checkpoints hold the place heads
    PlaceHeads.attach(with_heads := build(get_config("shapes"), device="cpu"))
    assert load_checkpoint(tmp_path / "run26" / "checkpoint", with_heads)["stage"] == len(done)
    other = build(get_config("shapes"), device="cpu")
    state = load_checkpoint(tmp_path / "run" / "checkpoint", other)
    assert state["stage"] == len(done) and state["step"] == 0
    assert torch.equal(other.language_model.lm_head.weight, model.language_model.lm_head.weight)
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    assert rep["vq_done"] and rep["encoder_done"] and rep["decoder_done"] and rep["vq_parse_rate"] == 0.99
    assert (tmp_path / "run" / "tokenizer.json").is_file()
    report["training"]["stages"][3]["stage"] = "elsewhere"
    (folder / "training_report.json").write_text(json.dumps(report))
    with pytest.raises(CheckpointError, match="recipe v25 starts with"):
        seed_from_model(tmp_path / "run2", folder, "v25", log=lambda *a: None)


def test_recipe_v26_is_v24_with_two_place_head_stages_after_its_restarts():
    v24, v26 = RECIPES["v24"], RECIPES["v26"]
    a, b = stages(80, recipe=v24), stages(80, recipe=v26)
    assert b[:len(a)] == a and [s.name for s in b[len(a):]] == ["stage3n", "stage3o"]
    n, o = b[len(a):]
    assert n.options["keep_places"] == 400 and "keep_places" not in o.options
    assert all(s.options["place_aux"] and s.options["relation_questions"] == 2 and s.mix == (6, 0, 4) for s in (n, o))
    assert all(s.frozen == ("gen_vision_model.", "vision_model.") for s in (n, o)) and (n.decay, o.decay) == (False, True)
    assert all(not s.options.get("place_aux") for s in a)
    assert [k for k, r in RECIPES.items() if r.place_aux] == ["v26", "v27"]


def test_recipe_v27_is_v26_and_one_more_stage_that_also_reads_crowded_scenes_and_its_own_drawings():
    a, b = stages(80, recipe=RECIPES["v26"]), stages(80, recipe=RECIPES["v27"])
    assert b[:len(a)] == a and b[-1].name == "stage3p" and b[-1].decay
    assert b[-1].options["place_aux"] and b[-1].options["own_share"] == 0.2 and b[-1].options["crowded_share"] == 0.1
    assert b[-1].options["relations"] == a[-1].options["relations"]


def test_place_targets_point_at_the_named_objects_shape_words_and_at_the_answer(data):
    st = Stage("s", lr=1e-3, options={"relations": {"side": 1, "sign": 1, "relation": 1}, "relation_share": 0.7,
                                      "relation_questions": 2, "place_aux": True})
    out = data.examples("und", 120, random.Random(3), st)
    tok = data.processor.tokenizer
    n_places = n_pairs = 0
    for e in out:
        words = [tok.id_to_token(e.ids[p]).lstrip("Ġ") for p, _, _ in e.places]
        assert set(words) <= {"circle", "square", "triangle", "cross"}
        assert all(-1 <= x < 1 and -1 <= y < 1 for _, x, y in e.places)
        for pos, *xy in e.pairs:  # the position predicts the answer's first token, after the question's words
            assert not e.loss_mask[pos] and e.loss_mask[pos + 1]
            before = [(x, y) for p, x, y in e.places if p < pos]
            assert [tuple(xy[:2]), tuple(xy[2:])] == before[-2:]
        n_places, n_pairs = n_places + len(e.places), n_pairs + len(e.pairs)
    assert n_places > 100 and n_pairs > 40
    plain = data.examples("und", 40, random.Random(3), Stage("s", lr=1e-3))
    assert all(e.places is None and e.pairs is None for e in plain)


def test_named_objects_are_the_unique_colour_shape_pairs_in_the_order_named():
    scene = next(s for s in (sample_scene(random.Random(i), n=4) for i in range(100))
                 if len({(o.color, o.shape) for o in s.objects}) == 4)
    a, b = scene.objects[2], scene.objects[0]
    assert named_objects(f"Is the {a.color} {a.shape} left of the {b.color} {b.shape}?", scene) == [a, b]
    assert named_objects(f"What color is the {a.shape}?", scene) == []


def test_place_heads_teach_the_lm_to_read_places_and_leave_no_trace_in_the_model(data):
    torch.manual_seed(0)
    cfg = get_config("shapes")
    cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, vocab_size=data.processor.tokenizer.get_vocab_size()))
    model = build(cfg, device="cpu")
    keys = set(model.state_dict())
    heads = PlaceHeads.attach(model)
    assert {k for k in model.state_dict() if k not in keys} == {f"place_heads.{h}.{p}" for h in ("at_word", "at_answer")
                                                                for p in ("weight", "bias")}
    st = Stage("s", lr=1e-3, options={"relations": {"sign": 1}, "relation_share": 1.0, "relation_questions": 1,
                                      "place_aux": True})
    batch = collate(data.examples("und", 8, random.Random(4), st), data.processor)
    model.train()
    loss, stats = loss_fn(model, batch)  # the unified loss carries the place loss while the heads are attached
    assert set(stats) == {"text", "places"} and abs(loss.item() - stats["text"] - stats["places"]) < 1e-4
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if n.startswith(("language_model.model.layers.",
                                                                                       "place_heads."))], lr=1e-3)
    losses = []
    for _ in range(30):  # the place loss alone, on one small batch: the LM learns to carry the places
        model.hidden(model.prepare_inputs_embeds(batch.ids, batch.pixels, batch.und_mask))
        place = heads.loss(batch.places, batch.pairs)
        losses.append(place.item())
        opt.zero_grad()
        place.backward()
        opt.step()
    assert losses[-1] < 0.5 * losses[0], losses
    lm = model.language_model.model.layers
    assert lm[0].mlp.down_proj.weight.grad.abs().sum() > 0  # the lookup is learned in the LM, not in the heads alone
    with torch.no_grad():  # evaluations (no grad) keep nothing and add no place loss
        assert "places" not in loss_fn(model, batch)[1] and not heads._acts
    PlaceHeads.detach(model)
    assert set(model.state_dict()) == keys and not any(layer._forward_hooks for layer in lm)
