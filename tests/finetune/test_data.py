"""The JSONL fine-tuning format: validation with FILE:LINE errors, multi-turn targets, serving to the loop."""

from __future__ import annotations

import json
import random

import pytest
import torch
from PIL import Image
from ftdata import und, write_dataset

from zuoyou.api import load
from zuoyou.finetune.data import DataError, JsonlData, conversation, data_files, load_records, vq_pixels
from zuoyou.processor import Message
from zuoyou.train.batch import collate, num_targets


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return load(tiny_dir, device="cpu")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("ds"))


def _load(pipe, folder, **kw):
    files, held = data_files(folder)
    cfg = pipe.config
    return load_records(files, pipe.engine.processor, cfg.lm.max_position_embeddings, cfg.vq.num_tokens, **kw), held


def test_loads_and_counts(pipe, dataset):
    recs, held = _load(pipe, dataset)
    assert held == dataset / "eval.jsonl"
    data = JsonlData(recs, pipe.engine.processor, pipe.engine.model.gen_vision_model)
    assert data.counts() == {"und": 6, "text": 1, "gen": 4}
    assert recs[0].where == "data.jsonl:1"


def test_multi_turn_targets_are_the_assistant_turns_in_the_inference_format(pipe):
    proc = pipe.engine.processor
    msgs = [Message("user", "How many objects are there?", [None]), Message("assistant", "one"),
            Message("user", "What color is the square?"), Message("assistant", "red")]
    ids, mask = conversation(proc, msgs)
    # the prompt before the last answer is exactly what inference builds from the history
    img = Image.new("RGB", (8, 8))
    want, _ = proc.understanding_inputs([Message("user", "How many objects are there?", [img]),
                                         Message("assistant", "one"), Message("user", "What color is the square?")])
    answer = proc.tokenizer.encode(" red", add_special_tokens=False).ids + [proc.eos]
    assert ids == want + answer
    targets = [t for t, m in zip(ids, mask) if m]
    one = proc.tokenizer.encode(" one", add_special_tokens=False).ids + [proc.eos]
    assert targets == one + answer
    assert sum(t == proc.image_id for t in ids) == proc.num_image_tokens and not any(
        m for t, m in zip(ids, mask) if t == proc.image_id)


