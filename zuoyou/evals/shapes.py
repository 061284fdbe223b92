"""Exact evaluations on ShapesWorld: GenEval-style generation scores and VQA accuracy.

Generation: per category, prompts drawn with an evaluation seed (disjoint from training's),
``images`` images each, every image judged by the scene parser against the prompt's "exactly"
rule; category score = fraction of passing images; overall = unweighted mean of the six (GenEval).
Understanding: questions about scenes sampled with an evaluation seed, exact answers (a
description is right when its parsed multiset equals the scene's); accuracy per type and overall.
Both run through the one ``Engine`` (batched requests), like every other caller.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from PIL import Image

from ..shapes import (CATEGORIES, QUESTION_TYPES, all_prompts, answers_match, check, parse_image, render_image,
                      sample_question, sample_scene)

EVAL_SEED = 20_251_129
VALID_SEED = 777_001  # for choosing generation defaults; neither training's nor evaluation's


def eval_prompts(per_category: int, seed: int = EVAL_SEED) -> dict[str, list]:
    """``per_category`` prompts per category (cycling through small categories in a shuffled order)."""
    rng = random.Random(seed)
    out = {}
    for c in CATEGORIES:
        pool = all_prompts(c)
        rng.shuffle(pool)
        out[c] = [pool[i % len(pool)] for i in range(per_category)]
    return out


def geneval(pipe, per_category: int = 24, images: int = 4, seed: int = EVAL_SEED, cfg=None, temperature=None,
            best_of: int | None = None, redraws: int | None = None, out_dir: Path | None = None,
            batch_prompts: int = 32, log=None) -> dict:
    """``best_of``: candidates per image, ranked by the model's own check; ``redraws``: more rounds of them
    for an image whose best one fails that check (None: the model's defaults). The judge sees only the
    images kept."""
    prompts = eval_prompts(per_category, seed)
    flat = [(c, p) for c in CATEGORIES for p in prompts[c]]
    results = {c: [] for c in CATEGORIES}
    grids = {c: [] for c in CATEGORIES}
    t0 = time.time()
    for i in range(0, len(flat), batch_prompts):
        chunk = flat[i:i + batch_prompts]
        reqs = [pipe.image_request(p.text, n=images, cfg=cfg, temperature=temperature, seed=seed + i + j,
                                   best_of=best_of, redraws=redraws) for j, (_, p) in enumerate(chunk)]
        outs = pipe.engine.generate_images(reqs)
        for (c, p), imgs in zip(chunk, outs):
            for img in imgs:
                results[c].append((p.text, check(p, parse_image(img))))
            grids[c].append(imgs)
        if log:
            log(f"geneval: {min(i + batch_prompts, len(flat))}/{len(flat)} prompts")
    scores = {c: sum(ok for _, ok in results[c]) / len(results[c]) for c in CATEGORIES}
    report = {"categories": scores, "overall": sum(scores.values()) / len(scores), "images_per_prompt": images,
              "prompts_per_category": per_category, "seed": seed, "seconds": round(time.time() - t0, 1),
              "cfg": cfg if cfg is not None else pipe.defaults.cfg,
              "temperature": temperature if temperature is not None else pipe.defaults.temperature,
              "best_of": reqs[0].best_of, "redraws": reqs[0].redraws,
              "dtype": str(getattr(pipe.engine, "dtype", "")).removeprefix("torch.")}
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for c in CATEGORIES:
            grid(grids[c][:16]).save(out_dir / f"geneval_{c}.png")
        report["failures"] = {c: sorted({t for t, ok in results[c] if not ok})[:20] for c in CATEGORIES}
        _write_reports(out_dir / "geneval", report, _geneval_md(report))
    return report


def vqa(pipe, n: int = 600, seed: int = EVAL_SEED, out_dir: Path | None = None, batch: int = 32, log=None) -> dict:
    rng = random.Random(seed + 1)
    items = []
    for i in range(n):
        scene = sample_scene(rng)
        qtype = QUESTION_TYPES[i % len(QUESTION_TYPES)]
        try:
            items.append((scene, *sample_question(rng, scene, qtype)))
        except ValueError:  # that type does not apply to this scene: any applicable one
            items.append((scene, *sample_question(rng, scene)))
    per: dict[str, list[bool]] = {}
    mistakes = []
    t0 = time.time()
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        reqs = [pipe.text_request([{"role": "user", "content": q, "images": [render_image(s)]}]) for s, _, q, _ in chunk]
        answers = pipe.engine.generate_text(reqs)
        for (s, qt, q, a), got in zip(chunk, answers):
            ok = answers_match(qt, got, a)
            per.setdefault(qt, []).append(ok)
            if not ok and len(mistakes) < 30:
                mistakes.append({"question": q, "expected": a, "answer": got})
        if log:
            log(f"vqa: {min(i + batch, len(items))}/{len(items)} questions")
    acc = {k: sum(v) / len(v) for k, v in sorted(per.items())}
    total = sum(sum(v) for v in per.values()) / sum(len(v) for v in per.values())
    report = {"accuracy": acc, "overall": total, "questions": len(items), "seed": seed,
              "seconds": round(time.time() - t0, 1)}
    if out_dir is not None:
        report["mistakes"] = mistakes
        _write_reports(Path(out_dir) / "vqa", report, _vqa_md(report))
    return report


def prompt_gain(pipe, n: int = 24, seed: int = VALID_SEED) -> float:
    """How much the prompt helps: mean over ``n`` images of NLL(codes | another prompt of the same
    category) - NLL(codes | the image's own prompt), in nats per image, teacher-forced, no CFG.

    Far more sensitive than GenEval early in training: a model that draws plausible scenes but
    ignores the prompt scores ~0 here (each named colour alone is worth up to log 6 = 1.8 nats).
    """
    import torch

    from ..quantize import image_code_logits
    from ..shapes import scene_for_prompt
    from ..train.vq import encode_scenes

    rng = random.Random(seed)
    model, proc = pipe.engine.model, pipe.engine.processor
    gains = []
    for i in range(n):
        cat = CATEGORIES[i % len(CATEGORIES)]
        pool = all_prompts(cat)
        p, other = rng.sample(pool, 2)
        codes = encode_scenes(model.gen_vision_model, [scene_for_prompt(rng, p)])[0]
        nll = []
        for text in (p.text, other.text):
            ids = torch.tensor(proc.generation_ids(text))
            lp = image_code_logits(model, ids, torch.tensor(proc.uncond_ids(ids.tolist())), codes, cfg=1.0)
            nll.append(-lp.log_softmax(-1)[torch.arange(len(codes)), codes].sum().item())
        gains.append(nll[1] - nll[0])
    return sum(gains) / len(gains)


def quick_eval(pipe, log=None) -> dict:
    """A small, fast check run at the end of each training stage."""
    g = geneval(pipe, per_category=8, images=2, seed=VALID_SEED, best_of=1)
    v = vqa(pipe, n=120, seed=VALID_SEED)
    out = {"geneval": round(g["overall"], 3), "geneval_categories": {k: round(x, 3) for k, x in g["categories"].items()},
           "vqa": round(v["overall"], 3), "vqa_types": {k: round(x, 3) for k, x in v["accuracy"].items()},
           "prompt_gain_nats": round(prompt_gain(pipe), 3)}
    if log:
        log(f"quick eval: {out}")
    return out


def choose_defaults(pipe, cfgs=(1.5, 2.0, 3.0, 5.0), temps=(0.6, 0.8, 1.0), log=None, per_category: int = 24,
                    images: int = 4) -> dict:
    """Grid search of CFG x temperature on validation prompts (not the evaluation's), as many images per
    setting as the evaluation (576): with 96 (before the fifth session) the choice was within noise."""
    best = None
    for cfg in cfgs:
        for t in temps:
            s = geneval(pipe, per_category=per_category, images=images, seed=VALID_SEED, cfg=cfg, temperature=t)["overall"]
            if log:
                log(f"defaults: cfg {cfg} temperature {t} -> {s:.3f}")
            if best is None or s > best[0]:
                best = (s, cfg, t)
    return {"cfg": best[1], "temperature": best[2], "validation_geneval": round(best[0], 3)}


def grid(rows: list[list[Image.Image]], pad: int = 2) -> Image.Image:
    if not rows:
        return Image.new("RGB", (1, 1), "white")
    w, h = rows[0][0].size
    cols = max(len(r) for r in rows)
    canvas = Image.new("RGB", (cols * (w + pad) + pad, len(rows) * (h + pad) + pad), (200, 200, 200))
    for i, r in enumerate(rows):
        for j, img in enumerate(r):
            canvas.paste(img, (pad + j * (w + pad), pad + i * (h + pad)))
    return canvas


def _write_reports(stem: Path, report: dict, md: str) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(md)


def _geneval_md(r: dict) -> str:
    lines = ["# ShapesWorld GenEval-style report", "",
             f"{r['prompts_per_category']} prompts per category x {r['images_per_prompt']} images, seed {r['seed']}, "
             f"CFG {r['cfg']}, temperature {r['temperature']}" + (f", {r['dtype']}" if r.get("dtype") else "")
             + (f", each image the best of {r['best_of']} by the model's own check" if r.get("best_of", 1) > 1 else "")
             + (f" (up to {r['redraws']} more rounds while it fails)" if r.get("best_of", 1) > 1 and r.get("redraws")
                else ""),
             "", "| category | score |", "|---|---|"]
    lines += [f"| {c} | {s:.3f} |" for c, s in r["categories"].items()]
    lines += [f"| **overall** | **{r['overall']:.3f}** |", ""]
    lines += [f"![{c}](geneval_{c}.png)" for c in r["categories"]]
    return "\n".join(lines) + "\n"


def _vqa_md(r: dict) -> str:
    lines = ["# ShapesWorld VQA report", "", f"{r['questions']} questions, seed {r['seed']}", "",
             "| question type | accuracy |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in r["accuracy"].items()]
    lines += [f"| **overall** | **{r['overall']:.3f}** |"]
    return "\n".join(lines) + "\n"
