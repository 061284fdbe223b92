"""``zuoyou finetune``: LoRA (module, merge), full fine-tuning with frozen parts, gradient accumulation,
held-out evaluation, a loadable output folder, and the guards of ``--resume``."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from ftdata import write_dataset

from zuoyou.api import load
from zuoyou.config import get_config
from zuoyou.errors import InputError
from zuoyou.finetune.lora import LoRALinear, apply_lora, lora_frozen, merge_lora
from zuoyou.finetune.run import finetune
from zuoyou.loading import load_model
from zuoyou.models.janus import build

FAST = dict(steps=4, batch_size=8, precision="fp32", threads=1, no_progress=True, seed=3, eval_every=2)


@pytest.fixture(scope="module")
def base(tiny_dir, tmp_path_factory):
    """The tiny checkpoint plus a generation_defaults.json, which the output must keep."""
    d = tmp_path_factory.mktemp("base")
    for f in tiny_dir.iterdir():
        shutil.copy(f, d / f.name)
    (d / "generation_defaults.json").write_text(json.dumps({"cfg": 2.5, "system_prompt": ""}))
    return d


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("ds"))


def _sd(folder):
    return load_model(folder, torch.device("cpu"))[0].state_dict()


def test_lora_module_starts_at_the_base_and_merges_exactly():
    torch.manual_seed(0)
    model = build(get_config("tiny"), "cpu")
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 5, model.config.hidden)
    ref = model.hidden(x)
    names = apply_lora(model, rank=4)
    assert len(names) == 7 * model.config.lm.num_hidden_layers
    keys = set(model.state_dict())
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in keys  # base names kept
    assert "language_model.model.layers.0.self_attn.q_proj.lora_A" in keys
    assert torch.equal(model.hidden(x), ref)  # B = 0
    frozen = lora_frozen(model)
    trainable = [n for n, _ in model.named_parameters() if not n.startswith(frozen)]
    assert trainable and all(".lora_" in n for n in trainable)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.05)
    adapted = model.hidden(x)
    assert not torch.allclose(adapted, ref, atol=1e-4)
    assert merge_lora(model) == len(names)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(build(get_config("tiny"), "meta").state_dict())
    torch.testing.assert_close(model.hidden(x), adapted, atol=1e-5, rtol=1e-5)


def test_lora_finetune_gives_a_loadable_merged_model(base, dataset, tmp_path):
    out = tmp_path / "run"
    s = finetune(model=str(base), data=str(dataset), out=str(out), lora_rank=4, **FAST)
    assert s["held_out"] == 2 and set(s["eval_before"]) == {"text", "image"} and set(s["eval_after"]) == {"text", "image"}
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and "eval" in rows[1] and "eval" in rows[3]
    assert json.loads((out / "model/generation_defaults.json").read_text())["cfg"] == 2.5
    assert (out / "model/tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    pipe = load(out / "model", device="cpu")
    assert pipe.defaults.cfg == 2.5
    assert isinstance(pipe.ask(dataset / "img/red.png", "What color is the square?", max_new_tokens=3), str)
    before, after = _sd(base), _sd(out / "model")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj") for k in changed)


def test_full_finetune_keeps_frozen_parts(base, dataset, tmp_path):
    out = tmp_path / "run"
    finetune(model=str(base), data=str(dataset), out=str(out), full=True, freeze=["vision_model."], **FAST)
    before, after = _sd(base), _sd(out / "model")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not any(k.startswith(("vision_model.", "gen_vision_model.")) for k in changed)
    assert any(k.startswith("language_model.") for k in changed) and any(k.startswith("gen_head.") for k in changed)


def test_gradient_accumulation_matches_one_big_batch(base, dataset, tmp_path):
    kw = dict(FAST, steps=3, eval_every=0)
    finetune(model=str(base), data=str(dataset), out=str(tmp_path / "a"), full=True, grad_accum=1, **kw)
    finetune(model=str(base), data=str(dataset), out=str(tmp_path / "b"), full=True, grad_accum=4, **kw)
    la, lb = ([json.loads(x) for x in (tmp_path / o / "log.jsonl").read_text().splitlines()] for o in "ab")
    for x, y in zip(la, lb, strict=True):
        assert x["text"] == pytest.approx(y["text"], abs=1e-5) and x["image"] == pytest.approx(y["image"], abs=1e-5)
    a, b = _sd(tmp_path / "a/model"), _sd(tmp_path / "b/model")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_resume_guards(base, dataset, tmp_path):
    out = tmp_path / "run"
    finetune(model=str(base), data=str(dataset), out=str(out), lora_rank=2, **dict(FAST, steps=2))
    with pytest.raises(InputError, match="--resume to continue"):
        finetune(model=str(base), data=str(dataset), out=str(out), lora_rank=2, **dict(FAST, steps=2))
    with pytest.raises(InputError, match="lora_rank: 2 -> 4"):
        finetune(model=str(base), data=str(dataset), out=str(out), lora_rank=4, resume=True, **dict(FAST, steps=2))
    # a finished run resumed: nothing to train, the model is exported again
    s = finetune(model=str(base), data=str(dataset), out=str(out), lora_rank=2, resume=True, **dict(FAST, steps=2))
    assert s["training"][0]["steps"] == 2 and (out / "model/model.safetensors").is_file()


def test_cli_flags():
    from zuoyou.cli import build_parser

    p = build_parser()
    a = p.parse_args(["finetune", "--data", "d", "--out", "o", "--full", "--freeze", "vision_model.", "--mix", "5:1:4",
                      "--grad-accum", "2", "--fsdp"])
    assert a.full and a.freeze == ["vision_model."] and a.grad_accum == 2 and a.fsdp
    with pytest.raises(SystemExit):
        p.parse_args(["finetune", "--data", "d", "--out", "o", "--full", "--lora-rank", "4"])
