"""What a drawing of a ShapesWorld prompt must answer: the model's self-check.

``self_checks(prompt)`` turns a prompt into ``(question, answer)`` pairs of the world's question
grammar that every correct drawing of it answers so: how many objects, how many of each named shape,
the shape of a named colour, the colour of a named shape, and whether the named relation holds.
``Engine.generate_images`` with ``best_of=K`` draws K candidates per image and keeps those whose answers
the model itself finds most likely (the sum of their log-probabilities): the understanding half checks the
generating half.

Prompts: the GenEval-style templates and every training caption style name all objects of the scene,
so both are read. Anything else gets no checks (and is drawn once). The world's relation question names both
objects' colours ("Is the red circle left of the blue square?"); where the prompt leaves a colour open (the
GenEval-style position prompts: "a photo of a circle left of a square") the check is a ``FollowUp``: the model
first picks the colour of each such shape in the drawing, then is asked the relation with those colours.
Relations are asked since the twenty-second session: v26 was the first model to answer them (held-out VQA relation
0.936; v24 0.449, saying "yes" to nearly all, so its check passes them all).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from .language import NUMBERS, PREFIX, _normalise, question
from .world import COLORS, RELATIONS, SHAPES, SIZES

_ITEM = re.compile(r"(a|an|one|two|three|four) (?:(%s) )?(?:(%s) )?(%s|shape)(?:es|s)?" % (
    "|".join(SIZES), "|".join(COLORS), "|".join(SHAPES)))
_COUNT = {"a": 1, "an": 1, **{w: i for i, w in enumerate(NUMBERS)}}


def objects_named(text: str) -> list[tuple[str | None, str | None]] | None:
    """``[(shape or None, colour or None), ...]``, one per object the prompt names; None when the
    text is not of the world's prompt or caption grammar. ``shape`` None: "three red shapes"."""
    t = _normalise(text)
    if not t.startswith(PREFIX):
        return None
    t = t[len(PREFIX):].split(", with the ")[0]  # a relation appended to a full description
    for rel in RELATIONS:  # "a circle left of a square" names two objects
        t = t.replace(f" {rel} ", " and ")
    objs = []
    for part in re.split(r", | and ", t):
        m = _ITEM.fullmatch(part)
        if m is None:
            return None
        objs += [(None if m[4] == "shape" else m[4], m[3])] * _COUNT[m[1]]
    return objs


@dataclass(frozen=True)
class FollowUp:
    """A check whose question depends on the drawing: the model first picks its answer to each ``ask``
    question among that question's ``options`` (``zuoyou.selfcheck`` picks the one whose first token is likeliest),
    then ``then(picks)`` gives the ``(question, answer)`` to score, or None when the picks make no such
    question (which counts as failing)."""

    ask: tuple[str, ...]
    options: tuple[tuple[str, ...], ...]
    then: Callable[[tuple[str, ...]], tuple[str, str] | None]


def relation_named(text: str) -> tuple[tuple[str, str | None], str, tuple[str, str | None]] | None:
    """``((shape, colour or None), relation, (shape, colour or None))`` of a prompt that names a relation
    between two objects ("a red circle left of a square", or a description ending ", with the red circle
    left of the blue square"), else None."""
    t = _normalise(text)
    if not t.startswith(PREFIX):
        return None
    t = t[len(PREFIX):]
    if ", with the " in t:
        t = "a " + t.split(", with the ")[1].replace(" the ", " a ", 1)  # "a red circle left of a blue square"
    for rel in RELATIONS:
        if f" {rel} " in t:
            items = [_ITEM.fullmatch(part) for part in t.split(f" {rel} ", 1)]
            if all(m is not None and _COUNT[m[1]] == 1 and m[4] != "shape" for m in items):
                (a, b) = ((m[4], m[3]) for m in items)
                return a, rel, b
    return None


def _relation_check(text: str, objs: list) -> tuple[str, str] | FollowUp | None:
    """The relation check of ``text`` whose named objects are ``objs``: a fixed pair where both colours are
    named, a ``FollowUp`` asking the open colours first, None where the question would be ambiguous."""
    named = relation_named(text)
    if named is None:
        return None
    (sa, ca), rel, (sb, cb) = named
    shapes = [s for s, _ in objs]
    # each object must be the only one the question can mean: the only one of its colour and shape where the
    # colour is named, the only one of its shape where it is asked
    if any(objs.count((s, c)) != 1 if c else shapes.count(s) != 1 for s, c in ((sa, ca), (sb, cb))):
        return None
    if ca and cb:
        return (question("relation", ca, sa, rel, cb, sb), "yes") if (sa, ca) != (sb, cb) else None
    open_shapes = tuple(s for s, c in ((sa, ca), (sb, cb)) if c is None)

    def then(answers: tuple[str, ...]) -> tuple[str, str] | None:
        said = dict(zip(open_shapes, (a.strip().lower() for a in answers)))
        ca_, cb_ = ca or said[sa], cb or said[sb]
        if ca_ not in COLORS or cb_ not in COLORS:
            return None
        return question("relation", ca_, sa, rel, cb_, sb), "yes"

    return FollowUp(tuple(question("color_of_shape", s) for s in open_shapes), (tuple(COLORS),) * len(open_shapes),
                    then)


def self_checks(text: str) -> list[tuple[str, str] | FollowUp]:
    """The checks a correct drawing of ``text`` passes (empty: none known): ``(question, answer)`` pairs,
    and at most one ``FollowUp`` (the relation, where the prompt leaves a colour open), last."""
    objs = objects_named(text)
    if not objs or len(objs) >= len(NUMBERS):
        return []
    shapes, colors = [s for s, _ in objs], [c for _, c in objs]
    checks = [(question("count_all"), NUMBERS[len(objs)])]
    if None in shapes:  # "two red shapes": only the total is known
        return checks
    checks += [(question("count_shape", s), NUMBERS[shapes.count(s)]) for s in dict.fromkeys(shapes)]
    for s, c in objs:
        if c is None:
            continue
        if None not in colors and colors.count(c) == 1:  # every colour named: no other object is c
            checks.append((question("shape_of_color", c), s))
        if shapes.count(s) == 1:
            checks.append((question("color_of_shape", s), c))
    if (rel := _relation_check(text, objs)) is not None:
        checks.append(rel)
    return checks
