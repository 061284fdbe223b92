"""OpenAI request parsing and validation, and OpenAI-shaped error bodies.

Bodies are parsed by hand rather than with pydantic models so that every refusal names the field
and the reason in one line, in OpenAI's ``{"error": {"message", "type", "param", "code"}}`` form.
Everything here is synchronous and touches no model state: the app runs it in a thread pool
(image decoding may take a moment) before a job ever reaches the model's queue.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass, field

from PIL import Image

from ..engine import MAX_BEST_OF, MAX_REDRAWS, ImageRequest, TextRequest
from ..errors import InputError
from ..processor import Message, open_image


class APIError(Exception):
    """An error the server answers with ``status`` and an OpenAI error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


@dataclass
class Limits:
    """Per-request limits; the server refuses anything beyond them with a 4xx naming the limit."""

    max_body_bytes: int = 32 * 2**20
    max_image_bytes: int = 16 * 2**20  # one decoded image file
    max_image_pixels: int = 4096 * 4096
    max_images: int = 8  # images in one conversation
    max_messages: int = 64
    max_prompt_chars: int = 8000
    max_n: int = 8
    max_tokens: int = 2048
    max_partial_images: int = 8
    request_timeout: float = 300.0  # seconds, queueing included
    allow_remote_images: bool = False
    remote_timeout: float = 10.0


# ----------------------------------------------------------------------------------- field helpers
def _typename(v) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


def get_num(body: dict, key: str, default=None, lo=None, hi=None, integer=False, lo_open=False):
    v = body.get(key)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok:
        raise bad(f"'{key}' must be {'an integer' if integer else 'a number'}, got {_typename(v)}", key, "invalid_type")
    if v != v or (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        rng = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise bad(f"'{key}'={v} is out of range: must be in {rng}", key)
    return v


def get_str(body: dict, key: str, default=None, required=False, max_chars=None):
    v = body.get(key)
    if v is None:
        if required:
            raise bad(f"missing required field '{key}'", key, "missing_required_parameter")
        return default
    if not isinstance(v, str):
        raise bad(f"'{key}' must be a string, got {_typename(v)}", key, "invalid_type")
    if max_chars is not None and len(v) > max_chars:
        raise bad(f"'{key}' is {len(v)} characters, over the limit of {max_chars}", key, "string_above_max_length")
    return v


def get_bool(body: dict, key: str, default=False) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"'{key}' must be a boolean, got {_typename(v)}", key, "invalid_type")
    return v


def get_seed(body: dict):
    return get_num(body, "seed", None, 0, 2**63 - 1, integer=True)


# ----------------------------------------------------------------------------------- images
_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)$", re.S)


def decode_image(data: bytes, limits: Limits, param: str) -> Image.Image:
    """Bytes -> RGB PIL image, the pixel count checked from the header before anything is decoded."""
    if len(data) > limits.max_image_bytes:
        raise bad(f"{param}: the image is {len(data):,} bytes, over the limit of {limits.max_image_bytes:,}", param,
                  "image_too_large")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            w, h = probe.size
    except Image.DecompressionBombError:
        raise bad(f"{param}: too many pixels (decompression-bomb guard)", param, "image_too_large") from None
    except Exception as e:  # PIL raises many types on garbage
        raise bad(f"{param}: the bytes are not an image PIL can read ({type(e).__name__}: {e})", param,
                  "invalid_image") from None
    if w * h > limits.max_image_pixels:
        raise bad(f"{param}: {w}x{h} is {w * h:,} pixels, over the limit of {limits.max_image_pixels:,}", param,
                  "image_too_large")
    try:
        return open_image(data)
    except InputError as e:
        raise bad(f"{param}: {e}", param, "invalid_image") from None


def image_from_url(url: str, limits: Limits, param: str) -> Image.Image:
    m = _DATA_URI.match(url)
    if m:
        b64 = re.sub(r"\s+", "", m.group("data"))
        if len(b64) * 3 // 4 > limits.max_image_bytes + 3:
            raise bad(f"{param}: the image is over the limit of {limits.max_image_bytes:,} bytes", param,
                      "image_too_large")
        try:
            raw = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError) as e:
            raise bad(f"{param}: the data URI is not valid base64 ({e})", param, "invalid_base64") from None
        return decode_image(raw, limits, param)
    if url.startswith(("http://", "https://")):
        if not limits.allow_remote_images:
            raise bad(f"{param}: remote image URLs are disabled on this server (start it with "
                      "--allow-remote-images); send the image inline as a data:image/...;base64 URI",
                      param, "remote_images_disabled")
        return decode_image(_fetch(url, limits, param), limits, param)
    raise bad(f"{param}: expected a data:image/...;base64,... URI" +
              (" or an http(s) URL" if limits.allow_remote_images else ""), param, "invalid_image_url")


