"""Helpers shared by the fine-tuning tests: a small hand-written JSONL dataset with real PNGs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image

COLORS = {"red": (220, 40, 40), "blue": (40, 70, 220), "green": (40, 170, 60), "orange": (245, 130, 20)}


def write_dataset(folder: Path, eval_file: bool = True) -> Path:
    """und (one image, multi-turn, two images), text (multi-turn) and generation records."""
    folder = Path(folder)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    recs, held = [], []
    for i, (name, rgb) in enumerate(COLORS.items()):
        img = Image.new("RGB", (48, 36), (255, 255, 255))
        img.paste(rgb, (8 + 4 * i, 6, 30 + 4 * i, 28))
        img.save(folder / f"img/{name}.png")
        recs.append(und(f"img/{name}.png", "What color is the square?", name))
        recs.append({"type": "generation", "caption": f"a photo of a {name} square", "image": f"img/{name}.png"})
    recs.append({"type": "understanding", "images": ["img/red.png"], "messages": [
        {"role": "user", "content": "How many objects are there?"}, {"role": "assistant", "content": "one"},
        {"role": "user", "content": "What color is the square?"}, {"role": "assistant", "content": "red"}]})
    recs.append({"type": "understanding", "images": ["img/red.png", "img/blue.png"], "messages": [
        {"role": "user", "content": "<image_placeholder>\n<image_placeholder>\nDescribe the image."},
        {"role": "assistant", "content": "two squares"}]})
    recs.append({"type": "text", "system": "", "messages": [
        {"role": "user", "content": "one two"}, {"role": "assistant", "content": "three"},
        {"role": "user", "content": "four"}, {"role": "assistant", "content": "zero"}]})
    held.append(und("img/orange.png", "Describe the image.", "a orange square"))
    held.append({"type": "generation", "caption": "a photo of a blue square", "image": "img/blue.png"})
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    if eval_file:
        (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))
    return folder


def und(image: str, question: str, answer: str) -> dict:
    return {"type": "understanding", "images": [image],
            "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def cli(*args: str) -> list[str]:
    """The torchrun-free command line of a fine-tuning subprocess."""
    return [sys.executable, "-m", "zuoyou.train", "finetune", *args]


FAST = ["--steps", "4", "--batch-size", "8", "--precision", "fp32", "--threads", "1", "--no-progress", "--seed", "3"]


def flags(d: dict) -> list[str]:
    """``{"lora_rank": 4, "full": True}`` -> ``["--lora-rank", "4", "--full"]`` (False drops the flag)."""
    out = []
    for k, v in d.items():
        flag = "--" + k.replace("_", "-")
        out += [flag] if v is True else [] if v is False else [flag, str(v)]
    return out
