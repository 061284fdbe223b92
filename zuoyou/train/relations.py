"""(v25, v26) Relations by a curriculum: training-only questions that build the world's relation question in steps.

Every recipe up to v24 answered "Is the red circle left of the blue square?" at chance (held-out VQA relation
0.42-0.55; training log, sessions 11 and 17-19). Two things were missing:

- **the place of an image token.** The understanding encoder's labels are the same wherever an object stands, so
  it kept each token's column poorly (its position embeddings ~20x smaller than its patch embeddings) and the
  aligner lost half of the rest. ``keep_places`` fine-tunes encoder + aligner so that a linear read of every
  image token gives its own (column, row), with their outputs held close to what they were (distillation), so
  that the LM reading them keeps its other answers.
- **a path to the comparison.** A fresh LM given both places as inputs stays at chance on the relation for over a
  thousand steps, and reaches a partial plateau (0.645) after 2600; taught one named object's place first (*side*),
  then which of two is further along one axis (*sign*), it learns the spec's rule within 100 steps (0.948;
  ``docs/probes/relations_curriculum.py``). The stages of v25 ask these questions in that order
  (``relation_questions``, by the stage's weights).

v25 still answered at chance (0.49). What it lacked (twenty-first session): the LM never carried a named object's
place to the question's words or the answer. **v26** trains it to, through training-only ``PlaceHeads`` (bottom of
this file) that read each named object's centre at its shape word and both centres at the answer position.

Kinds (``KINDS``), all yes/no, "yes" about half the time:
  side      ``Is the red circle on the left half?``      the object's centre x < 32 (left), >= 32 (right); y alike
  sign      ``Is the red circle further left than the blue square?``   one coordinate, >= 8 px (the spec's margin)
  relation  the world's relation question (``zuoyou.shapes.sample_question``), the spec's rule
"""

from __future__ import annotations

import math
import random
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..shapes import sample_question, sample_scene
from ..shapes.language import _unique_pairs
from ..shapes.world import SHAPES, Scene

HALF = 32  # the canvas's middle (64 px)
MARGIN = 8  # the spec's relations need dx >= 8 (or dy)
SIDES = {"left": lambda o: o.cx < HALF, "right": lambda o: o.cx >= HALF,
         "top": lambda o: o.cy < HALF, "bottom": lambda o: o.cy >= HALF}
FURTHER = {"further left than": lambda a, b: b.cx - a.cx >= MARGIN, "further right than": lambda a, b: a.cx - b.cx >= MARGIN,
           "higher than": lambda a, b: b.cy - a.cy >= MARGIN, "lower than": lambda a, b: a.cy - b.cy >= MARGIN}
KINDS = ("side", "sign", "relation")


def relation_question(rng: random.Random, scene: Scene, kind: str) -> tuple[str, str] | None:
    """``(question, answer)`` of ``kind`` about ``scene``, or None where the scene has no objects to ask it of."""
    objs = _unique_pairs(scene.objects)  # the objects a question can name
    if kind == "side":
        if not objs:
            return None
        o, side = rng.choice(objs), rng.choice(list(SIDES))
        return f"Is the {o.color} {o.shape} on the {side} half?", "yes" if SIDES[side](o) else "no"
    if len(objs) < 2:
        return None
    if kind == "relation":
        return tuple(sample_question(rng, scene, "relation")[1:])
    if kind != "sign":
        raise ValueError(f"unknown relation question kind {kind!r}; known: {', '.join(KINDS)}")
    want = rng.random() < 0.5
    cands = [(a, r, b) for a in objs for b in objs if a is not b for r in FURTHER if FURTHER[r](a, b) == want]
    if not cands:
        return None
    a, r, b = rng.choice(cands)
    return f"Is the {a.color} {a.shape} {r} the {b.color} {b.shape}?", "yes" if want else "no"


def relation_questions(rng: random.Random, scene: Scene, weights: dict[str, float], n: int) -> list[tuple[str, str]]:
    """Up to ``n`` questions about ``scene``, each of a kind drawn by ``weights`` (fewer where kinds do not apply)."""
    kinds, w = list(weights), list(weights.values())
    out = []
    for _ in range(n):
        qa = relation_question(rng, scene, rng.choices(kinds, w)[0])
        if qa is not None:
            out.append(qa)
    return out