def _fetch(url: str, limits: Limits, param: str) -> bytes:
    import httpx

    try:
        with httpx.stream("GET", url, timeout=limits.remote_timeout, follow_redirects=True) as r:
            r.raise_for_status()
            out = bytearray()
            for chunk in r.iter_bytes():
                out += chunk
                if len(out) > limits.max_image_bytes:
                    raise bad(f"{param}: the remote image is over {limits.max_image_bytes:,} bytes", param,
                              "image_too_large")
            return bytes(out)
    except httpx.HTTPError as e:
        raise bad(f"{param}: could not fetch {url} ({e})", param, "image_fetch_failed") from None


# ----------------------------------------------------------------------------------- chat
@dataclass
class ChatSpec:
    request: TextRequest
    prompt_tokens: int
    stream: bool = False
    include_usage: bool = False
    model: str | None = None


def _parts(content, i: int, role: str, limits: Limits, images: list) -> str:
    """A message's content (string or list of parts) -> text with image tags; images appended to ``images``."""
    from ..processor import IMAGE_TAG

    p = f"messages[{i}].content"
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad(f"{p} must be a string or an array of parts, got {_typename(content)}", p, "invalid_type")
    out = []
    for j, part in enumerate(content):
        pj = f"{p}[{j}]"
        if not isinstance(part, dict):
            raise bad(f"{pj} must be an object, got {_typename(part)}", pj, "invalid_type")
        kind = part.get("type")
        if kind == "text":
            out.append(get_str(part, "text", required=True))
        elif kind == "image_url":
            if role != "user":
                raise bad(f"{pj}: images are only accepted in user messages", pj)
            iu = part.get("image_url")
            url = iu.get("url") if isinstance(iu, dict) else iu
            if not isinstance(url, str):
                raise bad(f"{pj}.image_url must be {{'url': 'data:image/...;base64,...'}}", f"{pj}.image_url",
                          "invalid_type")
            if len(images) >= limits.max_images:
                raise bad(f"{pj}: more than {limits.max_images} images in one conversation", pj, "too_many_images")
            images.append(image_from_url(url, limits, f"{pj}.image_url"))
            out.append(IMAGE_TAG)
        else:
            raise bad(f"{pj}.type={kind!r}: supported part types are 'text' and 'image_url'", f"{pj}.type")
    return "\n".join(out)


def parse_chat(body: dict, pipe, limits: Limits) -> ChatSpec:
    msgs = body.get("messages")
    if msgs is None:
        raise bad("missing required field 'messages'", "messages", "missing_required_parameter")
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty array", "messages", "invalid_type")
    if len(msgs) > limits.max_messages:
        raise bad(f"{len(msgs)} messages, over the limit of {limits.max_messages}", "messages")
    for key in ("tools", "functions"):
        if body.get(key):
            raise bad(f"'{key}' is not supported by this model", key, "unsupported_parameter")
    if body.get("stop"):
        raise bad("'stop' sequences are not supported", "stop", "unsupported_parameter")
    if get_num(body, "n", 1, 1, 1, integer=True) != 1:
        raise bad("only n=1 is supported", "n")
    d = pipe.defaults
    max_tokens = get_num(body, "max_completion_tokens", None, 1, limits.max_tokens, integer=True)
    max_tokens = get_num(body, "max_tokens", max_tokens, 1, limits.max_tokens, integer=True)
    max_tokens = min(limits.max_tokens, d.max_new_tokens) if max_tokens is None else max_tokens
    temperature = get_num(body, "temperature", d.text_temperature, 0, 2)
    top_p = get_num(body, "top_p", None, 0, 1, lo_open=True)
    top_k = get_num(body, "top_k", None, 1, 10**6, integer=True)
    seed = get_seed(body)
    stream = get_bool(body, "stream")
    so = body.get("stream_options") or {}
    if not isinstance(so, dict):
        raise bad("'stream_options' must be an object", "stream_options", "invalid_type")
    include_usage = get_bool(so, "include_usage")
    system, messages, chars = [], [], 0
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object, got {_typename(m)}", f"messages[{i}]", "invalid_type")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise bad(f"messages[{i}].role={role!r}: expected 'system', 'user' or 'assistant'", f"messages[{i}].role")
        images: list = []
        text = _parts(m.get("content"), i, role, limits, images)
        chars += len(text)
        if chars > limits.max_prompt_chars:
            raise bad(f"the conversation is over the limit of {limits.max_prompt_chars} characters", "messages",
                      "context_length_exceeded")
        if role in ("system", "developer"):
            system.append(text)
        else:
            messages.append(Message(role, text, images))
    if not messages or messages[-1].role != "user":
        raise bad("the last message must be the user's", "messages")
    req = TextRequest(messages, max_tokens, temperature, top_k, top_p, seed,
                      "\n\n".join(system) if system else d.system_prompt)
    proc = pipe.engine.processor
    try:
        ids = proc.expand_images(proc.encode(proc.chat_prompt(messages, req.system)))
    except InputError as e:
        raise bad(str(e), "messages") from None
    n_tags = sum(1 for t in ids if t == proc.image_start)
    if n_tags != sum(len(m.images) for m in messages):
        raise bad("the text contains image placeholder tokens; send images as image_url parts", "messages")
    if len(ids) >= pipe.engine.context:
        raise bad(f"the prompt is {len(ids)} tokens; the model's context is {pipe.engine.context}", "messages",
                  "context_length_exceeded")
    return ChatSpec(req, len(ids), stream, include_usage, body.get("model"))


