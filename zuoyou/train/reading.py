"""Understanding examples beyond the world's rendered scenes, for the reader behind the self-check.

``Engine.generate_images(best_of=K)`` keeps the candidates whose answers to the prompt's questions (how many
objects, how many of each shape, colour of a shape, shape of a colour) the model finds most likely. The model
learns to answer on rendered scenes of 1 to 4 objects and their VQ reconstructions, and on those it answers
right (held out: counts 0.99-1.00). Its own drawings are different: asked for "four circles", v17 (bundled
before v21) draws five or more objects in 50 of 64 validation drawings and says "four" about them with
probability ~1.0; asked for two objects, a drawing of three gets "two" at ~0.7. Two kinds of examples teach
it to read those:

- ``crowded``: rendered scenes of 5 or 6 objects, past the world's four, asked their counts (recipe v19);
- ``own_drawings`` + ``judged_questions``: the model's own drawings of training prompts, asked what the
  world's judge (``zuoyou.shapes.parse_image``, the scene parser the evaluation uses) sees in them.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from ..shapes import CATEGORIES, NUMBERS, SHAPES, Obj, Scene, parse_image, sample_prompt, sample_question, sample_scene
from ..shapes.language import _applicable, question

PAST_FOUR = ("five", "six")  # count answers past the world's four
COUNTS = (*NUMBERS, *PAST_FOUR)
CHECKED = ("count_all", "count_shape", "color_of_shape", "shape_of_color")  # the self-check's question types
OWN_CFG, OWN_TEMPERATURE = 3.0, 0.8  # the bundled model's defaults: drawings like those the self-check sees


def count_questions(rng: random.Random, objects) -> list[tuple[str, str]]:
    """How many objects, and how many of one shape (present 70 % of the time), in a random order."""
    objects = list(objects)
    shape = rng.choice(objects).shape if rng.random() < 0.7 else rng.choice(SHAPES)
    qas = [(question("count_all"), COUNTS[len(objects)]),
           (question("count_shape", shape), COUNTS[sum(o.shape == shape for o in objects)])]
    return qas if rng.random() < 0.5 else qas[::-1]


def crowded(rng: random.Random) -> tuple[Scene, list[tuple[str, str]]]:
    """A training scene of 5 or 6 objects with its counts asked: ``(scene, [(question, answer), ...])``. Half
    of the scenes are all of one shape, like an overshot counting drawing."""
    n = rng.choice((5, 6))
    shapes = [rng.choice(SHAPES)] * n if rng.random() < 0.5 else None
    sizes = ["small" if rng.random() < 0.7 else "large" for _ in range(n)]
    try:
        scene = sample_scene(rng, n, shapes=shapes, sizes=sizes, max_objects=6)
    except RuntimeError:  # large objects that do not fit: all small ones always do
        scene = sample_scene(rng, n, shapes=shapes, sizes=["small"] * n, max_objects=6)
    return scene, count_questions(rng, scene.objects)


def judged_questions(rng: random.Random, objects: list[Obj]) -> list[tuple[str, str]]:
    """Questions of the self-check's types about what the judge found, answered from it: one question of an
    applicable type (up to four objects), or the two counts (five or six)."""
    if len(objects) > len(NUMBERS) - 1:
        return count_questions(rng, objects)
    applicable = _applicable(objects)
    qtype = rng.choice([t for t in CHECKED if t in applicable])
    return [sample_question(rng, objects, qtype)[1:]]


@torch.no_grad()
def own_drawings(pipe, n: int, seed: int, batch: int = 64, log=None) -> list[tuple[torch.Tensor, list[Obj]]]:
    """``n`` drawings by ``pipe``'s model of training-seed GenEval-style prompts (categories uniform), each
    drawn once at ``OWN_CFG`` / ``OWN_TEMPERATURE``: ``[(image (3, 64, 64) in [-1, 1], judged objects)]``,
    keeping those in which the judge finds 1 to 6 objects."""
    rng = random.Random(seed)
    prompts = [sample_prompt(rng, rng.choice(CATEGORIES)) for _ in range(n)]
    out = []
    for i in range(0, n, batch):
        reqs = [pipe.image_request(p.text, n=1, cfg=OWN_CFG, temperature=OWN_TEMPERATURE, seed=seed + i + j,
                                   best_of=1) for j, p in enumerate(prompts[i:i + batch])]
        for (img,) in pipe.engine.generate_images(reqs):
            objs = parse_image(img)
            if 1 <= len(objs) <= len(COUNTS) - 1:
                x = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0)
                out.append((x.permute(2, 0, 1).contiguous(), objs))  # (3, 64, 64)
        if log:
            log(f"own drawings: {min(i + batch, n)}/{n}")
    return out
