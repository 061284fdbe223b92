"""LoRA (Hu et al., 2021) for the LM's linear layers, applied from outside the model, merged for export.

Our own ~80 lines instead of ``peft``: ``peft`` wraps a ``transformers`` ``PreTrainedModel`` and
its config/generation machinery, which our plain ``Janus`` module is not; we need only the
low-rank linear, a way to put it in place of ``q/k/v/o/gate/up/down_proj`` and a merge back to
plain ``nn.Linear`` weights (the exported folder must load with ``zuoyou.load``, with no
adapter format). No extra dependency, and its state-dict keys keep the base names
(``...q_proj.weight``) with ``lora_A``/``lora_B`` beside them, so a training checkpoint is a plain
state dict of the adapted model.

``W x + (alpha / r) * B A x``, ``A`` Kaiming-uniform, ``B`` zero: training starts from the base model.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` (its very parameters, same names) plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, not {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank, self.scale = rank, (alpha if alpha is not None else 2 * rank) / rank
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        a = self.lora_A.to(x.dtype) if not torch.is_autocast_enabled(x.device.type) else self.lora_A
        b = self.lora_B.to(x.dtype) if not torch.is_autocast_enabled(x.device.type) else self.lora_B
        return y + (F.linear(F.linear(self.dropout(x), a), b) * self.scale).to(y.dtype)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with ``W + scale * B A`` (computed in fp32, stored in W's dtype)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        w = self.weight.float() + self.scale * (self.lora_B.float() @ self.lora_A.float())
        lin.weight.copy_(w.to(self.weight.dtype))
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, scale={self.scale:g}"


def apply_lora(model: nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0,
               targets=TARGETS, under: str = "language_model.", skip: tuple[str, ...] = ()) -> list[str]:
    """Replace every ``nn.Linear`` named in ``targets`` below ``under`` (not below a ``skip`` prefix).

    Returns the names of the adapted modules.
    """
    done = []
    for name, mod in list(model.named_modules()):
        if not name.startswith(under) or name.startswith(tuple(skip)):
            continue
        for child_name, child in list(mod.named_children()):
            full = f"{name}.{child_name}"
            if child_name in targets and isinstance(child, nn.Linear) and not full.startswith(tuple(skip)):
                setattr(mod, child_name, LoRALinear(child, rank, alpha, dropout))
                done.append(full)
    if not done:
        raise ValueError(f"no linear layer named {', '.join(targets)} under {under!r} to adapt")
    return done


def lora_frozen(model: nn.Module, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """``Stage.frozen`` for LoRA: every non-LoRA parameter, by its full name (a name is its own prefix)."""
    return tuple(n for n, _ in model.named_parameters() if ".lora_" not in n) + tuple(extra)


def merge_lora(model: nn.Module) -> int:
    """Fold every ``LoRALinear`` back into a plain ``nn.Linear`` in place; returns how many."""
    n = 0
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, LoRALinear):
                setattr(mod, child_name, child.merged())
                n += 1
    return n


__all__ = ["LoRALinear", "apply_lora", "merge_lora", "lora_frozen", "TARGETS"]
