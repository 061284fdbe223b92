"""zuoyou.train.reading: examples that teach the self-check's reader (crowded scenes, the model's own drawings)."""

import collections
import random

import numpy as np
import torch

from zuoyou.shapes import NUMBERS, SHAPES, boxes_ok, parse_image, render_image, sample_scene
from zuoyou.shapes.language import plural
from zuoyou.train.reading import CHECKED, COUNTS, PAST_FOUR, crowded, judged_questions, own_drawings


def _asked_shape(q: str) -> str:
    shape, = (s for s in SHAPES if q == f"How many {plural(s)} are there?")
    return shape


def test_crowded_scenes_have_five_or_six_objects_and_their_counts():
    """Crowded training scenes (past the world's four) are valid scenes the judge reads back, asked their counts."""
    words = (*NUMBERS, *PAST_FOUR)
    rng, sizes, one_shape = random.Random(3), collections.Counter(), 0
    for _ in range(200):
        scene, qas = crowded(rng)
        assert len(scene) in (5, 6) and boxes_ok(scene.objects)
        seen = parse_image(render_image(scene))
        assert collections.Counter((o.shape, o.color, o.size) for o in seen) == collections.Counter(
            (o.shape, o.color, o.size) for o in scene.objects)
        answers = dict(qas)
        assert answers.pop("How many objects are there?") == words[len(scene)]
        (q, a), = answers.items()
        assert a == words[sum(o.shape == _asked_shape(q) for o in scene.objects)]
        sizes[len(scene)] += 1
        one_shape += len({o.shape for o in scene.objects}) == 1
    assert min(sizes.values()) > 60 and 60 < one_shape < 140


def test_judged_questions_are_the_self_checks_types_answered_from_the_objects():
    rng = random.Random(4)
    kinds = collections.Counter()
    for _ in range(300):
        n = rng.randint(1, 6)
        objs = list(sample_scene(rng, n, sizes=["small"] * n, max_objects=6).objects)
        for q, a in judged_questions(rng, objs):
            if q == "How many objects are there?":
                kinds["count_all"] += 1
                assert a == COUNTS[n]
            elif q.startswith("How many "):
                kinds["count_shape"] += 1
                assert a == COUNTS[sum(o.shape == _asked_shape(q) for o in objs)]
            elif q.startswith("What color is the "):
                kinds["color_of_shape"] += 1
                shape = q.removeprefix("What color is the ").removesuffix("?")
                assert [o.color for o in objs if o.shape == shape] == [a]
            else:
                kinds["shape_of_color"] += 1
                color = q.removeprefix("What shape is the ").removesuffix(" object?")
                assert [o.shape for o in objs if o.color == color] == [a]
    assert set(kinds) == set(CHECKED)


class _Pipe:
    """Stands in for a Pipeline: "draws" the rendered scene of each prompt (the judge then reads it exactly)."""

    class _Request:
        def __init__(self, text, **kw):
            self.text, self.kw = text, kw

    def __init__(self):
        from zuoyou.shapes import parse_prompt, scene_for_prompt

        self.engine, self.requests = self, []
        self._scene = lambda text, seed: scene_for_prompt(random.Random(seed), parse_prompt(text))

    def image_request(self, text, **kw):
        return self._Request(text, **kw)

    def generate_images(self, reqs):
        self.requests += reqs
        return [[render_image(self._scene(r.text, r.kw["seed"]))] for r in reqs]


def test_own_drawings_are_judged_and_drawn_once_at_the_bundled_defaults():
    pipe = _Pipe()
    pool = own_drawings(pipe, 40, seed=9, batch=16)
    assert len(pipe.requests) == 40 and len(pool) == 40
    assert {(r.kw["n"], r.kw["best_of"], r.kw["cfg"], r.kw["temperature"]) for r in pipe.requests} == {(1, 1, 3.0, 0.8)}
    for (img, objs), r in zip(pool, pipe.requests):
        assert img.shape == (3, 64, 64) and -1 <= img.min() and img.max() <= 1
        want = pipe._scene(r.text, r.kw["seed"])
        assert sorted((o.shape, o.color) for o in objs) == sorted((o.shape, o.color) for o in want.objects)
        pixels = torch.round((img.permute(1, 2, 0) + 1) * 127.5).to(torch.uint8).numpy()
        assert (pixels == np.asarray(render_image(want))).all()
    assert own_drawings(_Pipe(), 40, seed=9, batch=16)[0][1] == pool[0][1]  # seeded


def test_own_drawings_of_the_bundled_model_are_read_by_the_judge():
    """The real thing: the bundled model draws training-seed prompts; most drawings hold 1 to 6 objects."""
    import zuoyou

    pool = own_drawings(zuoyou.api.load(None, device="cpu"), 12, seed=5, batch=6)
    assert len(pool) >= 9
    for img, objs in pool:
        assert img.shape == (3, 64, 64) and 1 <= len(objs) <= 6
        pixels = torch.round((img.permute(1, 2, 0) + 1) * 127.5).to(torch.uint8).numpy()
        assert parse_image(pixels) == objs
