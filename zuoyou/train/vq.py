"""Train the VQ image tokenizer (the generation encoder/decoder) on rendered images.

Recipe for flat synthetic scenes (no GAN or perceptual loss is needed: every pixel is one of
seven colours, and what matters is that the judge parses the reconstruction back exactly):
- loss = MSE + L1 on pixels in [-1, 1], + codebook loss ||sg(z) - e||^2 + 0.25 ||z - sg(e)||^2
  on l2-normalised vectors (LlamaGen's quantiser);
- a short plain-autoencoder warm-up, then the codebook is initialised from encoder outputs
  (random latents), and codes unused for a while are restarted on recent latents;
- bf16 autocast (these CPUs have avx512_bf16), AdamW, cosine decay.

Options so that a patch always gets the same code (recipe ``v2`` of ``zuoyou.train.shapes``;
off by default, see there why). The plain recipe maps the empty background patch (75 % of all
patches) to thousands of codes (H(code | patch) = 5.6 nats in the bundled model's VQ), because
the conv/attention encoder gives the same patch a slightly different latent in every context:
- ``consistency``: latents of identical 8x8 patches in a batch are pulled to their mean;
- ``per_content_pool``: init and restarts draw one latent per distinct patch content;
- ``min_code_dist``: of two codes closer than this, the less used one is restarted;
- ``consolidate_codes`` after training folds codes serving one content into its main code.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
import torch.nn.functional as F

from ..models.vq import VQModel
from ..shapes.world import render, sample_scene
from .checkpoint import exists, load_checkpoint, save_checkpoint
from .loop import Stage, timed_steps


def scenes_to_tensor(scenes) -> torch.Tensor:
    x = np.stack([render(s) for s in scenes]).astype(np.float32)  # (B, 64, 64, 3)
    return torch.from_numpy(x / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()  # (B, 3, 64, 64)


def image_batch(rng: random.Random, batch: int, crop: int | None = None) -> torch.Tensor:
    """Rendered scenes, or random ``crop`` x ``crop`` windows of them (aligned to the 8-px code grid).

    The VQ is convolutional, so training on crops teaches the same local code <-> pixels mapping
    at a fraction of the cost per code; the attention blocks have no positions, so they transfer.
    """
    x = scenes_to_tensor([sample_scene(rng) for _ in range(batch)])
    if crop is None or crop >= x.shape[-1]:
        return x
    cells = (x.shape[-1] - crop) // 8 + 1
    out = []
    for img in x:
        i, j = rng.randrange(cells) * 8, rng.randrange(cells) * 8
        out.append(img[:, i:i + crop, j:j + crop])
    return torch.stack(out)


def patch_groups(x: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, 3, S, S) pixels -> (B*grid*grid,) ids of identical patch contents, raster order per image."""
    B, C, S, _ = x.shape
    p = S // grid
    patches = x.reshape(B, C, grid, p, grid, p).permute(0, 2, 4, 1, 3, 5).reshape(B * grid * grid, -1)  # (N, C*p*p)
    q = torch.round((patches + 1) * 127.5).to(torch.int16)  # exact 8-bit pixel values
    return torch.unique(q, dim=0, return_inverse=True)[1]


