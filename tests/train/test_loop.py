"""The training loop's compiled trunk (``train(compile=True)``) follows the eager loss curve."""

from __future__ import annotations

import random
import time

import pytest
import torch

from zuoyou.loading import load_model
from zuoyou.processor import Processor
from zuoyou.train.batch import Example, generation_example
from zuoyou.train.loop import Stage, timed_steps, train

PROMPTS = ["a photo of a red circle", "a blue square left of a green cross", "a photo of a circle"]


class RandomCodes:
    """Generation examples (varying prompt lengths) and text examples with random answers."""

    def __init__(self, proc: Processor, codes: int, tokens: int):
        self.processor, self.codes, self.tokens = proc, codes, tokens

    def examples(self, kind, n, rng: random.Random, stage):
        if kind == "gen":
            return [generation_example(self.processor, rng.choice(PROMPTS),
                                       torch.tensor([rng.randrange(self.codes) for _ in range(self.tokens)]),
                                       drop=rng.random() < 0.2) for _ in range(n)]
        ids = self.processor.encode(rng.choice(PROMPTS))
        return [Example(ids + [rng.randrange(50, 100) for _ in range(3)], len(ids)) for _ in range(n)]


def _curve(tiny_dir, tmp_path, compile: bool) -> list[dict]:
    model, cfg = load_model(tiny_dir, torch.device("cpu"))
    proc = Processor.from_folder(tiny_dir, num_image_tokens=cfg.vision.num_patches, image_size=cfg.vision.image_size)
    data = RandomCodes(proc, cfg.image_token_size, proc.num_image_tokens)
    losses = []
    train(model, [Stage("s", lr=1e-3, steps=3, mix=(0, 1, 3), batch_size=6)], data, tmp_path / str(compile), seed=3,
          autocast=False, progress=False, threads=None, log=lambda *a: None, compile=compile,
          on_step=lambda st, step, stats, ev: losses.append(stats))
    return losses


def test_compiled_trunk_matches_eager(tiny_dir, tmp_path):
    eager = _curve(tiny_dir, tmp_path, False)
    compiled = _curve(tiny_dir, tmp_path, True)
    assert len(eager) == len(compiled) == 3
    for a, b in zip(eager, compiled):
        assert a.keys() == b.keys() == {"text", "image"}
        for k in a:
            assert b[k] == pytest.approx(a[k], abs=1e-4)


def test_timed_steps_stops_at_the_step_cap_and_checkpoints_at_the_end():
    saved = []
    got = list(timed_steps(60, step=3, max_steps=7, checkpoint=lambda s, e: saved.append((s, e))))
    assert [s for s, _ in got] == [3, 4, 5, 6]  # resumed at step 3, 7 in all
    fracs = [f for _, f in got]
    assert fracs == sorted(fracs) and fracs[0] == pytest.approx(3 / 7, abs=1e-3)  # the steps' share leads the clock's
    assert [s for s, _ in saved] == [7] and saved[0][1] < 60


def test_timed_steps_counts_the_elapsed_time_of_an_earlier_run():
    # 59.9 of 60 s were spent before the resume: steps of 50 ms leave room for about two more
    got = []
    for step, frac in timed_steps(1.0, elapsed=59.9):
        got.append(frac)
        time.sleep(0.05)
    assert 1 <= len(got) <= 3 and all(f > 0.99 for f in got)
    assert list(timed_steps(1.0, elapsed=60.0)) == []
