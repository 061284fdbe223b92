"""``python -m zuoyou.train finetune ...``: the entry point for ``torchrun`` (same arguments as ``zuoyou finetune``).

    torchrun --nproc-per-node 2 -m zuoyou.train finetune --model M --data DIR --out OUT [--fsdp]

Each rank joins the process group (gloo on CPU, NCCL on GPUs) from torchrun's environment;
rank 0 alone prints, checkpoints and writes the fine-tuned model. Alone, it runs single-process.
"""

from __future__ import annotations

import argparse
import sys

from ..cli import run_guarded


def main(argv: list[str] | None = None) -> int:
    from ..finetune.run import add_parser

    parser = argparse.ArgumentParser(prog="python -m zuoyou.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return run_guarded(args)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
