"""zuoyou vs the transformers Janus port on the same random weights: text-to-image and understanding.

    python benchmarks/bench_generate.py --config tiny                 # seconds
    python benchmarks/bench_generate.py --config janus-pro-1b --steps 64

A random ``JanusForConditionalGeneration`` of the chosen size (transformers' own init, bf16) is saved
in the transformers layout and, via ``zuoyou.convert.hf_to_official``, in the official layout; each
mode runs in its own subprocess on those weights (fp32 modes upcast the same bf16 values): zuoyou
fp32 / bf16 / int8 (int8 weights, bf16 activations) / int4 (int4 decoder layers, int8 text head and
aligner, bf16 image head; zuoyou's VNNI kernel where available) [/ int4-aten (ATen's int4 kernel), int8-fp32, "+compile" / "+autotune", "+kv8"], the port
in fp32 / bf16. Per mode: text-to-image (CFG 5, temperature 1, n = 1 and 4) prefill, ms per decode
step (between calls of the image head; after a 2-step warm-up), VQ decode, s/image (extrapolated
from ``--steps K``); understanding (one image + a question, greedy) prefill and ms per token; peak
RSS after loading and, reset, while running; the bandwidth floor (bytes read per step / measured
read bandwidth); the quality guard (KL and greedy agreement vs fp32, teacher-forced). The method and
its caveats: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

PROMPT = "a photo of a red circle left of a blue square"
QUESTION = "Describe the image."
WORDS = ["a photo of a red circle", "a blue square left of a green cross", "How many objects are there?",
         "What color is the circle?", "one two three four zero yes no", "Describe the image."]
ZUOYOU = {"fp32": ("fp32", None), "bf16": ("bf16", None), "int8": ("bf16", "int8"), "int8-fp32": ("fp32", "int8"),
          "int4": ("bf16", "int4"), "int4-aten": ("bf16", "int4")}
ENV = {"int4-aten": {"ZUOYOU_INT4_KERNEL": "0"}}  # int4 on ATen's kernel instead of zuoyou's VNNI kernel
HF = {"hf-fp32": torch.float32, "hf-bf16": torch.bfloat16}
COMPILE = {"compile": True, "autotune": "max-autotune"}  # mode suffixes -> zuoyou.load(compile=...)
KV = {"kv8": "int8"}  # mode suffix -> zuoyou.load(kv_cache=...)
DEFAULT_MODES = "fp32,bf16,int8,int4,hf-fp32,hf-bf16"


def hwm_mb() -> float:
    """Peak RSS so far: VmHWM (Linux), else ru_maxrss (KiB on Linux, bytes on macOS: Linux assumed)."""
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.is_file() else []:
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def machine() -> str:
    """CPU model, cores and the matmul-relevant ISA flags (Linux), for the report."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags]
    return f"{model}, {os.cpu_count()} cores, {' '.join(isa)}; torch {torch.__version__}"


def measure_bandwidth(mb: int = 512) -> float:
    x = torch.ones(mb * 2**20 // 4)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


# ---------------------------------------------------------------------------------------------- weights
def hf_config(name: str, vocab: dict):
    from transformers import JanusConfig, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig

    from zuoyou.config import get_config
    from zuoyou.processor import BOS, EOS, IMAGE_TAG, PAD

    lm = get_config(name).lm
    vision, vq = {}, {}  # janus-pro-1b: the port's defaults are the SigLIP-L / VQ-16 sizes
    if name == "tiny":  # zuoyou's tiny, with a 32/4 = 8x8 patch grid: the port decodes on the ViT's grid
        vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=4,
                      num_image_tokens=64)
        vq = dict(embed_dim=8, num_embeddings=64, latent_channels=32, base_channels=32, channel_multiplier=[1, 2],
                  num_res_blocks=1)
    elif name != "janus-pro-1b":
        raise SystemExit(f"--config {name}: use janus-pro-1b or tiny")
    ids = dict(bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[PAD])
    text = LlamaConfig(vocab_size=lm.vocab_size, hidden_size=lm.hidden_size, intermediate_size=lm.intermediate_size,
                       num_hidden_layers=lm.num_hidden_layers, num_attention_heads=lm.num_attention_heads,
                       num_key_value_heads=lm.num_key_value_heads, max_position_embeddings=lm.max_position_embeddings,
                       rms_norm_eps=lm.rms_norm_eps, tie_word_embeddings=False, **ids)
    D = lm.hidden_size
    return JanusConfig(text_config=text, vision_config=JanusVisionConfig(projection_dim=D, **vision),
                       vq_config=JanusVQVAEConfig(projection_dim=D, image_token_embed_dim=D, **vq),
                       image_token_id=vocab[IMAGE_TAG], tie_word_embeddings=False), ids


