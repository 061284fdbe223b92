"""ShapesWorld language: GenEval-style prompts and their checkers, training captions,
understanding questions with answers, and the canonical description with its parser.

Everything follows ``shared/specs/shapes-world.md``:

* six prompt categories (``CATEGORIES``) with fixed templates; a prompt is satisfied
  by an image whose judged objects are *exactly* the requested ones (no missing, no
  extra objects; attributes the prompt does not name are free);
* six question types (``QUESTION_TYPES``) with lower-case answers, no final full stop;
* the canonical description ``a {size} {color} {shape}`` items ordered by centre x,
  then y, joined with ``, `` and a final `` and ``.
"""

from __future__ import annotations

import collections
import itertools
import random
import re
from dataclasses import dataclass
from functools import lru_cache

from .world import COLORS, RELATIONS, SHAPES, SIZES, Obj, Scene, place_scene, relations

CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
NUMBERS = ("zero", "one", "two", "three", "four")
QUESTION_TYPES = ("count_all", "count_shape", "color_of_shape", "shape_of_color",
                  "relation", "describe")
PREFIX = "a photo of "


def plural(shape: str) -> str:
    """``crosses`` for cross, else shape + ``s``."""
    return shape + "es" if shape == "cross" else shape + "s"


def _objects(scene_or_objects) -> list[Obj]:
    if isinstance(scene_or_objects, Scene):
        return list(scene_or_objects.objects)
    return list(scene_or_objects)


def _join(items: list[str]) -> str:
    """``x``, ``x and y``, ``x, y and z``."""
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _normalise(text: str) -> str:
    """Lower-case, collapse whitespace, drop one trailing full stop."""
    text = " ".join(str(text).lower().split())
    return text[:-1].rstrip() if text.endswith(".") else text


# ----------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class Prompt:
    """A generation prompt and what the image must contain *exactly*.

    ``objects``: one ``(shape, color or None)`` requirement per object, nothing else
    may be in the image.  ``relation``: if set, "object matching objects[0] REL object
    matching objects[1]" must hold.
    """

    category: str
    text: str
    objects: tuple[tuple[str, str | None], ...]
    relation: str | None = None


def _make(category: str, objects, relation=None) -> Prompt:
    if category == "counting":
        text = f"{PREFIX}{NUMBERS[len(objects)]} {plural(objects[0][0])}"
    elif category == "position":
        text = f"{PREFIX}a {objects[0][0]} {relation} a {objects[1][0]}"
    else:
        text = PREFIX + " and ".join(
            "a " + (f"{c} {s}" if c else s) for s, c in objects)
    return Prompt(category, text, tuple(objects), relation)


@lru_cache(maxsize=None)
def _all(category: str) -> tuple[Prompt, ...]:
    pairs = [(a, b) for a in SHAPES for b in SHAPES if a != b]
    if category == "single_object":
        out = [_make(category, [(s, None)]) for s in SHAPES]
    elif category == "two_object":
        out = [_make(category, [(a, None), (b, None)]) for a, b in pairs]
    elif category == "counting":
        out = [_make(category, [(s, None)] * n) for n in (2, 3, 4) for s in SHAPES]
    elif category == "colors":
        out = [_make(category, [(s, c)]) for c in COLORS for s in SHAPES]
    elif category == "position":
        out = [_make(category, [(a, None), (b, None)], r) for a, b in pairs for r in RELATIONS]
    elif category == "color_attr":
        out = [_make(category, [(a, c1), (b, c2)]) for a, b in pairs
               for c1 in COLORS for c2 in COLORS if c1 != c2]
    else:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    return tuple(out)


def all_prompts(category: str) -> list[Prompt]:
    """Every prompt of a category (a finite, deterministic list)."""
    return list(_all(category))


@lru_cache(maxsize=None)
def _by_text() -> dict[str, Prompt]:
    return {p.text: p for c in CATEGORIES for p in _all(c)}


def sample_prompt(rng: random.Random, category: str | None = None) -> Prompt:
    """A uniformly random prompt of ``category`` (a uniformly random category if None)."""
    if category is None:
        category = rng.choice(CATEGORIES)
    return rng.choice(_all(category))


