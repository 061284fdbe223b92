"""The ShapesWorld scene parser ("judge"): any 64 x 64 RGB image -> list of objects.

Pipeline (numpy only, ~1 ms per image):

1. **Pixel classes.**  Each pixel is assigned to the palette colour whose segment
   *white -> colour* passes nearest to it, and counts as that colour when it lies at
   least half way along the segment (``t >= 0.5``), else as background.  For flat
   pixels this is exactly "nearest palette colour or background"; it also keeps the
   pale fringe of a blurred object with the object's colour (a blurred blue edge is
   nearer to cyan than to blue, but it lies on the white -> blue segment).
2. **Blobs.**  4-connected components per colour, labelled on horizontal runs with a
   small union-find.  Blobs under ``MIN_AREA`` pixels are ignored.
3. **Shape.**  The blob mask is compared with the four shape templates drawn at the
   blob's own bounding-box width and height (:func:`world.shape_mask`).  An exact
   match wins (so rendered objects parse exactly); otherwise the template under which
   the mask is most likely, given a simple per-pixel noise model (ragged edges, some
   spill, rare strays), wins.
4. **Size and position.**  Side = longer bbox side: small when ``<= SMALL_MAX`` (14),
   else large.  Centre = bbox centre, the renderer's convention.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

from .world import CANVAS, COLORS, SHAPES, Obj, shape_mask

MIN_AREA = 12       # blobs with fewer pixels are noise
SMALL_MAX = 14      # longest bbox side <= this -> "small"
_COLOR_NAMES = tuple(COLORS)
_DIR = np.array([COLORS[c] for c in _COLOR_NAMES], np.float32) - 255.0   # (6, 3)
_DIR_N2 = (_DIR ** 2).sum(1)
_W = CANVAS + 2     # padded row width used by the run labelling


def to_array(img) -> np.ndarray:
    """A PIL image or array -> (64, 64, 3) uint8 RGB array (validated)."""
    if isinstance(img, Image.Image):
        img = np.asarray(img.convert("RGB"))
    arr = np.asarray(img)
    if arr.shape != (CANVAS, CANVAS, 3):
        raise ValueError(f"expected a {CANVAS}x{CANVAS} RGB image, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return arr


def classify_pixels(img) -> np.ndarray:
    """(64, 64) int8 class map: 0 = background, k + 1 = ``list(COLORS)[k]``."""
    p = to_array(img).reshape(-1, 3).astype(np.float32) - 255.0
    g = p @ _DIR.T                                                     # (N, 6)
    t = np.clip(g / _DIR_N2, 0.0, 1.0)
    # |p - t d|^2 = |p|^2 - 2 t (p.d) + t^2 |d|^2 ; |p|^2 is common to all colours
    k = (t * (t * _DIR_N2 - 2.0 * g)).argmin(1)
    tk = np.take_along_axis(t, k[:, None], 1)[:, 0]
    return np.where(tk >= 0.5, k + 1, 0).astype(np.int8).reshape(CANVAS, CANVAS)


def _blobs(cls: np.ndarray):
    """4-connected same-class components as lists of runs ``(row, c0, c1)``.

    Yields ``(class, runs)``; ``c1`` is exclusive.
    """
    pad = np.zeros((CANVAS, _W), np.int8)
    pad[:, 1:CANVAS + 1] = cls
    flat = pad.ravel()
    bounds = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts, ends = bounds[:-1], bounds[1:]
    vals = flat[starts]
    keep = vals != 0
    starts, ends, vals = starts[keep], ends[keep], vals[keep]
    rows = (starts // _W).tolist()
    c0s = (starts % _W - 1).tolist()
    c1s = (ends % _W - 1).tolist()
    vals = vals.tolist()
    n = len(rows)
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    prev_lo = prev_hi = 0      # index range of the previous row's runs
    i = 0
    while i < n:
        r = rows[i]
        j = i
        while j < n and rows[j] == r:
            j += 1
        if prev_hi > prev_lo and rows[prev_lo] == r - 1:
            for a in range(i, j):
                for b in range(prev_lo, prev_hi):
                    if c0s[b] >= c1s[a]:
                        break
                    if vals[a] == vals[b] and c1s[b] > c0s[a]:
                        ra, rb = find(a), find(b)
                        if ra != rb:
                            parent[ra] = rb
        prev_lo, prev_hi = i, j
        i = j
    groups: dict[int, list] = {}
    for k in range(n):
        groups.setdefault(find(k), []).append((rows[k], c0s[k], c1s[k]))
    for root, runs in groups.items():
        yield vals[root], runs


# Shape likelihood model for a blob given a template (per pixel, independent):
# template interior pixels are present (missing: P_STRAY), template boundary pixels
# are missing with probability P_RAGGED, background pixels next to the template are
# present with probability P_NEAR, farther ones with P_STRAY.
P_RAGGED, P_NEAR, P_STRAY = 0.3, 0.1, 0.02


@lru_cache(maxsize=256)
def _templates(w: int, h: int):
    """Stacked templates (4, h*w) bool, and the log-likelihood terms for (w, h).

    ``loglik(mask) = base + gain @ mask`` (one row per shape, order of ``SHAPES``).
    """
    tpl = np.stack([shape_mask(s, w, h) for s in SHAPES])
    p = np.pad(tpl, ((0, 0), (1, 1), (1, 1)))
    nb_all = p[:, :-2, 1:-1] & p[:, 2:, 1:-1] & p[:, 1:-1, :-2] & p[:, 1:-1, 2:]
    nb_any = p[:, :-2, 1:-1] | p[:, 2:, 1:-1] | p[:, 1:-1, :-2] | p[:, 1:-1, 2:]
    inner, edge = tpl & nb_all, tpl & ~nb_all
    near = ~tpl & nb_any
    far = ~tpl & ~nb_any
    lg = np.log
    present = (inner * 0.0 + edge * lg(1 - P_RAGGED) + near * lg(P_NEAR)
               + far * lg(P_STRAY))
    absent = (inner * lg(P_STRAY) + edge * lg(P_RAGGED) + near * lg(1 - P_NEAR)
              + far * lg(1 - P_STRAY))
    n = len(SHAPES)
    return (tpl.reshape(n, -1), absent.reshape(n, -1).sum(1),
            (present - absent).reshape(n, -1).astype(np.float32))


def classify_shape(mask: np.ndarray) -> str:
    """Shape of a blob mask cropped to its bbox.

    An exact template match wins outright (so rendered objects parse exactly);
    otherwise the template with the highest log-likelihood under the noise model
    above (ragged edges, a little spill, rare strays) wins.
    """
    h, w = mask.shape
    tpl, base, gain = _templates(w, h)
    flat = mask.ravel()
    exact = np.flatnonzero((tpl == flat).all(1))
    if len(exact):
        return SHAPES[exact[0]]
    return SHAPES[int(np.argmax(base + gain @ flat))]


def _half(v: float):
    """An int when integral, else the float (keeps rendered objects' x0/y0 ints)."""
    return int(v) if float(v).is_integer() else v


def parse_image(img, min_area: int = MIN_AREA) -> list[Obj]:
    """Parse a 64 x 64 RGB image (PIL image or uint8 array) into objects.

    Returns :class:`Obj` instances sorted by ``(cx, cy)``.  ``s`` is the longer side of
    the blob's bounding box; ``x0``/``y0`` are chosen so that ``cx``/``cy`` are the exact
    bbox centre (half-integers only for non-square blobs).
    """
    cls = classify_pixels(img)
    out = []
    for val, runs in _blobs(cls):
        if sum(c1 - c0 for _, c0, c1 in runs) < min_area:
            continue
        r0 = min(r for r, _, _ in runs)
        r1 = max(r for r, _, _ in runs)
        x0 = min(c0 for _, c0, _ in runs)
        x1 = max(c1 for _, _, c1 in runs)
        mask = np.zeros((r1 - r0 + 1, x1 - x0), bool)
        for r, c0, c1 in runs:
            mask[r - r0, c0 - x0:c1 - x0] = True
        h, w = mask.shape
        side = max(w, h)
        shape = classify_shape(mask)
        out.append(Obj(shape=shape, color=_COLOR_NAMES[val - 1],
                       size="small" if side <= SMALL_MAX else "large", s=side,
                       x0=_half(x0 + (w - side) / 2), y0=_half(r0 + (h - side) / 2)))
    out.sort(key=lambda o: (o.cx, o.cy))
    return out
