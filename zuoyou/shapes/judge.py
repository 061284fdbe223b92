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
3. **Clean-up.**  A spur of one or two 1-pixel rows/columns sticking out of a blob
   (a stray pixel of the same colour touching it) is trimmed from its bounding box.
4. **Shape.**  The blob mask is compared (IoU) with the four shape templates drawn at
   the blob's own bounding-box width and height (:func:`world.shape_mask`); the best
   wins.  On a rendered object the right template matches with IoU 1.
5. **Size and position.**  Side = longer bbox side: small when ``<= SMALL_MAX`` (14),
   else large.  Centre = bbox centre, the renderer's convention.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .world import CANVAS, COLORS, SHAPES, Obj, shape_mask

MIN_AREA = 20       # blobs with fewer pixels are noise
SMALL_MAX = 14      # longest bbox side <= this -> "small"
_SPUR_MAX = 2       # at most this many thin rows/columns are trimmed per side
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


def _trim(mask: np.ndarray):
    """Trim thin spurs (<= 2 rows/cols holding <= 1 pixel next to a >= 4-pixel row).

    Returns ``(mask, top, left)``: the trimmed mask and the offsets removed.
    """
    top = left = 0
    for axis in (0, 1):
        for side in (0, 1):
            counts = mask.sum(axis=1 - axis)
            if side:
                counts = counts[::-1]
            k = 0
            while k < min(_SPUR_MAX, len(counts) - 1) and counts[k] <= 1:
                k += 1
            if k and counts[k] >= 4:
                size = mask.shape[axis]
                sl = slice(k, size) if side == 0 else slice(0, size - k)
                mask = mask[sl] if axis == 0 else mask[:, sl]
                if side == 0:
                    if axis == 0:
                        top += k
                    else:
                        left += k
    # drop rows/columns left empty by the trimming
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    mask = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    return mask, top + int(rows[0]), left + int(cols[0])


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """Best-matching shape for a blob mask cropped to its bbox, and its IoU."""
    h, w = mask.shape
    area = mask.sum()
    best, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        t = shape_mask(shape, w, h)
        inter = np.count_nonzero(mask & t)
        iou = inter / (area + np.count_nonzero(t) - inter)
        if iou > best_iou:
            best, best_iou = shape, iou
    return best, float(best_iou)


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
        mask, dt, dl = _trim(mask)
        if mask.sum() < min_area:
            continue
        h, w = mask.shape
        side = max(w, h)
        shape, _ = classify_shape(mask)
        left, top = x0 + dl, r0 + dt
        out.append(Obj(shape=shape, color=_COLOR_NAMES[val - 1],
                       size="small" if side <= SMALL_MAX else "large", s=side,
                       x0=_half(left + (w - side) / 2), y0=_half(top + (h - side) / 2)))
    out.sort(key=lambda o: (o.cx, o.cy))
    return out
