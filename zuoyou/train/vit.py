"""Pre-train the understanding encoder (the SigLIP-style ViT) on ShapesWorld, before the LM stages.

Janus starts from a SigLIP encoder pre-trained on billions of image-text pairs; our ViT starts
random, and learning to see through the LM's answer loss alone is slow (a few answer tokens per
image). A contrastive (SigLIP) objective would need large batches to separate near-identical scenes,
so we use the world's exact labels instead, densely, as a detector backbone is pre-trained: every
8x8 patch token (the positions the LM reads) predicts

- ``centre``: which object has its centre in this patch, as one class of (shape, colour, size),
  or none (two centres never share a patch: boxes are >= 3 px apart and >= 10 px wide);
- ``offset``: where in the patch that centre lies (x, y in [0, 1)); the relations need the
  centre to a pixel, not to a patch;
- ``cover``: the (shape, colour, size) class of the object covering most of the patch's pixels, or
  background; every patch of an object gets its attributes, a far denser signal than its centre;
- (v7) ``absolute``: where on the canvas that centre lies, in patch units (x, y in [0, 8)), from a
  linear read of the same token. The offset alone leaves the patch's own place to the LM, which
  sees only a 1-D token order: the v6 model answered relations at chance (0.55 on yes/no) and
  orders descriptions (by centre x) poorly. Read linearly off each centre's token, the absolute
  place turns "is A left of B" into comparing two numbers.

The head is thrown away afterwards; the LM stages then train the encoder further with the rest.
"""

from __future__ import annotations

import itertools
import random
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.siglip import CLIPVisionTower
from ..shapes.world import COLORS, SHAPES, SIZES, relations, sample_scene, shape_mask
from .loop import Stage, timed_steps
from .vq import scenes_to_tensor

PATCH = 8
_SHAPES, _COLORS, _SIZES = list(SHAPES), list(COLORS), list(SIZES)
NUM_CENTRE = 1 + len(_SHAPES) * len(_COLORS) * len(_SIZES)  # 0 = no centre here


def centre_class(o) -> int:
    return 1 + (_SHAPES.index(o.shape) * len(_COLORS) + _COLORS.index(o.color)) * len(_SIZES) + _SIZES.index(o.size)


