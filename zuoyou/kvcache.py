"""An int8 KV cache, chosen from outside the model (``LlamaForCausalLM.setup_cache(cache=Int8KVCache)``).

Why: a decode step reads the whole cache of every row. Drawing 4 Janus-Pro-1B images with CFG (8
rows) reads ~0.5 GB of bf16 keys and values per step by the end of the image, as much as the int4
weights, and holds ~0.9 GB. Stored as int8 with one fp32 scale per (row, head, slot) (symmetric:
``x ~ x8 * max|x| / 127``), the cache takes ~half the bytes.

One-token steps (decoding) run ``zuoyou/kernels/kv8_attention.cpp``, which reads the int8 cache as
it is (under ``torch.compile`` as the custom op ``zuoyou::kv8_attend``); longer inputs (prefill) and
CPUs without the kernel dequantise the slots they read and use PyTorch's attention (same
quantisation, same results up to rounding).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .kernels import int4 as kernels
from .models.llama import sdpa


def quantise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., hs) -> int8 values and fp32 scales (...,): ``x ~ x8 * scale``, scale = max |x| / 127."""
    amax = x.float().abs().amax(-1)
    scale = amax / 127
    x8 = torch.round(x.float() * torch.where(amax > 0, 127 / amax, 0)[..., None]).to(torch.int8)
    return x8, scale


class Int8KVCache(nn.Module):
    def __init__(self, batch: int, seq: int, n_kv: int, hs: int, dtype, device):
        super().__init__()  # (``dtype``, the compute dtype, is not the storage's: kept for the common signature)
        for name in ("k8", "v8"):
            self.register_buffer(name, torch.zeros(batch, n_kv, seq, hs, dtype=torch.int8, device=device),
                                 persistent=False)
        for name in ("ks", "vs"):
            self.register_buffer(name, torch.zeros(batch, n_kv, seq, dtype=torch.float32, device=device),
                                 persistent=False)
        self.kernel = self.k8.device.type == "cpu" and kernels.available()  # decided once, off the decode path

    @property
    def rows(self) -> int:
        return self.k8.shape[0]

    def select_rows(self, index: torch.Tensor) -> None:
        for name in ("k8", "v8", "ks", "vs"):
            setattr(self, name, getattr(self, name).index_select(0, index))

    def attend(self, q, k, v, input_pos, mask=None):
        """Store k, v (B, nkv, T, hs) at ``input_pos`` (T,); attention of q (B, nh, T, hs) over the stored
        slots (those ``mask`` (B, 1, T, S') covers, or all) -> (B, nh, T, hs)."""
        n = self.k8.shape[2] if mask is None else mask.shape[-1]
        if q.shape[2] == 1 and self.kernel and _kernel_fits(q):  # (a custom op under torch.compile)
            return kernels.kv8_attend(q, k, v, self.k8, self.ks, self.v8, self.vs, input_pos, mask, n)
        for x, (x8, xs) in ((k, ("k8", "ks")), (v, ("v8", "vs"))):
            values, scales = quantise(x)
            getattr(self, x8).index_copy_(2, input_pos, values)
            getattr(self, xs).index_copy_(2, input_pos, scales)
        keys = (self.k8[:, :, :n] * self.ks[:, :, :n, None]).to(q.dtype)  # (B, nkv, S', hs)
        values = (self.v8[:, :, :n] * self.vs[:, :, :n, None]).to(q.dtype)
        return sdpa(q, keys, values, mask)


def _kernel_fits(q: torch.Tensor) -> bool:
    # (the device is the cache's, checked once in ``Int8KVCache.kernel``)
    return q.dtype in (torch.float32, torch.bfloat16) and q.shape[-1] % 16 == 0 and q.shape[-1] <= 256


KV_CACHES = {"model": None, "int8": Int8KVCache}  # None: the model's own (``KVCache``, the compute dtype)
