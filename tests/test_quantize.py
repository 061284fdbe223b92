"""int8 / int4 weight-only quantisation (``zuoyou.quantize``) and the quality guard of the lossy modes.

The guard compares next-token distributions along teacher-forced sequences (image codes after CFG,
and answer tokens after an understanding prompt) of the tiny random model in fp32 against the
same weights in bf16 and int8: mean KL(fp32 || mode) and greedy (argmax) agreement.

The tiny checkpoint's RMSNorm gains are random (std 0.2), which makes every distribution nearly
flat and greedy agreement a coin toss on near-ties; here they are set to 1, as in a trained model,
so that the image distributions are peaked (mean top-1 probability ~0.75 after CFG).

Measured (8 seeds x (64 image + 64 text positions), pooled; this CPU):
| mode | image KL mean | image agreement | text KL mean | text agreement |
| bf16 | 0.0058 | 0.961 | 0.0007 | 0.947 |
| int8 (fp32 model) | 0.0184 | 0.943 | 0.0017 | 0.926 |
| int8 (bf16 model) | 0.0189 | 0.943 | 0.0022 | 0.934 |
| 7-bit grid (control) | 0.094 | 0.881 | 0.011 | 0.836 |
| 6-bit grid | 0.31 | 0.764 | 0.029 | 0.772 |
Bounds: image KL < 0.05, text KL < 0.01, agreement >= 0.9: int8 passes with a 2.7x / 4.5x KL margin,
and the same layers on a grid one bit coarser (negative control) fail them.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

import zuoyou.api
from zuoyou.cli import build_parser
from zuoyou.errors import ConfigError
from zuoyou.processor import Message
from zuoyou.models.llama import RMSNorm
from zuoyou.kernels import int4 as int4_kernel
from zuoyou.quantize import (Int4Linear, Int8Linear, compare_logits, fit_int4, image_code_logits, quantize_model,
                             text_logits, weight_bytes)

IMG_KL, TEXT_KL, AGREEMENT = 0.05, 0.01, 0.9
SEEDS = range(8)


# ---------------------------------------------------------------------------------------------- the layer
@pytest.mark.parametrize("rows", [1, 2, 4, 16, 17, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_matches_dequantised_weights(rows, dtype):
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 48).to(dtype)
    q = Int8Linear.from_linear(lin, kernel="aten")
    assert q.weight_int8.dtype == torch.int8 and q.scales.shape == (48,) and q.compute_dtype == torch.bfloat16
    # weights within half a quantisation step (of the bf16-rounded scale)
    err = (q.weight_int8.float() * q.scales.float()[:, None] - lin.weight.float()).abs()
    assert (err <= q.scales.float()[:, None] * 0.51).all()
    x = torch.randn(3, rows, 128, dtype=dtype)  # 3*rows rows: both kernels (int8pack_mm and dequantise + GEMM)
    y = q(x)
    assert y.shape == (3, rows, 48) and y.dtype == dtype
    want = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
    assert ((y.float() - want).norm() / want.norm()).item() < 0.02


def test_int8_linear_odd_width_uses_the_safe_path():
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 5)  # in_features % 16 != 0: int8pack_mm would crash or return garbage
    q = Int8Linear.from_linear(lin)
    assert not q.packable
    x = torch.randn(2, 24)
    want = lin(x)
    assert ((q(x) - want).norm() / want.norm()).item() < 0.02


def test_quantize_model_swaps_lm_linears_and_heads_only(tiny_dir):
    model = zuoyou.api.load(tiny_dir, device="cpu").engine.model
    before = weight_bytes(model.language_model.model.layers)
    quantize_model(model, "int8")
    lm = model.language_model
    layer = lm.model.layers[0]
    for m in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.down_proj, lm.lm_head,
              model.gen_head.output_mlp_projector, model.gen_head.vision_head):
        assert isinstance(m, Int8Linear)
    assert not any(isinstance(m, Int8Linear) for part in (model.vision_model, model.aligner, model.gen_vision_model)
                   for m in part.modules())
    # the image-code aligner runs at every image step: its linears with a 64-multiple input are quantised
    for lin in model.gen_aligner.layers:
        if isinstance(lin, (torch.nn.Linear, Int8Linear)):
            assert isinstance(lin, Int8Linear) == (lin.in_features % 64 == 0)
    assert isinstance(lm.model.embed_tokens, torch.nn.Embedding)
    assert weight_bytes(lm.model.layers) < 0.3 * before  # fp32 -> int8 + per-channel scales
    assert quantize_model(model, None) is model
    with pytest.raises(ConfigError, match="int5"):
        quantize_model(model, "int5")


KERNELS = ["aten"] + (["vnni"] if int4_kernel.available() else [])


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("rows", [1, 7, 40])
def test_int4_linear_matches_dequantised_weights(rows, kernel):
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 48)
    q = Int4Linear.from_linear(lin, group=Int4Linear.group_for(lin), kernel=kernel)
    assert q.group == 64 and q.packed.dtype == torch.uint8 and q.packed.numel() == 48 * 64
    w, dq = lin.weight.detach(), q.dequantize().float()
    # every weight at its group's nearest grid point (+ bf16 rounding of scale and zero); a least-squares grid
    # may leave the extreme weights outside its ends, which then take the end point
    scale, low = (t[..., None].expand(48, 2, 64).reshape(48, 128) for t in fit_int4(w.reshape(48, 2, 64), torch.bfloat16))
    nearest = w.clamp(low, low + 15 * scale)
    assert ((dq - nearest).abs() <= scale / 2 * 1.05 + 1e-3).all()
    x = torch.randn(rows, 128)
    want = x.to(torch.bfloat16).float() @ dq.t() + lin.bias.detach()
    # the vnni kernel also rounds the activations to int8 (per group of 64): ~0.4 % of a group's largest
    assert torch.allclose(q(x), want, atol=0.03, rtol=0.02)


@pytest.mark.skipif("vnni" not in KERNELS, reason="zuoyou's int4 kernels are not available here")
def test_int4_vnni_prefill_in_chunks_matches_dequantised_weights():
    """Prefill (> VNNI_MAX_ROWS rows) unpacks ``PREFILL_OUTPUTS`` output channels at a time: 2064 outputs are
    chunks of 1024, 1024 and 16, each sliced from the packed layout, in ``dense_dtype``."""
    from zuoyou.quantize import PREFILL_OUTPUTS, VNNI_MAX_ROWS

    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 2 * PREFILL_OUTPUTS + 16)
    q = Int4Linear.from_linear(lin, group=64, kernel="vnni")
    x = torch.randn(VNNI_MAX_ROWS + 24, 128)
    want = x.to(torch.bfloat16).float() @ q.dequantize().float().t() + lin.bias.detach()
    assert torch.allclose(q(x).float(), want, atol=0.03, rtol=0.02)


def test_int4_least_squares_grid_never_loses_to_min_max():
    """``fit_int4``: per group, no more squared error than the min-max grid (where it starts), less on the
    whole; scale and low hold bf16 values; a constant group stays exact."""
    torch.manual_seed(0)
    wg = torch.randn(64, 16, 64)
    wg[0, 0] = 0.25  # a constant group (zero range)

    def sq_err(s, lo):
        q = torch.round((wg - lo[..., None]) / s[..., None]).clamp(0, 15)
        return (q * s[..., None] + lo[..., None] - wg).pow(2).sum(-1)

    lo = wg.amin(-1).bfloat16().float()
    s = ((wg.amax(-1) - wg.amin(-1)) / 15).clamp(min=1e-8).bfloat16().float()
    fs, flo = fit_int4(wg, torch.bfloat16)
    assert torch.equal(fs, fs.bfloat16().float()) and torch.equal(flo, flo.bfloat16().float())
    mine, minmax = sq_err(fs, flo), sq_err(s, lo)
    assert (mine <= minmax).all() and mine.sum() < 0.95 * minmax.sum()
    assert mine[0, 0] == 0


def test_int4_unpack_matches_the_kernel_layout():
    """Prefill (> PACK_MAX_ROWS rows) unpacks ATen's blocked layout with tensor ops: same weights,
    same outputs as the kernel itself. The layout depends on the CPU torch runs on (blocks of 64 channels
    with AVX-512, 32 with AVX2; until the sixteenth session 64 was assumed, and int4 prefill on AVX2 CPUs
    multiplied by scrambled weights)."""
    from zuoyou.quantize import aten_int4_block

    assert aten_int4_block() in (32, 64), "a new ATen int4 layout: prefill would fall back to ATen's slow kernel"
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 192, bias=False).bfloat16()
    q = Int4Linear.from_linear(lin, group=64, kernel="aten")
    eye = torch.eye(256, dtype=torch.bfloat16)
    assert torch.equal(q.unpack(), torch.ops.aten._weight_int4pack_mm_for_cpu(eye, q.packed, 64, q.scales_zeros).t())
    x = torch.randn(40, 256, dtype=torch.bfloat16)
    kernel = torch.ops.aten._weight_int4pack_mm_for_cpu(x, q.packed, q.group, q.scales_zeros)
    assert torch.allclose(q(x).float(), kernel.float(), atol=0.05, rtol=0.02)


@pytest.mark.skipif(not int4_kernel.available(), reason="no AVX-512 VNNI or no C++ compiler")
def test_vnni_kernel_against_its_own_arithmetic():
    """The VNNI kernel equals, to float rounding, what it is meant to compute: int8 activations per
    group of 64 (scale absmax/127) times the unpacked int4 weights; every row count up to 8 and a
    remainder (9 = 8 + 1), a layout round trip, and the same model weights as the prefill path."""
    torch.manual_seed(0)
    N, K = 96, 320
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8)
    assert torch.equal(int4_kernel.unpack(int4_kernel.pack(q)), q)
    scale, low = torch.rand(N, K // 64).bfloat16() * 0.1, torch.randn(N, K // 64).bfloat16() * 0.1
    w = q.float() * scale.float().repeat_interleave(64, 1) + low.float().repeat_interleave(64, 1)
    for rows in (1, 2, 3, 4, 5, 6, 7, 8, 9):
        x = torch.randn(rows, K)
        xg = x.view(rows, K // 64, 64)
        s = xg.abs().amax(-1, keepdim=True) / 127
        xq = (torch.round(xg / s) * s).view(rows, K)  # what the kernel multiplies with
        y = int4_kernel.mm(x, int4_kernel.pack(q), int4_kernel.by_block(scale), int4_kernel.by_block(low))
        want = (xq @ (q.float() * scale.float().repeat_interleave(64, 1)).t()
                + x @ low.float().repeat_interleave(64, 1).t())  # zero points use the exact group sums
        assert torch.allclose(y, want, atol=1e-3, rtol=1e-4), rows
        assert (y - x @ w.t()).abs().max() < 0.02 * (x @ w.t()).abs().max()  # int8 rounding, bounded


@pytest.mark.skipif(not int4_kernel.available(), reason="no AVX-512 VNNI or no C++ compiler")
def test_int8_vnni_kernel_against_its_own_arithmetic():
    """The int8-weight VNNI kernel: int8 activations per group of 64 times the int8 codes, times the
    output's scale; rows 1-9, fp32 and bf16 inputs, a layout round trip."""
    torch.manual_seed(0)
    N, K = 96, 320
    q = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    packed = int4_kernel.pack8(q)
    assert packed.shape == (N // 16, K // 4, 64) and torch.equal(int4_kernel.unpack8(packed), q)
    scale = (torch.rand(N) * 0.01 + 1e-3).bfloat16()
    w = q.float() * scale.float()[:, None]
    def arithmetic(x):  # what the kernel multiplies with: x rounded to int8 per group of 64
        xg = x.view(x.shape[0], K // 64, 64)
        s = xg.abs().amax(-1, keepdim=True) / 127
        return (torch.round(xg / s) * s).view(x.shape) @ w.t()

    for rows in (1, 2, 3, 4, 5, 6, 7, 8, 9):
        x = torch.randn(rows, K)
        y = int4_kernel.mm8(x, packed, scale)
        assert torch.allclose(y, arithmetic(x), atol=1e-4, rtol=1e-4), rows
        yb = int4_kernel.mm8(x.bfloat16(), packed, scale)  # bf16 in, bf16 out
        want = arithmetic(x.bfloat16().float())
        assert yb.dtype == torch.bfloat16 and torch.allclose(yb.float(), want, atol=1e-2, rtol=1e-2), rows
        assert (y - x @ w.t()).abs().max() < 0.02 * (x @ w.t()).abs().max()


@pytest.mark.skipif(not int4_kernel.available(), reason="no AVX-512 VNNI or no C++ compiler")
def test_amx_rows_equal_the_vnni_rows():
    """5-8 rows take AMX tiles where the CPU has AMX-INT8 (else the VNNI loop): the same int32 sums and
    scaling, so each row equals, bit for bit, that row computed alone (1 row: always VNNI). An odd
    group count (K = 5 x 64) covers the pipeline's last group."""
    torch.manual_seed(0)
    N, K = 48, 320
    q4, q8 = torch.randint(0, 16, (N, K), dtype=torch.uint8), torch.randint(-128, 128, (N, K), dtype=torch.int8)
    scale, low = torch.rand(N, K // 64).bfloat16() * 0.1, torch.randn(N, K // 64).bfloat16() * 0.1
    p4, s4, l4 = int4_kernel.pack(q4), int4_kernel.by_block(scale), int4_kernel.by_block(low)
    p8, s8 = int4_kernel.pack8(q8), (torch.rand(N) * 0.01).bfloat16()
    for rows in (5, 6, 7, 8, 13):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(rows, K, dtype=dtype)
            alone4 = torch.cat([int4_kernel.mm(x[i:i + 1], p4, s4, l4) for i in range(rows)])
            alone8 = torch.cat([int4_kernel.mm8(x[i:i + 1], p8, s8) for i in range(rows)])
            assert torch.equal(int4_kernel.mm(x, p4, s4, l4), alone4), (rows, dtype)
            assert torch.equal(int4_kernel.mm8(x, p8, s8), alone8), (rows, dtype)
    assert isinstance(int4_kernel.amx_available(), bool)


@pytest.mark.skipif(not int4_kernel.available(), reason="no AVX-512 VNNI or no C++ compiler")
@pytest.mark.parametrize("rows", [1, 8, 100])  # decode rows on the kernel; prefill (> VNNI_MAX_ROWS) dequantises
def test_int8_linear_on_the_vnni_kernel(rows):
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 48).bfloat16()
    q, ref = Int8Linear.from_linear(lin), Int8Linear.from_linear(lin, kernel="aten")
    assert q.kernel == "vnni" and not hasattr(q, "weight_int8") and torch.equal(q.codes(), ref.weight_int8)
    assert torch.equal(q.dequantize(), ref.dequantize()) and weight_bytes(q) == weight_bytes(ref)
    x = torch.randn(rows, 128, dtype=torch.bfloat16)
    want = torch.nn.functional.linear(x.float(), ref.dequantize().float(), lin.bias.float())
    assert ((q(x).float() - want).norm() / want.norm()).item() < 0.01
    fp16 = Int8Linear.from_linear(torch.nn.Linear(128, 48).half())
    assert fp16.kernel == "aten"  # the VNNI kernel computes in bf16


def test_int4_keeps_int8_where_the_kernel_does_not_fit(tiny_dir):
    assert Int4Linear.group_for(torch.nn.Linear(64, 24)) is None  # out % 16
    assert Int4Linear.group_for(torch.nn.Linear(48, 32)) is None  # in % 32
    assert Int4Linear.group_for(torch.nn.Linear(96, 32)) == 32
    model = zuoyou.api.load(tiny_dir, device="cpu").engine.model
    before = weight_bytes(model.language_model.model.layers)
    quantize_model(model, "int4")
    lm = model.language_model
    layer = lm.model.layers[0]
    assert all(isinstance(m, Int4Linear) for m in (*layer.mlp.children(), layer.self_attn.q_proj, layer.self_attn.o_proj))
    assert isinstance(lm.lm_head, Int8Linear)
    # the image head stays in float: its logits are what CFG multiplies (``quantized_part``)
    assert all(isinstance(m, torch.nn.Linear) for m in (model.gen_head.output_mlp_projector, model.gen_head.vision_head))
    assert weight_bytes(lm.model.layers) < 0.2 * before  # fp32 -> 4 bits + a bf16 scale and zero per 32-64 weights


def test_load_quantized_pipeline_and_cli_flag(tiny_dir):
    for mode in ("int8", "int4"):
        pipe = zuoyou.api.load(tiny_dir, device="cpu", quantize=mode)
        assert isinstance(pipe.engine.model.language_model.lm_head, Int8Linear)
        images = pipe.generate("a red circle", n=2, seed=0)
        assert len(images) == 2 and images[0].size == (16, 16)
        assert isinstance(pipe.ask(images[0], "What color is the circle?", max_new_tokens=4), str)
    with pytest.raises(ConfigError):
        zuoyou.api.load(tiny_dir, device="cpu", quantize="int3")
    args = build_parser().parse_args(["generate", "a red circle", "-o", "x.png", "--quantize", "int8"])
    assert args.quantize == "int8"
    assert build_parser().parse_args(["generate", "a red circle", "-o", "x.png", "--quantize", "int4"]).quantize == "int4"
    assert build_parser().parse_args(["ask", "q", "--image", "a.png"]).quantize is None


# ---------------------------------------------------------------------------------------------- quality guard
@pytest.fixture(scope="module")
def models(tiny_dir):
    pipe = zuoyou.api.load(tiny_dir, device="cpu", dtype="fp32")
    ref = pipe.engine.model
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, RMSNorm):  # (FusedRMSNorm too: a float model takes the kernels once built)
                m.weight.fill_(1.0)
    return pipe.engine.processor, ref, {
        "bf16": copy.deepcopy(ref).to(torch.bfloat16),
        "int8": quantize_model(copy.deepcopy(ref), "int8"),
        "int8-bf16": quantize_model(copy.deepcopy(ref).to(torch.bfloat16), "int8"),
    }


def pooled(proc, ref, models: dict, items, cfg: float = 5.0) -> dict:
    """Each model vs ``ref`` over ``items`` = (gen ids, uncond ids, codes, und ids, pixels, answer), pooled:
    {name: {"image": compare_logits(...), "text": compare_logits(...)}}."""
    refs, outs = {"image": [], "text": []}, {k: {"image": [], "text": []} for k in models}
    for ids, un, codes, uids, px, answer in items:
        for m, bucket in ((ref, refs), *((models[k], outs[k]) for k in models)):
            bucket["image"].append(image_code_logits(m, ids, un, codes, cfg=cfg))
            bucket["text"].append(text_logits(m, torch.tensor(uids), px, proc.image_id, answer))
    return {k: {part: compare_logits(torch.cat(refs[part]), torch.cat(outs[k][part])) for part in refs} for k in models}


def guard(proc, ref, model, seeds=SEEDS):
    """Pooled over seeds: {"image": compare_logits(...), "text": compare_logits(...)}."""
    cfg = ref.config
    ids = torch.tensor(proc.generation_ids("a blue square left of a green cross"))
    un = torch.tensor(proc.uncond_ids(ids.tolist()))
    items = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        codes = torch.randint(0, cfg.image_token_size, (cfg.vq.num_tokens,), generator=g)
        img = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8))
        uids, px = proc.understanding_inputs([Message("user", "What color is the circle?", [img])])
        answer = torch.randint(10, cfg.lm.vocab_size - 20, (64,), generator=g)
        items.append((ids, un, codes, uids, px, answer))
    return pooled(proc, ref, {"model": model}, items)["model"]


