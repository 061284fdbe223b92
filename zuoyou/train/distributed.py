"""Data-parallel training for the one loop (``zuoyou.train.loop``): DDP, or FSDP2 for models too large for one device.

Launch: ``torchrun --nproc-per-node K -m zuoyou.train finetune ...`` (gloo on CPU, NCCL on GPUs).

- Every rank seeds the same RNG and draws the same global batch; rank r trains on examples
  r, r+K, r+2K, ... of it, in ``Stage.grad_accum`` micro-batches.
- A slice's loss is its token-*summed* cross-entropy divided by the token counts of the whole
  global batch (``loss_fn(..., norm=...)``), times K because DDP and FSDP average gradients: the
  synchronised gradient is the single-process gradient of the same global batch, so K ranks
  follow the single-process loss curve (up to float summation order).
- DDP (``find_unused_parameters``: a slice may hold no image-generation example, leaving
  ``gen_head`` unused on that rank) keeps a full replica per rank. FSDP2 (``fully_shard`` per
  LM decoder layer, everything else in the root group) shards parameters, gradients and
  optimiser state; the frozen VQ is left unsharded (``ignored_params``) so data sources can
  encode images with it. FSDP2 issues the same collectives on every rank only if every rank
  runs the same parts and gives the same parameters a gradient: decoder layers always run, and
  the parts of the root a micro-batch leaves unused (vision tower, generation embedding and
  head, ``lm_head``) get a zero-weighted pass (``_unused_paths``). (So a part that the whole
  global batch leaves unused gets a zero gradient rather than none: AdamW still moves it by its
  momentum that step, where one process would skip it.) Both run the loss inside one
  ``forward`` of a thin wrapper, which is what their hooks need. Every rank loads the whole
  model before ``fully_shard`` keeps its 1/K of it.
- Only rank 0 writes checkpoints, in the single-process format (FSDP gathers full tensors
  first), so a checkpoint written by K ranks resumes on any number of ranks, 1 included.
- Decisions taken from the clock (stage end, time-based checkpoints) use rank 0's clock,
  broadcast every step: every rank takes the same branch, so collectives never mismatch.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
import torch.nn as nn

from .batch import loss_fn


def init_from_env() -> tuple[int, int]:
    """Join the process group torchrun describes in the environment; (rank, world). No-op alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def local_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class LossModule(nn.Module):
    """``forward(batch, norm) = loss_fn(model, batch, norm)``: the one call DDP/FSDP hooks see."""

    def __init__(self, model: nn.Module, every_path: bool = False):
        super().__init__()
        self.model, self.every_path = model, every_path

    def forward(self, batch, norm=None):
        loss, stats = loss_fn(self.model, batch, norm)
        if self.every_path:
            loss = loss + 0.0 * _unused_paths(self.model, batch)
        return loss, stats


def _unused_paths(m, batch) -> torch.Tensor:
    """A sum through every part of the model this batch leaves unused (to be weighted by zero)."""
    h = m.embed_text(batch.ids[:1, :1])  # (1, 1, D)
    out = h.sum()
    if batch.pixels is None:
        S = m.config.vision.image_size
        out = out + m.embed_images(h.new_zeros(1, 3, S, S)).sum()
    if not batch.gen_codes.numel():
        out = out + m.image_logits(m.embed_image_codes(batch.ids.new_zeros(1, 1))).sum()
    if not (batch.text_targets >= 0).any():
        out = out + m.text_logits(h).sum()
    return out


class _Holder:
    """Stands in for a module/optimiser whose (gathered) state dict is already at hand."""

    def __init__(self, sd=None):
        self.sd = sd

    def state_dict(self):
        return self.sd

    def load_state_dict(self, sd, *args, **kwargs):
        self.sd = sd


