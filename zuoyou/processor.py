"""Text and image preprocessing: the Janus chat format, placeholder expansion, image normalisation.

Special-token ids are always resolved from the tokenizer by their strings: they differ between
checkpoints (e.g. the pad id is 100002 in Janus-Pro-1B and 100015 in Janus-Pro-7B).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tokenizers import Tokenizer

from .errors import CheckpointError, InputError

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language."
)
BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
IMAGE_TAG, IMAGE_START, IMAGE_END = "<image_placeholder>", "<begin_of_image>", "<end_of_image>"
PRO_ROLES = ("<|User|>", "<|Assistant|>")
V1_ROLES = ("User", "Assistant")
MAX_IMAGE_PIXELS = 50_000_000  # larger images are refused (decompression-bomb guard)


# ------------------------------------------------------------------------------------------ images
def open_image(image) -> Image.Image:
    """A path, bytes or PIL image -> an RGB PIL image; any failure is an ``InputError`` naming it."""
    name = "<bytes>" if isinstance(image, (bytes, bytearray)) else str(image)
    if not isinstance(image, Image.Image):
        src = io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else image
        if isinstance(src, (str, Path)):
            if not Path(src).is_file():
                raise InputError(f"image {name}: no such file")
            if Path(src).stat().st_size == 0:
                raise InputError(f"image {name}: the file is empty (0 bytes)")
        elif isinstance(image, (bytes, bytearray)) and not image:
            raise InputError("image <bytes>: empty (0 bytes)")
        try:
            image = _load(src, name)
        except InputError:
            raise
        except Image.DecompressionBombError:
            raise InputError(f"image {name}: too many pixels (decompression-bomb guard)") from None
        except UnidentifiedImageError:
            raise InputError(f"image {name}: not an image file (or a format Pillow cannot read)") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise InputError(f"image {name}: cannot read it as an image ({e})") from None
    elif image.width * image.height > MAX_IMAGE_PIXELS:
        raise InputError(f"image: {image.width}x{image.height} pixels is over the {MAX_IMAGE_PIXELS:,} limit")
    return to_rgb(image)


def _load(src, name: str) -> Image.Image:
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    with warnings.catch_warnings():  # PIL warns between 1x and 2x its limit: we refuse those ourselves, below
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(src)
    try:
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise InputError(f"image {name}: {image.width}x{image.height} pixels is over the {MAX_IMAGE_PIXELS:,} limit")
        image.load()
    except BaseException:
        image.close()  # the file Image.open opened
        raise
    return image


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparency is composited over white; 16/32-bit greys are rescaled."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)
        return Image.fromarray(a.astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info or img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    # CMYK (JPEG included: Pillow already decodes Adobe-inverted CMYK JPEGs as "CMYK;I") converts directly
    return img.convert("RGB")


@dataclass
class ImageProcessor:
    """Reference preprocessing: long side -> size (bicubic), pad to a square with grey, [-1, 1]."""

    image_size: int = 384
    min_size: int = 14
    background: tuple = (127, 127, 127)
    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.5, 0.5, 0.5)

    def __call__(self, image) -> torch.Tensor:
        img = open_image(image)
        w, h = img.size
        m = max(w, h)
        new_h = max(int(h / m * self.image_size), self.min_size)
        new_w = max(int(w / m * self.image_size), self.min_size)
        img = img.resize((new_w, new_h), Image.BICUBIC)
        side = max(new_w, new_h)
        canvas = Image.new("RGB", (side, side), self.background)
        canvas.paste(img, ((side - new_w) // 2, (side - new_h) // 2))
        x = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, S, S)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """(B, 3, S, S) decoder output in [-1, 1] -> PIL images, clipped then truncated to uint8 (reference)."""
    x = pixels.detach().float().permute(0, 2, 3, 1).cpu().numpy()  # (B, S, S, 3)
    x = np.clip((x + 1) / 2 * 255, 0, 255).astype(np.uint8)
    return [Image.fromarray(a) for a in x]


# ------------------------------------------------------------------------------------------ text
@dataclass
class Message:
    role: str  # "user" | "assistant"
    content: str
    images: list = field(default_factory=list)


class Processor:
    """Tokenizer + chat template + placeholder expansion + image preprocessing."""

    def __init__(self, tokenizer: Tokenizer, num_image_tokens: int, image_processor: ImageProcessor,
                 system_prompt: str = DEFAULT_SYSTEM_PROMPT):
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.image_processor = image_processor
        self.system_prompt = system_prompt
        vocab = tokenizer.get_vocab(with_added_tokens=True)

        def tok(s):
            if s not in vocab:
                raise CheckpointError(f"tokenizer.json lacks the special token {s!r}")
            return vocab[s]

        self.bos, self.eos, self.pad = tok(BOS), tok(EOS), tok(PAD)
        self.image_id, self.image_start, self.image_end = tok(IMAGE_TAG), tok(IMAGE_START), tok(IMAGE_END)
        # Janus-Pro tokenizers carry <|User|> as one token; Janus-1.3B's use plain words
        self.roles = PRO_ROLES if PRO_ROLES[0] in vocab else V1_ROLES
        self.special_ids = {self.bos, self.eos, self.pad, self.image_id, self.image_start, self.image_end}

    @classmethod
    def from_folder(cls, folder: Path, num_image_tokens: int, image_size: int, system_prompt: str | None = None):
        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{folder}: no tokenizer.json")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise CheckpointError(f"{path}: cannot be read by `tokenizers` ({e})") from None
        ip = ImageProcessor(image_size=image_size)
        return cls(tokenizer, num_image_tokens, ip, DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt)

    # -------------------------------------------------------------- prompts
    def chat_prompt(self, messages: list[Message], system: str | None = None) -> str:
        """The ``deepseek`` sft_format: ``{system}\\n\\n{User}: ...\\n\\n{Assistant}: ...<eos>...{Assistant}:``."""
        system = self.system_prompt if system is None else system
        user, assistant = self.roles
        out = system.strip() + "\n\n" if system.strip() else ""
        for m in messages:
            role = user if m.role == "user" else assistant
            content = m.content.strip()
            if m.role == "user" and m.images and IMAGE_TAG not in content:
                content = "\n".join([IMAGE_TAG] * len(m.images) + [content]).strip()
            sep = "\n\n" if m.role == "user" else EOS  # sep / sep2 of the deepseek template
            out += f"{role}: {content}{sep}"
        if not messages or messages[-1].role != "assistant":
            out += f"{assistant}:"
        return out.strip()

    def encode(self, text: str) -> list[int]:
        return [self.bos] + self.tokenizer.encode(text, add_special_tokens=False).ids

    def answer_ids(self, text: str) -> list[int]:
        """An assistant turn's tokens after the template's ``{Assistant}:``: `` {answer}<eos>`` (what
        training targets and what answers are scored by)."""
        return self.tokenizer.encode(" " + text.strip(), add_special_tokens=False).ids + [self.eos]

    def expand_images(self, ids: list[int]) -> list[int]:
        """Each ``<image_placeholder>`` -> ``<begin_of_image>`` + N placeholders + ``<end_of_image>``."""
        out = []
        for t in ids:
            if t == self.image_id:
                out += [self.image_start] + [self.image_id] * self.num_image_tokens + [self.image_end]
            else:
                out.append(t)
        return out

    def understanding_ids(self, messages: list[Message], system: str | None = None) -> list[int]:
        """Messages -> prompt ids with each image's placeholders expanded. Checks placeholders vs images."""
        ids = self.expand_images(self.encode(self.chat_prompt(messages, system)))
        n_tags, n_images = sum(1 for t in ids if t == self.image_start), sum(len(m.images) for m in messages)
        if n_tags != n_images:
            raise InputError(f"the conversation has {n_tags} image placeholders but {n_images} images")
        return ids

    def understanding_inputs(self, messages: list[Message], system: str | None = None):
        """Messages -> (ids list[int], pixel_values (N, 3, S, S)) (``understanding_ids`` and the images preprocessed)."""
        images = [img for m in messages for img in m.images]
        ids = self.understanding_ids(messages, system)
        size = self.image_processor.image_size
        pixels = torch.stack([self.image_processor(i) for i in images]) if images else torch.zeros(0, 3, size, size)
        return ids, pixels

    def generation_ids(self, prompt: str) -> list[int]:
        """``{User}: {prompt}\\n\\n{Assistant}:<begin_of_image>`` with no system prompt."""
        text = self.chat_prompt([Message("user", prompt)], system="") + IMAGE_START
        return self.encode(text)

    def uncond_ids(self, ids: list[int]) -> list[int]:
        """CFG's unconditional prompt: BOS and the final ``<begin_of_image>`` kept, the rest pad."""
        return [ids[0]] + [self.pad] * (len(ids) - 2) + [ids[-1]]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i not in self.special_ids], skip_special_tokens=True)



class TextStream:
    """Token ids -> text pieces as they arrive, for streaming answers.

    Byte-level BPE can split one character over several tokens: a piece is released only once it
    decodes without a replacement character. The template's space after ``<|Assistant|>:``
    starts every answer and is not part of it, so leading whitespace is dropped.
    """

    def __init__(self, processor: "Processor"):
        self.processor, self.ids, self.sent = processor, [], ""

    @property
    def text(self) -> str:
        return self.processor.decode(self.ids).lstrip()

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.text
        if text.endswith("\ufffd") or len(text) <= len(self.sent):
            return ""
        piece, self.sent = text[len(self.sent):], text
        return piece

    def flush(self) -> str:
        """Whatever is left (e.g. an incomplete character at the end of a truncated answer)."""
        text = self.text
        piece, self.sent = text[len(self.sent):], text
        return piece
