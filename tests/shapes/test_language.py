"""ShapesWorld language: prompts and the "exactly" rule, captions, questions, descriptions."""

import collections
import dataclasses
import random
import re

import pytest

from zuoyou.shapes.judge import parse_image
from zuoyou.shapes.language import (CATEGORIES, NUMBERS, QUESTION_TYPES, all_prompts,
                                    answer_question, answers_match, caption, check,
                                    describe, parse_description, parse_prompt, plural, question,
                                    sample_prompt, sample_question, scene_for_prompt)
from zuoyou.shapes.world import COLORS, SHAPES, Obj, Scene, relations, render, sample_scene


def O(shape, color="red", x=10, y=10, size="small", s=10):  # noqa: E743
    """Object with its centre at (x + 5, y + 5) for s = 10."""
    return Obj(shape, color, size, s, x, y)


def test_prompt_sets_and_templates():
    sizes = {c: len(all_prompts(c)) for c in CATEGORIES}
    assert sizes == {"single_object": 4, "two_object": 12, "counting": 12, "colors": 24,
                     "position": 48, "color_attr": 360}
    texts = [p.text for c in CATEGORIES for p in all_prompts(c)]
    assert len(texts) == len(set(texts))
    assert plural("cross") == "crosses" and plural("circle") == "circles"
    examples = {
        "a photo of a triangle": "single_object",
        "a photo of a circle and a cross": "two_object",
        "a photo of three crosses": "counting",
        "a photo of a purple square": "colors",
        "a photo of a square below a circle": "position",
        "a photo of a red circle and a blue cross": "color_attr",
    }
    for text, cat in examples.items():
        p = parse_prompt(text)
        assert p.category == cat and p.text == text
    assert parse_prompt("A photo of a Triangle. ").text == "a photo of a triangle"
    for bad in ["a photo of a circle and a circle", "a photo of one circle", "a photo of a dog",
                "a photo of a red circle and a red square", "a photo of a circle left of a circle",
                "a photo of five squares", ""]:
        with pytest.raises(ValueError):
            parse_prompt(bad)
    rng = random.Random(0)
    assert {sample_prompt(rng).category for _ in range(200)} == set(CATEGORIES)
    assert all(sample_prompt(rng, "colors").category == "colors" for _ in range(20))


def test_scene_for_prompt_satisfies_every_prompt_rendered_and_judged():
    rng = random.Random(1)
    for cat in CATEGORIES:
        for p in all_prompts(cat):
            assert parse_prompt(p.text) == p
            scene = scene_for_prompt(rng, p)
            assert check(p, scene.objects)
            assert check(p, parse_image(render(scene)))


def test_check_fails_on_wrong_images():
    rng = random.Random(2)
    for cat in CATEGORIES:
        for p in rng.sample(all_prompts(cat), min(12, len(all_prompts(cat)))):
            objs = list(scene_for_prompt(rng, p).objects)
            assert not check(p, objs[1:])                               # missing object
            if len(objs) < 4:                                            # extra object
                extra = sample_scene(rng, len(objs) + 1, shapes=[o.shape for o in objs] + [None],
                                     colors=[o.color for o in objs] + [None])
                assert not check(p, parse_image(render(extra)))
            unused = next(s for s in SHAPES if s not in {o.shape for o in objs})
            assert not check(p, [dataclasses.replace(objs[0], shape=unused)] + objs[1:])
            if any(c for _, c in p.objects):                             # wrong colour
                wrong = [dataclasses.replace(o, color=next(c for c in COLORS if c != o.color))
                         for o in objs]
                assert not check(p, wrong)
            if p.relation:                                               # wrong relation
                for rel in {"left of", "right of", "above", "below"} - {p.relation}:
                    other = parse_prompt(p.text.replace(f" {p.relation} ", f" {rel} "))
                    assert not check(other, objs)


