"""The int4 / int8 x int8 decode kernels (``int4_vnni.cpp``): availability, build, weight layouts; and, in
the same extension, one-token attention over an int8 or plain KV cache (``kv_attention.cpp``, ``zuoyou.kvcache``),
RMSNorm / RoPE in one call each (``fused_ops.cpp``) and 1-4 row bf16 linears (``gemv.cpp``; both ``zuoyou.fused``).

AVX-512 VNNI for 1-4 rows; from 5 rows on, AMX-INT8 tiles where the CPU has them and Linux grants
them (``amx_available()``; ``ZUOYOU_AMX=0`` keeps VNNI), with bit-identical results.

Built on first use with ``torch.utils.cpp_extension.load`` (a C++ compiler and ``ninja`` are needed;
the build is cached under ``~/.cache/zuoyou/kernels``, or ``$ZUOYOU_CACHE/kernels``, in a folder named by the
sources, flags, torch and Python; a build found there is imported directly). Where it cannot be used (no AVX-512 VNNI,
no compiler, ``ZUOYOU_INT4_KERNEL=0``) ``available()`` is False and ``zuoyou.quantize.Int4Linear`` /
``Int8Linear`` keep ATen's int4 / int8 kernels. ``available()`` never raises: a failed build is
reported once as a warning.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import warnings
from pathlib import Path

import torch

GROUP = 64  # inputs per scale / zero (fixed in the kernel)
BLOCK = 16  # outputs per block (one AVX-512 register of int32 sums)


def fits(out_features: int, in_features: int) -> bool:
    return out_features % BLOCK == 0 and in_features % GROUP == 0


def _cpu_has_vnni() -> bool:
    cpu = getattr(torch, "cpu", None)
    try:
        return bool(cpu._is_avx512_supported() and cpu._is_vnni_supported())
    except AttributeError:  # older torch: read the flags
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return "avx512_vnni" in flags and "avx512bw" in flags


NAME = "zuoyou_int4_vnni"  # the extension module
# -fopenmp: at::parallel_for is a header template; without OpenMP it runs on one thread
FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma"]


def build_dir() -> Path:
    """Where the build lives: per torch and Python version and per version of these sources and flags (a header
    changed alone would not make torch's extension loader rebuild)."""
    root = os.environ.get("ZUOYOU_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "zuoyou"
    digest = hashlib.sha256(" ".join(FLAGS + [sys.version.split()[0]]).encode())
    for f in sorted(f for f in Path(__file__).parent.iterdir() if f.suffix in (".cpp", ".h")):
        digest.update(f.name.encode() + f.read_bytes())
    return Path(root) / "kernels" / f"torch-{torch.__version__}-{digest.hexdigest()[:12]}"


def _load_built():
    """The extension built before from these very sources, flags, torch and Python (the folder's name says so), or
    None. Imported as torch's loader imports it, without its ninja check, which rebuilds (one to two minutes)
    whenever these sources sit in another folder than at the last build, e.g. another checkout sharing the cache."""
    so = build_dir() / f"{NAME}.so"
    if not so.is_file():
        return None
    try:
        import importlib.util

        spec = importlib.util.spec_from_file_location(NAME, so)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except Exception as e:  # (a damaged build: ``_module`` builds it again)
        warnings.warn(f"zuoyou: {so} could not be loaded ({e})", RuntimeWarning, stacklevel=2)
        return None


@functools.lru_cache(maxsize=None)
def _module():
    module = _load_built()
    if module is not None:
        return module
    from torch.utils import cpp_extension

    out = build_dir()
    here = Path(__file__).parent
    src = [str(here / name) for name in ("int4_vnni.cpp", "kv_attention.cpp", "fused_ops.cpp", "gemv.cpp")]
    out.mkdir(parents=True, exist_ok=True)
    print("zuoyou: compiling the int4/int8 kernels (first use only, one to two minutes) ...", file=sys.stderr, flush=True)
    return cpp_extension.load(NAME, src, extra_cflags=FLAGS, extra_ldflags=["-fopenmp"], build_directory=str(out),
                              verbose=False)


def _allowed() -> bool:
    """May the kernels run here at all (a CPU with AVX-512 VNNI, not turned off by ``ZUOYOU_INT4_KERNEL=0``)?"""
    return os.environ.get("ZUOYOU_INT4_KERNEL", "1") != "0" and _cpu_has_vnni()


@functools.lru_cache(maxsize=None)
def available() -> bool:
    if not _allowed():
        return False
    try:
        _module()
        return True
    except Exception as e:  # no compiler / ninja, or a build error: fall back, say why once
        warnings.warn(f"zuoyou: the int4/int8 VNNI kernels could not be built ({type(e).__name__}: {str(e)[:200]}); "
                      "int4 and int8 use ATen's slower kernels", RuntimeWarning, stacklevel=2)
        return False


def built() -> bool:
    """Would ``available()`` be True here without compiling anything (built before: by a quantised load, the
    tests, or a first ``available()``)? Float models take the kernels only then (``zuoyou.load``): a minute or
    two of compiling would cost more than it saves on one call to a small model."""
    return _allowed() and _load_built() is not None and available()


def amx_available() -> bool:
    """Do 5-8 row products run on AMX tiles (CPU with AMX-INT8, granted by Linux, ``ZUOYOU_AMX`` not 0)?"""
    return available() and bool(_module().amx_available())


def pack(q: torch.Tensor) -> torch.Tensor:
    """(N, K) integers in 0..15 -> (N/16, K/8, 64) uint8 in the kernel's layout (see int4_vnni.cpp)."""
    N, K = q.shape
    qv = q.to(torch.uint8).view(N // BLOCK, BLOCK, K // 8, 2, 4)  # (b, c, t, half, i): k = 8t + 4 half + i
    byte = qv[:, :, :, 0] | (qv[:, :, :, 1] << 4)  # (b, c, t, i)
    return byte.permute(0, 2, 1, 3).reshape(N // BLOCK, K // 8, BLOCK * 4).contiguous()


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack``: (N/16, K/8, 64) uint8 -> (N, K) uint8 in 0..15."""
    NB, T, _ = packed.shape
    byte = packed.view(NB, T, BLOCK, 4).permute(0, 2, 1, 3)  # (b, c, t, i)
    q = torch.stack([byte & 0xF, byte >> 4], dim=3)  # (b, c, t, half, i)
    return q.reshape(NB * BLOCK, T * 8)


def dense(packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """(N, K) bf16 weights ``q * scale + low`` (the C++ unpacking: prefill unpacks once per call)."""
    return _module().int4_unpack(packed, scale, low)


def by_block(t: torch.Tensor) -> torch.Tensor:
    """(N, K/64) per-group values -> (N/16, K/64, 16), the kernel's order."""
    N, G = t.shape
    return t.view(N // BLOCK, BLOCK, G).transpose(1, 2).contiguous()


def from_block(t: torch.Tensor) -> torch.Tensor:
    NB, G, _ = t.shape
    return t.transpose(1, 2).reshape(NB * BLOCK, G)


def mm(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """(M, K) fp32 / bf16 activations -> (M, N) in their dtype: ``x @ (q * scale + low).T``, x rounded to
    int8 per group of 64. Eager calls go straight to the extension (a custom op's dispatch costs ~50 us,
    ~8 ms per Janus-Pro-1B decode step); under torch.compile, the custom op below."""
    if torch.compiler.is_compiling():
        return _mm_op(x, packed, scale, low)
    return _module().int4_mm(x, packed, scale, low)


# a custom op, so that torch.compile traces through it instead of breaking the graph at every layer
@torch.library.custom_op("zuoyou::int4_mm", mutates_args=())
def _mm_op(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    return _module().int4_mm(x, packed, scale, low)


@_mm_op.register_fake
def _(x, packed, scale, low):
    return x.new_empty((x.shape[0], packed.shape[0] * BLOCK))


# ------------------------------------------------------------------------------------------------ int8 weights
def pack8(q: torch.Tensor) -> torch.Tensor:
    """(N, K) int8 -> (N/16, K/4, 64) uint8, ``q + 128`` in the kernel's int8 layout (see int4_vnni.cpp)."""
    N, K = q.shape
    u = (q.view(torch.uint8) ^ 0x80).view(N // BLOCK, BLOCK, K // 4, 4)  # q + 128; (b, c, t, i): k = 4t + i
    return u.permute(0, 2, 1, 3).reshape(N // BLOCK, K // 4, BLOCK * 4).contiguous()


def unpack8(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack8``: (N/16, K/4, 64) uint8 -> (N, K) int8."""
    NB, T, _ = packed.shape
    u = packed.view(NB, T, BLOCK, 4).permute(0, 2, 1, 3).reshape(NB * BLOCK, T * 4)
    return (u ^ 0x80).view(torch.int8)


def mm8(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(M, K) fp32 / bf16 -> (M, N) in their dtype: ``x @ (q * scale[:, None]).T``, x rounded to int8 per
    group of 64 (as ``mm``)."""
    if torch.compiler.is_compiling():
        return _mm8_op(x, packed, scale)
    return _module().int8_mm(x, packed, scale)


@torch.library.custom_op("zuoyou::int8_mm", mutates_args=())
def _mm8_op(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return _module().int8_mm(x, packed, scale)


@_mm8_op.register_fake
def _(x, packed, scale):
    return x.new_empty((x.shape[0], packed.shape[0] * BLOCK))


# ------------------------------------------------------------------------------------------ int8 KV cache
def kv8_attend(q, k, v, k8, ks, v8, vs, input_pos: torch.Tensor, mask, n_read: int) -> torch.Tensor:
    """One-token attention over an int8 cache (``zuoyou.kvcache``), after writing k, v into slot
    ``input_pos[0]`` (a CPU tensor). Eager calls go straight to the extension; under torch.compile, the
    custom op below (it writes the cache in place, which the op declares)."""
    if torch.compiler.is_compiling():
        return _kv8_op(q, k, v, k8, ks, v8, vs, input_pos, mask, n_read)
    return _module().kv8_attend(q, k, v, k8, ks, v8, vs, int(input_pos[0]), mask, n_read)


@torch.library.custom_op("zuoyou::kv8_attend", mutates_args=("k8", "ks", "v8", "vs"))
def _kv8_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k8: torch.Tensor, ks: torch.Tensor, v8: torch.Tensor,
            vs: torch.Tensor, input_pos: torch.Tensor, mask: torch.Tensor | None, n_read: int) -> torch.Tensor:
    return _module().kv8_attend(q, k, v, k8, ks, v8, vs, int(input_pos[0]), mask, n_read)


@_kv8_op.register_fake
def _(q, k, v, k8, ks, v8, vs, input_pos, mask, n_read):
    return torch.empty_like(q)


def kv_attend(q, k, v, kc, vc, input_pos: torch.Tensor, mask, n_read: int) -> torch.Tensor:
    """The same over a cache in q's dtype (``zuoyou.kvcache.KernelKVCache``)."""
    if torch.compiler.is_compiling():
        return _kv_op(q, k, v, kc, vc, input_pos, mask, n_read)
    return _module().kv_attend(q, k, v, kc, vc, int(input_pos[0]), mask, n_read)


@torch.library.custom_op("zuoyou::kv_attend", mutates_args=("kc", "vc"))
def _kv_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
           input_pos: torch.Tensor, mask: torch.Tensor | None, n_read: int) -> torch.Tensor:
    return _module().kv_attend(q, k, v, kc, vc, int(input_pos[0]), mask, n_read)


@_kv_op.register_fake
def _(q, k, v, kc, vc, input_pos, mask, n_read):
    return torch.empty_like(q)


# ------------------------------------------------------------------------------------ fused element-wise ops
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _module().rms_norm(x, weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return _module().rope(x, cos, sin)


def bf16_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(M <= 4, K) x (N, K) dense bf16 weights (+ bias) -> (M, N) in x's dtype (``gemv.cpp``)."""
    return _module().bf16_gemv(x, weight, bias)
