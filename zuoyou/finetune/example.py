"""Worked example: teach a ShapesWorld model a colour it has never seen (orange), then measure it.

    python -m zuoyou.finetune.example data --out orange-data            # JSONL + PNGs (+ eval.jsonl)
    python -m zuoyou.finetune.example eval --model BASE                 # before
    zuoyou finetune --model BASE --data orange-data --out orange-run --steps 600
    python -m zuoyou.finetune.example eval --model orange-run/model     # after

``data`` renders scenes with the palette extended by the new colour (most scenes hold at least
one object of it, the rest keep the old palette so the model does not forget it) and writes
understanding records (ShapesWorld questions, half of them about the new colour's object),
text-only records (the scene described in words) and generation records (a true caption).

``eval`` measures, on scenes from another seed:
- ``new_color_name``: "What color is the {shape}?" about the new-colour object -> the new name;
- ``new_color_shape``: "What shape is the {color} object?" -> its shape;
- ``old_color_name``: the same colour question about objects of the original palette (forgetting);
- ``gen_new_color``: images for "a photo of a {color} {shape}" whose dominant colour is the new
  one (nearest of the extended palette), and ``gen_shape``: those the judge parses as exactly one
  object of the asked shape;
- ``vq_new_color``: new-colour scenes whose VQ round trip (encode, decode) keeps the new colour
  dominant: the frozen VQ must represent a colour for generation to draw it (a ceiling).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
from pathlib import Path

import numpy as np

from ..shapes import SHAPES, describe, render_image, sample_question, sample_scene
from ..shapes import language, world

NEW_COLOR, NEW_RGB = "orange", (245, 130, 20)
EVAL_SEED = 4_242_001


@contextlib.contextmanager
def extra_color(name: str = NEW_COLOR, rgb=NEW_RGB):
    """ShapesWorld with one more colour (sampling, rendering, captions, questions) inside the block."""
    if name in world.COLORS:
        yield
        return
    caches = (language._all, language._by_text, language._by_shapes)
    world.COLORS[name] = tuple(rgb)
    for c in caches:
        c.cache_clear()
    try:
        yield
    finally:
        del world.COLORS[name]
        for c in caches:
            c.cache_clear()


def _scene(rng: random.Random, color: str | None):
    """A random scene; with ``color``, one random object of it."""
    if color is None:
        return sample_scene(rng)
    n = rng.randint(1, 4)
    colors = [None] * n
    colors[rng.randrange(n)] = color
    return sample_scene(rng, n=n, colors=colors)


def _question(rng: random.Random, scene, color: str):
    """Half the time a question about the new-colour object when one applies, else any."""
    if any(o.color == color for o in scene.objects) and rng.random() < 0.5:
        for qtype in rng.sample(["color_of_shape", "shape_of_color"], 2):
            for _ in range(8):
                try:
                    _, q, a = sample_question(rng, scene, qtype)
                except ValueError:
                    break
                if color in q or a == color:
                    return q, a
    _, q, a = sample_question(rng, scene)
    return q, a


def make_data(out, n: int = 1500, n_eval: int = 32, color: str = NEW_COLOR, rgb=NEW_RGB, share: float = 0.7,
              seed: int = 0) -> dict:
    """Write ``out/data.jsonl``, ``out/eval.jsonl`` and ``out/img/*.png``; returns record counts."""
    out = Path(out)
    (out / "img").mkdir(parents=True, exist_ok=True)
    counts = {}
    with extra_color(color, rgb):
        for name, count, s in (("data", n, seed), ("eval", n_eval, seed + 1)):
            rng = random.Random(s)
            lines = []
            for i in range(count):
                scene = _scene(rng, color if rng.random() < share else None)
                img = f"img/{name}-{i:05d}.png"
                render_image(scene).save(out / img)
                q, a = _question(rng, scene, color)
                lines.append({"type": "understanding", "images": [img],
                              "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                lines.append({"type": "generation", "caption": language.caption(rng, scene), "image": img})
                if i % 4 == 0:
                    q, a = _question(rng, scene, color)
                    lines.append({"type": "text", "messages": [{"role": "user", "content": f"Scene: {describe(scene)}.\n{q}"},
                                                               {"role": "assistant", "content": a}]})
            (out / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
            counts[name] = len(lines)
    return counts


def dominant_color(img, palette: dict) -> str | None:
    """The palette colour nearest to the mean of the image's non-white pixels (None: blank image)."""
    a = np.asarray(img.convert("RGB"), dtype=np.float32).reshape(-1, 3)
    ink = a[np.abs(a - 255).sum(1) > 90]
    if len(ink) < 12:
        return None
    names = list(palette)
    rgb = np.array([palette[k] for k in names], dtype=np.float32)
    votes = np.bincount(((ink[:, None] - rgb[None]) ** 2).sum(-1).argmin(1), minlength=len(names))
    return names[int(votes.argmax())]


def evaluate(pipe, n: int = 96, images: int = 2, color: str = NEW_COLOR, rgb=NEW_RGB, seed: int = EVAL_SEED,
             batch: int = 32) -> dict:
    """The example's before/after numbers (see the module docstring)."""
    import torch

    from ..processor import to_pil
    from ..shapes import parse_image
    from .data import vq_pixels

    rng = random.Random(seed)
    items = []  # (metric, image, question, expected)
    with extra_color(color, rgb):
        palette = dict(world.COLORS)
        while len(items) < 3 * n:
            new = len(items) < 2 * n
            scene = _scene(rng, color if new else None)
            target = [o for o in scene.objects if (o.color == color) == new]
            if not target:
                continue
            o = rng.choice(target)
            if sum(x.shape == o.shape for x in scene.objects) > 1 or sum(x.color == o.color for x in scene.objects) > 1:
                continue
            if new and len(items) >= n:
                items.append(("new_color_shape", render_image(scene), language.question("shape_of_color", o.color), o.shape))
            else:
                items.append(("new_color_name" if new else "old_color_name", render_image(scene),
                              language.question("color_of_shape", o.shape), o.color))
    per: dict[str, list[bool]] = {}
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        reqs = [pipe.text_request([{"role": "user", "content": q, "images": [img]}], max_new_tokens=8)
                for _, img, q, _ in chunk]
        for (metric, _, _, want), got in zip(chunk, pipe.engine.generate_text(reqs)):
            per.setdefault(metric, []).append(got.strip().lower().rstrip(".") == want)
    prompts = [f"a photo of a {color} {s}" for s in SHAPES]
    reqs = [pipe.image_request(p, n=images, seed=seed + j) for j, p in enumerate(prompts)]
    for s, imgs in zip(SHAPES, pipe.engine.generate_images(reqs)):
        for img in imgs:
            per.setdefault("gen_new_color", []).append(dominant_color(img, palette) == color)
            objs = parse_image(img if img.size == (world.CANVAS,) * 2 else img.resize((world.CANVAS,) * 2))
            per.setdefault("gen_shape", []).append(len(objs) == 1 and objs[0].shape == s)
    vq = pipe.engine.model.gen_vision_model
    new_images = [img for metric, img, _, _ in items if metric.startswith("new_color")][:32]
    with torch.no_grad():
        x = torch.stack([vq_pixels(img, vq.config.image_size) for img in new_images])
        p = next(vq.parameters())
        decoded = to_pil(vq.decode_code(vq.encode(x.to(p.device, p.dtype))[1]).float())
    per["vq_new_color"] = [dominant_color(img, palette) == color for img in decoded]
    return {k: round(sum(v) / len(v), 4) for k, v in per.items()} | {"questions": len(items), "images": len(prompts) * images}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m zuoyou.finetune.example", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data", help="render the new-colour fine-tuning data (JSONL + PNGs)")
    d.add_argument("--out", required=True)
    d.add_argument("--n", type=int, default=1500, help="scenes (each gives an understanding and a generation record)")
    d.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("eval", help="before/after numbers for a model")
    e.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    e.add_argument("--n", type=int, default=96, help="questions per understanding metric")
    e.add_argument("--images", type=int, default=2, help="images per generation prompt")
    for q in (d, e):
        q.add_argument("--color", default=NEW_COLOR)
        q.add_argument("--rgb", default=",".join(map(str, NEW_RGB)), help="R,G,B of the new colour")
    a = p.parse_args(argv)
    rgb = tuple(int(x) for x in a.rgb.split(","))
    if a.command == "data":
        print(json.dumps(make_data(a.out, a.n, color=a.color, rgb=rgb, seed=a.seed)))
    else:
        from ..api import load

        print(json.dumps(evaluate(load(a.model, device="cpu"), a.n, a.images, a.color, rgb), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
