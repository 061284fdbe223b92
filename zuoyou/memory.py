"""Process memory helpers."""

from __future__ import annotations


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Large tensors freed in pieces (float weights after quantising, a KV cache after a request) stay
    in glibc's heap for reuse, so the process would keep its largest size although it no longer
    uses that memory, and the next large allocation (the VQ decoder's) would come on top.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
