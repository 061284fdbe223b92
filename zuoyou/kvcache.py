"""KV caches chosen from outside the model (``LlamaForCausalLM.setup_cache(cache=...)``): an int8 one, and the
model's own whose one-token steps run zuoyou's attention kernel.

Why: a decode step reads the whole cache of every row. Drawing 4 Janus-Pro-1B images with CFG (8
rows) reads ~0.5 GB of bf16 keys and values per step by the end of the image, as much as the int4
weights, and holds ~0.9 GB. Stored as int8 with one fp32 scale per (row, head, slot) (symmetric:
``x ~ x8 * max|x| / 127``), the cache takes ~half the bytes.

One-token steps (decoding) run ``zuoyou/kernels/kv_attention.cpp``, which reads the int8 cache as
it is (under ``torch.compile`` as the custom op ``zuoyou::kv8_attend``); longer inputs (prefill) and
CPUs without the kernel dequantise the slots they read and use PyTorch's attention (same
quantisation, same results up to rounding).

``KernelKVCache`` stores keys and values in the compute dtype like the model's ``KVCache`` and runs its
one-token steps on the same kernel (writing the new slot in the same call): PyTorch's CPU attention reads a
one-query bf16 cache at about half the memory bandwidth and spends ~0.1-0.2 ms per call on the mask and
dispatch at short lengths (24 calls per Janus-Pro-1B step). ``zuoyou.load`` uses it in the quantised CPU
modes, whose kernels are built anyway; a plain model keeps ``KVCache`` and never waits for a C++ build.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .kernels import int4 as kernels
from .models.llama import KVCache, sdpa


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


class KernelKVCache(KVCache):
    """The model's cache (keys and values in the compute dtype); one-token steps on zuoyou's kernel."""

    def __init__(self, batch: int, seq: int, n_kv: int, hs: int, dtype, device):
        super().__init__(batch, seq, n_kv, hs, dtype, device)
        self.kernel = self.k.device.type == "cpu" and kernels.available()  # decided once, off the decode path

    def attend(self, q, k, v, input_pos, mask=None):
        if q.shape[2] == 1 and self.kernel and _kernel_fits(q) and q.dtype == self.k.dtype:
            n = self.k.shape[2] if mask is None else mask.shape[-1]
            return kernels.kv_attend(q, k, v, self.k, self.v, input_pos, mask, n)
        return super().attend(q, k, v, input_pos, mask)


def _kernel_fits(q: torch.Tensor) -> bool:
    # (the device is the cache's, checked once in each cache's ``kernel``)
    return q.dtype in (torch.float32, torch.bfloat16) and q.shape[-1] % 16 == 0 and q.shape[-1] <= 256


KV_CACHES = {"model": None, "int8": Int8KVCache}  # None: the model's own (``KVCache``, the compute dtype)


def cache_class(name: str, kernels_in_use: bool):
    """The cache class ``setup_cache`` gets for ``kv_cache=name``: with zuoyou's kernels in use (the quantised
    CPU modes) the model's own storage takes the kernel's one-token attention."""
    return KernelKVCache if name == "model" and kernels_in_use else KV_CACHES[name]
