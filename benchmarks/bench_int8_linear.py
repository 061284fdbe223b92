"""One Janus-Pro-1B MLP projection (2048 -> 5632) at decode- and prefill-sized inputs: which int8 path?

    python benchmarks/bench_int8_linear.py [--threads N]

Compares ``F.linear`` in fp32 / bf16, zuoyou's ``Int8Linear`` (``torch._weight_int8pack_mm`` up to
``PACK_MAX_ROWS`` rows, dequantise + GEMM above), the raw kernel with fp32 activations, and
torchao's ``Int8WeightOnlyConfig`` when torchao is installed. Median of interleaved repeats, ms.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from zuoyou.quantize import Int8Linear


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rows", default="1,2,4,8,16,64,600")
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lin = torch.nn.Linear(2048, 5632, bias=False)
    w32, w16 = lin.weight.detach(), lin.weight.detach().bfloat16()
    ours = Int8Linear.from_linear(lin.bfloat16())
    fns = {
        "fp32 F.linear": lambda x: F.linear(x.float(), w32),
        "bf16 F.linear": lambda x: F.linear(x, w16),
        "zuoyou Int8Linear (bf16 act.)": ours,
        "int8pack_mm, fp32 act.": lambda x, s=ours.scales.float(): torch._weight_int8pack_mm(x.float(), ours.weight_int8, s),
    }
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        ao = torch.nn.Sequential(torch.nn.Linear(2048, 5632, bias=False).bfloat16())
        ao[0].weight.data.copy_(w16)
        quantize_(ao, Int8WeightOnlyConfig())
        fns["torchao Int8WeightOnly (bf16 act.)"] = ao
    except Exception as e:  # not installed, or an API change
        print(f"torchao: skipped ({type(e).__name__}: {str(e)[:80]})")
    rows = [int(r) for r in args.rows.split(",")]
    times = {(n, m): [] for n in fns for m in rows}
    with torch.inference_mode():
        for _ in range(args.repeats):
            for m in rows:
                x = torch.randn(m, 2048, dtype=torch.bfloat16)
                for name, f in fns.items():
                    if m > 64 and "fp32 act." in name:
                        continue  # minutes: the kernel's fp32 path is not vectorised
                    t = time.perf_counter()
                    f(x)
                    times[name, m].append((time.perf_counter() - t) * 1e3)
    print(f"{torch.get_num_threads()} threads; ms per call (median of {args.repeats})")
    print("| kernel | " + " | ".join(f"{m} rows" for m in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for name in fns:
        cells = [f"{statistics.median(times[name, m]):.2f}" if times[name, m] else "-" for m in rows]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