def parse_prompt(text: str) -> Prompt:
    """The :class:`Prompt` whose template text is ``text`` (case, spacing and a final
    full stop are forgiven); ``ValueError`` for anything else."""
    prompt = _by_text().get(_normalise(text))
    if prompt is None:
        raise ValueError(f"not a ShapesWorld prompt: {text!r}")
    return prompt


def scene_for_prompt(rng: random.Random, prompt: Prompt) -> Scene:
    """A random scene that satisfies ``prompt`` exactly (unnamed attributes random)."""
    specs = [{"shape": s, "color": c} for s, c in prompt.objects]
    rel = (0, prompt.relation, 1) if prompt.relation else None
    return place_scene(rng, specs, rel)


def check(prompt: Prompt, objects) -> bool:
    """GenEval-style "exactly" rule: the objects are exactly the required ones.

    True when there are as many objects as requirements and some one-to-one
    assignment meets every (shape, colour) requirement and, for position prompts,
    the relation between the first two.
    """
    objs = _objects(objects)
    if len(objs) != len(prompt.objects):
        return False
    for perm in itertools.permutations(objs):
        if all(o.shape == s and (c is None or o.color == c)
               for o, (s, c) in zip(perm, prompt.objects)):
            if prompt.relation is None or prompt.relation in relations(perm[0], perm[1]):
                return True
    return False


# ------------------------------------------------------------------- description
def _item(o: Obj, size: bool = True, color: bool = True) -> str:
    words = ([o.size] if size else []) + ([o.color] if color else []) + [o.shape]
    return "a " + " ".join(words)


def describe(scene_or_objects) -> str:
    """Canonical description: ``a {size} {color} {shape}`` items ordered by centre x,
    then y, joined with ``, `` and a final `` and ``.  ``nothing`` when empty."""
    objs = sorted(_objects(scene_or_objects), key=lambda o: (o.cx, o.cy))
    return _join([_item(o) for o in objs]) if objs else "nothing"


_ITEM_RE = re.compile(r"a (%s) (%s) (%s)" % ("|".join(SIZES), "|".join(COLORS),
                                              "|".join(SHAPES)))


def parse_description(text: str) -> collections.Counter:
    """Multiset of ``(size, color, shape)`` of a canonical description.

    Case, spacing and a final full stop are forgiven; anything else raises
    ``ValueError`` (``nothing`` parses as the empty multiset).
    """
    norm = _normalise(text)
    if norm == "nothing":
        return collections.Counter()
    items = [m.groups() for m in _ITEM_RE.finditer(norm)]
    if not items or _join(["a " + " ".join(i) for i in items]) != norm:
        raise ValueError(f"malformed description: {text!r}")
    return collections.Counter(items)


# ---------------------------------------------------------------------- captions
def _count_phrase(n: int, noun: str) -> str:
    """``a circle`` / ``three circles`` / ``two red shapes``."""
    return f"a {noun}" if n == 1 else f"{NUMBERS[n]} {plural(noun)}"


def _unique_pairs(objs: list[Obj]) -> list[Obj]:
    """Objects whose (colour, shape) is unique in the scene."""
    key = collections.Counter((o.color, o.shape) for o in objs)
    return [o for o in objs if key[(o.color, o.shape)] == 1]


@lru_cache(maxsize=None)
def _by_shapes() -> dict[tuple[str, ...], list[Prompt]]:
    """Prompts indexed by the sorted tuple of the shapes they require."""
    index: dict[tuple[str, ...], list[Prompt]] = collections.defaultdict(list)
    for c in CATEGORIES:
        for p in _all(c):
            index[tuple(sorted(s for s, _ in p.objects))].append(p)
    return dict(index)


def _geneval_captions(objs: list[Obj]) -> list[str]:
    """All GenEval template texts that are true of the scene (exactly)."""
    key = tuple(sorted(o.shape for o in objs))
    return [p.text for p in _by_shapes().get(key, []) if check(p, objs)]


