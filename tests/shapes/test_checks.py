"""The self-check questions: every correct drawing of a prompt answers them as they expect."""

import collections
import random

import pytest

from zuoyou.shapes.checks import FollowUp, objects_named, relation_named, self_checks
from zuoyou.shapes.language import (CATEGORIES, QUESTION_TYPES, all_prompts, answer_question, caption,
                                    scene_for_prompt)
from zuoyou.shapes.world import COLORS, sample_scene


def resolved(checks, scene):
    """The checks as (question, answer) pairs, each ``FollowUp`` asked of ``scene`` with its true answers."""
    return [c if isinstance(c, tuple) else c.then(tuple(answer_question(q, scene)[1] for q in c.ask))
            for c in checks]


@pytest.mark.parametrize("category", CATEGORIES)
def test_every_template_prompt_is_checked_and_its_scenes_pass(category):
    rng = random.Random(1)
    for p in all_prompts(category):
        checks = self_checks(p.text)
        assert checks and checks[0] == ("How many objects are there?", ("zero one two three four".split())[len(p.objects)])
        # position prompts name no colours: their relation is a follow-up that asks both colours first
        follow = [c for c in checks if isinstance(c, FollowUp)]
        assert len(follow) == (category == "position") and all(isinstance(c, tuple) for c in checks[:-1])
        for _ in range(3):  # random scenes that satisfy the prompt exactly (unnamed attributes random)
            scene = scene_for_prompt(rng, p)
            for q, a in resolved(checks, scene):
                assert answer_question(q, scene)[1] == a, (p.text, q, a, scene)


def test_position_checks_fail_the_swapped_scene():
    """The relation follow-up is what tells a position drawing from its mirror image: the other checks pass
    both."""
    rng = random.Random(3)
    for p in all_prompts("position"):
        scene = scene_for_prompt(rng, p)
        (sa, _), rel, (sb, _) = relation_named(p.text)
        swapped = p.text.replace(f"a {sa} {rel} a {sb}", f"a {sb} {rel} a {sa}")
        checks = resolved(self_checks(swapped), scene)
        answers = [answer_question(q, scene)[1] == a for q, a in checks]
        assert answers[:-1] == [True] * (len(checks) - 1) and answers[-1] is False, (p.text, scene)


def test_captions_are_read_and_their_scenes_pass():
    """Every training caption names all objects of its scene, so its checks hold for the scene."""
    rng = random.Random(2)
    kinds = collections.Counter()
    for _ in range(3000):
        scene = sample_scene(rng)
        text = caption(rng, scene)
        objs = objects_named(text)
        assert objs is not None and len(objs) == len(scene.objects), text
        for q, a in resolved(self_checks(text), scene):
            qtype, truth = answer_question(q, scene)
            kinds[qtype] += 1
            assert truth == a, (text, q, a, scene)
    # every question type the checks use is exercised (relations: fixed where the caption names both
    # colours, else follow-ups), descriptions never asked
    assert set(kinds) == {"count_all", "count_shape", "color_of_shape", "shape_of_color", "relation"}
    assert set(kinds) < set(QUESTION_TYPES)


def test_checks_of_partial_and_foreign_prompts():
    assert self_checks("a photo of a red circle left of a blue square") == [
        ("How many objects are there?", "two"), ("How many circles are there?", "one"),
        ("How many squares are there?", "one"), ("What shape is the red object?", "circle"),
        ("What color is the circle?", "red"), ("What shape is the blue object?", "square"),
        ("What color is the square?", "blue"), ("Is the red circle left of the blue square?", "yes")]
    # a colour left open: the follow-up asks it of the drawing; an answer that is no colour makes no question
    follow = self_checks("a photo of a red circle below a square")[-1]
    assert follow.ask == ("What color is the square?",) and follow.options == (tuple(COLORS),)
    assert follow.then(("green",)) == ("Is the red circle below the green square?", "yes")
    assert follow.then(("a dog",)) is None
    # a relation whose object the question could not single out is not checked
    assert not any("left of" in c[0] for c in self_checks("a photo of a circle left of a circle"))
    # a colour named for one object only: another object may share it, so only its shape count is safe
    assert ("What shape is the red object?", "circle") not in self_checks("a photo of a red circle and a square")
    assert ("What color is the circle?", "red") in self_checks("a photo of a red circle and a square")
    # shapes not named: only the total is known
    assert self_checks("a photo of two red shapes and a blue shape") == [("How many objects are there?", "three")]
    for text in ("", "a photo of", "a cat on a mat", "a photo of a red dog", "a photo of five circles",
                 "a photo of two circles and three squares"):  # five objects: beyond the world's four
        assert self_checks(text) == [], text