def make_checkpoint(name: str, work: Path, seed: int = 0) -> None:
    """work/hf (transformers layout) and work/zuoyou (official layout): the same random bf16 weights."""
    from safetensors.torch import save_file
    from transformers import JanusForConditionalGeneration

    from zuoyou.config import JanusConfig, get_config
    from zuoyou.convert import hf_config_to_official, hf_to_official
    from zuoyou.tokenizer import train_tokenizer

    tok = train_tokenizer(WORDS * 20, vocab_size=300)
    vocab = tok.get_vocab()
    cfg, ids = hf_config(name, vocab)
    torch.manual_seed(seed)
    hf = JanusForConditionalGeneration._from_config(cfg, attn_implementation="sdpa", dtype=torch.bfloat16).eval()
    hf.save_pretrained(work / "hf")
    ours = work / "zuoyou"
    ours.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in hf_to_official(hf.state_dict()).items()}
    save_file(sd, str(ours / "model.safetensors"), metadata={"format": "pt"})
    official = hf_config_to_official(hf.config.to_dict())
    official["torch_dtype"] = "bfloat16"
    config = JanusConfig.from_dict(official)
    assert name == "tiny" or (config.lm, config.vq) == (get_config(name).lm, get_config(name).vq), "sizes differ"
    config.save(ours / "config.json")
    for d in (ours, work / "hf"):
        tok.save(str(d / "tokenizer.json"))


# ---------------------------------------------------------------------------------------------- timing
class Stop(Exception):
    """Raised by a timed head on its call ``limit + 1``: ends a run after ``limit`` decode steps."""


def timed(call, owner, attr: str, limit: int | None) -> dict:
    """Run ``call`` with the head ``owner.attr`` timed: prefill = start -> first head call, then one step
    between consecutive head calls (one head call per generated token)."""
    stamps, head = [], getattr(owner, attr)

    def hooked(*a, **k):
        stamps.append(time.perf_counter())
        if limit is not None and len(stamps) > limit:
            raise Stop
        return head(*a, **k)
    setattr(owner, attr, hooked)
    t0 = time.perf_counter()
    try:
        call()
        complete = True
    except Stop:
        complete = False
    finally:
        delattr(owner, attr)  # the instance attribute shadowed the method
    wall, n = time.perf_counter() - t0, len(stamps) - 1
    return {"prefill_s": stamps[0] - t0, "step_ms": (stamps[-1] - stamps[0]) / max(n, 1) * 1e3, "steps_timed": n,
            "heads": len(stamps), "complete": complete, "wall_s": wall}


def kv_bytes(lm_cfg, rows: int, slots: int, dtype: torch.dtype, int8: bool = False) -> int:
    """Bytes of keys and values a step reads; ``int8``: zuoyou's int8 cache (one fp32 scale per head and slot)."""
    per_head = lm_cfg.head_dim + 4 if int8 else lm_cfg.head_dim * torch.finfo(dtype).bits // 8
    return 2 * lm_cfg.num_hidden_layers * rows * lm_cfg.num_key_value_heads * slots * per_head