def caption(rng: random.Random, scene) -> str:
    """A random training caption that is true (and complete) for the scene.

    Styles: a GenEval template that the scene satisfies exactly; the canonical
    description; all objects in random order with or without sizes; a relation between
    two objects (for two-object scenes, or appended to a full description); counts per
    shape ("two circles and a square"); counts per colour ("three red shapes").
    """
    objs = _objects(scene)
    if not objs:
        raise ValueError("cannot caption an empty scene")
    styles = {
        "describe": lambda: describe(objs),
        "shuffled": lambda: _join([_item(o) for o in rng.sample(objs, len(objs))]),
        "no_size": lambda: _join([_item(o, size=False)
                                  for o in rng.sample(objs, len(objs))]),
        "count_shape": lambda: _join([_count_phrase(n, s) for s, n in sorted(
            collections.Counter(o.shape for o in objs).items(),
            key=lambda kv: SHAPES.index(kv[0]))]),
        "count_color": lambda: _join([_count_phrase(n, f"{c} shape") for c, n in sorted(
            collections.Counter(o.color for o in objs).items(),
            key=lambda kv: list(COLORS).index(kv[0]))]),
    }
    geneval = _geneval_captions(objs)
    if geneval:
        styles["geneval"] = lambda: rng.choice(geneval)[len(PREFIX):]
    uniq = _unique_pairs(objs)
    rel = [(a, r, b) for a in uniq for b in uniq if a is not b for r in relations(a, b)]
    if rel:
        def relation_caption():
            a, r, b = rng.choice(rel)
            if len(objs) == 2:
                sized = rng.random() < 0.5
                return f"{_item(a, size=sized)} {r} {_item(b, size=sized)}"
            return f"{describe(objs)}, with the {a.color} {a.shape} {r} the {b.color} {b.shape}"
        styles["relation"] = relation_caption
    name = rng.choice(sorted(styles))
    return PREFIX + styles[name]()


# --------------------------------------------------------------------- questions
_QUESTIONS = {
    "count_all": "How many objects are there?",
    "count_shape": "How many {} are there?",
    "color_of_shape": "What color is the {}?",
    "shape_of_color": "What shape is the {} object?",
    "relation": "Is the {} {} {} the {} {}?",
    "describe": "Describe the image.",
}


def question(qtype: str, *slots: str) -> str:
    """The question of ``qtype`` about the named slots: ``question("count_shape", "cross")`` ->
    "How many crosses are there?"; relation slots: colour, shape, relation, colour, shape."""
    if qtype == "count_shape":
        slots = tuple(plural(s) for s in slots)
    return _QUESTIONS[qtype].format(*slots)


_QUESTION_RES = {
    "count_all": re.compile(r"how many objects are there\?"),
    "count_shape": re.compile(r"how many (%s) are there\?" % "|".join(map(plural, SHAPES))),
    "color_of_shape": re.compile(r"what color is the (%s)\?" % "|".join(SHAPES)),
    "shape_of_color": re.compile(r"what shape is the (%s) object\?" % "|".join(COLORS)),
    "relation": re.compile(r"is the (%s) (%s) (%s) the (%s) (%s)\?" % (
        "|".join(COLORS), "|".join(SHAPES), "|".join(RELATIONS), "|".join(COLORS),
        "|".join(SHAPES))),
    "describe": re.compile(r"describe the image\."),
}


