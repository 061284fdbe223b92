"""Shared fixtures: a tiny random Janus checkpoint folder (official layout) built in seconds."""

from __future__ import annotations

import pytest
import torch

from zuoyou.config import get_config
from zuoyou.loading import save_model
from zuoyou.models.janus import build
from zuoyou.tokenizer import train_tokenizer

WORDS = ["a photo of a red circle", "a blue square left of a green cross", "How many objects are there?",
         "What color is the circle?", "one two three four zero yes no", "Describe the image."]


def make_tiny_checkpoint(folder, seed: int = 0, std: float = 0.2):
    """Random tiny model + byte-level BPE tokenizer, written as an official-layout folder."""
    torch.manual_seed(seed)
    cfg = get_config("tiny")
    model = build(cfg, "cpu")
    for p in model.parameters():
        torch.nn.init.normal_(p, std=std)
    save_model(model, folder)
    train_tokenizer(WORDS * 20, vocab_size=cfg.lm.vocab_size).save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_pipe(tiny_dir):
    import zuoyou.api

    return zuoyou.api.load(tiny_dir, device="cpu")
