"""Weight-only int8 / int4 quantisation of the LM linears and the per-step image path, applied from outside the model.

int4 (``Int4Linear``, decoder layers only) is described in its class; int4 mode keeps int8 for the text head
and aligner and leaves the image head in float (``quantized_part``). The rest of this text is about int8.

``quantize_model(model, "int8")`` swaps, in place, every ``nn.Linear`` of the LLaMA decoder layers,
the text head (``lm_head``), the image head (``gen_head``) and the image-code aligner (``gen_aligner``,
but an input narrower than 64) for an ``Int8Linear``: int8 weights with one symmetric scale per output
channel (``w ~ q * s``, ``s = absmax / 127``). The model code is untouched; the vision tower, its
aligner, the embeddings and the VQ stay in the model's dtype.

Why our own module rather than torchao (measured on this repo's CPU, see ``benchmarks/README.md``):
torchao 0.18's ``Int8WeightOnlyConfig`` installs and runs on CPU, but its linear is slower than
the plain bf16 ``F.linear`` it replaces, while ``torch._weight_int8pack_mm`` (ATen's CPU/CUDA/MPS
kernel behind gpt-fast's int8 path) was 1.25-1.8x faster than bf16 for 1-2 row inputs.

On CPUs with AVX-512 VNNI (and a C++ compiler), bf16 models take zuoyou's own int8 x int8 kernel
(``zuoyou/kernels``, the int4 kernel's design with 8-bit weights) for up to ``VNNI_MAX_ROWS`` rows:
it reads the weights once per 8 rows and rounds the activations to int8 per group of 64. Elsewhere
(the "aten" layout), the kernel choice per call, by the number of rows ``M`` (tokens x batch):
- ``M <= PACK_MAX_ROWS`` (decode steps): ``_weight_int8pack_mm``. It reads the int8 weights once
  per block of 4 rows, so it wins for the 1-4 row steps of single requests and becomes slower than
  bf16 from ~8 rows (CFG batch of 4 images) on (inductor's AMX template, ``compile="max-autotune"``,
  is not);
- larger ``M`` (prefill): dequantise to the compute dtype and run one GEMM (compute-bound anyway).
The kernel needs the input feature count to be a multiple of 16 (other sizes crash or return
garbage on CPU); such layers always take the dequantising path.

The activations of an ``Int8Linear`` are bf16 (fp16 for an fp16 model): the kernel's fp32 path is
not vectorised on CPU. So ``quantize="int8"`` on an fp32 model runs its quantised matmuls in bf16.
"""

from __future__ import annotations

import functools
import gc
import re
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ConfigError
from .sampling import guide
from .kernels import int4 as int4k
from .memory import release_freed_memory

MODES = ("int8", "int4")
INT4_GROUPS = (64, 32, 128, 256)  # group sizes the CPU int4 kernel takes, in order of preference
PACK_MAX_ROWS = 16  # above this, dequantise + GEMM is faster than the int8 matrix-vector kernel
VNNI_MAX_ROWS = 96  # the same for the VNNI kernels (they read the weights once per 8 rows)
PREFILL_OUTPUTS = 1024  # output channels per dequantised GEMM of a VNNI-layout int4 prefill


def _kernel_for(w: torch.Tensor, compute: torch.dtype, kernel: str | None, group: int = int4k.GROUP) -> str:
    """``kernel`` if given, else "vnni" where zuoyou's VNNI kernels can take ``w`` (CPU, bf16 compute,
    the shape and group they are built for, and they build here), else "aten"."""
    if kernel is not None:
        return kernel
    fits = compute == torch.bfloat16 and w.device.type == "cpu" and group == int4k.GROUP and int4k.fits(*w.shape)
    return "vnni" if fits and int4k.available() else "aten"