def answer_question(question: str, scene_or_objects) -> tuple[str, str]:
    """``(qtype, answer)`` for a question of the grammar about a scene or a list of
    (judged) objects.  ``ValueError`` if the question is not of the grammar or is not
    applicable (e.g. the named shape is not unique)."""
    objs = _objects(scene_or_objects)
    q = " ".join(question.lower().split())
    for qtype, pattern in _QUESTION_RES.items():
        m = pattern.fullmatch(q)
        if m:
            break
    else:
        raise ValueError(f"not a ShapesWorld question: {question!r}")
    if qtype == "count_all":
        return qtype, NUMBERS[len(objs)]
    if qtype == "count_shape":
        shape = next(s for s in SHAPES if plural(s) == m.group(1))
        return qtype, NUMBERS[sum(o.shape == shape for o in objs)]
    if qtype == "describe":
        return qtype, describe(objs)
    if qtype == "color_of_shape":
        hits = [o for o in objs if o.shape == m.group(1)]
        if len(hits) != 1:
            raise ValueError(f"not exactly one {m.group(1)}")
        return qtype, hits[0].color
    if qtype == "shape_of_color":
        hits = [o for o in objs if o.color == m.group(1)]
        if len(hits) != 1:
            raise ValueError(f"not exactly one {m.group(1)} object")
        return qtype, hits[0].shape
    c1, s1, rel, c2, s2 = m.groups()
    a = [o for o in objs if (o.color, o.shape) == (c1, s1)]
    b = [o for o in objs if (o.color, o.shape) == (c2, s2)]
    if len(a) != 1 or len(b) != 1 or a[0] is b[0]:
        raise ValueError("relation question needs two distinct unique objects")
    return qtype, "yes" if rel in relations(a[0], b[0]) else "no"


def _applicable(objs: list[Obj]) -> list[str]:
    shapes = collections.Counter(o.shape for o in objs)
    colors = collections.Counter(o.color for o in objs)
    ok = {"count_all", "count_shape", "describe"}
    if 1 in shapes.values():
        ok.add("color_of_shape")
    if 1 in colors.values():
        ok.add("shape_of_color")
    if len(_unique_pairs(objs)) >= 2:
        ok.add("relation")
    return [q for q in QUESTION_TYPES if q in ok]


def sample_question(rng: random.Random, scene, qtype: str | None = None):
    """``(qtype, question, answer)`` about the scene.

    ``qtype`` None picks uniformly among the types applicable to the scene; a given
    ``qtype`` that does not apply raises ``ValueError``.  Relation questions are
    answered ``yes`` and ``no`` about equally often (``no`` uses a relation that does
    not hold between two unique objects).
    """
    objs = _objects(scene)
    ok = _applicable(objs)
    if qtype is None:
        qtype = rng.choice(ok)
    elif qtype not in ok:
        raise ValueError(f"question type {qtype!r} does not apply to this scene")
    if qtype == "count_all":
        return qtype, question(qtype), NUMBERS[len(objs)]
    if qtype == "count_shape":
        present = rng.random() < 0.7 and objs
        shape = rng.choice(objs).shape if present else rng.choice(SHAPES)
        return qtype, question(qtype, shape), NUMBERS[sum(o.shape == shape for o in objs)]
    if qtype == "describe":
        return qtype, question(qtype), describe(objs)
    if qtype == "color_of_shape":
        counts = collections.Counter(o.shape for o in objs)
        o = rng.choice([o for o in objs if counts[o.shape] == 1])
        return qtype, question(qtype, o.shape), o.color
    if qtype == "shape_of_color":
        counts = collections.Counter(o.color for o in objs)
        o = rng.choice([o for o in objs if counts[o.color] == 1])
        return qtype, question(qtype, o.color), o.shape
    uniq = _unique_pairs(objs)
    pairs = [(a, b) for a in uniq for b in uniq if a is not b]
    true = [(a, r, b) for a, b in pairs for r in relations(a, b)]
    false = [(a, r, b) for a, b in pairs for r in RELATIONS if r not in relations(a, b)]
    want_yes = bool(true) and rng.random() < 0.5
    a, r, b = rng.choice(true if want_yes else false)
    return qtype, question(qtype, a.color, a.shape, r, b.color, b.shape), "yes" if want_yes else "no"


def answers_match(qtype: str, predicted: str, expected: str) -> bool:
    """Exact match after normalising (strip, lower-case, whitespace, one trailing
    full stop); for ``describe`` the parsed multisets must be equal (malformed ->
    False)."""
    if qtype == "describe":
        try:
            return parse_description(predicted) == parse_description(expected)
        except ValueError:
            return False
    return _normalise(predicted) == _normalise(expected)
