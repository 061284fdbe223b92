"""ShapesWorld judge: exact recovery of rendered scenes, robustness to mild noise."""

import collections
import random
import time

import numpy as np
import pytest
from PIL import Image

from zuoyou.shapes.judge import classify_pixels, parse_image
from zuoyou.shapes.world import COLORS, SHAPES, SIZES, Obj, Scene, render, sample_scene

PALETTE = np.array(list(COLORS.values()), np.uint8)


def _sorted(objs):
    return sorted(objs, key=lambda o: (o.cx, o.cy))


def test_recovers_3000_rendered_scenes_exactly():
    rng = random.Random(1234)
    bad = []
    t = time.perf_counter()
    for i in range(3000):
        scene = sample_scene(rng)
        got = parse_image(render(scene))
        want = _sorted(scene.objects)
        ok = len(got) == len(want) and all(
            (g.shape, g.color, g.size) == (w.shape, w.color, w.size)
            and abs(g.cx - w.cx) <= 0.5 and abs(g.cy - w.cy) <= 0.5
            for g, w in zip(got, want))
        if not ok:
            bad.append((i, want, got))
    elapsed = time.perf_counter() - t
    assert not bad, bad[:3]
    print(f"\njudge exact: 3000/3000 scenes, {elapsed / 3 :.2f} ms per scene incl. sampling")


def test_every_shape_colour_size_alone():
    for shape in SHAPES:
        for color in COLORS:
            for size, (lo, hi) in SIZES.items():
                for s in range(lo, hi + 1):
                    o = Obj(shape, color, size, s, 30 - s // 2, 25 - s // 2)
                    assert parse_image(render(Scene((o,)))) == [o]


def test_accepts_pil_and_sorts_by_centre():
    objs = (Obj("cross", "green", "large", 18, 40, 5), Obj("circle", "red", "small", 12, 5, 40),
            Obj("triangle", "cyan", "small", 12, 5, 5))
    img = Image.fromarray(render(Scene(objs)))
    got = parse_image(img)
    assert got == _sorted(objs)
    assert [o.shape for o in got] == ["triangle", "circle", "cross"]
    with pytest.raises(ValueError):
        parse_image(np.zeros((32, 32, 3), np.uint8))


def test_blank_and_tiny_blobs_are_ignored():
    img = np.full((64, 64, 3), 255, np.uint8)
    assert parse_image(img) == []
    img[10:13, 10:13] = COLORS["red"]          # 9 px: noise
    img[40, 40] = COLORS["blue"]
    assert parse_image(img) == []
    assert classify_pixels(img)[10, 10] == 1 and classify_pixels(img)[0, 0] == 0


def noisy(img, nrng, jitter=0, strays=0, ragged=0.0, erode=False):
    """Mild generation-like noise: colour jitter, stray pixels, eroded edges."""
    img = img.copy()
    obj = (img != 255).any(-1)
    if ragged or erode:
        p = np.pad(obj, 1)
        inner = obj & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
        edge = obj & ~inner
        img[edge if erode else edge & (nrng.random(obj.shape) < ragged)] = 255
    for _ in range(strays):
        y, x = nrng.integers(0, 64, 2)
        img[y, x] = PALETTE[nrng.integers(6)] if nrng.random() < 0.85 else 255
    if jitter:
        img = np.clip(img.astype(int) + nrng.integers(-jitter, jitter + 1, img.shape), 0, 255)
    return img.astype(np.uint8)


def blur(img):
    """3 x 3 box blur (soft edges, as a VQ decoder might produce)."""
    f = np.pad(img.astype(float), ((1, 1), (1, 1), (0, 0)), mode="edge")
    return (sum(f[i:i + 64, j:j + 64] for i in range(3) for j in range(3)) / 9).astype(np.uint8)


def _match(scene, got, tol=1.5):
    """Same multiset of (shape, colour, size) and every centre within ``tol`` px."""
    key = lambda o: (o.shape, o.color, o.size)   # noqa: E731
    if collections.Counter(map(key, got)) != collections.Counter(map(key, scene.objects)):
        return False
    return all(any(key(g) == key(o) and abs(g.cx - o.cx) <= tol and abs(g.cy - o.cy) <= tol
                   for g in got) for o in scene.objects)


NOISES = {
    "jitter20": dict(jitter=20),
    "strays20": dict(strays=20),
    "ragged30": dict(ragged=0.3),
    "erode1px": dict(erode=True),
    "mild_all": dict(jitter=20, strays=8, ragged=0.3),
    "harsh_all": dict(jitter=25, strays=12, ragged=0.5),
}


@pytest.mark.parametrize("name", list(NOISES) + ["blur3"])
def test_robust_to_mild_noise(name):
    rng, nrng = random.Random(99), np.random.default_rng(99)
    n, good = 400, 0
    for _ in range(n):
        scene = sample_scene(rng)
        img = blur(render(scene)) if name == "blur3" else noisy(render(scene), nrng, **NOISES[name])
        good += _match(scene, parse_image(img))
    print(f"\njudge {name}: {good}/{n} = {good / n:.3f}")
    assert good / n >= 0.97