# ----------------------------------------------------------------------------------- images
@dataclass
class ImageSpec:
    request: ImageRequest
    prompt_tokens: int
    size: str
    stream: bool = False
    partial_images: int = 0
    extra: dict = field(default_factory=dict)


def native_size(pipe) -> str:
    s = pipe.config.vq.image_size
    return f"{s}x{s}"


def parse_images(body: dict, pipe, limits: Limits) -> ImageSpec:
    prompt = get_str(body, "prompt", required=True, max_chars=limits.max_prompt_chars)
    if not prompt.strip():
        raise bad("'prompt' is empty", "prompt")
    n = get_num(body, "n", 1, 1, limits.max_n, integer=True)
    size = get_str(body, "size", "auto")
    native = native_size(pipe)
    if size not in ("auto", native):
        raise bad(f"size={size!r}: this model draws only {native} images (or pass 'auto')", "size",
                  "unsupported_size")
    fmt = get_str(body, "response_format", "b64_json")
    if fmt != "b64_json":
        raise bad(f"response_format={fmt!r}: this server returns images inline only; use 'b64_json'",
                  "response_format", "unsupported_response_format")
    out_fmt = get_str(body, "output_format", "png")
    if out_fmt != "png":
        raise bad(f"output_format={out_fmt!r}: only 'png' is supported", "output_format")
    d = pipe.defaults
    cfg = get_num(body, "cfg", d.cfg, 0, 100)
    temperature = get_num(body, "temperature", d.temperature, 0, 10)
    top_k = get_num(body, "top_k", d.top_k, 1, 10**6, integer=True)
    top_p = get_num(body, "top_p", d.top_p, 0, 1, lo_open=True)
    seed = get_seed(body)
    best_of = get_num(body, "best_of", d.best_of, 1, MAX_BEST_OF, integer=True)
    if best_of > 1 and pipe.engine.checker is None:
        raise bad(f"best_of={best_of}: this model has no self-check to rank candidates by", "best_of")
    redraws = get_num(body, "redraws", d.redraws, 0, MAX_REDRAWS, integer=True)
    stream = get_bool(body, "stream")
    partial = get_num(body, "partial_images", 3 if stream else 0, 0, limits.max_partial_images, integer=True)
    req = ImageRequest(prompt, n, cfg, temperature, top_k, top_p, seed, best_of, redraws)
    proc, eng = pipe.engine.processor, pipe.engine
    ids = proc.generation_ids(prompt)
    if len(ids) + pipe.config.vq.num_tokens > eng.context:
        raise bad(f"the prompt is {len(ids)} tokens; with {pipe.config.vq.num_tokens} image tokens it exceeds "
                  f"the model's context of {eng.context}", "prompt", "context_length_exceeded")
    return ImageSpec(req, len(ids), native, stream, partial if stream else 0)
