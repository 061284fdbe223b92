"""ShapesWorld world: palette, masks, sampler invariants, renderer, relations."""

import random

import numpy as np
import pytest
from PIL import Image

from zuoyou.shapes.world import (CANVAS, COLORS, SHAPES, SIZES, Obj, Scene, boxes_ok,
                                 place_scene, relations, render, render_image,
                                 sample_scene, shape_mask)


def test_constants_follow_spec():
    assert list(COLORS.items()) == [
        ("red", (220, 40, 40)), ("yellow", (235, 200, 20)), ("green", (40, 170, 60)),
        ("cyan", (20, 180, 200)), ("blue", (40, 70, 220)), ("purple", (150, 50, 190))]
    assert SHAPES == ("circle", "square", "triangle", "cross")
    assert SIZES == {"small": (10, 12), "large": (17, 20)}
    assert CANVAS == 64


@pytest.mark.parametrize("s", [10, 11, 12, 17, 18, 19, 20])
def test_masks_fill_their_box(s):
    for shape in SHAPES:
        m = shape_mask(shape, s)
        assert m.shape == (s, s)
        # every mask touches all four sides of its box, so bbox == the object's box
        assert m[0].any() and m[-1].any() and m[:, 0].any() and m[:, -1].any()
    assert shape_mask("square", s).all()
    tri = shape_mask("triangle", s)
    widths = tri.sum(1)
    assert (np.diff(widths) >= 0).all() and widths[-1] == s and widths[0] <= 2
    assert (tri == tri[:, ::-1]).all()                      # isosceles
    circ = shape_mask("circle", s)
    assert (circ == circ.T).all() and (circ == circ[::-1]).all()
    assert abs(circ.mean() - np.pi / 4) < 0.08
    cross = shape_mask("cross", s)
    w = round(s / 3)
    assert cross.sum() == 2 * w * s - w * w
    assert cross[s // 2].all() and cross[:, s // 2].all() and not cross[0, 0]


def test_sampler_invariants():
    rng = random.Random(0)
    counts = {1: 0, 2: 0, 3: 0, 4: 0}
    for _ in range(2000):
        scene = sample_scene(rng)
        counts[len(scene.objects)] += 1
        assert boxes_ok(scene.objects)
        for o in scene.objects:
            assert o.shape in SHAPES and o.color in COLORS
            lo, hi = SIZES[o.size]
            assert lo <= o.s <= hi
            assert o.x0 >= 2 and o.y0 >= 2 and o.x0 + o.s <= 62 and o.y0 + o.s <= 62
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1:]:
                gap_x = max(b.x0 - (a.x0 + a.s), a.x0 - (b.x0 + b.s))
                gap_y = max(b.y0 - (a.y0 + a.s), a.y0 - (b.y0 + b.s))
                assert max(gap_x, gap_y) >= 3
    assert all(c > 400 for c in counts.values()), counts      # 1..4 roughly uniform


def test_sampler_is_seeded_and_honours_fixed_attributes():
    a = [sample_scene(random.Random(42)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    rng = random.Random(1)
    for _ in range(200):
        scene = sample_scene(rng, 4, shapes=["cross", None, "circle", None],
                             colors=[None, "red", None, None], sizes=["large"] * 4)
        o = scene.objects
        assert len(o) == 4 and o[0].shape == "cross" and o[2].shape == "circle"
        assert o[1].color == "red" and all(x.size == "large" for x in o)
    with pytest.raises(ValueError):
        sample_scene(rng, 5)
    with pytest.raises(ValueError):
        sample_scene(rng, 2, shapes=["circle"])


def test_place_scene_with_relation():
    rng = random.Random(2)
    for rel in ("left of", "right of", "above", "below"):
        for _ in range(30):
            scene = place_scene(rng, [{"shape": "circle", "color": "red"}, {"size": "small"}],
                                relation=(0, rel, 1))
            a, b = scene.objects
            assert (a.shape, a.color, b.size) == ("circle", "red", "small")
            assert relations(a, b) == {rel}


def test_render_is_exact_and_deterministic():
    o = Obj("square", "blue", "small", 10, 5, 7)
    img = render(Scene((o,)))
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert (img[7:17, 5:15] == COLORS["blue"]).all()
    img[7:17, 5:15] = 255
    assert (img == 255).all()
    rng = random.Random(3)
    for _ in range(50):
        scene = sample_scene(rng)
        a, b = render(scene), render(scene)
        assert (a == b).all()
        colours = {tuple(c) for c in a.reshape(-1, 3)}
        assert colours <= set(COLORS.values()) | {(255, 255, 255)}   # no anti-aliasing
        assert (np.asarray(render_image(scene)) == a).all()
        assert isinstance(render_image(scene), Image.Image)


def test_relations_follow_the_spec():
    def at(cx, cy, s=10):
        return Obj("circle", "red", "small", s, cx - s // 2, cy - s // 2)

    a = at(20, 30)
    assert relations(a, at(28, 30)) == {"left of"}        # dx = 8 exactly
    assert relations(a, at(27, 30)) == set()              # dx = 7 too small
    assert relations(at(28, 30), a) == {"right of"}
    assert relations(a, at(20, 40)) == {"above"}
    assert relations(at(20, 40), a) == {"below"}
    assert relations(a, at(30, 40)) == set()              # |dx| == |dy|: neither
    assert relations(a, at(40, 35)) == {"left of"}
    assert relations(a, at(25, 50)) == {"above"}
    assert a.cx == 20 and a.cy == 30


def test_relations_are_antisymmetric_on_random_scenes():
    rng = random.Random(4)
    opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    for _ in range(300):
        objs = sample_scene(rng, 2).objects
        r, q = relations(objs[0], objs[1]), relations(objs[1], objs[0])
        assert len(r) <= 1 and {opposite[x] for x in r} == q
