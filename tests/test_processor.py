"""Prompt formats (spec §4), image preprocessing (§5.1), image modes and bad images (``zuoyou.processor``)."""

from __future__ import annotations

import io
import re
import struct
import traceback
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from zuoyou import processor as P
from zuoyou.errors import CheckpointError, InputError
from zuoyou.processor import (BOS, DEFAULT_SYSTEM_PROMPT, EOS, IMAGE_END, IMAGE_START, IMAGE_TAG, PAD, ImageProcessor,
                              Message, Processor, open_image)
from zuoyou.tokenizer import train_tokenizer

TEXTS = ["a photo of a red circle", "a blue square left of a green cross", "What color is the circle?",
         "How many objects are there?", "It is red. And the shape?"] * 20
N = 5  # image tokens per image in these tests
GREY = 127 / 255 * 2 - 1


def bpe(specials: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS, trainer=trainer)
    return tok


def make(tok: Tokenizer, size: int = 32) -> Processor:
    return Processor(tok, N, ImageProcessor(image_size=size))


@pytest.fixture(scope="module")
def pro():
    return make(train_tokenizer(TEXTS, vocab_size=300))


@pytest.fixture(scope="module")
def v1():
    """A Janus-1.3B-like tokenizer: no <|User|> / <|Assistant|> tokens."""
    return make(bpe([BOS, EOS, PAD, IMAGE_TAG, IMAGE_START, IMAGE_END]))