def test_check_hand_made_cases():
    P = parse_prompt
    assert check(P("a photo of a circle"), [O("circle", "blue")])
    assert not check(P("a photo of a circle"), [O("square")])
    assert not check(P("a photo of a circle"), [O("circle"), O("circle", x=40)])
    assert not check(P("a photo of a circle"), [])
    two = P("a photo of a circle and a square")
    assert check(two, [O("square", x=40), O("circle")])
    assert not check(two, [O("circle"), O("circle", x=40)])
    assert not check(two, [O("circle"), O("square", x=40), O("cross", y=40)])
    cnt = P("a photo of three crosses")
    assert check(cnt, [O("cross"), O("cross", "blue", x=40), O("cross", y=40)])
    assert not check(cnt, [O("cross"), O("cross", x=40)])                     # wrong count
    assert not check(cnt, [O("cross"), O("cross", x=40), O("square", y=40)])  # wrong shape
    assert not check(cnt, [O("cross"), O("cross", x=40), O("cross", y=40), O("cross", 40, 40)])
    col = P("a photo of a purple square")
    assert check(col, [O("square", "purple", size="large", s=18)])
    assert not check(col, [O("square", "red")])
    pos = P("a photo of a circle left of a square")
    assert check(pos, [O("circle", x=5), O("square", x=30)])
    assert not check(pos, [O("circle", x=30), O("square", x=5)])              # wrong relation
    assert not check(pos, [O("circle", x=5, y=5), O("square", x=30, y=30)])   # diagonal: none
    assert not check(pos, [O("circle", x=5), O("square", x=30), O("cross", y=40)])
    below = P("a photo of a triangle below a cross")
    assert check(below, [O("cross", y=5), O("triangle", y=30)])
    attr = P("a photo of a red circle and a blue cross")
    assert check(attr, [O("cross", "blue"), O("circle", "red", x=40)])
    assert not check(attr, [O("cross", "red"), O("circle", "blue", x=40)])    # swapped colours
    assert not check(attr, [O("cross", "blue")])


def test_describe_and_parse_round_trip():
    objs = [O("square", "blue", x=40, size="large", s=18), O("cross", "yellow", x=5, y=40),
            O("circle", "red", x=5, y=5)]
    assert describe(objs) == ("a small red circle, a small yellow cross and "
                              "a large blue square")
    assert describe(objs[:1]) == "a large blue square"
    assert describe(objs[:2]) == "a small yellow cross and a large blue square"
    rng = random.Random(3)
    for _ in range(500):
        scene = sample_scene(rng)
        want = collections.Counter((o.size, o.color, o.shape) for o in scene.objects)
        text = describe(scene)
        assert parse_description(text) == want
        assert describe(parse_image(render(scene))) == text
    for bad in ["a small red circle, a large blue square", "a small red circle and",
                "a red circle", "a small red circle, and a large blue square",
                "two small red circles", "a tiny red circle", "", "a small red circle a"]:
        with pytest.raises(ValueError):
            parse_description(bad)
    assert parse_description("A small red circle and a large blue square.") == \
        collections.Counter([("small", "red", "circle"), ("large", "blue", "square")])
    assert describe([]) == "nothing" and parse_description("nothing") == collections.Counter()


def test_questions_agree_with_scenes():
    rng = random.Random(4)
    seen = collections.Counter()
    yes_no = collections.Counter()
    for _ in range(3000):
        scene = sample_scene(rng)
        objs = scene.objects
        qtype, q, a = sample_question(rng, scene)
        seen[qtype] += 1
        assert a == a.lower() and not a.endswith(".")
        assert answer_question(q, objs) == (qtype, a)
        assert answer_question(q, parse_image(render(scene))) == (qtype, a)
        if qtype == "count_all":
            assert q == "How many objects are there?" and a == NUMBERS[len(objs)]
        elif qtype == "count_shape":
            shape = next(s for s in SHAPES if f"many {plural(s)} " in q)
            assert a == NUMBERS[sum(o.shape == shape for o in objs)]
        elif qtype == "color_of_shape":
            hits = [o for o in objs if f"the {o.shape}?" in q]
            assert len(hits) == 1 and hits[0].color == a
        elif qtype == "shape_of_color":
            hits = [o for o in objs if f"the {o.color} object" in q]
            assert len(hits) == 1 and hits[0].shape == a
        elif qtype == "relation":
            yes_no[a] += 1
            words = q[len("Is the "):-1]
            ones = [(o, f"{o.color} {o.shape}") for o in objs]
            a_obj = next(o for o, name in ones if words.startswith(name + " "))
            b_obj = next(o for o, name in ones if words.endswith(" the " + name))
            rel = words[len(f"{a_obj.color} {a_obj.shape} "):-len(f" the {b_obj.color} {b_obj.shape}")]
            assert a == ("yes" if rel in relations(a_obj, b_obj) else "no")
        else:
            assert q == "Describe the image." and parse_description(a) == collections.Counter(
                (o.size, o.color, o.shape) for o in objs)
    assert set(seen) == set(QUESTION_TYPES)
    assert 0.4 < yes_no["yes"] / sum(yes_no.values()) < 0.6, yes_no


