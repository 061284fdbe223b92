"""Next-token sampling: temperature (0 = argmax), top-k, top-p, with an explicit RNG."""

from __future__ import annotations

import torch

from .errors import InputError


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature is None or temperature < 0:
        raise InputError(f"temperature={temperature}: must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise InputError(f"top_k={top_k}: must be >= 1")
    if top_p is not None and not 0 < top_p <= 1:
        raise InputError(f"top_p={top_p}: must be in (0, 1]")


def sample(logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). One ``multinomial`` call for the whole group, as the reference."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def make_generator(seed: int | None, device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g
