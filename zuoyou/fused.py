"""RMSNorm and RoPE as one kernel call each, and dense bf16 linears for a few rows, in eager inference,
swapped in from outside the model.

Why: besides its matrix products, an eager Janus-Pro-1B decode step runs ~700 small element-wise
ops on 2 x 2048 values, each paying a few microseconds of dispatch: an RMSNorm with HF's roundings
is ~9 of them (49 per step), RoPE on q and k ~13 (24 per step). ``zuoyou/kernels/fused_ops.cpp`` does
each in one call with the same roundings. The float linears left in an int4 model (Janus-Pro-1B's image
head: 64 MiB of bf16 read per step for 2 rows) read their weights at about half the memory bandwidth in
PyTorch's bf16 GEMM at 1-4 rows; ``zuoyou/kernels/gemv.cpp`` streams them faster (2 rows on a 2-core Xeon:
15-17 of ~19 GB/s, against 10-12; the same sums in another order, so the outputs agree to bf16 rounding).
``zuoyou.load`` applies ``fuse`` on CPU in the quantised
modes (whose kernels are built anyway), where zuoyou's kernels are available. Only inference takes the
kernels (no autograd through them): training, ``torch.compile`` (which fuses these ops itself) and
other devices run the model's own code.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .kernels import int4 as kernels
from .models.llama import RMSNorm, apply_rope


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


def fuse(model: nn.Module) -> int:
    """Swap every ``RMSNorm`` of ``model`` for a ``FusedRMSNorm`` (same weight), every attention's RoPE
    for ``rope`` and every bf16 ``nn.Linear`` for a ``GemvLinear`` (same weights), if zuoyou's kernels are
    available here; returns the number of swaps."""
    if not kernels.available():
        return 0
    swaps = 0
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
