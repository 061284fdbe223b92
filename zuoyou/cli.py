"""The ``zuoyou`` command line: generate, ask, train, eval, demo, serve.

Answers go to stdout alone; progress bars and logs go to stderr. A user error (bad image, bad
parameter, wrong folder) prints one line ``zuoyou: error: ...`` and exits with status 2; pass
``--debug`` for the full traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import ZuoyouError
from .train.recipes import RECIPES  # (plain dataclasses: no torch import)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint folder or hub id (default: the bundled ShapesWorld model)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps or npu (default: auto)")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: the checkpoint's; on CPU the model "
                   "folder's cpu_dtype where that is the faster here: the bundled model takes bf16 on CPUs with fast "
                   "native bf16)")
    p.add_argument("--quantize", default=None, choices=["int8", "int4", "none"],
                   help="int8: weight-only int8 LM linears and heads: half the weight memory, faster decoding "
                        "of one image or one answer on CPU; int4 (CPU only): group-wise int4 decoder layers, "
                        "int8 text head, image head in float, about a quarter of the memory, lossier (default: none)")
    p.add_argument("--kv-cache", default="model", choices=["model", "int8"],
                   help="int8: keys and values stored as int8, about half the KV cache's memory and reads "
                        "(worth it when drawing several images at once); model: the compute dtype (default)")


def load_from_args(args):
    """``zuoyou.load`` with the options of ``_model_args`` (the commands here and ``zuoyou serve``)."""
    from .api import load

    return load(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize, kv_cache=args.kv_cache)


def _load(args):
    log(f"loading {args.model or 'the bundled ShapesWorld model'} ...")
    return load_from_args(args)


def cmd_generate(args) -> None:
    pipe = _load(args)
    images = pipe.generate(args.prompt, n=args.n, cfg=args.cfg, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, seed=args.seed, progress=True, best_of=args.best_of,
                           redraws=args.redraws)
    out = Path(args.output)
    if args.n == 1 and out.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
        out.parent.mkdir(parents=True, exist_ok=True)
        images[0].save(out)
        paths = [out]
    else:
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / f"{i:04d}.png" for i in range(len(images))]
        for img, p in zip(images, paths):
            img.save(p)
    for p in paths:
        print(p)


def cmd_ask(args) -> None:
    pipe = _load(args)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
              seed=args.seed)
    for piece in pipe.ask_stream(args.image, args.question, **kw):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_train_shapes(args) -> None:
    from .train.shapes import run

    if args.from_model:
        from .errors import InputError
        from .loading import resolve_folder

        if args.fresh:
            raise InputError("--from-model starts OUT from a model folder; --fresh would ignore it: pass one of them")
        from .train.shapes import seed_from_model

        seed_from_model(Path(args.out), resolve_folder(args.from_model), args.recipe, args.minutes, args.seed, log=log)
    report = run(Path(args.out), minutes=args.minutes, vq_minutes=args.vq_minutes, seed=args.seed,
                 resume=not args.fresh, log=log, recipe=args.recipe)
    log(f"done: model in {Path(args.out) / 'model'}; report {Path(args.out) / 'report.json'}")
    if "defaults" in report:
        log(f"generation defaults: {report['defaults']}")


def cmd_eval(args) -> None:
    import json

    from .evals import shapes as ev

    pipe = _load(args)
    out = Path(args.out) if args.out else None
    if args.task == "shapes-geneval":
        r = ev.geneval(pipe, per_category=args.prompts, images=args.images, cfg=args.cfg, temperature=args.temperature,
                       best_of=args.best_of, redraws=args.redraws, out_dir=out, log=log)
        scores = {**r["categories"], "overall": r["overall"]}
    else:
        r = ev.vqa(pipe, n=args.questions, out_dir=out, log=log)
        scores = {**r["accuracy"], "overall": r["overall"]}
    print(json.dumps({k: round(v, 4) for k, v in scores.items()}, indent=2))


def cmd_demo(args) -> None:
    from .demo import make_demo

    index = make_demo(_load(args), Path(args.out), log=log)
    print(index)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zuoyou", description="Janus-Pro-style models: understand and draw images.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="draw images from a text prompt")
    g.add_argument("prompt")
    _model_args(g)
    g.add_argument("-n", type=int, default=1, help="number of images (default 1)")
    g.add_argument("--cfg", type=float, default=None, help="classifier-free guidance weight (default: the model's)")
    g.add_argument("--temperature", type=float, default=None, help="0 = argmax (default: the model's)")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--best-of", type=int, default=None, metavar="K",
                   help="draw K candidates per image, keep the n the model's own answers about them rate best "
                        "(models with a self-check; default: the model's, 1 = off)")
    g.add_argument("--redraws", type=int, default=None, metavar="R",
                   help="up to R more rounds of K candidates per kept image that fails the self-check "
                        "(default: the model's, 0 = off)")
    g.add_argument("-o", "--output", required=True, help="a .png/.jpg file when n=1, else a folder (0000.png, ...)")
    g.set_defaults(func=cmd_generate)

    a = sub.add_parser("ask", help="answer a question about one or more images")
    a.add_argument("question")
    a.add_argument("--image", action="append", required=True, help="image file (repeat for several)")
    _model_args(a)
    a.add_argument("--max-new-tokens", type=int, default=None)
    a.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the model's)")
    a.add_argument("--top-k", type=int, default=None)
    a.add_argument("--top-p", type=float, default=None)
    a.add_argument("--seed", type=int, default=None)
    a.set_defaults(func=cmd_ask)

    t = sub.add_parser("train", help="train a model")
    tsub = t.add_subparsers(dest="what", required=True)
    ts = tsub.add_parser("shapes", help="train the ShapesWorld model from zero "
                                        "(tokenizer, VQ, encoder pre-training, three stages, the recipe's SFT restarts)")
    ts.add_argument("--out", required=True, help="run folder (checkpoints, report); the model lands in OUT/model")
    ts.add_argument("--recipe", choices=list(RECIPES), default="v27",
                    help="v27: the bundled model's recipe (default; v26 + a stage that also reads crowded scenes and its "
                         "own drawings); v26: v24 + relations "
                         "taught with training-only place heads on the LM (start them with --from-model); v25: v24 + relations taught by a curriculum (one object's side, which of two is further, "
                         "the relation; start it with --from-model); v24: the model bundled before v27 (v22 + two more restarts of v21's kind); v23: one such; v22: v21 with its "
                         "VQ decoder trained 30 min more on whole scenes, the codes unchanged (cleaner pixels from the same "
                         "drawings); v21: v17 + two more restarts in which the model also reads "
                         "crowded scenes and its own drawings as the judge sees them: a better self-check); v20: one such "
                         "restart; v19: v20 without its own drawings; v17: v15 + two more restarts whose prompts "
                         "favour the weak categories; v18: three such; v16: one such; "
                         "v15: v12 + three more restarts whose two-object scenes come in the named order; v14, v13: two and one such; v12: v9 + three restarts of SFT of 25 min each; v11: two such restarts; v10: v9 + 25 min more SFT; v9: v6 with 80 %% "
                         "GenEval-style prompts among the generation examples; v6: the one bundled before (v4 with a "
                         "3x longer encoder pre-training); v4: v3 "
                         "with a wide image-code embedding; v3: v1's VQ, a pre-trained understanding encoder, more "
                         "generation data; v1: the first bundled model; v2: deterministic VQ codes, multi-question "
                         "dialogues; v5: v4 + 70 min more SFT (no better held out); v7: v6 on v2's deterministic VQ, the encoder "
                         "also taught where objects are; v8: v6 with that encoder label alone "
                         "(see the README for how they compared)")
    ts.add_argument("--minutes", type=float, default=None,
                    help="wall-clock budget of the three LM stages (default: the recipe's, 80 for v4, v6 and v9-v27; "
                         "the fourth stage of v5 adds its own 70, of v10 its own 25, v11 two of 25, v12 three, v15 six, "
                         "v17 eight, v21 and v22 ten, v23 eleven, v24 twelve, v26 fourteen and v27 fifteen, "
                         "the relation stages after 400 steps of keep_places)")
    ts.add_argument("--vq-minutes", type=float, default=None,
                    help="wall-clock budget of the VQ training (default: the recipe's, 26 for v4, v6 and v9-v27 (v22-v27 then 30 more on its decoder), 25 for v2 and v7)")
    ts.add_argument("--seed", type=int, default=1)
    ts.add_argument("--fresh", action="store_true", help="ignore checkpoints in OUT (default: resume)")
    ts.add_argument("--from-model", default=None, metavar="DIR",
                    help="start OUT from this finished model folder (e.g. zuoyou/assets/shapes, the bundled v27) "
                         "instead of from zero: the recipe goes on after the stages its training_report.json lists")
    ts.set_defaults(func=cmd_train_shapes)

    e = sub.add_parser("eval", help="evaluate a model on ShapesWorld")
    e.add_argument("task", choices=["shapes-geneval", "shapes-vqa"])
    _model_args(e)
    e.add_argument("--out", default=None, help="folder for the JSON + Markdown report and PNG grids")
    e.add_argument("--prompts", type=int, default=24, help="prompts per category (geneval)")
    e.add_argument("--images", type=int, default=4, help="images per prompt (geneval)")
    e.add_argument("--questions", type=int, default=600, help="number of questions (vqa)")
    e.add_argument("--cfg", type=float, default=None)
    e.add_argument("--temperature", type=float, default=None)
    e.add_argument("--best-of", type=int, default=None, metavar="K",
                   help="candidates per image, ranked by the model's own check (geneval; default: the model's)")
    e.add_argument("--redraws", type=int, default=None, metavar="R",
                   help="more rounds of candidates while an image fails its self-check (geneval; default: the model's)")
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("demo", help="a small gallery: prompts -> images -> questions -> answers")
    _model_args(d)
    d.add_argument("--out", required=True)
    d.set_defaults(func=cmd_demo)
    __import__("zuoyou.finetune.run", fromlist=["add_parser"]).add_parser(sub)  # zuoyou finetune

    try:
        from .server.cli import add_parser as add_serve
    except ImportError:  # the serving extra (fastapi, uvicorn) is not installed
        add_serve = None
    if add_serve is not None:
        add_serve(sub)
    return parser


def run_guarded(args) -> int:
    """Run ``args.func(args)``: a user error is one line on stderr and status 2 (``--debug``: raise)."""
    try:
        args.func(args)
    except ZuoyouError as e:
        if args.debug:
            raise
        print(f"zuoyou: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("zuoyou: interrupted", file=sys.stderr)
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_guarded(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