def group_means(z: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """(N, D) latents, (N,) group ids -> (G, D) mean latent of each group."""
    G = int(groups.max()) + 1
    sums = torch.zeros(G, z.shape[1], dtype=z.dtype).index_add_(0, groups, z)
    counts = torch.bincount(groups, minlength=G).clamp_min(1).to(z.dtype)
    return sums / counts[:, None]


def crowded_codes(vq: VQModel, usage: torch.Tensor, min_dist: float) -> torch.Tensor:
    """Of every pair of codes closer than ``min_dist``, the less used one.

    The codebook loss drags codes into dense regions of latent space: the 75 % of patches that
    are empty background end up split over hundreds of near-identical codes, which the LM then
    has to tell apart. Restarting the losers elsewhere keeps one code per tight cluster.
    """
    e = vq.quantize.codebook().detach()
    d = torch.cdist(e, e)  # (K, K)
    i, j = torch.triu(d < min_dist, diagonal=1).nonzero(as_tuple=True)
    return torch.where(usage[i] < usage[j], i, j).unique()


def restart_dead_codes(vq: VQModel, usage: torch.Tensor, recent: torch.Tensor) -> int:
    """Re-initialise never-hit codes on randomly chosen recent (normalised) encoder latents."""
    dead = (usage == 0).nonzero().squeeze(1)
    if dead.numel() == 0:
        return 0
    pick = recent[torch.randint(0, recent.shape[0], (dead.numel(),))]
    pick = pick + 0.01 * torch.randn_like(pick)
    with torch.no_grad():
        vq.quantize.embedding.weight[dead] = F.normalize(pick, dim=-1)
    return dead.numel()


def pixel_loss(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The VQ's reconstruction loss (``train_vq`` and ``polish_decoder``): MSE + 0.5 L1 on pixels."""
    return F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x)


def _saver(out_ckpt, vq: VQModel, opt, rng: random.Random):
    """``timed_steps``'s checkpoint callback for the VQ loops: model, optimiser, step count, elapsed time, data RNG."""
    def save(steps: int, elapsed: float) -> None:
        save_checkpoint(out_ckpt, vq, opt, step=steps, elapsed=elapsed, rng=rng.getstate())

    return save


def train_vq(vq: VQModel, out_ckpt, minutes: float, batch: int = 64, lr: float = 2e-3, seed: int = 0,
             warmup_steps: int = 150, restart_every: int = 50, log=print, resume: bool = True,
             crop: int | None = 32, consistency: float = 0.0, min_code_dist: float = 0.0,
             per_content_pool: bool = False, max_steps: int | None = None) -> VQModel:
    """Train ``vq`` for about ``minutes`` of wall time (or ``max_steps`` steps in all, if that comes first:
    tests); checkpoints atomically to ``out_ckpt``."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(vq.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    state = {"step": 0, "elapsed": 0.0, "rng": rng.getstate()}
    if resume and exists(out_ckpt):
        state = load_checkpoint(out_ckpt, vq, opt)
        rng.setstate(state["rng"])
        log(f"vq: resumed at step {state['step']} ({state['elapsed'] / 60:.1f} min done)")
    K = vq.config.codebook_size
    usage = torch.zeros(K)
    recent = []
    for step, frac in timed_steps(minutes, state["step"], state["elapsed"], max_steps, _saver(out_ckpt, vq, opt, rng),
                                  desc="vq"):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 50) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        x = image_batch(rng, batch, crop)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = vq.quant_conv(vq.encoder(x)).float()
        if step < warmup_steps:  # plain autoencoder on normalised latents: shapes the latent space first
            z = F.normalize(h, dim=1)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                rec = vq.decode(z).float()
            q_loss = torch.zeros(())
        else:
            z_q, codes, z, zq_raw = vq.quantize(h)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                rec = vq.decode(z_q).float()
            q_loss = F.mse_loss(zq_raw, z.detach()) + 0.25 * F.mse_loss(z, zq_raw.detach())
            usage += torch.bincount(codes.flatten(), minlength=K).float()
        zn = F.normalize(h, dim=1).permute(0, 2, 3, 1).reshape(-1, h.shape[1])  # (B*g*g, D)
        c_loss, pool = torch.zeros(()), zn.detach()
        if consistency or per_content_pool:  # (the plain recipe skips the per-step patch grouping)
            groups = patch_groups(x, h.shape[-1])
            means = group_means(zn.detach(), groups)  # (G, D) one latent per distinct patch content
            c_loss = F.mse_loss(zn, means[groups]) * zn.shape[1]  # mean squared distance to the group mean
            if per_content_pool:
                pool = F.normalize(means, dim=-1)
        recent = (recent + [pool])[-8:]
        if step == warmup_steps:  # codebook init: distinct random latents
            pool = torch.cat(recent)
            vq.quantize.embedding.weight.data = F.normalize(pool[torch.randint(0, len(pool), (K,))] + 0.01 * torch.randn(K, pool.shape[1]), dim=-1)
        # consistency only once the autoencoder has spread its latents (from the start it collapses
        # them all onto one point), ramped in over ``warmup_steps``
        ramp = min(1.0, max(0.0, (step - warmup_steps) / warmup_steps))
        loss = pixel_loss(rec, x) + q_loss + consistency * ramp * c_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vq.parameters(), 1.0)
        opt.step()
        done = step + 1
        if done > warmup_steps and done % restart_every == 0:
            if min_code_dist > 0:  # till the end: the codebook loss keeps dragging codes back into the background blob
                usage[crowded_codes(vq, usage, min_code_dist)] = 0
            restart = frac < 0.85 or min_code_dist > 0
            n_dead = restart_dead_codes(vq, usage, torch.cat(recent)) if restart else int((usage == 0).sum())
            if done % (restart_every * 2) == 0:
                log(f"vq step {done} ({frac:.0%} of the budget) loss {loss.item():.4f} "
                    f"q {q_loss.item():.4f} consistency {c_loss.item():.4f} used {(usage > 0).sum().item()}/{K} restarted {n_dead}")
            usage.zero_()
    return vq


def polish_decoder(vq: VQModel, out_ckpt, minutes: float, batch: int = 32, lr: float = 3e-4, seed: int = 777,
                   log=print, resume: bool = True, max_steps: int | None = None) -> VQModel:
    """Train only the decoder side (``post_quant_conv`` + ``decoder``) on whole 64x64 scenes, the codes fixed.

    The encoder and codebook are frozen, so every image keeps exactly the codes the LM was (or will be)
    trained on; only the pixels drawn from them get better. ``train_vq`` learns on 32x32 crops with a
    moving codebook; here the decoder sees whole scenes (its attention, its borders) and the final codes.
    The same ``pixel_loss``, bf16 autocast, cosine decay to 2 %; checkpoints atomically to ``out_ckpt``.
    ``max_steps`` also ends it at that many steps in all (the schedule then follows whichever budget runs
    out first): the same work on a fast or a slow machine (tests).
    """
    rng = random.Random(seed)
    params = list(vq.post_quant_conv.parameters()) + list(vq.decoder.parameters())
    vq.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    state = {"step": 0, "elapsed": 0.0}
    if resume and exists(out_ckpt):
        state = load_checkpoint(out_ckpt, vq, opt)
        rng.setstate(state["rng"])
        log(f"decoder: resumed at step {state['step']} ({state['elapsed'] / 60:.1f} min done)")
    sched = Stage("decoder", lr=lr, minutes=minutes, warmup=30, decay=True)  # the LM stages' lr schedule
    avg = None
    for step, frac in timed_steps(minutes, state["step"], state["elapsed"], max_steps, _saver(out_ckpt, vq, opt, rng),
                                  desc="vq decoder"):
        for g in opt.param_groups:
            g["lr"] = sched.lr_at(step, frac)
        scenes = [sample_scene(rng) for _ in range(batch)]
        x = scenes_to_tensor(scenes)
        codes = encode_images(vq, x)  # (B, grid*grid), no grad
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rec = vq.decode_code(codes).float()
        loss = pixel_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        if (step + 1) % 100 == 0:
            log(f"decoder step {step + 1} ({frac:.0%} of the budget) loss {avg:.5f}")
    vq.requires_grad_(False)
    return vq


@torch.no_grad()
def encode_scenes(vq: VQModel, scenes) -> torch.Tensor:
    """Scenes -> (B, grid*grid) codes."""
    return encode_images(vq, scenes_to_tensor(scenes))


@torch.no_grad()
def encode_images(vq: VQModel, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, 64, 64) images in [-1, 1] -> (B, grid*grid) codes."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = vq.quant_conv(vq.encoder(x)).to(vq.quantize.embedding.weight.dtype)  # (a bf16 model's codebook)
    return vq.quantize(h)[1]


@torch.no_grad()
def reconstruction_parse_rate(vq: VQModel, n: int = 500, seed: int = 10_000_019) -> float:
    """Fraction of held-out scenes whose VQ reconstruction the judge parses back exactly."""
    from ..shapes.judge import parse_image

    rng = random.Random(seed)
    ok = 0
    for i in range(0, n, 50):
        scenes = [sample_scene(rng) for _ in range(min(50, n - i))]
        codes = encode_scenes(vq, scenes)
        imgs = vq.decode_code(codes).float()
        arr = ((imgs.clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).to(torch.uint8).numpy()
        for s, a in zip(scenes, arr):
            ok += same_scene(s.objects, parse_image(a))
    return ok / n


def same_scene(want, got, tol: float = 1.0) -> bool:
    """Same multiset of (shape, colour, size), and matched centres within ``tol`` px.

    One pixel of slack on centres is far below anything a prompt or question can depend on
    (relations need >= 8 px offsets), while shape, colour, size and count must be exact.
    """
    key = lambda o: (o.shape, o.color, o.size, o.cx, o.cy)  # noqa: E731
    want, got = sorted(want, key=key), sorted(got, key=key)
    if [k[:3] for k in map(key, want)] != [k[:3] for k in map(key, got)]:
        return False
    return all(abs(a.cx - b.cx) <= tol and abs(a.cy - b.cy) <= tol for a, b in zip(want, got))


@torch.no_grad()
def content_codes(vq: VQModel, n: int, seed: int, chunk: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` seeded scenes -> (patch-content group ids, codes), both (n*g*g,) in raster order."""
    rng = random.Random(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    codes = torch.cat([encode_scenes(vq, scenes[i:i + chunk]) for i in range(0, n, chunk)]).flatten()
    return patch_groups(scenes_to_tensor(scenes), math.isqrt(codes.numel() // n)), codes


@torch.no_grad()
def code_entropy(vq: VQModel, n: int = 500, seed: int = 10_000_019) -> float:
    """H(code | patch content) in nats over held-out scenes: 0 = every distinct 8x8 patch always gets
    the same code. The LM must model this noise on top of the image, so it should be small."""
    groups, codes = content_codes(vq, n, seed, chunk=n)
    pairs = torch.unique(torch.stack([groups, codes]), dim=1, return_counts=True)
    (g, _), c = pairs
    per_group = torch.zeros(int(groups.max()) + 1).index_add_(0, g, c.float())
    p = c.float() / per_group[g]
    return float(-(c.float() * p.log()).sum() / codes.numel())


@torch.no_grad()
def consolidate_codes(vq: VQModel, n: int = 2000, purity: float = 0.9, seed: int = 5) -> int:
    """Give each patch content one code: a code used (≥ ``purity`` of its uses) by one content that
    has a more frequent code becomes a copy of that code; ties resolve to the lower index, so every
    patch of that content then gets the same code. Returns the number of codes folded.

    Training keeps a few nearby codes inside the tight cluster of each frequent content (the empty
    background above all); they decode alike, so folding them changes the pixels little (checked by
    the parse rate measured afterwards) and removes that noise from what the LM has to predict.
    """
    groups, codes = content_codes(vq, n, seed)
    K = vq.config.codebook_size
    pair = groups * K + codes
    uniq, cnt = torch.unique(pair, return_counts=True)
    g, c = uniq // K, uniq % K
    use = torch.bincount(codes, minlength=K)
    main = {}  # content -> its most frequent code
    for gi, ci, ni in sorted(zip(g.tolist(), c.tolist(), cnt.tolist()), key=lambda t: -t[2]):
        main.setdefault(gi, ci)
    fold = {}  # code -> the main code it becomes a copy of
    for gi, ci, ni in zip(g.tolist(), c.tolist(), cnt.tolist()):
        if ci != main[gi] and ni >= purity * use[ci].item():
            fold[ci] = main[gi]
    w = vq.quantize.embedding.weight
    w0 = w.detach().clone()
    for ci, m in fold.items():
        seen = {ci}
        while m in fold and m not in seen:  # a main code may itself be folded (a rare content's top
            seen.add(m)                     # code owned by another): follow it, so copies stay copies
            m = fold[m]
        w[ci] = w0[m]
    return len(fold)
