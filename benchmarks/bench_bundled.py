"""Latency of the bundled ShapesWorld model: 4 images + 1 answer (issue target: < 1 s on 2 CPU cores).

    python benchmarks/bench_bundled.py [--model M] [--repeats 5] [--threads N] [--best-of 1,4] [--redraws 0,2]
                                       [--prompt TEXT] [--dtype fp32|bf16]

Prints the median and the slowest wall time of each part over the repeats (after one warm-up run), for
each ``best_of`` (candidates per image, ranked by the model's own check) and ``redraws`` (more rounds of
candidates while an image fails that check; defaults: the model's own settings), with the mean number
of drawing rounds per call: redraws cost time only when the check fails, so the time depends on the prompt
(``--prompt``; the default is a position prompt that names both colours, so the check also asks its relation).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import zuoyou


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--best-of", default=None, help="comma-separated values (default: the model's)")
    ap.add_argument("--redraws", default=None, help="comma-separated values (default: the model's)")
    ap.add_argument("--prompt", default="a photo of a red circle left of a blue square")
    ap.add_argument("--dtype", default=None, help="fp32 or bf16 (default: the model's choice for this CPU)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t = time.perf_counter()
    pipe = zuoyou.load(args.model, device="cpu", dtype=args.dtype)
    load_s = time.perf_counter() - t
    prompt, question = args.prompt, "How many objects are there?"
    print(f"model: {pipe.folder}  {pipe.engine.dtype}  threads: {torch.get_num_threads()}  load: {load_s:.2f} s  "
          f"prompt: {prompt!r}")
    values = lambda arg, default: [int(k) for k in arg.split(",")] if arg else [default]  # noqa: E731
    for best_of in values(args.best_of, pipe.defaults.best_of):
        for redraws in values(args.redraws, pipe.defaults.redraws):
            gen, ask, total = [], [], []
            for i in range(args.repeats + 1):
                t = time.perf_counter()
                images = pipe.generate(prompt, n=4, seed=i, best_of=best_of, redraws=redraws)
                t1 = time.perf_counter()
                answer = pipe.ask(images[0], question)
                t2 = time.perf_counter()
                if i:  # the first run warms up the kernels
                    gen.append(t1 - t)
                    ask.append(t2 - t1)
                    total.append(t2 - t)
                else:
                    rounds0 = pipe.engine.rounds_drawn  # (the warm-up's rounds not counted)
            g, a, m = statistics.median(gen), statistics.median(ask), statistics.median(total)
            print(f"best_of {best_of} redraws {redraws}: 4 images: {g * 1000:.0f} ms   1 answer ({answer!r}): "
                  f"{a * 1000:.0f} ms   total: {m * 1000:.0f} ms median, {max(total) * 1000:.0f} ms slowest of "
                  f"{args.repeats} (target < 1000 ms); {(pipe.engine.rounds_drawn - rounds0) / args.repeats:.1f} drawing rounds per call")

if __name__ == "__main__":
    main()
