"""RMSNorm, RoPE and small-row bf16 linear kernels (zuoyou.fused) against the model's own code, and a fused model
against the plain one."""

import copy

import pytest
import torch

from zuoyou.config import LMConfig
from zuoyou.fused import FusedRMSNorm, GemvLinear, StackedAttention, StackedMLP, fuse, rope
from zuoyou.kernels import int4 as kernels
from zuoyou.models.llama import LlamaForCausalLM, RMSNorm, apply_rope, rope_cos_sin
from zuoyou.quantize import Int4Linear, quantize_linears

pytestmark = pytest.mark.skipif(not kernels.available(), reason="zuoyou's CPU kernels are not available here")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_kernel(dtype):
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(2048, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(2048, generator=g))
    norm = norm.to(dtype)
    fused = FusedRMSNorm(2048, 1e-6).to(dtype)
    fused.weight = norm.weight
    x = (torch.randn(3, 5, 2048, generator=g) * 4).to(dtype)
    with torch.no_grad():
        want, got = norm(x), fused(x)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:  # bf16: the same roundings; a sum in another order may move a value by one bf16 step, rarely
        diff = (got.float() - want.float()).abs() / want.float().abs().clamp(min=1e-3)
        assert (got == want).float().mean() > 0.99 and diff.max() <= 2 ** -7
    # with gradients, the module's own code runs (the kernel has no backward)
    x.requires_grad_(True)
    assert fused(x).grad_fn is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 7])
def test_rope_kernel_is_exact(dtype, T):
    g = torch.Generator().manual_seed(1)
    B, H, hs = 2, 4, 64
    cos, sin = rope_cos_sin(torch.arange(T).expand(B, T) + 5, hs, 10000.0)
    cos, sin = cos[:, None].to(dtype), sin[:, None].to(dtype)  # (B, 1, T, hs)
    x = torch.randn(B, T, H, hs, generator=g).to(dtype).transpose(1, 2)  # (B, H, T, hs), as the model's q
    with torch.no_grad():
        assert torch.equal(rope(x, cos, sin), apply_rope(x, cos, sin))


@pytest.mark.parametrize("rows", [1, 2, 4, 5])  # 5: PyTorch's GEMM (the kernel takes up to 4)
@pytest.mark.parametrize("bias", [True, False])
def test_bf16_linear_for_a_few_rows(rows, bias):
    g = torch.Generator().manual_seed(2)
    lin = torch.nn.Linear(256, 1000, bias=bias).to(torch.bfloat16)  # 1000 outputs: not a multiple of the tasks
    with torch.no_grad():
        lin.weight.copy_(torch.randn(1000, 256, generator=g))
    module = torch.nn.Sequential(lin)
    assert fuse(module) == 1 and type(module[0]) is GemvLinear and module[0].weight is lin.weight
    x = torch.randn(rows, 1, 256, generator=g).to(torch.bfloat16)  # (B, T, K) as in a decode step
    with torch.no_grad():
        want = torch.nn.functional.linear(x.float(), lin.weight.float(), None if lin.bias is None else lin.bias.float())
        got = module(x)
    assert got.shape == (rows, 1, 1000) and got.dtype == torch.bfloat16
    # fp32 sums in another order than PyTorch's, then one bf16 rounding: within a bf16 step of the exact value
    assert ((got.float() - want).abs() <= want.abs() * 2 ** -8 + 1e-2).all()
    x.requires_grad_(True)  # with gradients, nn.Linear's own code runs (the kernel has no backward)
    assert module(x).grad_fn is not None


def test_fused_model_decodes_like_the_plain_one():
    cfg = LMConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64)  # head size 32: both kernels fit
    torch.manual_seed(0)
    lm_p, lm_f = LlamaForCausalLM(cfg).eval(), LlamaForCausalLM(cfg).eval()
    lm_f.load_state_dict(lm_p.state_dict())
    assert fuse(lm_f) == 2 * 2 + 1 + 2  # two norms per layer, the final norm, RoPE per layer
    x = torch.randn(2, 6, cfg.hidden_size)
    with torch.inference_mode():
        for lm in (lm_p, lm_f):
            lm.setup_cache(2, 8)
        a = lm_p.model(x, torch.arange(6))
        b = lm_f.model(x, torch.arange(6))
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        step = torch.randn(2, 1, x.shape[-1])
        mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
        torch.testing.assert_close(lm_f.model(step, torch.tensor([6]), mask), lm_p.model(step, torch.tensor([6]), mask),
                                   rtol=1e-5, atol=1e-5)


def test_int4_stack_equals_its_parts():
    torch.manual_seed(3)
    parts = [Int4Linear.from_linear(torch.nn.Linear(128, n, bias=False).bfloat16(), 64) for n in (64, 32, 32)]
    stacked = Int4Linear.stack(parts)
    assert stacked.out_features == 128 and stacked.kernel == "vnni"
    with torch.no_grad():
        for rows in (1, 2, 100):  # decode kernel and the prefill path (over VNNI_MAX_ROWS)
            x = torch.randn(rows, 128, dtype=torch.bfloat16)
            assert torch.equal(stacked(x), torch.cat([p(x) for p in parts], -1))
    assert Int4Linear.stack(parts[:1] + [Int4Linear.from_linear(torch.nn.Linear(256, 32, bias=False).bfloat16(), 64)]) is None
    assert Int4Linear.stack([Int4Linear.from_linear(torch.nn.Linear(128, 32).bfloat16(), 64)]) is None  # a bias
    aten = Int4Linear.from_linear(torch.nn.Linear(128, 32, bias=False).bfloat16(), 64, kernel="aten")
    assert Int4Linear.stack([parts[0], aten]) is None


def test_int4_model_with_stacked_projections_decodes_the_same():
    cfg = LMConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64)  # GQA: q wider than k and v
    torch.manual_seed(0)
    lm_p = LlamaForCausalLM(cfg).eval().bfloat16()
    quantize_linears(lm_p.model.layers, "int4")
    lm_f = copy.deepcopy(lm_p)
    assert fuse(lm_f) == 2 * 2 + 2 * 2 + 1 + 2 + 1  # attention + MLP stacked and two norms per layer, final norm, RoPE, bf16 head
    layer = lm_f.model.layers[0]
    assert type(layer.self_attn) is StackedAttention and type(layer.mlp) is StackedMLP
    assert layer.self_attn.rope is rope and not hasattr(layer.self_attn, "q_proj")
    x = torch.randn(2, 6, cfg.hidden_size).bfloat16()
    with torch.inference_mode():
        for lm in (lm_p, lm_f):
            lm.setup_cache(2, 8)
        # the same int4 products; the norms and RoPE on zuoyou's kernels round alike (test above): equal or a bf16 step
        torch.testing.assert_close(lm_f.model(x, torch.arange(6)), lm_p.model(x, torch.arange(6)), rtol=2 ** -7, atol=1e-2)
        step = torch.randn(2, 1, cfg.hidden_size).bfloat16()
        mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
        torch.testing.assert_close(lm_f.model(step, torch.tensor([6]), mask), lm_p.model(step, torch.tensor([6]), mask),
                                   rtol=2 ** -7, atol=1e-2)
