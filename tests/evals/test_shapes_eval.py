"""``zuoyou.evals.shapes`` (GenEval-style generation scores, VQA accuracy) with oracle and blank fake engines.

The tiny random model draws 16x16 noise the ShapesWorld judge can't read, so the pipelines here are the
real ``Pipeline`` around fake engines: the oracle draws a rendered scene satisfying each prompt and
answers from the scene it parses out of the request's image; scores must then be exactly 1.0. The
blank engine draws empty canvases and answers nothing: scores 0.0.
"""

from __future__ import annotations

import json
import random

import pytest
from PIL import Image

from zuoyou.api import GenerationDefaults, Pipeline
from zuoyou.cli import main
from zuoyou.evals import shapes as ev
from zuoyou.shapes import (CANVAS, CATEGORIES, QUESTION_TYPES, answer_question, parse_image, parse_prompt,
                           render_image, scene_for_prompt)


class OracleEngine:
    def __init__(self):
        self.image_calls, self.text_calls = [], []

    def generate_images(self, requests, **kw):
        self.image_calls.append(requests)
        out = []
        for r in requests:
            rng = random.Random(r.seed)
            prompt = parse_prompt(r.prompt)
            out.append([render_image(scene_for_prompt(rng, prompt)) for _ in range(r.n)])
        return out

    def generate_text(self, requests):
        self.text_calls.append(requests)
        answers = []
        for r in requests:
            (msg,) = r.messages
            (image,) = msg.images
            assert isinstance(image, Image.Image) and image.size == (CANVAS, CANVAS)
            answers.append(answer_question(msg.content, parse_image(image))[1])
        return answers


class BlankEngine(OracleEngine):
    def generate_images(self, requests, **kw):
        return [[Image.new("RGB", (CANVAS, CANVAS), "white") for _ in range(r.n)] for r in requests]

    def generate_text(self, requests):
        return ["" for _ in requests]


def fake_pipe(engine, **defaults):
    return Pipeline(engine, GenerationDefaults(**defaults), folder=None)


def test_geneval_oracle_scores_one(tmp_path):
    eng = OracleEngine()
    r = ev.geneval(fake_pipe(eng), per_category=3, images=2, batch_prompts=5, out_dir=tmp_path, cfg=2.5)
    assert r["categories"] == {c: 1.0 for c in CATEGORIES} and r["overall"] == 1.0
    assert (r["prompts_per_category"], r["images_per_prompt"], r["cfg"], r["temperature"]) == (3, 2, 2.5, 1.0)
    reqs = [q for call in eng.image_calls for q in call]
    assert len(reqs) == 18 and max(len(call) for call in eng.image_calls) == 5  # batched by batch_prompts
    assert all(q.n == 2 and q.cfg == 2.5 and q.temperature == 1.0 for q in reqs)  # the pipe's defaults fill in
    assert len({q.seed for q in reqs}) == 18  # one seed per prompt

    # outputs: JSON (the report), Markdown (a table), one PNG grid per category
    saved = json.loads((tmp_path / "geneval.json").read_text())
    assert saved["categories"] == r["categories"] and saved["failures"] == {c: [] for c in CATEGORIES}
    md = (tmp_path / "geneval.md").read_text()
    assert "| **overall** | **1.000** |" in md and all(f"| {c} | 1.000 |" in md for c in CATEGORIES)
    for c in CATEGORIES:
        g = Image.open(tmp_path / f"geneval_{c}.png")
        assert g.size == (2 * (CANVAS + 2) + 2, 3 * (CANVAS + 2) + 2) and f"geneval_{c}.png" in md


def test_geneval_blank_scores_zero(tmp_path):
    r = ev.geneval(fake_pipe(BlankEngine(), cfg=3.0), per_category=2, images=1, out_dir=tmp_path / "blank")
    assert r["categories"] == {c: 0.0 for c in CATEGORIES} and r["overall"] == 0.0 and r["cfg"] == 3.0
    saved = json.loads((tmp_path / "blank" / "geneval.json").read_text())
    assert all(len(saved["failures"][c]) == 2 for c in CATEGORIES)  # the failing prompts are listed
    assert "| **overall** | **0.000** |" in (tmp_path / "blank" / "geneval.md").read_text()


def test_geneval_without_out_dir_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = ev.geneval(fake_pipe(OracleEngine()), per_category=1, images=1)
    assert r["overall"] == 1.0 and "failures" not in r and list(tmp_path.iterdir()) == []


def test_vqa_oracle_scores_one(tmp_path):
    eng = OracleEngine()
    r = ev.vqa(fake_pipe(eng), n=48, batch=20, out_dir=tmp_path)
    assert r["overall"] == 1.0 and set(r["accuracy"]) == set(QUESTION_TYPES)
    assert all(v == 1.0 for v in r["accuracy"].values()) and r["questions"] == 48
    assert [len(c) for c in eng.text_calls] == [20, 20, 8]
    assert all(q.temperature == 0.0 for c in eng.text_calls for q in c)  # greedy by default
    saved = json.loads((tmp_path / "vqa.json").read_text())
    assert saved["overall"] == 1.0 and saved["mistakes"] == []
    md = (tmp_path / "vqa.md").read_text()
    assert "| **overall** | **1.000** |" in md and "48 questions" in md


def test_vqa_blank_scores_zero(tmp_path):
    r = ev.vqa(fake_pipe(BlankEngine()), n=24, out_dir=tmp_path)
    assert r["overall"] == 0.0 and all(v == 0.0 for v in r["accuracy"].values())
    saved = json.loads((tmp_path / "vqa.json").read_text())
    assert len(saved["mistakes"]) == 24 and {"question", "expected", "answer"} == set(saved["mistakes"][0])


@pytest.mark.parametrize("task", ["shapes-geneval", "shapes-vqa"])
def test_cli_eval_prints_scores(task, tmp_path, monkeypatch, capsys):
    import zuoyou.cli

    monkeypatch.setattr(zuoyou.cli, "_load", lambda args: fake_pipe(OracleEngine()))
    rc = main(["eval", task, "--prompts", "1", "--images", "1", "--questions", "12", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0 and json.loads(out)["overall"] == 1.0
    assert (tmp_path / ("geneval.json" if task == "shapes-geneval" else "vqa.json")).is_file()
