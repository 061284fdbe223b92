"""``zuoyou finetune``: LoRA or full fine-tuning of any loadable model on JSONL data, with the one training loop.

    zuoyou finetune --model M --data DIR --out OUT [--lora-rank 16 | --full] [--steps 500] [--resume]
    torchrun --nproc-per-node K -m zuoyou.train finetune ... [--fsdp]

One ``Stage`` of ``zuoyou.train.loop``: the same und:text:gen mixing and 10 % CFG prompt dropout
as training, AdamW with warm-up and cosine decay, gradient clipping, bf16 autocast where
supported, gradient accumulation, atomic checkpoints every ``--checkpoint-every`` steps (and
every ``--checkpoint-minutes``), ``--resume`` with the same data order, data parallel under
torchrun. OUT holds ``checkpoint/``, ``finetune.json`` (the run's settings), ``log.jsonl`` (one
line per step, held-out losses every ``--eval-every`` steps) and ``model/``: the fine-tuned model
(LoRA merged into the weights; tokenizer and generation defaults copied), loadable by
``zuoyou.load``.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

from ..errors import ConfigError, InputError

# (torch and the engine are imported when a command runs: ``zuoyou --help`` stays fast)

# settings that must not change when a run resumes (they decide the data order or the parameters)
FIXED = ("model", "data", "full", "lora_rank", "lora_alpha", "lora_dropout", "freeze", "train", "steps", "lr",
         "batch_size", "grad_accum", "mix", "seed", "eval_size")


DATA_HELP = """data: one JSON record per line in DIR/*.jsonl (DIR/eval.jsonl: held out), paths relative to the file:
  {"type": "understanding", "images": ["img/a.png"], "messages": [{"role": "user", "content": "What color is it?"},
                                                                   {"role": "assistant", "content": "orange"}]}
  {"type": "generation", "caption": "a photo of an orange circle", "image": "img/b.png"}
  {"type": "text", "messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
turns alternate user/assistant and end with the assistant; the loss is on the assistant turns.
Errors name the file and line. Full description: zuoyou/finetune/data.py."""


def log(msg: str) -> None:
    from ..train.distributed import is_main

    if is_main():
        print(msg, file=sys.stderr, flush=True)


def add_parser(sub) -> None:
    import argparse

    f = sub.add_parser("finetune", help="fine-tune a model on your own JSONL data (LoRA or full)",
                       description="LoRA or full fine-tuning of any loadable model on your own JSONL data, with\n"
                                   "the training loop of `zuoyou train` (alone, or: torchrun -m zuoyou.train finetune).",
                       epilog=DATA_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("--model", default=None, help="base checkpoint folder or hub id (default: the bundled model)")
    f.add_argument("--data", required=True, help="folder of *.jsonl records (eval.jsonl: held out), or one .jsonl")
    f.add_argument("--out", required=True, help="run folder: checkpoint/, log.jsonl, and the result in OUT/model")
    m = f.add_mutually_exclusive_group()
    m.add_argument("--lora-rank", type=int, default=16, help="LoRA rank on the LM's projections (default 16)")
    m.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    f.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    f.add_argument("--lora-dropout", type=float, default=0.0)
    f.add_argument("--freeze", action="append", default=[], metavar="PREFIX",
                   help="keep parameters under this name prefix frozen (repeatable; the VQ is always frozen)")
    f.add_argument("--train", action="append", default=[], metavar="PREFIX", dest="train_prefixes",
                   help="with LoRA: also train these parameters fully, e.g. gen_head. (repeatable)")
    f.add_argument("--steps", type=int, default=500, help="optimiser steps (default 500)")
    f.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3 LoRA, 1e-4 full)")
    f.add_argument("--warmup", type=int, default=None, help="warm-up steps (default steps / 20)")
    f.add_argument("--batch-size", type=int, default=16, help="global batch per optimiser step (default 16)")
    f.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step and rank (default 1)")
    f.add_argument("--mix", default="1:1:1", help="und:text:gen sampling ratio; absent kinds get 0 (default 1:1:1)")
    f.add_argument("--eval-every", type=int, default=100, help="held-out loss every N steps (0: only at the end)")
    f.add_argument("--eval-size", type=int, default=32, help="without eval.jsonl: records held out (at most a tenth; default 32)")
    f.add_argument("--checkpoint-every", type=int, default=100, help="checkpoint every N steps (default 100)")
    f.add_argument("--checkpoint-minutes", type=float, default=10.0, help="... and every M minutes (default 10)")
    f.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="bf16 autocast or fp32 (auto: bf16 on GPUs that support it, fp32 otherwise)")
    f.add_argument("--device", default="auto", help="auto, cpu, cuda, ... (under torchrun: one GPU per rank)")
    f.add_argument("--fsdp", action="store_true", help="under torchrun: shard the model with FSDP2 (default DDP)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--threads", default="auto", help="CPU threads, or auto (re-tuned while training)")
    f.add_argument("--resume", action="store_true", help="continue the run in OUT from its last checkpoint")
    f.add_argument("--stop-at", type=int, default=None, metavar="N",
                   help="stop (checkpointed) at step N, before --steps; --resume continues")
    f.add_argument("--no-progress", action="store_true", help="no progress bar")
    f.set_defaults(func=cmd_finetune)


def cmd_finetune(args) -> None:
    keys = [a for a in vars(args) if a not in ("func", "command", "debug")]
    summary = finetune(**{k: getattr(args, k) for k in keys})
    from ..train.distributed import is_main

    if is_main():
        print(json.dumps(summary, indent=2))


def parse_mix(text: str) -> tuple[float, float, float]:
    try:
        mix = tuple(float(x) for x in text.split(":"))
    except ValueError:
        mix = ()
    if len(mix) != 3 or min(mix) < 0 or not sum(mix):
        raise InputError(f"--mix {text!r}: three non-negative weights und:text:gen, e.g. 5:1:4")
    return mix


def finetune(model=None, data=".", out="finetune-out", full=False, lora_rank=16, lora_alpha=None, lora_dropout=0.0,
             freeze=(), train_prefixes=(), steps=500, lr=None, warmup=None, batch_size=16, grad_accum=1, mix="1:1:1",
             eval_every=100, eval_size=32, checkpoint_every=100, checkpoint_minutes=10.0, precision="auto",
             device="auto", fsdp=False, seed=0, threads="auto", resume=False, no_progress=False,
             stop_at=None) -> dict:
    """Run (or resume) a fine-tuning into ``out``; returns a summary. See the module docstring."""
    import torch

    from ..loading import load_model, resolve_device, resolve_folder
    from ..processor import Processor
    from ..train.checkpoint import exists
    from ..train.distributed import init_from_env, is_main, local_device
    from ..train.loop import Stage, train
    from .data import JsonlData, data_files, load_records
    from .lora import apply_lora, lora_frozen

    train_prefixes = tuple(train_prefixes)
    _, world = init_from_env()
    out = Path(out)
    from ..api import BUNDLED, GenerationDefaults

    folder = resolve_folder(model if model is not None else BUNDLED)
    settings = dict(model=str(folder), data=str(Path(data).resolve()), full=full, lora_rank=None if full else lora_rank,
                    lora_alpha=lora_alpha, lora_dropout=lora_dropout, freeze=list(freeze), train=list(train_prefixes),
                    steps=steps, lr=lr or (1e-4 if full else 1e-3), batch_size=batch_size, grad_accum=grad_accum,
                    mix=mix, seed=seed, eval_size=eval_size)
    _check_run(out, settings, resume)
    dev = local_device() if world > 1 else resolve_device(device)
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "bf16" and dev.type == "mps":
        raise ConfigError("--precision bf16 is not supported on MPS; use fp32")
    # fp32 master weights (AdamW, FSDP's uniform dtype); a LoRA base may stay bf16 (it is frozen)
    wdtype = torch.bfloat16 if (not full and not fsdp and precision == "bf16") else torch.float32
    net, cfg = load_model(folder, dev, wdtype)
    defaults = GenerationDefaults.from_folder(folder)
    proc = Processor.from_folder(folder, cfg.vision.num_patches, cfg.vision.image_size, defaults.system_prompt)

    files, eval_file = data_files(data)
    max_len, codes = cfg.lm.max_position_embeddings, cfg.vq.num_tokens
    records = load_records(files, proc, max_len, codes)
    if eval_file is not None:
        held = load_records([eval_file], proc, max_len, codes)
    else:  # a deterministic few, only when there is enough to spare
        k = min(eval_size, len(records) // 10)
        pick = set(random.Random(seed).sample(range(len(records)), k)) if k else set()
        held = [r for i, r in enumerate(records) if i in pick]
        records = [r for i, r in enumerate(records) if i not in pick]
    source = JsonlData(records, proc, net.gen_vision_model)
    stage_mix = source.mix(parse_mix(mix))
    log(f"data: {source.counts()} training records, {len(held)} held out; mix und:text:gen = {stage_mix}")

    torch.manual_seed(seed)
    if full:
        frozen = ("gen_vision_model.",) + tuple(freeze)
    else:
        adapted = apply_lora(net, lora_rank, lora_alpha, lora_dropout, skip=tuple(freeze))
        frozen = tuple(n for n in lora_frozen(net) if not (train_prefixes and n.startswith(train_prefixes)))
        frozen += ("gen_vision_model.",) + tuple(freeze)
        log(f"LoRA rank {lora_rank} on {len(adapted)} linear layers")
    n_train = sum(p.numel() for n, p in net.named_parameters() if not n.startswith(frozen))
    log(f"training {n_train:,} of {sum(p.numel() for p in net.parameters()):,} parameters on {dev}, {precision}"
        + (f", {world} ranks ({'FSDP' if fsdp else 'DDP'})" if world > 1 else ""))
    stage = Stage("finetune", lr=settings["lr"], steps=steps, warmup=steps // 20 if warmup is None else warmup,
                  decay=True, mix=stage_mix, frozen=frozen, batch_size=batch_size, grad_accum=grad_accum)

    eval_ex = source.build(held) if held else []
    autocast = precision == "bf16"
    summary: dict = {"out": str(out / "model"), "records": source.counts(), "held_out": len(held)}
    if eval_ex and not (resume and exists(out / "checkpoint")):
        summary["eval_before"] = heldout_loss(net, eval_ex, proc, batch_size, autocast)
        log(f"held-out loss before: {_fmt(summary['eval_before'])}")
    logf = open(out / "log.jsonl", "a") if is_main() else None

    def on_step(st, step, stats, evaluate):
        row = {"step": step, **{k: round(v, 6) for k, v in stats.items()}}
        if eval_ex and ((eval_every and step % eval_every == 0) or step == st.steps):
            row["eval"] = _chunked(evaluate, eval_ex, batch_size)
            summary["eval_after"] = row["eval"]
            log(f"step {step}: held-out loss {_fmt(row['eval'])}")
        if logf is not None:
            logf.write(json.dumps(row) + "\n")
            logf.flush()

    try:
        history = train(net, [stage], source, out, seed=seed, resume=resume, log=log, autocast=autocast,
                        checkpoint_every=checkpoint_minutes * 60, checkpoint_steps=checkpoint_every,
                        progress=not no_progress, threads=threads, on_step=on_step, fsdp=fsdp, max_steps=stop_at)
    finally:
        if logf is not None:
            logf.close()
    summary["training"] = history.get("stages", [])
    if not summary["training"]:
        log(f"stopped at step {stop_at}; --resume continues the run")
    elif is_main():
        export(net, folder, out, cfg, None if full else (lora_rank, lora_alpha, tuple(freeze)), fsdp and world > 1)
        log(f"done: the fine-tuned model is in {out / 'model'}")
    if world > 1:
        torch.distributed.barrier()
    return summary


def _check_run(out: Path, settings: dict, resume: bool) -> None:
    from ..train.checkpoint import exists
    from ..train.distributed import is_main

    path = out / "finetune.json"
    if exists(out / "checkpoint") and not resume:
        raise InputError(f"{out} holds a run already: pass --resume to continue it, or choose another --out")
    if resume and path.is_file():
        old = json.loads(path.read_text())
        diff = [f"{k}: {old.get(k)!r} -> {settings[k]!r}" for k in FIXED if old.get(k) != settings[k]]
        if diff:
            raise InputError(f"--resume with other settings than the run in {out}: " + "; ".join(diff))
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(settings, indent=2) + "\n")
        tmp.replace(path)


def heldout_loss(model, examples, proc, batch_size: int, autocast: bool) -> dict:
    """Mean text / image-code losses over ``examples`` (token-weighted), the model as it is."""
    import torch

    from ..train.batch import collate, loss_fn, num_targets
    from ..train.loop import _compute, _to

    dev = next(model.parameters()).device
    norm, sums = num_targets(examples), {}
    was = model.training
    model.eval()
    for i in range(0, len(examples), batch_size):
        batch = _to(collate(examples[i:i + batch_size], proc), dev)
        with torch.no_grad(), _compute(dev, autocast):
            _, stats = loss_fn(model, batch, norm)
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v
    model.train(was)
    return {k: round(v, 6) for k, v in sums.items()}


def _chunked(evaluate, examples, size: int) -> dict:
    """``evaluate`` chunk by chunk (bounded memory), combined into token-weighted means."""
    from ..train.batch import num_targets

    tot: dict[str, float] = {}
    norm = num_targets(examples)
    for i in range(0, len(examples), size):
        part = examples[i:i + size]
        n = dict(zip(("text", "image"), num_targets(part)))
        for k, v in evaluate(part).items():
            tot[k] = tot.get(k, 0.0) + v * n[k]
    return {k: round(v / dict(zip(("text", "image"), norm))[k], 6) for k, v in tot.items()}


def _fmt(d: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in d.items())


def export(net, base: Path, out: Path, cfg, lora, from_checkpoint: bool) -> Path:
    """OUT/model: merged weights in the base's dtype, config, tokenizer and the other small files."""
    import torch

    from ..loading import DTYPES, load_model, save_model
    from ..train.checkpoint import load_checkpoint
    from .lora import apply_lora, merge_lora

    if from_checkpoint:  # FSDP: the live parameters are shards; the last checkpoint holds them whole
        net, _ = load_model(base, torch.device("cpu"), torch.float32)
        if lora is not None:
            apply_lora(net, lora[0], lora[1], skip=lora[2])
        load_checkpoint(out / "checkpoint", net)
    merge_lora(net)
    net.to(DTYPES.get(cfg.torch_dtype, torch.float32))
    dst = out / "model"
    save_model(net, dst)
    for f in base.iterdir():
        if f.suffix == ".json" and f.name != "config.json" and not f.name.endswith(".index.json"):
            shutil.copy(f, dst / f.name)
    return dst


__all__ = ["add_parser", "finetune", "parse_mix", "heldout_loss", "export"]