@pytest.mark.parametrize("mode", ["bf16", "int8", "int8-bf16"])
def test_quality_guard(models, mode):
    proc, ref, lossy = models
    r = guard(proc, ref, lossy[mode])
    print(mode, r)
    assert r["image"]["kl_mean"] < IMG_KL and r["text"]["kl_mean"] < TEXT_KL
    assert r["image"]["greedy_agreement"] >= AGREEMENT and r["text"]["greedy_agreement"] >= AGREEMENT


def test_quality_guard_catches_a_coarser_grid(models):
    """Negative control: the same int8 layers with their codes rounded to even values (7 bits)."""
    proc, ref, _ = models
    coarse = quantize_model(copy.deepcopy(ref), "int8")
    for m in coarse.modules():
        if isinstance(m, Int8Linear):
            m.set_codes((m.codes().float() / 2).round().clamp(-64, 63).mul(2).to(torch.int8))
    r = guard(proc, ref, coarse)
    print("7-bit", r)
    assert r["image"]["kl_mean"] > IMG_KL and r["image"]["greedy_agreement"] < AGREEMENT


# ------------------------------------------------------------------- int4 on trained weights (the bundled model)
@pytest.fixture(scope="module")
def bundled():
    """The bundled ShapesWorld model in fp32, loaded once for the trained-weights checks below."""
    return zuoyou.api.load(None, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def bundled_int4(bundled):
    """int8 and int4 against fp32 on the bundled ShapesWorld model, teacher-forced on real scenes' codes
    and answers, at the CFG of the model's defaults (``pooled``)."""
    import random

    from zuoyou.shapes import render_image, sample_question, sample_scene
    from zuoyou.train.vq import encode_scenes

    pipe = bundled
    ref, proc = pipe.engine.model, pipe.engine.processor
    lossy = {m: quantize_model(copy.deepcopy(ref), m) for m in ("int8", "int4")}
    rng = random.Random(0)
    ids = torch.tensor(proc.generation_ids("a photo of a red circle left of a blue square"))
    un = torch.tensor(proc.uncond_ids(ids.tolist()))
    items = []
    for _ in range(6):
        scene = sample_scene(rng)
        codes = encode_scenes(ref.gen_vision_model, [scene])[0]
        _, q, a = sample_question(rng, scene)
        uids, px = proc.understanding_inputs([Message("user", q, [render_image(scene)])])
        answer = torch.tensor(proc.tokenizer.encode(" " + a, add_special_tokens=False).ids + [proc.eos])
        items.append((ids, un, codes, uids, px, answer))
    r = pooled(proc, ref, lossy, items, cfg=pipe.defaults.cfg)
    print(r)
    return r


def test_int4_quality_on_the_bundled_model(bundled_int4):
    """Random weights are the worst case for 4 bits (the tiny model's image KL is ~2.4); what users run
    is trained weights. On the bundled ShapesWorld model int4's answers stay within int8's bounds, and
    fewer bits lose more than int8. Measured (6 scenes): text KL int4 7.5e-4 / int8 1.9e-5 (v24; v21 6.8e-4 / 3.7e-5)."""
    r = bundled_int4
    assert r["int4"]["text"]["kl_mean"] < TEXT_KL
    assert r["int4"]["image"]["kl_mean"] > r["int8"]["image"]["kl_mean"]  # fewer bits, more loss


@pytest.mark.xfail(strict=True, reason="known: the bundled v24 (like v15, v17 and v21) is sharper than v12: at its CFG 3 int4's "
                                       "image KL is 0.066 against the bound of 0.05 (int8 0.026), with the image head in "
                                       "float and least-squares grids (v21: 0.066; v17: 0.051, min-max grids 0.057; v12: 0.042). Held "
                                       "out, int4 scored as fp32 on v17 (docs/shapes-training-log.md, Thirteenth session)")
def test_int4_image_quality_on_the_bundled_model_at_its_defaults(bundled_int4):
    """int4's image distributions stay within int8's bound at the model's own CFG (v12 at CFG 3: 0.042; 0.051,
    over the bound, while int4 also put the image head in int8, which CFG amplifies; see ``quantized_part``)."""
    assert bundled_int4["int4"]["image"]["kl_mean"] < IMG_KL


@pytest.fixture(scope="module")
def decode_path(bundled) -> dict:
    """The decode kernels themselves (int8 activations per group of 64) on trained weights: teacher-forced
    through the KV cache one code at a time, as the engine decodes, at the model's CFG. {mode: compare_logits
    against the stepwise fp32 reference} for int8 and int4; the reference equals the one-forward one."""
    import random

    from zuoyou.shapes import sample_scene
    from zuoyou.train.vq import encode_scenes

    pipe = bundled
    ref, proc = pipe.engine.model, pipe.engine.processor
    ids = torch.tensor(proc.generation_ids("a photo of a red circle left of a blue square"))
    un = torch.tensor(proc.uncond_ids(ids.tolist()))
    codes = encode_scenes(ref.gen_vision_model, [sample_scene(random.Random(1))])[0]
    cfg = pipe.defaults.cfg
    full = image_code_logits(ref, ids, un, codes, cfg=cfg)
    step = image_code_logits(ref, ids, un, codes, cfg=cfg, stepwise=True)
    assert (full - step).abs().max() < 1e-3 * full.abs().max()
    out = {}
    for mode in ("int8", "int4"):
        lossy = quantize_model(copy.deepcopy(ref), mode)
        out[mode] = compare_logits(step, image_code_logits(lossy, ids, un, codes, cfg=cfg, stepwise=True))
        print(mode, out[mode])
    return out


@pytest.mark.xfail(strict=False, reason="known since the bundled v21, sharper than v17: through the decode path int8's KL "
                                        "is 0.025-0.028 (bound 0.05), but its greedy agreement sits near the 0.9 bound: on "
                                        "these 64 codes v21 0.891 or 0.922, v24 0.828 alone (KL 0.023) and over 0.9 in the full suite, "
                                        "depending on the state earlier tests leave (v17: 0.94); "
                                        "pooled over 6 scenes 0.888 / 0.904 (one / two threads). The flips are near-ties")
def test_decode_path_quality_on_the_bundled_model(decode_path):
    """int8 through the decode path stays within the guard's bounds (KL and greedy agreement)."""
    r = decode_path["int8"]
    assert r["kl_mean"] < IMG_KL and r["greedy_agreement"] >= AGREEMENT


@pytest.mark.xfail(strict=True, reason="known: through the decode path at the bundled v24's CFG 3 int4's image KL is "
                                       "0.074 against the bound of 0.05 (v21: 0.082; v17: 0.066, min-max grids 0.076; v12: 0.038; see "
                                       "the test above)")
def test_int4_decode_path_quality_on_the_bundled_model(decode_path):
    """int4 through the decode path, KL only (near-tied codes of the noisy VQ flip under 4-bit weights)."""
    assert decode_path["int4"]["kl_mean"] < IMG_KL


@pytest.mark.skipif(not int4_kernel.available(), reason="no AVX-512 VNNI or no C++ compiler")
def test_vnni_prefill_unpacks_the_same_weights():
    torch.manual_seed(0)
    lin = torch.nn.Linear(192, 80, bias=False).bfloat16()
    q = Int4Linear.from_linear(lin, group=64, kernel="vnni")
    assert torch.equal(int4_kernel.dense(q.packed, q.scale, q.low), q.unpack())
    x = torch.randn(100, 192, dtype=torch.bfloat16)  # > VNNI_MAX_ROWS: the dense path
    assert torch.allclose(q(x).float(), (x.float() @ q.unpack().float().t()), atol=0.03, rtol=0.02)


def test_int4_falls_back_to_aten_when_the_kernel_cannot_build(monkeypatch):
    """No compiler / a failed build: one warning naming the cause, and int4 layers on ATen's kernel."""
    def broken():
        raise OSError("no C++ compiler found")

    monkeypatch.setattr(int4_kernel, "_module", broken)
    monkeypatch.setattr(int4_kernel, "_cpu_has_vnni", lambda: True)
    int4_kernel.available.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found"):
            assert not int4_kernel.available()
        q = Int4Linear.from_linear(torch.nn.Linear(128, 64), group=64)
        assert q.kernel == "aten"
    finally:
        int4_kernel.available.cache_clear()
    monkeypatch.setenv("ZUOYOU_INT4_KERNEL", "0")
    try:
        assert not int4_kernel.available()
    finally:
        int4_kernel.available.cache_clear()


@pytest.mark.skipif(not int4_kernel.available(), reason="no AVX-512 VNNI or no C++ compiler")
def test_fp16_int4_keeps_the_aten_kernel():
    """The VNNI kernel computes in bf16: an fp16 model's int4 layers stay on ATen's kernel and run."""
    lin = torch.nn.Linear(128, 64).half()
    q = Int4Linear.from_linear(lin, group=64)
    assert q.kernel == "aten" and q.compute_dtype == torch.float16
    assert q(torch.randn(2, 128, dtype=torch.float16)).dtype == torch.float16
