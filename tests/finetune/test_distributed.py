"""torchrun with 2 CPU processes (gloo): the same loss curve as one process on the same global batch,
rank 0 alone writes, and a checkpoint written by 2 ranks resumes on 1 (DDP) or on 2 FSDP ranks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from ftdata import flags, write_dataset

from zuoyou.finetune.run import finetune
from zuoyou.loading import load_model

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

ARGS = dict(steps=4, batch_size=8, full=True, precision="fp32", threads=1, no_progress=True, seed=5, eval_every=2,
            checkpoint_every=2)


def _torchrun(*args: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "zuoyou.train", "finetune", *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def _log(out) -> dict[int, dict]:
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert len(rows) == len({r["step"] for r in rows}), "a step was logged twice: more than one writer?"
    return {r["step"]: r for r in rows}


def _same(got: dict, ref: dict, tol: float = 2e-5) -> None:
    assert sorted(got) == sorted(ref)
    for step, r in ref.items():
        for k in ("text", "image"):
            assert got[step][k] == pytest.approx(r[k], abs=tol), (step, k)
        if "eval" in r:
            for k, v in r["eval"].items():
                assert got[step]["eval"][k] == pytest.approx(v, abs=tol), (step, "eval", k)


def _weights_close(a, b, tol: float = 1e-5) -> None:
    sa, sb = (load_model(x, torch.device("cpu"))[0].state_dict() for x in (a, b))
    assert max((sa[k] - sb[k]).abs().max().item() for k in sa) < tol


def test_two_ranks_match_one_and_resume_anywhere(tiny_dir, tmp_path):
    data = write_dataset(tmp_path / "data")
    common = dict(model=str(tiny_dir), data=str(data))
    ref = tmp_path / "ref"
    finetune(out=str(ref), **common, **ARGS)

    # 2 DDP ranks, stopped (checkpointed) half-way
    ddp = tmp_path / "ddp"
    _torchrun(*flags(dict(common, out=ddp, stop_at=2, **ARGS)))
    assert not (ddp / "model").exists() and sorted(_log(ddp)) == [1, 2]
    fsdp = tmp_path / "fsdp"
    shutil.copytree(ddp, fsdp)

    # ... resumed by one process
    finetune(out=str(ddp), resume=True, **common, **ARGS)
    _same(_log(ddp), _log(ref))
    _weights_close(ddp / "model", ref / "model")

    # ... resumed by 2 FSDP ranks (sharded optimiser state restored from the full checkpoint)
    _torchrun(*flags(dict(common, out=fsdp, resume=True, fsdp=True, **ARGS)))
    _same(_log(fsdp), _log(ref))
    _weights_close(fsdp / "model", ref / "model")