def rgb(w=30, h=20, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def text_of(proc: Processor, ids: list[int]) -> str:
    assert ids[0] == proc.bos
    return proc.tokenizer.decode(ids[1:], skip_special_tokens=False)


# ------------------------------------------------------------------------------------------ prompts
def test_understanding_prompt(pro):
    msgs = [Message("user", "  What color is the circle?\n", [rgb()])]
    want = f"{DEFAULT_SYSTEM_PROMPT}\n\n<|User|>: <image_placeholder>\nWhat color is the circle?\n\n<|Assistant|>:"
    assert pro.chat_prompt(msgs) == want
    # an explicit placeholder in the text is used as it is, not added again
    assert pro.chat_prompt([Message("user", "<image_placeholder>\nWhat color is the circle?", [rgb()])]) == want
    assert pro.chat_prompt([Message("user", "Hi")], system="") == "<|User|>: Hi\n\n<|Assistant|>:"
    assert pro.chat_prompt([Message("user", "Hi")], system="Be brief.") == "Be brief.\n\n<|User|>: Hi\n\n<|Assistant|>:"
    # the roles are single tokens in a Janus-Pro tokenizer
    ids = pro.encode(pro.chat_prompt(msgs))
    vocab = pro.tokenizer.get_vocab()
    assert ids.count(vocab["<|User|>"]) == 1 and ids.count(vocab["<|Assistant|>"]) == 1
    assert text_of(pro, ids) == want


def test_multi_turn_prompt(pro):
    msgs = [Message("user", "What color is the circle?", [rgb()]), Message("assistant", " It is red. "),
            Message("user", "And the shape?")]
    assert pro.chat_prompt(msgs) == (
        f"{DEFAULT_SYSTEM_PROMPT}\n\n<|User|>: <image_placeholder>\nWhat color is the circle?\n\n"
        "<|Assistant|>: It is red.<｜end▁of▁sentence｜><|User|>: And the shape?\n\n<|Assistant|>:")
    ids = pro.encode(pro.chat_prompt(msgs))
    assert ids.count(pro.eos) == 1  # the EOS after the assistant turn is the special token, not text


def test_generation_prompt(pro, v1):
    ids = pro.generation_ids("  a red circle ")
    assert text_of(pro, ids) == "<|User|>: a red circle\n\n<|Assistant|>:<begin_of_image>"
    assert ids[0] == pro.bos and ids[-1] == pro.image_start and DEFAULT_SYSTEM_PROMPT not in text_of(pro, ids)
    assert text_of(v1, v1.generation_ids("a red circle")) == "User: a red circle\n\nAssistant:<begin_of_image>"


def test_janus_1_3b_roles(v1):
    assert v1.roles == ("User", "Assistant")
    msgs = [Message("user", "What color is the circle?", [rgb()]), Message("assistant", "red"),
            Message("user", "Sure?")]
    assert v1.chat_prompt(msgs) == (
        f"{DEFAULT_SYSTEM_PROMPT}\n\nUser: <image_placeholder>\nWhat color is the circle?\n\n"
        "Assistant: red<｜end▁of▁sentence｜>User: Sure?\n\nAssistant:")


def test_placeholder_expansion_and_multi_image(pro):
    ids, px = pro.understanding_inputs([Message("user", "What color is the circle?", [rgb(seed=1)])])
    block = [pro.image_start] + [pro.image_id] * N + [pro.image_end]
    i = ids.index(pro.image_start)
    assert ids[i:i + N + 2] == block and ids.count(pro.image_id) == N and px.shape == (1, 3, 32, 32)
    assert ids[0] == pro.bos and ids.count(pro.bos) == 1

    imgs = [rgb(seed=1), rgb(40, 10, seed=2)]
    ids2, px2 = pro.understanding_inputs([Message("user", "Which is brighter?", imgs)])
    assert ids2.count(pro.image_id) == 2 * N and ids2.count(pro.image_start) == 2 and ids2.count(pro.image_end) == 2
    starts = [k for k, t in enumerate(ids2) if t == pro.image_start]
    for s in starts:
        assert ids2[s:s + N + 2] == block
    assert px2.shape == (2, 3, 32, 32)
    assert torch.equal(px2[0], px[0]) and torch.equal(px2[1], pro.image_processor(imgs[1]))  # in order
    assert "<image_placeholder>\n<image_placeholder>\nWhich is brighter?" in pro.chat_prompt(
        [Message("user", "Which is brighter?", imgs)])

    # images over several turns, in reading order
    ids3, px3 = pro.understanding_inputs([Message("user", "this?", imgs[:1]), Message("assistant", "yes"),
                                          Message("user", "and this?", imgs[1:])])
    assert ids3.count(pro.image_start) == 2 and torch.equal(px3, px2)

    # placeholders written by hand must match the images given
    with pytest.raises(InputError, match="2 image placeholders but 1 images"):
        pro.understanding_inputs([Message("user", "<image_placeholder><image_placeholder> which?", imgs[:1])])
    with pytest.raises(InputError, match="1 image placeholders but 0 images"):
        pro.understanding_inputs([Message("user", "<image_placeholder> which?")])
    ids4, px4 = pro.understanding_inputs([Message("user", "no image")])
    assert pro.image_id not in ids4 and px4.shape == (0, 3, 32, 32)
    # the ids alone (no image preprocessed), with the same check
    assert pro.understanding_ids([Message("user", "this?", imgs[:1]), Message("assistant", "yes"),
                                  Message("user", "and this?", imgs[1:])]) == ids3
    with pytest.raises(InputError, match="2 image placeholders but 1 images"):
        pro.understanding_ids([Message("user", "<image_placeholder><image_placeholder> which?", imgs[:1])])


def test_cfg_uncond_prompt(pro):
    ids = pro.generation_ids("a blue square left of a green cross")
    un = pro.uncond_ids(ids)
    assert len(un) == len(ids) > 4
    assert un == [pro.bos] + [pro.pad] * (len(ids) - 2) + [pro.image_start]


def test_special_ids_resolved_by_string(pro):
    # fillers first, then the special tokens in the reverse order: every id differs from train_tokenizer's
    specials = ["<f0>", "<f1>", "<f2>", "<|Assistant|>", "<|User|>", IMAGE_END, IMAGE_START, IMAGE_TAG, PAD, EOS, BOS]
    tok = bpe(specials)
    proc = make(tok)
    vocab = tok.get_vocab()
    got = dict(bos=proc.bos, eos=proc.eos, pad=proc.pad, image_id=proc.image_id, image_start=proc.image_start,
               image_end=proc.image_end)
    want = dict(bos=vocab[BOS], eos=vocab[EOS], pad=vocab[PAD], image_id=vocab[IMAGE_TAG],
                image_start=vocab[IMAGE_START], image_end=vocab[IMAGE_END])
    assert got == want == dict(bos=10, eos=9, pad=8, image_id=7, image_start=6, image_end=5)
    assert got != dict(bos=pro.bos, eos=pro.eos, pad=pro.pad, image_id=pro.image_id, image_start=pro.image_start,
                       image_end=pro.image_end)
    ids, _ = proc.understanding_inputs([Message("user", "What color is the circle?", [rgb()])])
    assert ids[0] == 10 and ids.count(7) == N and ids.count(6) == 1 and ids.count(5) == 1
    gen = proc.generation_ids("a red circle")
    assert proc.uncond_ids(gen) == [10] + [8] * (len(gen) - 2) + [6]
    # decode drops every special token
    assert proc.decode([10, *tok.encode("red", add_special_tokens=False).ids, 9, 8]) == "red"


def test_missing_special_token_and_tokenizer_file(tmp_path):
    with pytest.raises(CheckpointError, match="lacks the special token '<begin_of_image>'"):
        make(bpe([BOS, EOS, PAD, IMAGE_TAG, IMAGE_END]))
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        Processor.from_folder(tmp_path, N, 32)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot be read"):
        Processor.from_folder(tmp_path, N, 32)


# ------------------------------------------------------------------------------------------ image preprocessing
def test_preprocessing_tall_image():
    """Long side -> size (bicubic, int() truncation), centred on grey, [-1, 1] (spec §5.1)."""
    ip = ImageProcessor(image_size=32)
    img = rgb(17, 25, seed=3)  # w 17, h 25 -> 21 x 32 (17/25*32 = 21.76: truncated), left pad (32-21)//2 = 5
    x = ip(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(x[:, :, :5], torch.tensor(GREY)) and torch.allclose(x[:, :, 26:], torch.tensor(GREY))
    content = np.asarray(img.resize((21, 32), Image.BICUBIC), dtype=np.float32) / 255 * 2 - 1
    assert torch.allclose(x[:, :, 5:26], torch.from_numpy(content).permute(2, 0, 1), atol=1e-6)
    assert not torch.allclose(x[:, :, 5], torch.tensor(GREY)) and not torch.allclose(x[:, :, 25], torch.tensor(GREY))
    assert x.min() >= -1 and x.max() <= 1


def test_preprocessing_min_size_and_value_range():
    ip = ImageProcessor(image_size=32)
    white = Image.new("RGB", (200, 3), "white")  # 3/200*32 = 0.48 -> min_size 14, top pad (32-14)//2 = 9
    x = ip(white)
    assert torch.allclose(x[:, :9], torch.tensor(GREY)) and torch.allclose(x[:, 23:], torch.tensor(GREY))
    assert torch.equal(x[:, 9:23], torch.ones(3, 14, 32))
    black = ip(Image.new("RGB", (32, 32), "black"))
    assert torch.equal(black, -torch.ones(3, 32, 32))  # square, same size: no padding
    big = ImageProcessor()(rgb(500, 300))  # the official size: 384 x 230, pad 77 rows on top
    assert big.shape == (3, 384, 384) and torch.allclose(big[:, :77], torch.tensor(GREY))
    assert not torch.allclose(big[:, 77], torch.tensor(GREY))


def _modes() -> dict[str, Image.Image]:
    base = rgb(30, 20, seed=4)
    p = base.convert("P")
    p.info["transparency"] = 0
    i16 = Image.fromarray((np.arange(600).reshape(20, 30) * 100).astype(np.uint16))
    return {"RGBA": base.convert("RGBA"), "LA": base.convert("LA"), "P+transparency": p, "P": base.convert("P"),
            "L": base.convert("L"), "I;16": i16, "I": base.convert("I"), "F": base.convert("F"),
            "CMYK": base.convert("CMYK"), "1": base.convert("1"), "PA": base.convert("PA"),
            "YCbCr": base.convert("YCbCr")}


@pytest.mark.parametrize("mode", sorted(_modes()))
def test_every_mode_converts(mode):
    img = _modes()[mode]
    out = open_image(img)
    assert out.mode == "RGB" and out.size == img.size
    x = ImageProcessor(image_size=32)(img)
    assert x.shape == (3, 32, 32) and torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1


def test_mode_semantics(tmp_path):
    # transparent pixels are composited on white
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    a = np.asarray(open_image(rgba))
    assert tuple(a[1, 1]) == (255, 255, 255) and tuple(a[0, 0]) == (255, 0, 0)
    # 16-bit greys are stretched to the full 8-bit range, through a PNG file too
    i16 = _modes()["I;16"]
    i16.save(tmp_path / "g16.png")
    g = np.asarray(open_image(tmp_path / "g16.png"))
    assert g.min() == 0 and g.max() == 255 and (g[..., 0] == g[..., 2]).all()
    # CMYK JPEGs (Adobe-inverted, as Pillow and Photoshop write them) keep their colours
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 60)).convert("CMYK").save(buf, "JPEG", quality=95)
    assert np.abs(np.asarray(open_image(buf.getvalue()))[8, 8].astype(int) - (200, 30, 60)).max() <= 8
    assert tuple(np.asarray(open_image(Image.new("CMYK", (2, 2), (0, 255, 255, 0))))[0, 0]) == (255, 0, 0)