def kv_slots(prompt: int, steps: int) -> float:
    """Cache slots a decode step reads, on average over ``steps`` steps after a ``prompt``-token prefill
    (both engines attend over the slots written so far; zuoyou's "+autotune" reads the whole cache)."""
    return prompt + 1 + steps / 2


def test_image(size: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------- workers
def measure(a: dict, T: int, K: int, gen, image_head, decode, ask, text_head, step_bytes, und_bytes, after=None):
    """The same measurements for both engines: text-to-image per batch size n, then understanding."""
    out = {}
    for n in a["batches"]:
        t = time.perf_counter()
        timed(lambda: gen(n), *image_head, 2)  # warm-up (and the compilation of "+compile" modes)
        after and after()
        warm = time.perf_counter() - t
        reset_hwm()  # peak RSS of this phase alone (one generate call + the VQ decode of n images)
        r = timed(lambda: gen(n), *image_head, None if a["steps"] >= T - 1 else a["steps"])
        after and after()
        codes = torch.randint(0, K, (n, T), generator=torch.Generator().manual_seed(0))
        t = time.perf_counter()
        decode(codes)
        out[f"t2i_{n}"] = dict(r, warmup_s=warm, vq_s=time.perf_counter() - t, tokens=T,
                               bytes_per_step=step_bytes(n, r["steps_timed"]), rss_mb=hwm_mb())
    reset_hwm()
    out["und"] = dict(timed(ask, *text_head, None), bytes_per_step=und_bytes)
    out["und"]["rss_mb"] = out["rss_run_mb"] = hwm_mb()
    out["rss_run_mb"] = max(out["rss_run_mb"], *(out[f"t2i_{n}"]["rss_mb"] for n in a["batches"]))
    return out


def run_zuoyou(mode: str, a: dict, work: Path) -> dict:
    import zuoyou.api
    from zuoyou.processor import Message
    from zuoyou.kvcache import KV_CACHES
    from zuoyou.quantize import image_code_logits, text_logits, weight_bytes as wb

    base, *suffixes = mode.split("+")
    compiled = next((COMPILE[x] for x in suffixes if x in COMPILE), False)
    kv = next((KV[x] for x in suffixes if x in KV), "model")
    dtype, quant = ZUOYOU[base]
    t = time.perf_counter()
    pipe = zuoyou.api.load(work / "zuoyou", device="cpu", dtype=dtype, quantize=quant, compile=compiled, kv_cache=kv)
    out = {"load_s": time.perf_counter() - t, "rss_load_mb": hwm_mb(), "rss_reset": reset_hwm()}
    engine, m, cfg = pipe.engine, pipe.engine.model, pipe.config
    out["weight_mb"] = wb(m) / 2**20
    lm, T, proc = m.language_model, cfg.vq.num_tokens, engine.processor
    gids = torch.tensor(proc.generation_ids(PROMPT))
    img = test_image(cfg.vision.image_size)
    ids, px = proc.understanding_inputs([Message("user", QUESTION, [img])])
    if compiled:  # compile the text decode step (for this very shape) before timing it
        pipe.ask(img, QUESTION, max_new_tokens=a["new_tokens"], temperature=0)
    layers = wb(lm.model.layers) + wb(lm.model.norm)
    out.update(measure(
        a, T, cfg.image_token_size, lambda n: pipe.generate(PROMPT, n=n, cfg=5.0, temperature=1.0, seed=0),
        (m, "image_logits"), engine._decode,
        lambda: pipe.ask(img, QUESTION, max_new_tokens=a["new_tokens"], temperature=0), (m, "text_logits"),
        lambda n, k: layers + wb(m.gen_head) + wb(m.gen_aligner)
        + kv_bytes(cfg.lm, 2 * n, len(gids) + T if engine._whole_cache else kv_slots(len(gids), k), engine.dtype,
                   kv == "int8"),
        layers + wb(lm.lm_head) + kv_bytes(cfg.lm, 1, kv_slots(len(ids), a["new_tokens"]), engine.dtype, kv == "int8"),
        after=lm.clear_cache))  # a run stopped after K steps leaves its cache behind
    if not compiled and a["quality_tokens"]:
        g = torch.Generator().manual_seed(1)
        codes = torch.randint(0, cfg.image_token_size, (min(T, a["quality_tokens"]),), generator=g)
        answer = torch.randint(10, cfg.lm.vocab_size, (a["new_tokens"],), generator=g)
        un = torch.tensor(proc.uncond_ids(gids.tolist()))
        # the int8 cache is only read by the decode path: teacher-forced step by step through it
        cache = KV_CACHES[kv]
        torch.save({"image": image_code_logits(m, gids, un, codes, stepwise=cache is not None, cache=cache),
                    "text": text_logits(m, torch.tensor(ids), px, proc.image_id, answer)}, work / f"quality-{mode}.pt")
    return out


def run_hf(mode: str, a: dict, work: Path) -> dict:
    import transformers
    from transformers import JanusForConditionalGeneration

    from zuoyou.loading import read_config
    from zuoyou.processor import Message, Processor
    from zuoyou.quantize import weight_bytes as wb

    transformers.logging.set_verbosity_error()
    dtype = HF[mode]
    t = time.perf_counter()
    hf = JanusForConditionalGeneration.from_pretrained(work / "hf", dtype=dtype, attn_implementation="sdpa").eval()
    out = {"load_s": time.perf_counter() - t, "rss_load_mb": hwm_mb(), "rss_reset": reset_hwm(), "weight_mb": wb(hf) / 2**20}
    cfg, _ = read_config(work / "zuoyou")
    proc = Processor.from_folder(work / "zuoyou", cfg.vision.num_patches, cfg.vision.image_size)
    gc = hf.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = proc.bos, proc.eos, proc.pad
    gc.boi_token_id = proc.image_start
    gc.generation_kwargs = {"boi_token_id": proc.image_start}  # what the port's image generate() reads
    T, head, lmod = cfg.vq.num_tokens, hf.model.generation_head, hf.model.language_model
    ids = torch.tensor([proc.generation_ids(PROMPT)])
    uids, px = proc.understanding_inputs([Message("user", QUESTION, [test_image(cfg.vision.image_size)])])
    uids = torch.tensor([uids])

    def gen(n):
        torch.manual_seed(0)
        hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_mode="image", do_sample=True,
                    temperature=1.0, guidance_scale=5.0, num_return_sequences=n)

    def ask():
        hf.generate(input_ids=uids, pixel_values=px.to(dtype), attention_mask=torch.ones_like(uids),
                    max_new_tokens=a["new_tokens"], do_sample=False)
    layers = wb(lmod.layers) + wb(lmod.norm)
    with torch.inference_mode():
        out.update(measure(
            a, T, cfg.image_token_size, gen, (head, "forward"), hf.decode_image_tokens, ask, (hf.lm_head, "forward"),
            lambda n, k: layers + wb(head) + wb(hf.model.generation_aligner)
            + kv_bytes(cfg.lm, 2 * n, kv_slots(ids.shape[1], k), dtype),
            layers + wb(hf.lm_head) + kv_bytes(cfg.lm, 1, kv_slots(uids.shape[1], a["new_tokens"]), dtype)))
    return out


