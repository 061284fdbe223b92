"""Your own fine-tuning data: a folder of JSONL records, validated on load, served to the training loop.

One JSON object per line (blank lines are skipped), paths relative to the file's folder::

    {"type": "understanding", "images": ["img/a.png"],
     "messages": [{"role": "user", "content": "What colour is the circle?"},
                  {"role": "assistant", "content": "orange"}]}
    {"type": "generation", "caption": "an orange circle", "image": "img/b.png"}
    {"type": "text", "messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}

- conversations alternate user / assistant, start with the user and end with the assistant;
  the loss is on every assistant turn (its text and end-of-sentence), nothing else;
- an understanding record's images go before the first user message, unless messages place them
  with ``<image_placeholder>`` (then one tag per image, in order, in user messages);
- optional ``"system"`` (understanding, text): the system prompt (default: the model's);
- ``--data DIR`` reads every ``DIR/*.jsonl`` for training except ``eval.jsonl``, the held-out
  set (without it, a few training records are held out); ``--data FILE.jsonl`` reads one file.

Every problem is reported as ``FILE:LINE: what is wrong`` (unknown type or key, bad roles, a
missing or unreadable image, a conversation longer than the model's context, ...).

``JsonlData`` is a ``DataSource`` for ``zuoyou.train.loop``: ``examples(kind, n, rng, stage)``
draws records of that kind with the loop's RNG (so a resumed run sees the same data), with the
10 % CFG prompt dropout of training for generation records. Understanding images are
preprocessed by the model's ``ImageProcessor``; generation images are resized (short side) and
centre-cropped to the VQ's image size and encoded to codes once (one by one: the codes are a
function of the image alone, whatever it is batched with), then cached.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import InputError
from ..processor import IMAGE_TAG, Message, Processor, open_image
from ..train.batch import Example, conversation, generation_example

KIND_OF = {"understanding": "und", "text": "text", "generation": "gen"}
KEYS = {"understanding": {"type", "images", "messages", "system"}, "text": {"type", "messages", "system", "images"},
        "generation": {"type", "caption", "image"}}
CFG_DROPOUT = 0.1


class DataError(InputError):
    """A malformed data file or record; the message starts with ``FILE:LINE:``."""


@dataclass
class Record:
    kind: str  # "und" | "text" | "gen"
    where: str  # "data.jsonl:12"
    ids: list[int] = field(default_factory=list)  # und/text: whole conversation, images expanded
    mask: list[bool] = field(default_factory=list)  # und/text: which ids are targets
    images: list[Path] = field(default_factory=list)  # und: in placeholder order; gen: the one image
    caption: str = ""  # gen


# ------------------------------------------------------------------------------------ reading
def data_files(path) -> tuple[list[Path], Path | None]:
    """(training files, held-out file or None) for ``--data``."""
    p = Path(path)
    if p.is_file():
        return [p], None
    if not p.is_dir():
        raise DataError(f"{p}: no such data folder or file")
    files = sorted(f for f in p.glob("*.jsonl") if f.name != "eval.jsonl")
    if not files:
        raise DataError(f"{p}: no .jsonl file (write one record per line, see `zuoyou finetune --help`)")
    return files, (p / "eval.jsonl") if (p / "eval.jsonl").is_file() else None


def load_records(files, processor: Processor, max_len: int | None = None, image_tokens: int = 0) -> list[Record]:
    """Read and validate every record of ``files``; raises ``DataError`` naming file and line."""
    out = []
    for f in [Path(x) for x in files]:
        try:
            lines = f.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{f}: cannot read it ({e})") from None
        for i, line in enumerate(lines, 1):
            if line.strip():
                out.append(parse_record(line, f"{f.name}:{i}", f.parent, processor, max_len, image_tokens))
    if not out:
        raise DataError(f"{', '.join(str(f) for f in files)}: no records")
    return out


def parse_record(line: str, where: str, root: Path, proc: Processor, max_len: int | None = None,
                 image_tokens: int = 0) -> Record:
    def fail(msg):
        raise DataError(f"{where}: {msg}")

    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        fail(f"not valid JSON ({e.msg} at column {e.colno})")
    if not isinstance(obj, dict):
        fail("a record must be a JSON object")
    typ = obj.get("type")
    if typ not in KIND_OF:
        fail(f"\"type\" must be one of {', '.join(KIND_OF)}, not {typ!r}")
    unknown = sorted(set(obj) - KEYS[typ])
    if unknown:
        fail(f"unknown key(s) for a {typ} record: {', '.join(unknown)} (allowed: {', '.join(sorted(KEYS[typ]))})")
    if typ == "generation":
        cap = obj.get("caption")
        if not isinstance(cap, str) or not cap.strip():
            fail("\"caption\" must be a non-empty string")
        rec = Record("gen", where, images=[_image(obj.get("image"), root, fail, "image")], caption=cap.strip())
        n = len(proc.generation_ids(rec.caption)) + image_tokens
        if max_len and n > max_len:
            fail(f"caption + image codes are {n} tokens, over the model's context of {max_len}")
        return rec
    images = obj.get("images", [])
    if typ == "text" and images:
        fail("a text record has no images (use type \"understanding\")")
    if not isinstance(images, list) or (typ == "understanding" and not images):
        fail("\"images\" must be a non-empty list of image paths")
    paths = [_image(x, root, fail, f"images[{j}]") for j, x in enumerate(images)]
    system = obj.get("system")
    if system is not None and not isinstance(system, str):
        fail("\"system\" must be a string")
    msgs = _messages(obj.get("messages"), len(paths), fail)
    ids, mask = conversation(proc, msgs, system)
    n_img = sum(1 for t in ids if t == proc.image_start)
    if n_img != len(paths):
        fail(f"{n_img} image placeholders for {len(paths)} images")
    if max_len and len(ids) > max_len:
        fail(f"the conversation is {len(ids)} tokens, over the model's context of {max_len}")
    return Record(KIND_OF[typ], where, ids, mask, paths)


def _image(x, root: Path, fail, what: str) -> Path:
    if not isinstance(x, str) or not x:
        fail(f"\"{what}\" must be an image path")
    p = Path(x) if Path(x).is_absolute() else root / x
    if not p.is_file():
        fail(f"{what}: no such image file {x!r} (paths are relative to {root})")
    try:
        with Image.open(p) as im:
            im.size
    except Exception as e:  # PIL raises many types on bad files
        fail(f"{what}: {x!r} is not a readable image ({type(e).__name__})")
    return p


def _messages(msgs, n_images: int, fail) -> list[Message]:
    if not isinstance(msgs, list) or not msgs:
        fail("\"messages\" must be a non-empty list of {\"role\", \"content\"} objects")
    out = []
    for j, m in enumerate(msgs):
        want = "user" if j % 2 == 0 else "assistant"
        if not isinstance(m, dict) or set(m) - {"role", "content"}:
            fail(f"messages[{j}] must be an object with only \"role\" and \"content\"")
        if m.get("role") != want:
            fail(f"messages[{j}]: role must be {want!r} (user and assistant alternate, user first), not {m.get('role')!r}")
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            fail(f"messages[{j}]: \"content\" must be a non-empty string")
        if m["role"] == "assistant" and IMAGE_TAG in m["content"]:
            fail(f"messages[{j}]: images go in user messages")
        out.append(Message(m["role"], m["content"], []))
    if out[-1].role != "assistant":
        fail("the last message must be the assistant's (it is what the model learns to say)")
    if n_images and not any(IMAGE_TAG in m.content for m in out):
        out[0].images = [None] * n_images  # chat_prompt puts one tag per image before the text
    return out



# ------------------------------------------------------------------------------------ serving
def vq_pixels(path, size: int) -> torch.Tensor:
    """An image file -> (3, size, size) in [-1, 1]: short side resized to ``size``, centre crop."""
    img = open_image(path)
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()


class JsonlData:
    """``DataSource`` over validated records (see the module docstring)."""

    def __init__(self, records: list[Record], processor: Processor, vq=None, cfg_dropout: float = CFG_DROPOUT):
        self.processor, self.vq, self.cfg_dropout = processor, vq, cfg_dropout
        self.by_kind = {k: [r for r in records if r.kind == k] for k in ("und", "text", "gen")}
        self._codes: dict[str, torch.Tensor] = {}

    def counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.by_kind.items()}

    def mix(self, wanted=(1.0, 1.0, 1.0)) -> tuple[float, float, float]:
        """``wanted`` und:text:gen with the share of kinds that have no records given to the others."""
        mix = tuple(float(w) if self.by_kind[k] else 0.0 for k, w in zip(("und", "text", "gen"), wanted))
        if not sum(mix):
            have = ", ".join(k for k, v in self.by_kind.items() if v)
            raise DataError(f"the mix {':'.join(f'{w:g}' for w in wanted)} gives no weight to the kinds present ({have})")
        return mix

    def examples(self, kind: str, n: int, rng: random.Random, stage=None) -> list[Example]:
        pool = self.by_kind[kind]
        recs = [pool[rng.randrange(len(pool))] for _ in range(n)]
        drop = [kind == "gen" and rng.random() < self.cfg_dropout for _ in recs]
        return self.build(recs, drop)

    def build(self, recs: list[Record], uncond: list[bool] | None = None) -> list[Example]:
        """Examples of ``recs`` (``uncond[i]``: the CFG-unconditional prompt for a generation record)."""
        uncond = uncond or [False] * len(recs)
        self._encode([r for r in recs if r.kind == "gen"])
        out = []
        for r, u in zip(recs, uncond):
            if r.kind == "gen":
                out.append(generation_example(self.processor, r.caption, self._codes[str(r.images[0])], drop=u))
                continue
            image = None
            if r.images:
                px = [self.processor.image_processor(p) for p in r.images]
                image = px[0] if len(px) == 1 else torch.stack(px)
            out.append(Example(r.ids, r.mask.index(True), image=image, loss_mask=r.mask))
        return out

    @torch.no_grad()
    def _encode(self, recs: list[Record]) -> None:
        todo = list(dict.fromkeys(str(r.images[0]) for r in recs if str(r.images[0]) not in self._codes))
        if not todo:
            return
        if self.vq is None:
            raise DataError("generation records need the model's VQ to encode their images")
        p = next(self.vq.parameters())
        for f in todo:  # one at a time: an image's codes must not depend on what it was batched with
            x = vq_pixels(f, self.vq.config.image_size)[None].to(p.device, p.dtype)
            self._codes[f] = self.vq.encode(x)[1][0].cpu()


__all__ = ["DataError", "Record", "JsonlData", "data_files", "load_records", "parse_record", "conversation",
           "vq_pixels"]
