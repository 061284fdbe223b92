"""The one training loop: staged, mixed-task, time- or step-budgeted, resumable, seeded.

Each ``Stage`` says which parameters train, its learning-rate schedule, its budget, and its
understanding:text:generation data ratio. A ``DataSource`` turns (kind, count, rng, stage) into
``Example``s; the loop mixes them into batches, runs ``loss_fn`` under bf16 autocast on CPU,
clips, steps AdamW, and checkpoints atomically (model, optimiser, RNG, stage, step, elapsed).
Killed at any point, ``resume=True`` continues from the last checkpoint with the same data
order. The ShapesWorld recipe and ``zuoyou finetune`` both drive this loop.
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .batch import Example, collate, loss_fn, num_targets
from .checkpoint import exists, load_checkpoint, save_checkpoint
from .distributed import Parallel

KINDS = ("und", "text", "gen")


@dataclass
class Stage:
    name: str
    lr: float
    minutes: float | None = None  # wall-clock budget (our CPU recipe) ...
    steps: int | None = None  # ... or a step budget (reproducible, used by tests/finetune)
    warmup: int = 0
    decay: bool = False  # cosine from lr down to 2 % of it over the stage
    mix: tuple[float, float, float] = (1.0, 1.0, 1.0)  # und : text : gen
    frozen: tuple[str, ...] = ("gen_vision_model.",)  # parameter-name prefixes kept frozen
    batch_size: int = 64  # the global batch of one optimiser step (all ranks, all micro-batches)
    grad_accum: int = 1  # micro-batches per optimiser step (per rank)
    options: dict = field(default_factory=dict)  # passed to the data source (e.g. simple prompts only)

    def progress(self, step: int, elapsed: float) -> float:
        if self.steps is not None:
            return step / self.steps
        return elapsed / (self.minutes * 60)

    def lr_at(self, step: int, frac: float) -> float:
        lr = self.lr * min(1.0, (step + 1) / self.warmup) if self.warmup else self.lr
        if self.decay:
            lr *= 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        return lr


def timed_steps(minutes: float, step: int = 0, elapsed: float = 0.0, max_steps: int | None = None,
                checkpoint: Callable[[int, float], None] | None = None, every: float = 120.0, desc: str | None = None):
    """The schedule of the small single-model loops (the VQ, its decoder, the understanding encoder).

    Yields ``(step, frac)`` until ``minutes`` of wall time have passed (``elapsed`` of them in an earlier,
    resumed run) or, if given, ``max_steps`` steps in all, whichever comes first. ``frac`` is the share of
    the budget used by the clock or by the steps (whichever is further: the learning-rate schedule then
    ends with the run, on a fast or a slow machine). ``checkpoint(steps_done, elapsed)`` runs every
    ``every`` seconds and once at the end. ``desc``: a progress bar (seconds) on stderr.
    """
    budget = minutes * 60
    t0, last = time.time() - elapsed, elapsed
    bar = None
    if desc:
        from tqdm.auto import tqdm

        bar = tqdm(total=int(budget), initial=int(elapsed), desc=desc, unit="s", file=sys.stderr, dynamic_ncols=True)
    try:
        while (now := time.time() - t0) < budget and (max_steps is None or step < max_steps):
            yield step, max(now / budget, 0.0 if max_steps is None else step / max_steps)
            step += 1
            now = time.time() - t0
            if bar is not None:
                bar.update(min(int(now), bar.total) - bar.n)
            if checkpoint is not None and now - last > every:
                checkpoint(step, now)
                last = now
        if checkpoint is not None:
            checkpoint(step, time.time() - t0)
    finally:
        if bar is not None:
            bar.close()


class DataSource(Protocol):
    processor: object

    def examples(self, kind: str, n: int, rng: random.Random, stage: Stage) -> list[Example]: ...


def split_counts(batch: int, mix, rng: random.Random) -> dict[str, int]:
    """Counts per kind summing to ``batch``, proportional to ``mix`` (remainders drawn at random)."""
    total = sum(mix)
    counts = {k: int(batch * m / total) for k, m in zip(KINDS, mix)}
    while sum(counts.values()) < batch:
        k = rng.choices(KINDS, weights=mix)[0]
        counts[k] += 1
    return counts


def set_trainable(model: torch.nn.Module, frozen: tuple[str, ...]) -> list[torch.nn.Parameter]:
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(frozen))
        if p.requires_grad:
            params.append(p)
    return params


def train(model, stages: list[Stage], data: DataSource, out: Path, seed: int = 0, resume: bool = True,
          on_stage_end: Callable[[Stage], dict] | None = None, log=print, checkpoint_every: float = 120.0,
          autocast: bool = True, progress: bool = True, max_steps: int | None = None, threads="auto",
          checkpoint_steps: int | None = None, on_step: Callable | None = None, fsdp: bool = False,
          compile: bool = False, on_stage_start: Callable[[Stage], None] | None = None) -> dict:
    """Run ``stages`` in order; returns the training log. ``max_steps`` stops early (tests).

    ``checkpoint_steps``: also checkpoint every that many steps (deterministic, unlike the clock).
    ``on_step(stage, step, stats, evaluate)`` after each step; ``evaluate(examples)`` -> mean losses.
    Under ``torchrun`` the loop runs data-parallel (``zuoyou.train.distributed``; ``fsdp`` shards).
    ``compile``: the transformer trunk runs through ``torch.compile`` (dynamic shapes; one process, no
    micro-batches): ~20 % faster steps on the ShapesWorld model here, ~10 s to compile.
    ``on_stage_start(stage)`` runs before a stage's first step (not when the stage resumes past it: its effect
    on the weights is in the checkpoint).
    """
    ckpt = Path(out) / "checkpoint"
    par = Parallel(model, fsdp)
    trunk = torch.compile(model.language_model.model, dynamic=True) if compile else None
    if par.rank:
        log, progress = (lambda *a, **k: None), False
    history = {"stages": [], "seed": seed}
    state = {"stage": 0, "step": 0, "elapsed": 0.0, "total_steps": 0}
    rng = random.Random(seed)
    torch.manual_seed(seed)
    start = 0
    if resume and exists(ckpt):
        # the optimiser is rebuilt per stage; its state is restored below once the stage is known
        state = load_checkpoint(ckpt, model)
        rng.setstate(state["rng"])
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        history = state.get("history", history)
        start = state["stage"]
        log(f"resumed: stage {stages[start].name if start < len(stages) else 'done'}, step {state['step']}")
    model.train()
    for si in range(start, len(stages)):
        st = stages[si]
        if on_stage_start is not None and not (si == start and state["step"]):
            on_stage_start(st)
            model.train()
        params = par.wrap(set_trainable(model, st.frozen))
        if st.batch_size < par.world * st.grad_accum:
            raise ValueError(f"batch size {st.batch_size} < {par.world} ranks x {st.grad_accum} micro-batches")
        opt = torch.optim.AdamW(params, lr=st.lr, betas=(0.9, 0.95), weight_decay=0.0)
        step, elapsed = (state["step"], state["elapsed"]) if si == start else (0, 0.0)
        if si == start and step and exists(ckpt):
            par.load_optimizer(ckpt, model, opt)
        t0, last_ckpt = time.time() - elapsed, elapsed
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=st.steps or int(st.minutes * 60), desc=st.name, unit="step" if st.steps else "s",
                       file=sys.stderr, initial=step if st.steps else int(elapsed), dynamic_ncols=True)
        losses: dict[str, list[float]] = {}
        tuner = ThreadTuner() if threads == "auto" else None
        if tuner is None and threads:
            torch.set_num_threads(int(threads))
        tuner = tuner or ThreadTuner(enabled=False)

        def evaluate(examples: list[Example]) -> dict:
            with torch.no_grad():
                return run_batch(model, par, examples, data.processor, st, autocast, backward=False)

        while st.progress(step, now := par.rank0_value(time.time() - t0)) < 1.0:
            frac = st.progress(step, now)
            for g in opt.param_groups:
                g["lr"] = st.lr_at(step, frac)
            counts = split_counts(st.batch_size, st.mix, rng)
            examples = [e for k in KINDS if counts[k] for e in data.examples(k, counts[k], rng, st)]
            opt.zero_grad(set_to_none=True)
            stats = run_batch(model, par, examples, data.processor, st, autocast, trunk=trunk)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            state["total_steps"] = state.get("total_steps", 0) + 1
            tuner.tick()
            for k, v in stats.items():
                losses.setdefault(k, []).append(v)
            if bar is not None:
                bar.set_postfix({k: f"{sum(v[-20:]) / len(v[-20:]):.3f}" for k, v in losses.items()}, refresh=False)
                bar.update(1 if st.steps else int(time.time() - t0) - bar.n)
            if on_step is not None:
                on_step(st, step, stats, evaluate)
            now = par.rank0_value(time.time() - t0)
            if now - last_ckpt > checkpoint_every or (checkpoint_steps and step % checkpoint_steps == 0):
                _save(ckpt, model, opt, rng, history, si, step, now, state, par)
                last_ckpt = now
            if max_steps is not None and state["total_steps"] >= max_steps:
                break
        if bar is not None:
            bar.close()
        record = {"stage": st.name, "steps": step, "minutes": round((time.time() - t0) / 60, 2),
                  "final_loss": {k: round(sum(v[-50:]) / len(v[-50:]), 4) for k, v in losses.items()}}
        if max_steps is not None and state["total_steps"] >= max_steps:
            _save(ckpt, model, opt, rng, history, si, step, time.time() - t0, state, par)
            return history
        if on_stage_end is not None:
            model.eval()
            record["eval"] = on_stage_end(st)
            model.train()
        history["stages"].append(record)
        log(f"stage {st.name} done: {record}")
        _save(ckpt, model, None, rng, history, si + 1, 0, 0.0, state, par)
    model.eval()
    return history


class ThreadTuner:
    """Re-picks the torch thread count every ``every`` steps by timing a few steps with each choice.

    On a shared machine, an oversubscribed OpenMP pool is many times slower than one thread fewer
    (measured here: 2 threads on 2 busy cores ran ~10x slower than 1), and the load changes
    during a long run.
    """

    def __init__(self, every: int = 200, probe: int = 3, enabled: bool = True):
        import os

        self.enabled = enabled and (os.cpu_count() or 1) > 1
        n = min(os.cpu_count() or 1, 16)
        self.choices = sorted({1, max(1, n - 1), n})
        self.every, self.probe = every, probe
        self.n, self.trial, self.times = 0, 0, {}
        self.t = time.perf_counter()

    def tick(self) -> None:
        if not self.enabled or len(self.choices) < 2:
            return
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        self.n += 1
        if self.n % self.every == 5:  # start probing (soon after the start, then periodically): each choice for ``probe`` steps
            self.trial, self.times = 1, {c: [] for c in self.choices}
            torch.set_num_threads(self.choices[0])
        elif self.trial:
            c = torch.get_num_threads()
            self.times[c].append(dt)
            if len(self.times[c]) >= self.probe:
                rest = [k for k in self.choices if len(self.times[k]) < self.probe]
                if rest:
                    torch.set_num_threads(rest[0])
                else:
                    best = min(self.choices, key=lambda k: sorted(self.times[k])[len(self.times[k]) // 2])
                    torch.set_num_threads(best)
                    self.trial = 0


def run_batch(model, par: Parallel, examples: list[Example], proc, st: Stage, autocast: bool,
              backward: bool = True, trunk=None) -> dict[str, float]:
    """Forward (+ backward) one global batch: this rank's slice, in ``st.grad_accum`` micro-batches.

    One process, one micro-batch: the plain mean loss. Otherwise each slice's loss is normalised
    by the global batch's target counts, so the (averaged) gradients equal the plain ones.
    """
    dev = next(model.parameters()).device
    if par.world == 1 and st.grad_accum == 1 and backward:
        batch = _to(collate(examples, proc), dev)
        with _compute(dev, autocast):
            loss, stats = loss_fn(model, batch, trunk=trunk)
        loss.backward()
        return stats
    norm = num_targets(examples)
    mine = examples[par.rank::par.world]
    micro = [mine[j::st.grad_accum] for j in range(st.grad_accum)]
    sums: dict[str, float] = {}
    for j, part in enumerate(micro):
        # an empty slice (only at the ragged end of an evaluation) still runs, unweighted: every
        # rank must issue the same collectives
        part, weight = (part, 1.0) if part else (examples[:1], 0.0)
        with par.no_sync(backward and j < len(micro) - 1):
            with _compute(dev, autocast):
                loss, stats = par.runner(_to(collate(part, proc), dev), norm)
            if backward:
                (loss * par.world * weight).backward()
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v * weight
    return par.sum_stats(sums, norm)


def _compute(dev: torch.device, autocast: bool) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    if autocast:
        stack.enter_context(torch.autocast(dev.type, dtype=torch.bfloat16))
    if dev.type == "cpu":  # short sequences: the plain (math) attention kernel trains ~2x faster on CPU than flash
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    return stack


def _to(batch, dev: torch.device):
    if dev.type == "cpu":
        return batch
    return type(batch)(**{k: v.to(dev) if torch.is_tensor(v) else v for k, v in vars(batch).items()})


def _save(ckpt, model, opt, rng, history, stage, step, elapsed, state, par: Parallel | None = None):
    if par is not None:  # FSDP: gather full tensors (every rank); only rank 0 writes
        model, opt = par.full_state(model, opt)
    if par is None or par.rank == 0:
        save_checkpoint(ckpt, model, opt, stage=stage, step=step, elapsed=elapsed, rng=rng.getstate(),
                        torch_rng=torch.get_rng_state().tolist(), history=history,
                        total_steps=state.get("total_steps", 0))
    if par is not None:
        par.barrier()
