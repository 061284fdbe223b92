"""One Janus-Pro-1B MLP projection (2048 -> 5632) at decode- and prefill-sized inputs: which kernel?

    python benchmarks/bench_linear.py [--threads N] [--copies 64]

Compares ``F.linear`` in fp32 / bf16, zuoyou's ``Int8Linear`` on ATen's kernel
(``torch._weight_int8pack_mm`` up to ``PACK_MAX_ROWS`` rows, dequantise + GEMM above) and on
zuoyou's VNNI kernel, ``Int4Linear`` on ATen's int4 kernel and on the VNNI kernel (when it builds here), and torchao's ``Int8WeightOnlyConfig`` when torchao is
installed. Each call cycles through ``--copies`` distinct weight matrices, as a decode step walks
through its layers: one matrix repeated would stay in the CPU caches and measure the cache, not
memory. Median over repeats, ms per projection, and the weight bytes read per second.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from zuoyou.kernels import int4 as int4_kernel
from zuoyou.quantize import Int4Linear, Int8Linear

IN, OUT = 2048, 5632


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rows", default="1,2,4,8,16,64,600")
    p.add_argument("--copies", type=int, default=64, help="distinct weight matrices per kernel (default 64)")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lins = [torch.nn.Linear(IN, OUT, bias=False).bfloat16() for _ in range(args.copies)]
    mods = {
        "bf16 F.linear": (lins, 2.0),
        "fp32 F.linear": ([torch.nn.Linear(IN, OUT, bias=False) for _ in range(args.copies)], 4.0),
        "zuoyou Int8Linear, ATen kernel": ([Int8Linear.from_linear(m, kernel="aten") for m in lins], 1.0),
        "zuoyou Int4Linear, ATen kernel": ([Int4Linear.from_linear(m, 64, kernel="aten") for m in lins], 0.5),
    }
    if int4_kernel.available():
        mods["zuoyou Int8Linear, VNNI kernel"] = ([Int8Linear.from_linear(m, kernel="vnni") for m in lins], 1.0)
        mods["zuoyou Int4Linear, VNNI kernel"] = ([Int4Linear.from_linear(m, 64, kernel="vnni") for m in lins], 0.5)
    else:
        print("zuoyou VNNI kernel: not available here (no AVX-512 VNNI or no compiler)")
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        ao = torch.nn.Sequential(*[torch.nn.Linear(IN, OUT, bias=False).bfloat16() for _ in range(args.copies)])
        for a, m in zip(ao, lins):
            a.weight.data.copy_(m.weight.data)
        quantize_(ao, Int8WeightOnlyConfig())
        mods["torchao Int8WeightOnly"] = (list(ao), 1.0)
    except Exception as e:  # not installed, or an API change
        print(f"torchao: skipped ({type(e).__name__}: {str(e)[:80]})")
    rows = [int(r) for r in args.rows.split(",")]
    times = {(n, m): [] for n in mods for m in rows}
    with torch.inference_mode():
        for rep in range(args.repeats + 1):  # the first round warms up
            for m in rows:
                x = torch.randn(m, IN, dtype=torch.bfloat16)
                for name, (layers, _) in mods.items():
                    xin = x.float() if name.startswith("fp32") else x
                    t = time.perf_counter()
                    for layer in layers:
                        layer(xin)
                    if rep:
                        times[name, m].append((time.perf_counter() - t) * 1e3 / len(layers))
    print(f"{torch.get_num_threads()} threads; {args.copies} distinct {IN}x{OUT} weights per kernel; ms per "
          f"projection (median of {args.repeats}) / GB/s of weights read")
    print("| kernel | " + " | ".join(f"{m} rows" for m in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for name, (_, bytes_per_weight) in mods.items():
        cells = []
        for m in rows:
            ms = statistics.median(times[name, m])
            cells.append(f"{ms:.2f} / {IN * OUT * bytes_per_weight / ms / 1e6:.0f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