# ------------------------------------------------------------------------------------------------ keep_places
def place_targets(grid: int) -> torch.Tensor:
    """(grid * grid, 2): each token's own (column, row), centred and scaled to about [-1.75, 1.75]."""
    idx = torch.arange(grid * grid)
    return (torch.stack([idx % grid, idx // grid], -1).float() - (grid - 1) / 2) / 2


def linear_read_r2(feats: torch.Tensor, target: torch.Tensor, ridge: float = 1.0) -> list[float]:
    """Held-out R^2 (per target column) of a ridge read of ``target`` from ``feats``: fitted on the first half of
    the rows, scored on the second. (N, C) x (N, k) -> k floats."""
    n = feats.shape[0] // 2
    x = torch.cat([feats, torch.ones(feats.shape[0], 1)], 1).double()
    y = target.double()
    w = torch.linalg.solve(x[:n].T @ x[:n] + ridge * torch.eye(x.shape[1], dtype=x.dtype), x[:n].T @ y[:n])
    err = ((x[n:] @ w - y[n:]) ** 2).sum(0)
    return (1 - err / ((y[n:] - y[n:].mean(0)) ** 2).sum(0)).tolist()


def keep_places(model, steps: int, seed: int = 0, batch_size: int = 64, lr: float = 1e-3, images=None,
                keep_weight: float = 1.0, log=print) -> dict:
    """Fine-tune ``model.vision_model`` and ``model.aligner`` in place, ``steps`` AdamW steps (50 warm-up, cosine):
    loss = ``keep_weight`` x ||aligner output - its output before||^2 / ||before||^2 + MSE of two training-only linear
    heads reading every token's own (column, row) from the encoder's and from the aligner's output.

    ``images(rng, n)`` -> (n, 3, S, S) training images (default: rendered scenes). Returns the held-out linear
    read R^2 of (column, row) at the aligner's output before and after, and the mean relative feature change."""
    import copy

    from .vq import scenes_to_tensor

    images = images or (lambda r, n: scenes_to_tensor([sample_scene(r) for _ in range(n)]))
    enc, ali = model.vision_model, model.aligner
    old = nn.Sequential(copy.deepcopy(enc), copy.deepcopy(ali)).eval().requires_grad_(False)
    x_val = images(random.Random(seed + 4242), 200)
    with torch.no_grad():
        old_val = old(x_val)  # (200, N, D)
    grid = int(math.isqrt(old_val.shape[1]))
    target = place_targets(grid)

    def read(feats):  # (B, N, D) -> [R^2 column, R^2 row]
        return [round(v, 4) for v in linear_read_r2(feats.reshape(-1, feats.shape[-1]), target.repeat(feats.shape[0], 1))]

    stats = {"steps": steps, "r2_before": read(old_val)}
    head_enc = nn.Linear(enc.vision_tower.norm.normalized_shape[0], 2)
    head_ali = nn.Linear(old_val.shape[-1], 2)
    params = [*enc.parameters(), *ali.parameters(), *head_enc.parameters(), *head_ali.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng = random.Random(seed)
    enc.train(), ali.train()
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        x = images(rng, batch_size)
        with torch.no_grad():
            before = old(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fe = enc(x)  # (B, N, width)
            fa = ali(fe)  # (B, N, D)
        fe, fa = fe.float(), fa.float()
        keep = ((fa - before) ** 2).sum(-1).mean() / (before ** 2).sum(-1).mean()
        want = target.expand(*fa.shape[:2], 2)  # (B, N, 2)
        place = F.mse_loss(head_ali(fa), want) + F.mse_loss(head_enc(fe), want)
        loss = keep_weight * keep + place
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % 100 == 0:
            log(f"keep places: step {step + 1}/{steps}, {(time.time() - t0) / 60:.1f} min, "
                f"feature change {keep.item():.4f}, place {place.item():.4f}")
    enc.eval(), ali.eval()
    with torch.no_grad():
        new_val = ali(enc(x_val))
    stats.update(r2_after=read(new_val), minutes=round((time.time() - t0) / 60, 2),
                 relative_change=round(((new_val - old_val).norm(dim=-1) / old_val.norm(dim=-1)).mean().item(), 4))
    log(f"keep places: {stats}")
    return stats


# ------------------------------------------------------------------------------------------------ place_aux (v26)
# v25's curriculum left relations at chance: its LM never carried the named objects' places to where it answers.
# A probe on v24 (twenty-first session) found the shape word's token ("circle" in "the red circle") held nothing of
# that object's place at any layer (held-out linear R^2 < 0). Training-only linear heads that read, from the LM's
# hidden states, each named object's centre at its shape word (layer ``q_layer``) and both centres at the answer
# position (layer ``a_layer``) made the lookup happen; the relation answers followed (held-out 0.49 -> 0.93).
def named_objects(question: str, scene: Scene) -> list:
    """The objects ``question`` names as "{color} {shape}", in the order named (only objects unique in ``scene``)."""
    objs = {(o.color, o.shape): o for o in _unique_pairs(scene.objects)}
    words = question.rstrip("?.").split()
    return [objs[w] for w in zip(words, words[1:]) if w in objs]


def shape_word_ids(tokenizer) -> set[int]:
    """Token ids of the shape words as they follow a colour (" circle", ...); empty if one is not a single token."""
    ids = [tokenizer.encode(" " + s, add_special_tokens=False).ids for s in SHAPES]
    return {i[0] for i in ids} if all(len(i) == 1 for i in ids) else set()


def place_annotations(ids: list[int], loss_mask: list[bool], shape_ids: set[int], named: list[list]) -> tuple[list, list]:
    """Targets of the place heads in one conversation: ``named[t]`` = the objects turn t's question names.

    Returns ``places`` [(position of the object's shape word, x, y)] and ``pairs`` [(position that predicts the answer,
    xA, yA, xB, yB)] for two-object questions; centres scaled to [-1, 1). A turn whose shape words do not match its
    named objects one to one gets no targets."""
    places, pairs = [], []
    pos, turn = 0, 0
    while pos < len(ids) and turn < len(named):
        answer = loss_mask.index(True, pos)  # this turn's answer starts here
        words = [i for i in range(pos, answer) if ids[i] in shape_ids]
        objs = named[turn]
        if objs and len(words) == len(objs):
            xy = [(o.cx / HALF - 1, o.cy / HALF - 1) for o in objs]
            places += [(p, x, y) for p, (x, y) in zip(words, xy)]
            if len(objs) == 2:
                pairs.append((answer - 1, *xy[0], *xy[1]))
        pos = answer
        while pos < len(ids) and loss_mask[pos]:
            pos += 1
        turn += 1
    return places, pairs


class PlaceHeads(nn.Module):
    """Training-only linear heads on the LM's hidden states (see above), attached to a model as ``place_heads`` by
    ``attach`` for as long as it trains, and never saved with it (``detach``).

    ``loss(places, pairs)``: MSE of each named object's centre read at its shape word (layer ``q_layer``'s output)
    plus the MSE of the two centres read at the answer position (layer ``a_layer``'s), on a batch's ``places`` /
    ``pairs``."""

    def __init__(self, dim: int, q_layer: int = 2, a_layer: int = 4):
        super().__init__()
        self.q_layer, self.a_layer = q_layer, a_layer
        self.at_word = nn.Linear(dim, 2)
        self.at_answer = nn.Linear(dim, 4)
        # zero: a random head's error on hidden states of norm ~10-20 is ~100x the targets' variance, and would
        # dominate the (clipped) first gradients of the LM; from zero the heads' pull grows as they learn to read
        for p in self.parameters():
            nn.init.zeros_(p)
        self._acts: dict[int, torch.Tensor] = {}
        self._hooks = []

    @classmethod
    def attach(cls, model, **kw) -> "PlaceHeads":
        layers = model.language_model.model.layers
        heads = cls(model.config.lm.hidden_size, **kw)
        for i in {heads.q_layer, heads.a_layer}:
            if not 0 <= i < len(layers):
                raise ValueError(f"place heads read layer {i}, but the LM has {len(layers)} layers")
            heads._hooks.append(layers[i].register_forward_hook(heads._keep(i)))
        model.place_heads = heads
        return heads

    @staticmethod
    def detach(model) -> None:
        heads = getattr(model, "place_heads", None)
        if heads is not None:
            for h in heads._hooks:
                h.remove()
            del model.place_heads

    def _keep(self, i: int):
        def hook(module, inputs, out):
            if self.training and torch.is_grad_enabled():  # only training steps keep their activations
                self._acts[i] = out
        return hook

    def loss(self, places: torch.Tensor | None, pairs: torch.Tensor | None) -> torch.Tensor:
        """places: (K, 4) rows (batch row, position, x, y); pairs: (M, 6) rows (batch row, position, xA, yA, xB, yB);
        None = no such targets in the batch."""
        total = torch.zeros(())
        for rows, layer, head in ((places, self.q_layer, self.at_word), (pairs, self.a_layer, self.at_answer)):
            if rows is not None and len(rows) and layer in self._acts:  # (none kept: an evaluation's forward, without grad)
                h = self._acts[layer][rows[:, 0].long(), rows[:, 1].long()]  # (K, D)
                total = total + F.mse_loss(head(h.float()), rows[:, 2:].float())
        self._acts.clear()
        return total