def test_question_sentences_are_the_specs():
    """The one builder of question sentences (sampling, self-checks and examples use it), word for word."""
    assert question("count_all") == "How many objects are there?"
    assert question("count_shape", "cross") == "How many crosses are there?"
    assert question("color_of_shape", "triangle") == "What color is the triangle?"
    assert question("shape_of_color", "cyan") == "What shape is the cyan object?"
    assert question("relation", "red", "circle", "left of", "blue", "square") == "Is the red circle left of the blue square?"
    assert question("describe") == "Describe the image."
    assert {qt for qt in QUESTION_TYPES} == {answer_question(question(qt, *slots), [O("circle", "red"), O("square", "blue", x=30)])[0]
                                              for qt, slots in [("count_all", ()), ("count_shape", ("circle",)),
                                                                ("color_of_shape", ("circle",)), ("shape_of_color", ("red",)),
                                                                ("relation", ("red", "circle", "left of", "blue", "square")),
                                                                ("describe", ())]}


def test_question_types_only_when_applicable():
    rng = random.Random(5)
    twins = Scene((O("circle", "red"), O("circle", "red", x=40)))
    for qtype in ("color_of_shape", "shape_of_color", "relation"):
        with pytest.raises(ValueError):
            sample_question(rng, twins, qtype)
    assert sample_question(rng, twins, "count_shape")[0] == "count_shape"
    with pytest.raises(ValueError):
        answer_question("What color is the circle?", twins.objects)
    with pytest.raises(ValueError):
        answer_question("What is the meaning of life?", twins.objects)
    assert answer_question("How many squares are there?", twins.objects) == ("count_shape", "zero")


def test_answers_match():
    assert answers_match("count_all", " Three.", "three")
    assert not answers_match("count_all", "four", "three")
    assert answers_match("relation", "Yes", "yes") and not answers_match("relation", "no", "yes")
    exp = "a small red circle and a large blue square"
    assert answers_match("describe", "a large blue square and a small red circle.", exp)
    assert not answers_match("describe", "a small red circle", exp)
    assert not answers_match("describe", "a small red circle and a large blue squar", exp)
    assert not answers_match("describe", "", exp)


def test_captions_are_true():
    rng = random.Random(6)
    styles = collections.Counter()
    gen_cats = collections.Counter()
    for _ in range(2000):
        scene = sample_scene(rng)
        objs = scene.objects
        text = caption(rng, scene)
        assert text.startswith("a photo of ") and text == text.lower()
        try:
            p = parse_prompt(text)
        except ValueError:
            p = None
        if p is not None:                       # a GenEval template: must hold exactly
            gen_cats[p.category] += 1
            assert check(p, objs), (text, objs)
            continue
        body = text[len("a photo of "):]
        try:
            assert parse_description(body) == collections.Counter(
                (o.size, o.color, o.shape) for o in objs)
            styles["description"] += 1
            continue
        except ValueError:
            pass
        rel_re = r"(.*?)(?:, with)? (?:the|a) ([a-z ]+) (left of|right of|above|below) " \
                 r"(?:the|a) ([a-z ]+)"
        m = re.fullmatch(rel_re, "x " + body)
        if m:                                   # a relation between two named objects
            styles["relation"] += 1
            names = [m.group(2).split(), m.group(4).split()]
            found = [[o for o in objs if all(w in (o.size, o.color, o.shape) for w in ws)]
                     for ws in names]
            assert all(len(f) == 1 for f in found), (body, objs)
            assert m.group(3) in relations(found[0][0], found[1][0])
            if m.group(1) != "x":
                assert parse_description(m.group(1)[2:]) == parse_description(describe(objs))
            else:
                assert len(objs) == 2
            continue
        key = "count_color" if " shape" in body else "other"
        styles[key] += 1
        words = body.replace(",", "").split()
        n = sum(NUMBERS.index(w) if w in NUMBERS else 1 for w in words if w in NUMBERS + ("a",))
        assert n == len(objs), (body, objs)
        named = {w for w in words if w in SHAPES} | {s for s in SHAPES if plural(s) in words}
        assert key == "count_color" or named == {o.shape for o in objs}, (body, objs)
    assert set(gen_cats) == set(CATEGORIES), gen_cats
    assert styles["description"] and styles["relation"] and styles["count_color"], styles