def patch_targets(scene, size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per 8x8 patch of the ``size`` x ``size`` render of ``scene`` (row-major): centre class, offset (2,), cover."""
    g = size // PATCH
    centre = np.zeros(g * g, np.int64)
    offset = np.zeros((g * g, 2), np.float32)
    owner = np.zeros((size, size), np.int64)  # per pixel: 1 + index of the object drawn there, 0 = background
    for i, o in enumerate(scene):
        col, row = min(int(o.cx) // PATCH, g - 1), min(int(o.cy) // PATCH, g - 1)
        centre[row * g + col] = centre_class(o)
        offset[row * g + col] = (o.cx / PATCH - col, o.cy / PATCH - row)
        owner[o.y0:o.y0 + o.s, o.x0:o.x0 + o.s][shape_mask(o.shape, o.s, o.s)] = i + 1
    classes = np.array([0] + [centre_class(o) for o in scene])
    patches = owner.reshape(g, PATCH, g, PATCH).transpose(0, 2, 1, 3).reshape(g * g, PATCH * PATCH)  # (64, 64 px)
    counts = np.stack([(patches == k).sum(1) for k in range(1, len(classes))], 1)  # (64 patches, objects)
    cover = np.where(counts.max(1) > 0, classes[counts.argmax(1) + 1], 0)  # any object pixel beats background
    return centre, offset, cover


class PatchHead(nn.Module):
    def __init__(self, width: int, absolute: bool = False):
        super().__init__()
        self.out = nn.Linear(width, 2 * NUM_CENTRE + 2)
        # created after ``out`` so that ``out`` draws the same numbers with or without it
        self.absolute = nn.Linear(width, 2) if absolute else None
        if absolute:  # start at the canvas centre: the first steps need not spend themselves learning the mean
            nn.init.constant_(self.absolute.bias, 4.0)

    def forward(self, h):  # (B, N, width) -> centre logits, offsets, cover logits, absolute centres or None
        y = self.out(h)
        where = self.absolute(h) if self.absolute is not None else None  # (B, N, 2), patch units
        return y[..., :NUM_CENTRE], y[..., NUM_CENTRE:NUM_CENTRE + 2].sigmoid(), y[..., NUM_CENTRE + 2:], where


def absolute_centres(offset: torch.Tensor) -> torch.Tensor:
    """(B, 64, 2) in-patch offsets -> centres on the canvas in patch units (x = column + offset x)."""
    g = int(offset.shape[1] ** 0.5)
    idx = torch.arange(g * g)
    grid = torch.stack([idx % g, idx // g], -1).to(offset.dtype)  # (64, 2): column, row
    return grid + offset


def relation_agreement(pred: torch.Tensor, true: torch.Tensor, has: torch.Tensor) -> float:
    """Over pairs of objects in each image: is the spec's relation (``world.relations``, which reads only
    the centres) the same from the predicted centres as from the true ones?"""
    right = total = 0
    for p, t, m in zip(pred * PATCH, true * PATCH, has):  # (64, 2) pixels each
        p, t = [[SimpleNamespace(cx=x, cy=y) for x, y in c[m].tolist()] for c in (p, t)]
        for i, j in itertools.combinations(range(len(t)), 2):
            right += relations(p[i], p[j]) == relations(t[i], t[j])
            total += 1
    return right / max(total, 1)


def batch(rng: random.Random, n: int, reconstruct=None, recon_share: float = 0.0):
    scenes = [sample_scene(rng) for _ in range(n)]
    x = scenes_to_tensor(scenes)  # (n, 3, 64, 64)
    targets = [patch_targets(s, x.shape[-1]) for s in scenes]
    recon = [i for i in range(n) if rng.random() < recon_share]
    if recon and reconstruct is not None:  # images as a model draws them, targets of the scene drawn
        x[recon] = reconstruct(x[recon])
    centre, offset, cover = (torch.from_numpy(np.stack(t)) for t in zip(*targets))
    return x, centre, offset, cover


def patch_loss(head: PatchHead, h, centre, offset, cover) -> tuple[torch.Tensor, dict]:
    c_logits, off, p_logits, where = head(h.float())
    lc = F.cross_entropy(c_logits.flatten(0, 1), centre.flatten())
    has = centre > 0
    lo = F.mse_loss(off[has], offset[has]) if has.any() else off.sum() * 0
    lp = F.cross_entropy(p_logits.flatten(0, 1), cover.flatten())
    with torch.no_grad():
        right = c_logits.argmax(-1) == centre
        image_acc = right.all(-1).float().mean().item()  # every patch of an image right
        object_acc = right[has].float().mean().item()  # patches holding a centre
    stats = {"centre": lc.item(), "offset": lo.item(), "cover": lp.item(), "object_acc": object_acc,
             "image_acc": image_acc}
    loss = lc + 10 * lo + lp
    if where is not None:
        true = absolute_centres(offset)
        la = F.mse_loss(where[has], true[has]) if has.any() else where.sum() * 0
        loss = loss + la  # patch units: a pixel off costs (1/8)^2, as for the offset
        stats["absolute"] = la.item()
        if not torch.is_grad_enabled():  # (held out) relations read off the predicted centres
            stats["relation_acc"] = relation_agreement(where.detach(), true, has)
    return loss, stats


def pretrain_encoder(tower: CLIPVisionTower, minutes: float, seed: int = 0, batch_size: int = 64, lr: float = 3e-3,
                     reconstruct=None, recon_share: float = 0.3, log=print, max_steps: int | None = None,
                     absolute: bool = True) -> dict:
    """Train ``tower`` in place for ``minutes`` (bf16 autocast, AdamW, cosine decay); returns final stats.

    ``absolute``: also the canvas place of each centre (v7 on; recipes v3-v6 were built without it)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    head = PatchHead(tower.vision_tower.norm.normalized_shape[0], absolute)
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = Stage("encoder", lr=lr, minutes=minutes, warmup=100, decay=True)  # the LM stages' schedule
    tower.train()
    t0, steps, stats = time.time(), 0, {}
    for step, frac in timed_steps(minutes, max_steps=max_steps, desc="encoder"):
        for g in opt.param_groups:
            g["lr"] = sched.lr_at(step, frac)
        x, centre, offset, cover = batch(rng, batch_size, reconstruct, recon_share)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = tower(x)  # (B, 64, width)
        loss, stats = patch_loss(head, h, centre, offset, cover)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        steps = step + 1
        if steps % 200 == 0:
            log(f"encoder pre-training: step {steps}, {(time.time() - t0) / 60:.1f} min, "
                + ", ".join(f"{k} {v:.3f}" for k, v in stats.items()))
    tower.eval()
    with torch.no_grad():  # held-out scenes
        x, *targets = batch(random.Random(seed + 10_000_019), 256)
        _, held_out = patch_loss(head, tower(x), *targets)
    return {"steps": steps, "minutes": round((time.time() - t0) / 60, 2), "train": {k: round(v, 4) for k, v in stats.items()},
            "held_out": {k: round(v, 4) for k, v in held_out.items()}}