class Parallel:
    """The loop's view of the process group; with one process every method is a pass-through."""

    def __init__(self, model: nn.Module, fsdp: bool = False):
        self.model = model
        self.on = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1
        self.fsdp = bool(fsdp) and self.on
        self.runner: nn.Module | None = None
        self._sharded = False

    # ------------------------------------------------------------------ wrapping
    def wrap(self, params: list[nn.Parameter]) -> list[nn.Parameter]:
        """Build the runner for a stage; returns the parameters the optimiser must own."""
        if not self.on:
            self.runner = LossModule(self.model)
            return params
        if self.fsdp:
            names = {n for n, p in self.model.named_parameters() if p.requires_grad}
            if self._sharded and names != self._trainable:
                raise NotImplementedError("FSDP: every stage must train the same parameters (shard once)")
            if not self._sharded:
                self._trainable = names
                from torch.distributed.fsdp import fully_shard

                m = self.model
                keep = set(m.gen_vision_model.parameters()) if hasattr(m, "gen_vision_model") else set()
                for block in _blocks(m):
                    fully_shard(block)
                self.runner = fully_shard(LossModule(m, every_path=True), ignored_params=keep)
                self._sharded = True
            return [p for p in self.runner.parameters() if p.requires_grad]
        from torch.nn.parallel import DistributedDataParallel as DDP

        dev = next(self.model.parameters()).device
        self.runner = DDP(LossModule(self.model), device_ids=[dev] if dev.type == "cuda" else None,
                          find_unused_parameters=True)
        return params

    def no_sync(self, skip: bool):
        """Within it, backward accumulates gradients locally (``skip``: not the last micro-batch)."""
        if not (self.on and skip):
            if self.fsdp and self.runner is not None:
                self.runner.set_requires_gradient_sync(True)
            return contextlib.nullcontext()
        if self.fsdp:
            self.runner.set_requires_gradient_sync(False)
            return contextlib.nullcontext()
        return self.runner.no_sync()

    # ------------------------------------------------------------------ collectives
    def sum_stats(self, sums: dict[str, float], norm: tuple[int, int]) -> dict[str, float]:
        """Per-rank normalised loss sums -> the global batch's mean losses (keys with targets only)."""
        keys = ("text", "image")
        if self.on:
            t = torch.tensor([sums.get(k, 0.0) for k in keys], dtype=torch.float64)
            dist.all_reduce(t)
            sums = dict(zip(keys, t.tolist()))
        return {k: sums.get(k, 0.0) for k, n in zip(keys, norm) if n}

    def rank0_value(self, x: float) -> float:
        """Rank 0's ``x`` on every rank (clock-based decisions must agree)."""
        if not self.on:
            return x
        t = torch.tensor([x], dtype=torch.float64)
        dist.broadcast(t, 0)
        return float(t.item())

    def barrier(self) -> None:
        if self.on:
            dist.barrier()

    # ------------------------------------------------------------------ checkpoints
    def full_state(self, model: nn.Module, opt):
        """(model-like, optimiser-like) whose ``state_dict()`` are full, single-process-format states.

        Collective under FSDP (every rank must call it); a pass-through otherwise.
        """
        if not self._sharded:
            return model, opt
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        o = StateDictOptions(full_state_dict=True, cpu_offload=True)
        sd = {_strip(k): v for k, v in get_model_state_dict(self.runner, options=o).items()}
        if opt is None:
            return _Holder(sd), None
        osd = get_optimizer_state_dict(self.runner, opt, options=o)
        if self.rank:  # with cpu_offload the full states land on rank 0 only, the one that writes
            return _Holder(sd), _Holder(osd)
        order = [n for g in osd["param_groups"] for n in g["params"]]
        idx = {n: i for i, n in enumerate(order)}
        groups = [{**g, "params": [idx[n] for n in g["params"]]} for g in osd["param_groups"]]
        return _Holder(sd), _Holder({"state": {idx[n]: s for n, s in osd["state"].items()}, "param_groups": groups})

    def load_optimizer(self, ckpt, model: nn.Module, opt) -> None:
        """Restore ``opt`` from a single-process-format checkpoint (the model is loaded before wrapping)."""
        from .checkpoint import load_checkpoint

        if not self._sharded:
            load_checkpoint(ckpt, model, opt)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        got = _Holder()
        load_checkpoint(ckpt, _Holder(), got)
        names = [n for n, p in self.runner.named_parameters() if p.requires_grad]
        osd = {"state": {names[int(i)]: s for i, s in got.sd["state"].items()},
               "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in got.sd["param_groups"]]}
        set_optimizer_state_dict(self.runner, opt, osd, options=StateDictOptions(full_state_dict=True))


def _strip(key: str) -> str:
    return key[len("model."):] if key.startswith("model.") else key


def _blocks(model: nn.Module) -> list[nn.Module]:
    """FSDP units: the LM's decoder layers, which every batch runs (the rest is the root group)."""
    return list(model.language_model.model.layers)