# ------------------------------------------------------------------------------------------ bad images
def png_header_only(w: int, h: int) -> bytes:
    """A valid-looking PNG that claims w x h pixels and holds none: the decompression-bomb shape."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    rgb(64, 48, seed=5).save(buf, fmt)
    return buf.getvalue()


BAD = {
    "empty.png": (b"", "empty"),
    "truncated.png": (_encoded("PNG")[:300], "truncated"),
    "truncated.jpg": (_encoded("JPEG")[:400], "truncated"),
    "notes.png": (b"these bytes are not an image at all\n" * 3, "not an image"),
    "bomb.png": (png_header_only(20000, 20000), "pixels"),
    "big.png": (png_header_only(8000, 8000), "pixels"),  # over our 50M limit, under PIL's own 2x error threshold
}


def check_one_line(e: pytest.ExceptionInfo, fragment: str) -> None:
    msg = str(e.value)
    assert fragment.lower() in msg.lower() and "\n" not in msg and "Traceback" not in msg, msg
    assert not re.search(r"0x[0-9a-f]{6,}|object at", msg), msg  # no object reprs
    # raised `from None` (or outside any except): no chained exception is printed with it
    assert e.value.__cause__ is None and (e.value.__context__ is None or e.value.__suppress_context__)
    assert len(traceback.format_exception_only(e.type, e.value)) == 1


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_image_file(tmp_path, name):
    data, fragment = BAD[name]
    path = tmp_path / name
    path.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either: refused before PIL warns
        with pytest.raises(InputError) as e:
            open_image(path)
        check_one_line(e, fragment)
        assert str(e.value).startswith(f"image {path}")
        with pytest.raises(InputError) as e:
            ImageProcessor(image_size=32)(str(path))
        check_one_line(e, fragment)
        with pytest.raises(InputError) as e:
            open_image(data)
        check_one_line(e, fragment)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file") as e:
        open_image(tmp_path / "nope.png")
    check_one_line(e, "nope.png")
    with pytest.raises(InputError, match="no such file"):
        open_image(str(tmp_path))  # a folder is not an image file


def test_pixel_limit(monkeypatch, tmp_path):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored afterwards
    monkeypatch.setattr(P, "MAX_IMAGE_PIXELS", 1000)
    rgb(40, 30).save(tmp_path / "ok.png")  # 1200 pixels
    rgb(50, 50).save(tmp_path / "huge.png")  # 2500 pixels: over PIL's 2x error threshold too
    for f in ("ok.png", "huge.png"):
        with pytest.raises(InputError) as e:
            open_image(tmp_path / f)
        check_one_line(e, "pixels")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InputError, match="40x30 pixels is over the 1,000 limit"):
            open_image(rgb(40, 30))  # a PIL image too
        with pytest.raises(InputError, match="40x30 pixels is over the 1,000 limit"):
            open_image(tmp_path / "ok.png")  # refused by our check, without PIL's warning
    assert open_image(rgb(20, 20)).size == (20, 20)
