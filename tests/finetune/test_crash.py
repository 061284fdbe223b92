"""Crash safety: a fine-tuning killed with SIGKILL mid-run resumes from its last checkpoint with the same
data order and continues the uninterrupted run's loss curve exactly (fp32, one thread, step checkpoints)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from ftdata import cli, flags, write_dataset

from zuoyou.finetune.run import finetune

ARGS = dict(steps=12, batch_size=8, lora_rank=4, precision="fp32", threads=1, no_progress=True, seed=7,
            eval_every=0, checkpoint_every=3)


def _losses(out) -> dict[int, tuple[float, float]]:
    """Per step, the last logged losses (steps re-run after a resume are logged again)."""
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: (r["text"], r["image"]) for r in rows}


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_then_resume_continues_the_same_curve(tiny_dir, tmp_path):
    data = write_dataset(tmp_path / "data", eval_file=False)
    common = dict(model=str(tiny_dir), data=str(data))
    out = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cli(*flags(dict(common, out=out, **ARGS))), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = out / "checkpoint" / "state.json"
    t0 = time.time()
    while not state.exists() and proc.poll() is None and time.time() - t0 < 120:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    err = proc.communicate()[1].decode(errors="replace")
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{err[-2000:]}"
    saved = json.loads(state.read_text())["step"]
    assert 3 <= saved < ARGS["steps"] and not (out / "model").exists()

    r = subprocess.run(cli(*flags(dict(common, out=out, resume=True, **ARGS))), env=env, capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed: stage finetune, step {saved}" in r.stderr

    ref = tmp_path / "ref"
    finetune(out=str(ref), **common, **ARGS)
    got, want = _losses(out), _losses(ref)
    assert sorted(got) == sorted(want) == list(range(1, ARGS["steps"] + 1))
    after = [s for s in want if s > saved]
    assert after and [got[s] for s in after] == [want[s] for s in after]  # bit-for-bit the same curve
    assert (out / "model/model.safetensors").read_bytes() == (ref / "model/model.safetensors").read_bytes()


def test_a_save_killed_before_its_switch_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import save_file

    from zuoyou.train import checkpoint as ck

    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(4, 3)).sum().backward()
    opt.step()
    ck.save_checkpoint(tmp_path, m, opt, step=1)
    first = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        m.weight.add_(1.0)

    def killed(*a, **k):  # the process dies after writing the new tensors, before state.json
        raise SystemExit("killed")

    monkeypatch.setattr(ck, "_atomic_write_bytes", killed)
    with pytest.raises(SystemExit):
        ck.save_checkpoint(tmp_path, m, opt, step=2)
    monkeypatch.undo()
    fresh = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.AdamW(fresh.parameters())
    state = ck.load_checkpoint(tmp_path, fresh, fresh_opt)
    assert state["step"] == 1 and all(torch.equal(fresh.state_dict()[k], v) for k, v in first.items())
    assert int(fresh_opt.state_dict()["state"][0]["step"]) == 1
    ck.save_checkpoint(tmp_path, m, opt, step=3)  # the next save clears the orphans
    assert len(list(tmp_path.glob("*.safetensors"))) == 2

    legacy = tmp_path / "legacy"  # the first layout (fixed names) still loads
    legacy.mkdir()
    save_file({k: v.contiguous() for k, v in first.items()}, str(legacy / "model.safetensors"))
    (legacy / "state.json").write_text('{"step": 5}')
    assert ck.load_checkpoint(legacy, fresh)["step"] == 5 and torch.equal(fresh.weight, first["weight"])