class Int8Linear(nn.Module):
    """``y = (x @ q.T) * s + b`` with int8 ``q`` (out, in) and per-output-channel scales ``s``.

    Two kernels, two storage layouts of the same codes (chosen when quantising, as for ``Int4Linear``):
    ``"vnni"``, zuoyou's AVX-512 VNNI kernel (``packed``: ``zuoyou.kernels.int4.pack8``; activations
    rounded to int8 per group of 64 inputs) where it is available, the compute dtype is bf16 and the
    shape fits (``out % 16 == 0``, ``in % 64 == 0``); else ``"aten"`` (``weight_int8``, see the module
    docstring).
    """

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, kernel: str = "aten"):
        super().__init__()
        self.kernel = kernel
        self.in_features = codes.shape[1] * (4 if kernel == "vnni" else 1)
        self.out_features = codes.shape[0] * (int4k.BLOCK if kernel == "vnni" else 1)
        self.register_buffer("packed" if kernel == "vnni" else "weight_int8", codes.contiguous())
        self.register_buffer("scales", scales.contiguous())  # (out,) in the compute dtype
        self.register_buffer("bias", None if bias is None else bias.to(scales.dtype).contiguous())
        self.packable = self.in_features % 16 == 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, rows: int = 2048, kernel: str | None = None) -> "Int8Linear":
        """Quantise ``rows`` output channels at a time (bounded fp32 temporaries: lm_head is 102400 x 2048).
        ``kernel``: "vnni", "aten", or None = "vnni" where it is available and fits."""
        w = linear.weight.detach()
        compute = torch.float16 if w.dtype == torch.float16 else torch.bfloat16
        out, inp = w.shape
        kernel = _kernel_for(w, compute, kernel)
        if kernel == "vnni":  # written block by block: rows (a multiple of 16) map to whole blocks
            rows -= rows % int4k.BLOCK
            codes = torch.empty(out // int4k.BLOCK, inp // 4, 4 * int4k.BLOCK, dtype=torch.uint8)
        else:
            codes = torch.empty(out, inp, dtype=torch.int8, device=w.device)
        scales = torch.empty(out, dtype=compute, device=w.device)
        for i in range(0, out, rows):
            w32 = w[i:i + rows].float()
            # the scale is stored in the compute dtype: quantise against the rounded value it will have
            s = (w32.abs().amax(dim=1) / 127.0).clamp(min=1e-12).to(compute)
            q = torch.round(w32 / s.float()[:, None]).clamp_(-128, 127).to(torch.int8)
            if kernel == "vnni":
                codes[i // int4k.BLOCK:(i + len(q)) // int4k.BLOCK] = int4k.pack8(q)
            else:
                codes[i:i + rows] = q
            scales[i:i + rows] = s
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(codes, scales, bias, kernel)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.scales.dtype

    def codes(self) -> torch.Tensor:
        """(out, in) int8 codes (a copy for the "vnni" layout)."""
        return int4k.unpack8(self.packed) if self.kernel == "vnni" else self.weight_int8

    def set_codes(self, q: torch.Tensor) -> None:
        if self.kernel == "vnni":
            self.packed.copy_(int4k.pack8(q))
        else:
            self.weight_int8.copy_(q)

    def dequantize(self) -> torch.Tensor:
        return self.codes().to(self.compute_dtype) * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.compute_dtype)
        if self.kernel == "vnni" and x2.shape[0] <= VNNI_MAX_ROWS:
            y = int4k.mm8(x2, self.packed, self.scales)
        elif self.kernel == "aten" and self.packable and x2.shape[0] <= PACK_MAX_ROWS:
            y = torch._weight_int8pack_mm(x2.contiguous(), self.weight_int8, self.scales)
        else:
            dt = dense_dtype(x2)  # fp32 where the CPU's bf16 GEMM is slower
            y = (F.linear(x2.to(dt), self.codes().to(dt)) * self.scales).to(x2.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, compute={self.compute_dtype}, "
                f"kernel={self.kernel}")


class Int4Linear(nn.Module):
    """Group-wise asymmetric int4: ``w ~ q * scale + low`` per ``group`` input channels, ``q`` in 0..15.

    A quarter of the bf16 bytes (plus 1/``group`` of scales), so a decode step that is bound by
    reading the weights reads ~3.6x less. Two kernels, two storage layouts (chosen when quantising):
    - ``"vnni"``: our AVX-512 VNNI kernel (``zuoyou/kernels``) for decode-sized inputs: activations
      rounded to int8 per group of 64 inputs, one instruction per 64 products; it keeps up with
      memory on 2 cores where ATen's kernel does not (``benchmarks/README.md``). Needs groups of 64,
      ``out % 16 == 0``, bf16 compute, and a CPU with AVX-512 VNNI and a C++ compiler (built once, cached);
    - ``"aten"``: ATen's ``_weight_int4pack_mm_for_cpu`` (the "tinygemm" layout of gpt-fast and
      torchao: ``packed`` (out, in / 2) uint8, ``scales_zeros`` (in / group, out, 2) with
      ``w = (q - 8) * scale + zero``), elsewhere. Needs ``out % 16 == 0`` and ``in % group == 0``.
    Inputs of more rows than the kernel is fast for (prefill: ``PACK_MAX_ROWS``, VNNI ``VNNI_MAX_ROWS``)
    unpack the weights and run one bf16 GEMM.
    Layers that fit neither kernel stay int8 (``Int4Linear.group_for``). Each group's grid is fit by least
    squares (``fit_int4``), not set by its min and max.
    """

    def __init__(self, packed: torch.Tensor, scales: tuple[torch.Tensor, ...], bias: torch.Tensor | None,
                 in_features: int, group: int, kernel: str):
        super().__init__()
        self.in_features, self.group, self.kernel = in_features, group, kernel
        self.out_features = packed.shape[0] * (int4k.BLOCK if kernel == "vnni" else 1)
        self.register_buffer("packed", packed)
        if kernel == "vnni":
            self.register_buffer("scale", scales[0])  # (out / 16, in / 64, 16)
            self.register_buffer("low", scales[1])
        else:
            self.register_buffer("scales_zeros", scales[0])  # (in / group, out, 2)
        self.register_buffer("bias", None if bias is None else bias.to(scales[0].dtype).contiguous())

    @staticmethod
    def group_for(linear: nn.Linear) -> int | None:
        """The group size to use for ``linear``, or None if no int4 kernel can take it."""
        out, inp = linear.weight.shape
        if out % 16:
            return None
        return next((g for g in INT4_GROUPS if inp % g == 0), None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: int, rows: int = 128, kernel: str | None = None) -> "Int4Linear":
        """``kernel``: "vnni", "aten", or None = "vnni" where it is available and fits (the VNNI kernel
        computes in bf16: an fp16 model keeps ATen's kernel)."""
        w = linear.weight.detach()
        compute = torch.float16 if w.dtype == torch.float16 else torch.bfloat16
        out, inp = w.shape
        kernel = _kernel_for(w, compute, kernel, group)
        q = torch.empty(out, inp, dtype=torch.uint8)
        scale = torch.empty(out, inp // group, dtype=compute)
        low = torch.empty(out, inp // group, dtype=compute)
        for i in range(0, out, rows):  # bounded fp32 temporaries
            wg = w[i:i + rows].float().reshape(-1, inp // group, group)  # (r, G, g)
            s, lo = fit_int4(wg, compute)  # quantise against the stored values
            if kernel == "vnni":
                low[i:i + rows] = lo.to(compute)
                base = low[i:i + rows].float()
            else:  # tinygemm's zero point: w = (q - 8) * scale + zero
                zero = (lo + 8 * s).to(compute).float()
                base = zero - 8 * s
                low[i:i + rows] = zero.to(compute)
            q[i:i + rows] = torch.round((wg - base[..., None]) / s[..., None]).clamp_(0, 15).reshape(-1, inp)
            scale[i:i + rows] = s.to(compute)
        bias = None if linear.bias is None else linear.bias.detach()
        if kernel == "vnni":
            return cls(int4k.pack(q), (int4k.by_block(scale), int4k.by_block(low)), bias, inp, group, kernel)
        packed = torch.empty(out, inp // 2, dtype=torch.uint8)
        for i in range(0, out, rows):
            packed[i:i + rows] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q[i:i + rows].to(torch.int32), 2)
        scales_zeros = torch.stack([scale, low], -1).transpose(0, 1).contiguous()  # (G, out, 2)
        return cls(packed, (scales_zeros,), bias, inp, group, kernel)

    @classmethod
    def stack(cls, linears: list[nn.Module]) -> "Int4Linear | None":
        """One layer whose outputs are those of ``linears`` side by side (``torch.cat([l(x) for l in linears], -1)``,
        bit for bit: each output depends only on its own weights and on x's int8 rounding, which they share), or
        None unless all are VNNI-layout ``Int4Linear`` of the same input size and group, without bias. The
        layout is blocked by 16 outputs along its first dimension, so stacking is concatenation there."""
        if not linears or not all(type(m) is cls and m.kernel == "vnni" and m.bias is None for m in linears):
            return None
        first = linears[0]
        if any((m.in_features, m.group, m.compute_dtype) != (first.in_features, first.group, first.compute_dtype)
               for m in linears):
            return None
        cat = lambda name: torch.cat([getattr(m, name) for m in linears])  # noqa: E731
        return cls(cat("packed"), (cat("scale"), cat("low")), None, first.in_features, first.group, "vnni")

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.scale.dtype if self.kernel == "vnni" else self.scales_zeros.dtype

    @property
    def unpackable(self) -> bool:
        """Whether ``unpack`` can read these weights with tensor ops (see ``aten_int4_block``)."""
        B = aten_int4_block()
        return self.kernel == "vnni" or (B is not None and self.out_features % B == 0)

    def dequantize(self) -> torch.Tensor:
        """(out, in) weights in the compute dtype (tests, debugging)."""
        if self.unpackable:
            return self.unpack()
        eye = torch.eye(self.in_features, dtype=self.compute_dtype)  # the kernel applied to the identity
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group, self.scales_zeros).t()

    def unpack(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(out, in) weights in ``dtype`` (default: the compute dtype), unpacked with tensor ops.

        The "aten" layout: ``aten_int4_block``. The "vnni" layout: ``zuoyou.kernels.int4``.
        """
        N, K = self.out_features, self.in_features
        if self.kernel == "vnni":
            q = int4k.unpack(self.packed)
            scale, base = int4k.from_block(self.scale).float(), int4k.from_block(self.low).float()
        else:
            q = _unpack_aten(self.packed, aten_int4_block(), N, K)  # (out, in) in 0..15
            scale, zero = (t.t().float() for t in self.scales_zeros.unbind(-1))
            base = zero - 8 * scale
        w = q.view(N, K // self.group, self.group).float() * scale[..., None] + base[..., None]  # (out, G, group)
        return w.view(N, K).to(dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.compute_dtype).contiguous()
        if x2.shape[0] > VNNI_MAX_ROWS and self.kernel == "vnni":
            y = self._prefill_vnni(x2)
        elif x2.shape[0] > PACK_MAX_ROWS and self.kernel == "aten" and self.unpackable:
            dt = dense_dtype(x2)  # fp32 where the CPU's bf16 GEMM is slower
            y = F.linear(x2.to(dt), self.unpack(dt)).to(x2.dtype)
        elif self.kernel == "vnni":
            y = int4k.mm(x2, self.packed, self.scale, self.low)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group, self.scales_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features).to(x.dtype)

    def _prefill_vnni(self, x2: torch.Tensor) -> torch.Tensor:
        """Many rows (prefill): the decode kernels have no fast path for them, so the weights are unpacked and
        multiplied by one GEMM per ``PREFILL_OUTPUTS`` output channels (the packed layout slices by blocks of
        16 outputs), in ``dense_dtype``. The chunks bound the dense copy alive at once (Janus-Pro-1B's MLP,
        5632 x 2048: 46 MB in fp32 whole, 8 MB per chunk)."""
        dt = dense_dtype(x2)  # fp32 where the CPU's bf16 GEMM is slower
        x = x2.to(dt)
        b = PREFILL_OUTPUTS // int4k.BLOCK  # (N / 16) blocks per chunk
        y = torch.cat([F.linear(x, int4k.dense(self.packed[i:i + b], self.scale[i:i + b], self.low[i:i + b]).to(dt))
                       for i in range(0, self.packed.shape[0], b)], dim=-1)  # (M, N)
        return y.to(x2.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}, kernel={self.kernel}"


def dense_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of a dequantised GEMM (prefill) on ``x``: its own, except bf16 on a CPU whose bf16 GEMM is slower
    than its fp32 one. Without native bf16 matmuls (oneDNN reports none, e.g. AVX2 only) fp32 is ~4x faster (AMD
    EPYC, 2 cores, 640 x 2048 x 5632: 0.27 s against 1.07 s); with AVX-512 BF16 but no AMX still ~1.5x (Xeon, 2
    cores, 600 x 2048 x 5632: 71 ms against 107); with AMX bf16 wins. Janus-Pro-1B int4, one 384 px image's
    prefill: see benchmarks/README.md."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and not cpu_bf16_gemm_faster():
        return torch.float32
    return x.dtype


@functools.cache
def _cpu_bf16_gemm() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: assume bf16 is native
        return True


@functools.cache
def cpu_bf16_gemm_faster() -> bool:
    """Whether a prefill-sized bf16 GEMM beats fp32 on this CPU: timed once per process (~0.1 s), since the
    CPU's flags do not tell (AMX, which makes bf16 fast, has no query in torch)."""
    if not _cpu_bf16_gemm():
        return False
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(256, 1024, generator=g), torch.randn(2048, 1024, generator=g)

    def best(dt: torch.dtype) -> float:
        xd, wd = x.to(dt), w.to(dt)
        F.linear(xd, wd)  # warm-up (oneDNN primitive creation)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            F.linear(xd, wd)
            times.append(time.perf_counter() - t)
        return min(times)

    return best(torch.bfloat16) < best(torch.float32)


def _unpack_aten(packed: torch.Tensor, B: int, N: int, K: int) -> torch.Tensor:
    """ATen's packed int4 (N, K / 2) uint8 in blocks of ``B`` output channels -> (N, K) codes in 0..15."""
    b = packed.view(N // B, K, B // 2)  # (blocks, in, B / 2): channel j low nibble, B / 2 + j high
    return torch.cat([b & 0xF, b >> 4], dim=2).permute(0, 2, 1).reshape(N, K)


@functools.cache
def aten_int4_block() -> int | None:
    """Output channels per block of ATen's CPU int4 layout here: ``packed.view(out / B, in, B / 2)[b, k, j]``
    holds channel ``B b + j`` in its low nibble and ``B b + B / 2 + j`` in its high one, with B = 64 where
    torch runs its AVX-512 kernels and 32 with AVX2. Found by packing a random matrix and reading it back,
    not assumed from the CPU; None if neither fits (then ATen's kernel runs for every row count)."""
    q = torch.randint(0, 16, (128, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    for B in (64, 32):
        if torch.equal(_unpack_aten(packed, B, *q.shape), q.to(torch.uint8)):
            return B
    return None


def fit_int4(wg: torch.Tensor, compute: torch.dtype, levels: int = 15, iters: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the affine grid ``w ~ q * scale + low`` (q in 0..levels) with the least squared error:
    wg (r, G, g) fp32 -> (scale, low), each (r, G) fp32 holding values of ``compute``.

    Min-max (scale = range / 15) spends grid points on the extreme weights. Instead, starting from the
    min-max codes, refit scale and low by least squares to the codes (linear regression of w on q) and
    requantise (``iters`` times), keeping per group the best grid seen (the idea of llama.cpp's k-quants,
    without their weights). Data-free; the kernels and the format do not change.

    Measured (fourteenth session): on the bundled model at its CFG 3, int4's image KL 0.057 -> 0.051 and through
    the decode path 0.076 -> 0.066 (v17; ``tests/test_quantize.py``); relative squared error of an N(0, 1)
    2048 x 5632 weight 0.00405 -> 0.00381. Quantising that weight takes 0.089 s instead of 0.023 s (128 rows at a
    time; at 2048 rows the temporaries leave the caches: 0.22 s); loading Janus-Pro-1B in int4 took ~2 s (4 %)
    longer. Not kept: three refits instead of one (the same KL), each input channel weighted by its RMSNorm gain
    squared (0.053), or by its mean squared activation on a few drawings (0.047, but it needs calibration data at load)."""
    lo, hi = wg.amin(-1), wg.amax(-1)
    span = (hi - lo).clamp(min=1e-8)

    def requantise(s, b):
        s, b = s.clamp(min=1e-8).to(compute).float(), b.to(compute).float()
        q = torch.round((wg - b[..., None]) / s[..., None]).clamp_(0, levels)  # (r, G, g)
        return s, b, q, (q * s[..., None] + b[..., None] - wg).pow_(2).sum(-1)

    best_s, best_b, q, best_e = requantise(span / levels, lo)
    wm = wg.mean(-1)
    for _ in range(iters):
        qm = q.mean(-1)
        qc = q - qm[..., None]
        var = qc.pow(2).mean(-1)
        s = (qc * (wg - wm[..., None])).mean(-1) / var.clamp(min=1e-12)
        s = torch.where((var > 0) & (s > 0), s, span / levels)
        s, b, q, e = requantise(s, wm - s * qm)
        better = e < best_e
        best_s, best_b, best_e = best_s.where(~better, s), best_b.where(~better, b), best_e.where(~better, e)
    return best_s, best_b


def quantize_linears(module: nn.Module, mode: str = "int8") -> int:
    """Replace every ``nn.Linear`` below ``module`` in place (int4 where the kernel fits, else int8); returns the count."""
    n = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            group = Int4Linear.group_for(child) if mode == "int4" else None
            q = Int4Linear.from_linear(child, group) if group else Int8Linear.from_linear(child)
            setattr(module, name, q)
            n += 1
        else:
            n += quantize_linears(child, mode)
    return n


def check_mode(mode: str | None) -> str | None:
    """The normalised mode (None = no quantisation); a ConfigError naming the choices otherwise."""
    if mode is None or str(mode).lower() in ("none", ""):
        return None
    if str(mode).lower() not in MODES:
        raise ConfigError(f"quantize={mode!r}: use one of {', '.join(MODES)} (or none)")
    return str(mode).lower()


def quantize_model(model, mode: str | None):
    """Quantise a ``Janus`` in place: decoder-layer linears, ``lm_head``, ``gen_head``, ``gen_aligner``. Returns the model.

    ``mode``: None / "none" (no-op), "int8", or "int4" (decoder layers in int4, the text head and the aligner
    in int8: they are a few % of the bytes of a step and the first place where rounding shows; the image
    head stays in float, see ``quantized_part``). The text head is quantised separately from a tied
    ``embed_tokens`` (the table stays in float).
    (``zuoyou.loading.load_model(..., quantize=mode)`` does the same part by part while it loads.)
    """
    mode = check_quantizable(next(model.parameters()).device, mode)
    if mode is None:
        return model
    for name in [n for n, m in model.named_modules() if quantized_part(n, m, mode)]:
        quantize_part(model, name, mode)
    own_storage(model)
    return model


def check_quantizable(device: torch.device, mode: str | None) -> str | None:
    """``check_mode``, and int4 only on the CPU."""
    mode = check_mode(mode)
    if mode == "int4" and device.type != "cpu":
        raise ConfigError("quantize='int4' has CPU kernels only (zuoyou's VNNI or ATen's): load on the CPU, or use int8")
    return mode


def quantized_part(name: str, module: nn.Module, mode: str = "int8") -> bool:
    """Is the submodule ``name`` one that quantisation in ``mode`` replaces: a decoder layer (its linears),
    the text head, a linear of the image-code aligner with a 64-multiple input, and in int8 a linear of
    the image head? (The aligner runs at every image step too: Janus's 2048 x 2048 second layer took
    ~1.5 ms of a step in bf16; its 8-wide first layer is left in float.)

    int4 leaves the image head in float: its logits are what CFG multiplies, and int8 with one scale
    per output channel was a fifth of int4's loss on trained weights. On the bundled model at its CFG 3,
    image KL: int8 image head alone 0.0115 (the head in bf16: 0.0048; int8 groups of 64, which no fast
    kernel here takes: 0.0009); int4 decoder layers alone 0.040; both 0.051, over the 0.05 bound.
    Janus-Pro-1B's image head is 38 M weights (~5 % of an int4 image step's bytes in int8, ~10 % in bf16)."""
    if not isinstance(module, nn.Linear):
        return _LAYER.fullmatch(name) is not None
    return (name == "language_model.lm_head" or (name.startswith("gen_head.") and mode != "int4")
            or (name.startswith("gen_aligner.") and module.in_features % 64 == 0))


_LAYER = re.compile(r"language_model\.model\.layers\.\d+")


def quantize_part(model, name: str, mode: str) -> None:
    """Quantise the submodule ``name`` (see ``quantized_part``): int4 or int8 decoder linears, int8 elsewhere."""
    module = model.get_submodule(name)
    if _LAYER.fullmatch(name):
        quantize_linears(module, mode)
    else:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, Int8Linear.from_linear(module))


def own_storage(module: nn.Module) -> None:
    """Give every remaining float tensor its own memory (one tensor at a time).

    A safetensors checkpoint loaded without a dtype change leaves the weights in one memory-mapped
    file: the float weights replaced by int8 ones stay mapped, and resident once read, as long as
    any other tensor of that file lives. Copying the others releases the whole mapping.
    """
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            t.data = t.data.clone()
    gc.collect()  # the file mapping may sit in a reference cycle
    release_freed_memory()


def weight_bytes(module: nn.Module) -> int:
    """Bytes of all parameters and buffers below ``module`` (int8 weights + scales counted as stored)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


# ------------------------------------------------------------------------------------------------ quality guard
@torch.inference_mode()
def image_code_logits(model, prompt_ids: torch.Tensor, uncond_ids: torch.Tensor, codes: torch.Tensor,
                      cfg: float = 5.0, stepwise: bool = False, cache=None) -> torch.Tensor:
    """Teacher-forced next-code logits after CFG: (T,) codes -> (T, K) float32.

    Row ``t`` is the distribution the sampler draws code ``t`` from, given the prompt and ``codes[:t]``.
    One full forward (many rows: quantised layers take their dense-weight path), or ``stepwise``:
    the decode path, a KV cache and one code per step for the two CFG rows, as the engine runs it
    (quantised layers take their decode kernels, int8 activations included), in a cache of class ``cache``
    (default: the model's own; e.g. ``zuoyou.kvcache.Int8KVCache``).
    """
    dtype = model.language_model.model.embed_tokens.weight.dtype
    rows = torch.stack([prompt_ids, uncond_ids])  # (2, L)
    if not stepwise:
        x = torch.cat([model.embed_text(rows), model.embed_image_codes(codes[:-1].expand(2, -1))], dim=1).to(dtype)
        logits = model.image_logits(model.hidden(x)[:, rows.shape[1] - 1:]).float()  # (2, T, K)
        return guide(logits, cfg)[0]
    lm, (L, T) = model.language_model, (rows.shape[1], len(codes))
    lm.setup_cache(2, L + T, dtype=dtype, cache=cache)
    try:
        h = model.hidden(model.embed_text(rows).to(dtype), torch.arange(L))[:, -1]  # causal prefill, (2, D)
        out = []
        for t in range(T):
            logits = model.image_logits(h).float()  # (2, K)
            out.append(guide(logits, cfg)[0])
            if t < T - 1:
                slot = L + t
                x = model.embed_image_codes(codes[t].expand(2))[:, None].to(dtype)  # (2, 1, D)
                mask = torch.ones(2, 1, 1, slot + 1, dtype=torch.bool)  # the slots written so far
                h = model.hidden(x, torch.tensor([slot]), mask)[:, -1]
        return torch.stack(out)
    finally:
        lm.clear_cache()


@torch.inference_mode()
def text_logits(model, ids: torch.Tensor, pixels: torch.Tensor, image_id: int, answer: torch.Tensor) -> torch.Tensor:
    """Teacher-forced next-token logits of ``answer`` (N,) after the understanding prompt ``ids`` (L,): (N, V)."""
    dtype = model.language_model.model.embed_tokens.weight.dtype
    full = torch.cat([ids, answer[:-1]])[None]
    x = model.prepare_inputs_embeds(full, pixels.to(dtype), full == image_id).to(dtype)
    return model.text_logits(model.hidden(x)[:, ids.numel() - 1:]).float()[0]


def compare_logits(ref: torch.Tensor, test: torch.Tensor) -> dict:
    """KL(ref || test) per position (mean, max, in nats) and greedy (argmax) agreement."""
    p, q = ref.float().log_softmax(-1), test.float().log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1).clamp(min=0)
    agree = (ref.argmax(-1) == test.argmax(-1)).float().mean()
    return {"kl_mean": kl.mean().item(), "kl_max": kl.max().item(), "greedy_agreement": agree.item()}
