"""Understanding-encoder pre-training: exact per-patch targets and a training run that learns."""

from __future__ import annotations

import random

import numpy as np
import torch

from zuoyou.config import get_config
from zuoyou.models.siglip import CLIPVisionTower
from zuoyou.shapes.world import Obj, Scene, sample_scene
from zuoyou.train.vit import NUM_CENTRE, centre_class, patch_targets, pretrain_encoder


def test_patch_targets_mark_each_centre_once_with_its_offset_and_cover():
    scene = Scene((Obj("square", "green", "large", 17, 14, 32), Obj("circle", "cyan", "large", 18, 36, 37)))
    centre, offset, cover = patch_targets(scene)
    assert sorted(np.flatnonzero(centre)) == [5 * 8 + 2, 5 * 8 + 5]
    assert centre[5 * 8 + 2] == centre_class(scene.objects[0]) and centre[5 * 8 + 5] == centre_class(scene.objects[1])
    np.testing.assert_allclose(offset[5 * 8 + 2], (22.5 / 8 - 2, 40.5 / 8 - 5))
    square, circle = (centre_class(o) for o in scene.objects)
    cover = cover.reshape(8, 8)
    assert cover[:4].tolist() == [[0] * 8] * 4 and cover[7].tolist() == [0] * 8  # rows 0-3 and 7 are empty
    assert cover[4:7, 1:4].tolist() == [[square] * 3] * 3 and cover[4:7, 4:7].tolist() == [[circle] * 3] * 3
    # the cover of every pixel agrees with the render: colours of covered patches are the objects' colours
    assert set(np.unique(cover)) == {0, square, circle}


def test_centre_classes_are_distinct_and_every_scene_keeps_all_its_objects():
    classes = {centre_class(Obj(s, c, z, 10, 5, 5)) for s in ("circle", "square", "triangle", "cross")
               for c in ("red", "yellow", "green", "cyan", "blue", "purple") for z in ("small", "large")}
    assert len(classes) == NUM_CENTRE - 1 and 0 not in classes
    rng = random.Random(0)
    for _ in range(300):  # never two centres in one patch
        scene = sample_scene(rng)
        centre, _, cover = patch_targets(scene)
        assert (centre > 0).sum() == len(scene)
        assert set(np.unique(cover)) - {0} == set(centre[centre > 0])  # each object covers some patch


def test_pretraining_lowers_the_centre_loss():
    torch.manual_seed(0)
    tower = CLIPVisionTower(get_config("shapes").vision)
    first = pretrain_encoder(tower, minutes=10, batch_size=16, max_steps=1, log=lambda *a: None)
    torch.manual_seed(0)
    tower = CLIPVisionTower(get_config("shapes").vision)
    # a step budget (the minutes only bound a very slow machine: a busy one made 31 steps in 10 minutes)
    later = pretrain_encoder(tower, minutes=60, batch_size=16, max_steps=60, lr=2e-3, log=lambda *a: None)
    assert later["steps"] == 60 and later["held_out"]["centre"] < 0.5 * first["held_out"]["centre"]


def test_absolute_centres_are_the_objects_centres_and_relations_match_the_world():
    from zuoyou.shapes.world import relations
    from zuoyou.train.vit import absolute_centres, batch, relation_agreement

    rng = random.Random(3)
    scenes = [sample_scene(rng) for _ in range(50)]
    targets = [patch_targets(s) for s in scenes]
    centre = torch.from_numpy(np.stack([t[0] for t in targets]))
    true = absolute_centres(torch.from_numpy(np.stack([t[1] for t in targets])))  # (50, 64, 2) patch units
    for s, c, t in zip(scenes, centre, true):
        got = sorted(map(tuple, (t[c > 0] * 8).tolist()))
        assert got == sorted((o.cx, o.cy) for o in s)
    assert relation_agreement(true, true, centre > 0) == 1.0
    # moving every centre changes relations the way world.relations says
    a, b = Obj("square", "green", "large", 17, 4, 30), Obj("circle", "cyan", "large", 18, 40, 30)
    pair = torch.tensor([[[a.cx / 8, a.cy / 8], [b.cx / 8, b.cy / 8]]])
    flipped = pair.flip(1)
    assert relations(a, b) == {"left of"}
    assert relation_agreement(flipped, pair, torch.ones(1, 2, dtype=torch.bool)) == 0.0
    assert relation_agreement(pair, pair, torch.ones(1, 2, dtype=torch.bool)) == 1.0


def test_pretraining_reports_the_absolute_centres_and_relations_held_out():
    torch.manual_seed(0)
    tower = CLIPVisionTower(get_config("shapes").vision)
    out = pretrain_encoder(tower, minutes=10, batch_size=8, max_steps=2, log=lambda *a: None)
    assert {"absolute", "relation_acc"} <= set(out["held_out"]) and "absolute" in out["train"]
    tower = CLIPVisionTower(get_config("shapes").vision)
    old = pretrain_encoder(tower, minutes=10, batch_size=8, max_steps=2, log=lambda *a: None, absolute=False)
    assert "absolute" not in old["held_out"]  # recipes v3-v6 were built without it