BAD = [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    (json.dumps({"type": "caption", "caption": "x"}), "\"type\" must be one of"),
    (json.dumps({"type": "generation", "caption": "x", "image": "img/red.png", "imgae": 1}), "unknown key(s)"),
    (json.dumps({"type": "generation", "caption": " ", "image": "img/red.png"}), "\"caption\" must be"),
    (json.dumps({"type": "generation", "caption": "x", "image": "img/none.png"}), "no such image file"),
    (json.dumps({"type": "generation", "caption": "x", "image": "img/broken.png"}), "not a readable image"),
    (json.dumps(und("img/red.png", "q", "a") | {"images": []}), "non-empty list"),
    (json.dumps({"type": "text", "images": ["img/red.png"], "messages": [{"role": "user", "content": "a"},
                                                                         {"role": "assistant", "content": "b"}]}),
     "a text record has no images"),
    (json.dumps({"type": "text", "messages": [{"role": "assistant", "content": "a"}]}), "role must be 'user'"),
    (json.dumps({"type": "text", "messages": [{"role": "user", "content": "a"}]}), "must be the assistant's"),
    (json.dumps({"type": "text", "messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "b"}]}),
     "non-empty string"),
    (json.dumps(und("img/red.png", "<image_placeholder> <image_placeholder> q", "a")), "2 image placeholders for 1"),
    (json.dumps({"type": "text", "messages": [{"role": "user", "content": "one two " * 400},
                                              {"role": "assistant", "content": "b"}]}), "over the model's context"),
]


@pytest.mark.parametrize("line,message", BAD, ids=[m for _, m in BAD])
def test_errors_name_file_and_line(pipe, dataset, tmp_path, line, message):
    (tmp_path / "img").mkdir()
    (tmp_path / "img/red.png").write_bytes((dataset / "img/red.png").read_bytes())
    (tmp_path / "img/broken.png").write_bytes(b"\x89PNG not really")
    good = json.dumps(und("img/red.png", "What color is the square?", "red"))
    (tmp_path / "mine.jsonl").write_text(f"{good}\n\n{line}\n")
    with pytest.raises(DataError) as e:
        _load(pipe, tmp_path)
    assert str(e.value).startswith("mine.jsonl:3: ") and message in str(e.value), str(e.value)


def test_empty_folder_and_mix(pipe, dataset, tmp_path):
    with pytest.raises(DataError, match="no .jsonl file"):
        data_files(tmp_path)
    recs, _ = _load(pipe, dataset)
    data = JsonlData([r for r in recs if r.kind != "text"], pipe.engine.processor, pipe.engine.model.gen_vision_model)
    assert data.mix((5, 1, 4)) == (5.0, 0.0, 4.0)  # the share of the absent kind goes to the others
    with pytest.raises(DataError, match="no weight"):
        data.mix((0, 1, 0))


def test_examples_images_codes_dropout_and_determinism(pipe, dataset):
    proc, vq = pipe.engine.processor, pipe.engine.model.gen_vision_model
    recs, _ = _load(pipe, dataset)
    data = JsonlData(recs, proc, vq)
    und = data.examples("und", 8, random.Random(0), None)
    again = data.examples("und", 8, random.Random(0), None)
    assert [e.ids for e in und] == [e.ids for e in again]
    S = pipe.config.vision.image_size
    for e in und:
        n = sum(t == proc.image_start for t in e.ids)
        assert tuple(e.image.shape) == ((3, S, S) if n == 1 else (n, 3, S, S))
    batch = collate(und, proc)
    assert batch.pixels.shape[0] == batch.und_mask.sum() // proc.num_image_tokens
    assert (batch.text_targets >= 0).sum().item() == num_targets(und)[0]
    gen = data.examples("gen", 200, random.Random(1), None)
    assert all(len(e.codes) == pipe.config.vq.num_tokens for e in gen)
    dropped = [e for e in gen if e.ids[1:-1] == [proc.pad] * (len(e.ids) - 2)]
    assert 5 <= len(dropped) <= 40  # CFG prompt dropout, 10 %
    rec = next(r for r in recs if r.kind == "gen")
    x = vq_pixels(rec.images[0], pipe.config.vq.image_size)
    assert x.shape == (3, pipe.config.vq.image_size, pipe.config.vq.image_size) and x.min() >= -1 and x.max() <= 1
    with torch.no_grad():
        want = vq.encode(x[None])[1][0]
    assert torch.equal(data.build([rec])[0].codes, want)


def test_cli_reports_the_line(tiny_dir, dataset, tmp_path, capsys):
    from zuoyou.cli import main

    bad = tmp_path / "data"
    bad.mkdir()
    (bad / "img").symlink_to(dataset / "img")
    (bad / "a.jsonl").write_text(json.dumps(und("img/red.png", "q", "a")) + "\n" + json.dumps({"type": "x"}) + "\n")
    assert main(["finetune", "--model", str(tiny_dir), "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "a.jsonl:2: \"type\" must be one of" in capsys.readouterr().err


def test_example_new_color_data_is_valid_and_the_palette_restored(pipe, tmp_path):
    from zuoyou.finetune.example import evaluate, extra_color, make_data
    from zuoyou.shapes import COLORS, all_prompts

    before = dict(COLORS), len(all_prompts("colors"))
    counts = make_data(tmp_path, n=8, n_eval=4)
    assert (dict(COLORS), len(all_prompts("colors"))) == before
    recs, held = _load(pipe, tmp_path)
    assert len(recs) == counts["data"] and held == tmp_path / "eval.jsonl"
    assert "orange" in (tmp_path / "data.jsonl").read_text()
    with extra_color():
        assert "orange" in COLORS
    r = evaluate(pipe, n=2, images=1)
    assert set(r) >= {"new_color_name", "new_color_shape", "old_color_name", "gen_new_color", "vq_new_color"}
    assert dict(COLORS) == before[0]
