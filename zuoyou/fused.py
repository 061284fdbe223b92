"""RMSNorm and RoPE as one kernel call each, and dense bf16 linears for a few rows, in eager inference,
swapped in from outside the model.

Why: besides its matrix products, an eager Janus-Pro-1B decode step runs ~700 small element-wise
ops on 2 x 2048 values, each paying a few microseconds of dispatch: an RMSNorm with HF's roundings
is ~9 of them (49 per step), RoPE on q and k ~13 (24 per step). ``zuoyou/kernels/fused_ops.cpp`` does
each in one call with the same roundings. The float linears left in an int4 model (Janus-Pro-1B's image
head: 64 MiB of bf16 read per step for 2 rows) read their weights at about half the memory bandwidth in
PyTorch's bf16 GEMM at 1-4 rows; ``zuoyou/kernels/gemv.cpp`` streams them faster (2 rows on a 2-core Xeon:
15-17 of ~19 GB/s, against 10-12; the same sums in another order, so the outputs agree to bf16 rounding).
In an int4 model, an attention's q, k, v projections and an MLP's gate and up projections each read the
same input: stacked into one ``Int4Linear`` (``StackedAttention``, ``StackedMLP``), they cost one kernel call
and one int8 rounding of the input instead of three or two (Janus-Pro-1B: 168 -> 96 int4 calls per decode
step; the same outputs, bit for bit).
``zuoyou.load`` applies ``fuse`` on CPU in the quantised
modes (whose kernels are built anyway), where zuoyou's kernels are available, and to float models where they
are built already. Only inference takes the
kernels (no autograd through them): training, ``torch.compile`` (which fuses these ops itself) and
other devices run the model's own code.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .kernels import int4 as kernels
from .memory import release_freed_memory
from .models.llama import MLP, Attention, RMSNorm, apply_rope
from .quantize import Int4Linear


def _kernel_for(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling())


class FusedRMSNorm(RMSNorm):
    def forward(self, x):
        if _kernel_for(x) and self.weight.dtype == x.dtype and x.shape[-1] % 16 == 0:
            return kernels.rms_norm(x, self.weight, self.eps)
        return super().forward(x)


def rope(x, cos, sin):
    """``apply_rope`` (x (B, H, T, hs), cos / signed sin (B, 1, T, hs)), in one call where the kernel fits."""
    if _kernel_for(x) and x.shape[-1] % 32 == 0 and cos.dtype == sin.dtype == x.dtype and cos.shape[0] == x.shape[0]:
        return kernels.rope(x, cos, sin)
    return apply_rope(x, cos, sin)


class GemvLinear(nn.Linear):
    """``nn.Linear`` whose bf16 inputs of 1-4 rows (decode steps) take ``kernels.bf16_gemv``."""

    def forward(self, x):
        if (_kernel_for(x) and x.dtype == self.weight.dtype == torch.bfloat16 and 0 < x.numel() <= 4 * x.shape[-1]
                and self.in_features % 16 == 0):
            y = kernels.bf16_gemv(x.reshape(-1, self.in_features), self.weight, self.bias)  # (M, N)
            return y.view(*x.shape[:-1], self.out_features)
        return super().forward(x)


class StackedAttention(Attention):
    """``Attention`` whose q, k, v come from one layer ``qkv`` (their weights stacked: ``Int4Linear.stack``).
    Built from an existing attention, whose output projection, cache slot and RoPE it keeps."""

    def __init__(self, attn: Attention, qkv: nn.Module):
        nn.Module.__init__(self)
        self.nh, self.nkv, self.hs = attn.nh, attn.nkv, attn.hs
        self.qkv, self.o_proj, self.kv_cache, self.rope = qkv, attn.o_proj, attn.kv_cache, attn.rope

    def project(self, x):
        return self.qkv(x).split([self.nh * self.hs, self.nkv * self.hs, self.nkv * self.hs], dim=-1)


class StackedMLP(MLP):
    """SwiGLU ``MLP`` whose gate and up projections are one layer ``gate_up`` (gate outputs first)."""

    def __init__(self, mlp: MLP, gate_up: nn.Module):
        nn.Module.__init__(self)
        self.gate_up, self.down_proj = gate_up, mlp.down_proj

    def project(self, x):
        return self.gate_up(x).chunk(2, dim=-1)  # (B, T, I) each


def _stacked(module: nn.Module) -> nn.Module | None:
    """``module`` rebuilt with its parallel projections stacked, or None where it has none that stack."""
    if type(module) is Attention:
        qkv = Int4Linear.stack([module.q_proj, module.k_proj, module.v_proj])
        return None if qkv is None else StackedAttention(module, qkv)
    if type(module) is MLP:
        gate_up = Int4Linear.stack([module.gate_proj, module.up_proj])
        return None if gate_up is None else StackedMLP(module, gate_up)
    return None


def fuse(model: nn.Module) -> int:
    """Swap every ``RMSNorm`` of ``model`` for a ``FusedRMSNorm`` (same weight), every attention's RoPE
    for ``rope``, every bf16 ``nn.Linear`` for a ``GemvLinear`` (same weights) and every attention / MLP whose
    projections are VNNI int4 for a ``StackedAttention`` / ``StackedMLP``, if zuoyou's kernels are available
    here; returns the number of swaps."""
    if not kernels.available():
        return 0
    swaps = 0
    # first, so that the swaps below see the stacked modules; holding only the parents, so that each separate
    # copy is unreferenced, and handed back to the OS, as soon as its stacked copy replaces it
    parents = [(m, name) for m in model.modules() for name, c in m.named_children() if type(c) in (Attention, MLP)]
    for module, name in parents:
        if (stacked := _stacked(getattr(module, name))) is not None:
            setattr(module, name, stacked)
            release_freed_memory()
            swaps += 1
    for module in list(model.modules()):
        if callable(getattr(module, "rope", None)) and module.rope is apply_rope:
            module.rope = rope
            swaps += 1
        for name, child in list(module.named_children()):
            if type(child) is RMSNorm:
                fused = FusedRMSNorm(child.weight.shape[0], child.eps)
                fused.weight = child.weight
            elif type(child) is nn.Linear and child.weight.dtype == torch.bfloat16:
                fused = GemvLinear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                fused.weight, fused.bias = child.weight, child.bias
            else:
                continue
            setattr(module, name, fused)
            swaps += 1
    return swaps
