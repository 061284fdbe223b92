"""What a drawing of a ShapesWorld prompt must answer: the model's self-check.

``self_checks(prompt)`` turns a prompt into ``(question, answer)`` pairs of the world's question
grammar that every correct drawing of it answers so: how many objects, how many of each named shape,
the shape of a named colour, the colour of a named shape. ``Engine.generate_images`` with
``best_of=K`` draws K candidates per image and keeps the one whose answers the model itself finds
most likely (the sum of their log-probabilities): the understanding half checks the generating half.

Prompts: the GenEval-style templates and every training caption style name all objects of the scene,
so both are read. Anything else gets no checks (and is drawn once). Relations are not asked: models before
v26 answered them at chance (v24's held-out VQA relation 0.449), and although the bundled v27 answers them (0.962),
the world's relation question names both objects' colours, which position prompts leave open.
"""

from __future__ import annotations

import re

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


def self_checks(text: str) -> list[tuple[str, str]]:
    """The ``(question, answer)`` pairs a correct drawing of ``text`` answers (empty: none known)."""
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
    return checks