def worker(mode: str, work: Path) -> None:
    a = json.loads((work / "args.json").read_text())
    if a["threads"]:
        torch.set_num_threads(a["threads"])
    out = run_hf(mode, a, work) if mode in HF else run_zuoyou(mode, a, work)
    out["threads"] = torch.get_num_threads()
    (work / f"result-{mode}.json").write_text(json.dumps(out, indent=1))


# ---------------------------------------------------------------------------------------------- report
def per_image(r: dict, n: int) -> float:
    """Seconds per image: prefill + (T-1) decode steps + VQ decode, over the n images of the call."""
    return (r["prefill_s"] + (r["tokens"] - 1) * r["step_ms"] / 1e3 + r["vq_s"]) / n


def same_dtype_port(mode: str) -> str:
    return "hf-fp32" if mode.startswith(("fp32", "int8-fp32", "hf-fp32")) else "hf-bf16"


def report(results: dict, bw: float, batches: list[int]) -> str:
    ok = {m: r for m, r in results.items() if "error" not in r}
    t2i = ["| mode | n | prefill s | ms/step | floor ms/step | step / floor | s/image | vs HF bf16 | vs HF same dtype |",
           "|---|---|---|---|---|---|---|---|---|"]
    und = ["| mode | load s | und prefill s | und ms/token | floor ms/token | tokens | peak RSS load MB "
           "| peak RSS run MB |", "|---|---|---|---|---|---|---|---|"]
    for mode, r in results.items():
        if mode not in ok:
            t2i.append(f"| {mode} | failed: {r['error']} |")
            continue
        for n in batches:
            t = r[f"t2i_{n}"]
            floor = t["bytes_per_step"] / bw / 1e6
            vs = [f"{per_image(ok[p][f't2i_{n}'], n) / per_image(t, n):.2f}x" if p in ok else "-"
                  for p in ("hf-bf16", same_dtype_port(mode))]
            t2i.append(f"| {mode} | {n} | {t['prefill_s']:.3g} | {t['step_ms']:.3g} | {floor:.3g} | "
                       f"{t['step_ms'] / floor:.2f} | {per_image(t, n):.3g} | {vs[0]} | {vs[1]} |")
        u = r["und"]
        und.append(f"| {mode} | {r['load_s']:.1f} | {u['prefill_s']:.3g} | {u['step_ms']:.3g} | "
                   f"{u['bytes_per_step'] / bw / 1e6:.3g} | {u['heads']} | {r['rss_load_mb']:.0f} | "
                   f"{r['rss_run_mb']:.0f}{'' if r['rss_reset'] else ' (not reset)'} |")
    mem = ["| mode | weights MB | peak RSS MB (x weights): load | " + " | ".join(f"image n={n}" for n in batches)
           + " | understanding |", "|---|---|---|" + "---|" * (len(batches) + 1)]
    for mode, r in ok.items():
        w = r.get("weight_mb")
        x = (lambda mb: f"{mb:.0f} ({mb / w:.2f}x)") if w else (lambda mb: f"{mb:.0f}")
        mem.append(f"| {mode} | {w or 0:.0f} | {x(r['rss_load_mb'])} | "
                   + " | ".join(x(r[f"t2i_{n}"].get("rss_mb", 0)) for n in batches) + f" | {x(r['und'].get('rss_mb', 0))} |")
    return "\n".join(t2i) + "\n\n" + "\n".join(und) + "\n\n" + "\n".join(mem)


