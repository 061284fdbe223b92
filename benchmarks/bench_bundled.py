"""Latency of the bundled ShapesWorld model: 4 images + 1 answer (issue target: < 1 s on 2 CPU cores).

    python benchmarks/bench_bundled.py [--model M] [--repeats 5] [--threads N] [--best-of 1,4]

Prints the median wall time of each part over the repeats (after one warm-up run), for each ``best_of``
(candidates per image, ranked by the model's own check; default: the model's own setting).
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
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t = time.perf_counter()
    pipe = zuoyou.load(args.model, device="cpu")
    load_s = time.perf_counter() - t
    prompt, question = "a photo of a red circle left of a blue square", "How many objects are there?"
    print(f"model: {pipe.folder}  threads: {torch.get_num_threads()}  load: {load_s:.2f} s")
    for best_of in [int(k) for k in args.best_of.split(",")] if args.best_of else [pipe.defaults.best_of]:
        gen, ask = [], []
        for i in range(args.repeats + 1):
            t = time.perf_counter()
            images = pipe.generate(prompt, n=4, seed=i, best_of=best_of)
            t1 = time.perf_counter()
            answer = pipe.ask(images[0], question)
            t2 = time.perf_counter()
            if i:  # the first run warms up the kernels
                gen.append(t1 - t)
                ask.append(t2 - t1)
        g, a = statistics.median(gen), statistics.median(ask)
        print(f"best_of {best_of}: 4 images: {g * 1000:.0f} ms   1 answer ({answer!r}): {a * 1000:.0f} ms   "
              f"total: {(g + a) * 1000:.0f} ms (median of {args.repeats}; target < 1000 ms)")

if __name__ == "__main__":
    main()
