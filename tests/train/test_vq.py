"""The VQ recipe's pieces: patch-content groups, the consistency target, crowded codes, H(code | patch)."""

from __future__ import annotations

import math
import random

import torch

from zuoyou.config import get_config
from zuoyou.models.vq import VQModel
from zuoyou.train.checkpoint import load_checkpoint
from zuoyou.train.vq import (code_entropy, consolidate_codes, crowded_codes, encode_scenes, group_means, image_batch,
                             patch_groups, polish_decoder, scenes_to_tensor, train_vq)
from zuoyou.shapes.world import sample_scene


def test_patch_groups_follow_exact_pixels():
    x = -torch.ones(2, 3, 16, 16)  # black 2x2 grid of 8x8 patches
    x[0, 0, :8, :8] = 1.0  # image 0, patch 0 red-ish
    x[1, 0, :8, :8] = 1.0  # same content at the same place in image 1
    x[1, 1, 8:, 8:] = 1.0  # image 1, patch 3 another content
    g = patch_groups(x, 2)  # raster order: image 0 patches 0..3, then image 1
    assert g.shape == (8,)
    assert g[0] == g[4]  # identical contents, different images
    assert g[1] == g[2] == g[3] == g[5] == g[6]  # the empty patch everywhere
    assert len({g[0].item(), g[1].item(), g[7].item()}) == 3


def test_group_means():
    z = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    m = group_means(z, torch.tensor([0, 0, 1]))
    assert torch.equal(m, torch.tensor([[2.0, 0.0], [0.0, 2.0]]))


def test_crowded_codes_returns_the_less_used_of_close_pairs():
    vq = VQModel(get_config("shapes").vq)
    K = vq.config.codebook_size
    with torch.no_grad():
        e = torch.nn.functional.normalize(torch.randn(K, vq.config.codebook_embed_dim), dim=-1)
        e[7] = e[3] + 1e-3  # a near-duplicate of code 3
        vq.quantize.embedding.weight.copy_(e)
    usage = torch.ones(K)
    usage[3], usage[7] = 10, 2
    crowded = crowded_codes(vq, usage, min_dist=0.01)
    assert 7 in crowded.tolist() and 3 not in crowded.tolist()
    assert len(crowded) <= 3  # the planted pair, give or take a chance pair of a random 8-d codebook


def test_code_entropy_zero_for_a_single_code_and_bounded():
    torch.manual_seed(0)
    vq = VQModel(get_config("shapes").vq).eval()
    h = code_entropy(vq, n=8)
    assert 0.0 <= h <= math.log(vq.config.codebook_size)
    with torch.no_grad():
        vq.quantize.embedding.weight.copy_(vq.quantize.embedding.weight[:1].expand_as(vq.quantize.embedding.weight))
    assert code_entropy(vq, n=8) == 0.0  # every patch gets code 0


def test_image_batch_crops_align_to_code_grid():
    x = image_batch(random.Random(0), 4, crop=32)
    assert x.shape == (4, 3, 32, 32) and x.min() >= -1 and x.max() <= 1


def test_train_vq_runs_checkpoints_and_resumes(tmp_path):
    torch.manual_seed(0)
    vq = VQModel(get_config("shapes").vq)
    logs = []
    # bounded by steps, not 3 s of wall time (too few steps to log on a slow or busy machine)
    train_vq(vq, tmp_path / "vq", minutes=10, batch=4, warmup_steps=2, restart_every=2, log=logs.append, max_steps=6)
    state = load_checkpoint(tmp_path / "vq", VQModel(get_config("shapes").vq))
    assert state["step"] == 6 and state["elapsed"] > 0
    assert any("consistency" in m for m in logs)
    train_vq(vq, tmp_path / "vq", minutes=10, batch=4, warmup_steps=2, restart_every=2, log=logs.append, max_steps=8)
    assert any("resumed at step" in m for m in logs)
    assert load_checkpoint(tmp_path / "vq", VQModel(get_config("shapes").vq))["step"] == 8


def test_consolidate_codes_gives_each_content_one_code():
    torch.manual_seed(0)
    vq = VQModel(get_config("shapes").vq).eval()
    seed = 10_000_019  # code_entropy's scenes
    before = code_entropy(vq, n=40, seed=seed)
    folded = consolidate_codes(vq, n=40, seed=seed)
    after = code_entropy(vq, n=40, seed=seed)
    # a random encoder spreads each content over many impure codes: only part of the noise goes
    # (on the trained VQ of the bundled model it fell from ~1.1 to ~0.2 nats with the parse rate kept)
    assert folded > 0 and after < before - 0.1
    w = vq.quantize.embedding.weight
    assert len(torch.unique(w, dim=0)) == vq.config.codebook_size - folded  # folded codes are copies


def test_polish_decoder_keeps_every_code_and_improves_pixels(tmp_path):
    STEPS = 12
    torch.manual_seed(0)
    vq = VQModel(get_config("shapes").vq).eval()
    scenes = [sample_scene(random.Random(i)) for i in range(8)]
    x = scenes_to_tensor(scenes)
    codes = encode_scenes(vq, scenes)
    frozen = {k: v.clone() for k, v in vq.state_dict().items() if not k.startswith(("decoder.", "post_quant_conv."))}
    with torch.no_grad():
        before = torch.nn.functional.mse_loss(vq.decode_code(codes), x).item()
    logs = []
    # bounded by steps, not time: 0.15 minutes were too few steps (~5) on an AVX2 CPU without native bf16
    polish_decoder(vq, tmp_path / "dec", minutes=10, batch=4, lr=3e-3, log=logs.append, max_steps=STEPS)
    assert torch.equal(encode_scenes(vq, scenes), codes)  # the LM's targets are untouched
    assert all(torch.equal(vq.state_dict()[k], v) for k, v in frozen.items())
    assert not any(p.requires_grad for p in vq.parameters())
    with torch.no_grad():
        after = torch.nn.functional.mse_loss(vq.decode_code(codes), x).item()
    assert after < 0.5 * before, (before, after)  # a random decoder is far off; a few steps close much of it
    step = load_checkpoint(tmp_path / "dec", VQModel(get_config("shapes").vq))["step"]
    assert step == STEPS
    polish_decoder(vq, tmp_path / "dec", minutes=10, batch=4, lr=3e-3, log=logs.append, max_steps=STEPS + 3)
    assert any("resumed at step" in m for m in logs)
    assert load_checkpoint(tmp_path / "dec", VQModel(get_config("shapes").vq))["step"] == STEPS + 3