def quality(work: Path) -> str:
    from zuoyou.quantize import compare_logits

    if not (work / "quality-fp32.pt").is_file():
        return "(no quality guard: it needs the fp32 mode as reference)"
    ref = torch.load(work / "quality-fp32.pt")
    rows = ["| mode vs fp32 | image KL mean | image KL max | image greedy agreement | text KL mean | text KL max "
            "| text greedy agreement |", "|---|---|---|---|---|---|---|"]
    for f in sorted(work.glob("quality-*.pt")):
        mode = f.stem.removeprefix("quality-")
        if mode != "fp32":
            got = torch.load(f)
            i, t = compare_logits(ref["image"], got["image"]), compare_logits(ref["text"], got["text"])
            rows.append(f"| {mode} | {i['kl_mean']:.2e} | {i['kl_max']:.2e} | {i['greedy_agreement']:.3f} | "
                        f"{t['kl_mean']:.2e} | {t['kl_max']:.2e} | {t['greedy_agreement']:.3f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="janus-pro-1b", choices=["janus-pro-1b", "tiny"])
    p.add_argument("--steps", type=int, default=None, help="decode steps to time (default: all); fewer = extrapolated")
    p.add_argument("--modes", default=DEFAULT_MODES, help=f"comma-separated, from {', '.join([*ZUOYOU, *HF])}; "
                   "zuoyou modes take '+compile' or '+autotune' (max-autotune, frozen weights) and '+kv8' (int8 "
                   "KV cache) suffixes "
                   "(default: %(default)s)")
    p.add_argument("--skip-hf", action="store_true", help="drop the transformers modes")
    p.add_argument("--batches", default="1,4", help="images per text-to-image call (default 1,4)")
    p.add_argument("--new-tokens", type=int, default=32, help="understanding: new tokens (default 32)")
    p.add_argument("--quality-tokens", type=int, default=576, help="teacher-forced image codes of the quality guard "
                   "(0 = no guard; default 576, a whole image)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    p.add_argument("--workdir", default=None, help="folder for the checkpoints, kept and reused (default: a "
                   "temporary folder, removed)")
    p.add_argument("--out", default=None, help="also write all numbers to this JSON file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, Path(args.workdir))
        return 0
    modes = [m for m in args.modes.split(",") if m and not (args.skip_hf and m in HF)]
    bad = [m for m in modes if m not in HF and (m.split("+")[0] not in ZUOYOU
                                                 or any(x not in COMPILE and x not in KV for x in m.split("+")[1:]))]
    if bad:
        p.error(f"unknown modes {bad}")
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="zuoyou-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        bw = measure_bandwidth()
        print(f"read bandwidth: {bw:.1f} GB/s ({torch.get_num_threads()} threads)", flush=True)
        if not (work / "zuoyou" / "model.safetensors").is_file() or not (work / "hf" / "config.json").is_file():
            print(f"building a random {args.config} (transformers' init) ...", flush=True)
            make_checkpoint(args.config, work)
        setup_s = time.perf_counter() - t
        batches = [int(b) for b in args.batches.split(",")]
        (work / "args.json").write_text(json.dumps({"steps": args.steps or 10**9, "batches": batches,
                                                    "new_tokens": args.new_tokens, "threads": args.threads,
                                                    "quality_tokens": args.quality_tokens}))
        results = {}
        for mode in modes:
            t = time.perf_counter()
            print(f"{mode} ...", end=" ", flush=True)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", mode, "--workdir", str(work)]
            env = dict(os.environ, **ENV.get(mode.split("+")[0], {}))
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            res = work / f"result-{mode}.json"
            if proc.returncode != 0 or not res.is_file():
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                results[mode] = {"error": f"exit {proc.returncode}: {' / '.join(tail)}"}
                print("failed:", "\n".join(tail))
                continue
            results[mode] = json.loads(res.read_text())
            res.unlink()
            print(f"{time.perf_counter() - t:.0f} s", flush=True)
        T = next((r[f"t2i_{batches[0]}"]["tokens"] for r in results.values() if "error" not in r), 0)
        timed_steps = "all decode steps timed" if not args.steps or args.steps >= T - 1 else (
            f"--steps {args.steps}: ms/step measured over {args.steps} decode steps, s/image extrapolated to {T} "
            f"image tokens")
        print(f"\n{machine()}\n{args.config}; {timed_steps}; read bandwidth {bw:.1f} GB/s; "
              f"{torch.get_num_threads()} threads; setup {setup_s:.0f} s\n")
        print(report(results, bw, batches))
        q = quality(work) if args.quality_tokens else "(quality guard skipped)"
        print("\n" + q)
        if args.out:
            Path(args.out).write_text(json.dumps({"config": args.config, "steps": args.steps, "bandwidth_gbs": bw,
                                                  "machine": machine(), "threads": torch.get_num_threads(),
                                                  "results": results, "quality": q}, indent=1))
    finally:
        if args.workdir:
            for f in work.glob("quality-*.pt"):
                f.unlink()
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
