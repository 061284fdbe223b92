"""The HTTP server against the real ``openai`` client, on a live uvicorn server over loopback.

The model is the random tiny checkpoint (16x16 images): answers are gibberish but every flow —
images in, SSE out, merged batches, limits, errors — is the real one.
"""

from __future__ import annotations

import base64
import io
import struct
import threading
import time
import zlib
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402

from liveserver import running  # noqa: E402
from zuoyou.server.app import create_app  # noqa: E402
from zuoyou.server.batcher import ImageJob  # noqa: E402
from zuoyou.server.openai_schema import Limits  # noqa: E402

KEY = "sk-test-123"


@pytest.fixture(scope="module")
def server(tiny_dir):
    import zuoyou.api

    pipe = zuoyou.api.load(tiny_dir, device="cpu")  # its own engine: the worker thread owns it
    limits = Limits(max_n=4, max_tokens=64, max_image_pixels=1024 * 1024, max_body_bytes=2 * 2**20,
                    request_timeout=60)
    app = create_app(pipe, api_key=KEY, max_queue=4, limits=limits, batch_window=0.02, model_id="tiny")
    with running(app) as url:
        yield SimpleNamespace(url=url, app=app, batcher=app.state.batcher, limits=limits, pipe=pipe,
                              http=httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60))


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def png_bytes(w=20, h=12, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def data_uri(raw: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def png_header_only(w: int, h: int) -> bytes:
    """A PNG that claims w x h pixels but holds no data: the decompression-bomb shape."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def image_msg(text="What color is the circle?", raw=None):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(raw or png_bytes())}},
                                         {"type": "text", "text": text}]}]


def wait_queued(batcher, n, timeout=20):
    deadline = time.time() + timeout
    while batcher.queued() < n:
        assert time.time() < deadline, f"only {batcher.queued()} of {n} requests reached the queue"
        time.sleep(0.02)


# ----------------------------------------------------------------------------------- basics
def test_health_models_and_page(server, client):
    h = httpx.get(server.url + "/health").json()  # no key needed
    assert h["status"] == "ok" and h["model"] == "tiny" and h["image_size"] == 16 and h["auth"] is True
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and 'id="chat-form"' in page.text and 'id="draw-form"' in page.text
    for f in ("app.js", "style.css"):
        assert httpx.get(f"{server.url}/static/{f}").status_code == 200
    r = server.http.get("/v1/nowhere")
    assert r.status_code == 404 and "message" in r.json()["error"]


def test_api_key_enforced(server):
    r = httpx.get(server.url + "/v1/models")  # no key at all
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.AuthenticationError):
        wrong.images.generate(prompt="a red circle", response_format="b64_json")
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])

# ----------------------------------------------------------------------------------- chat
def test_chat_with_image_multiturn_and_stream(server, client):
    kw = dict(model="tiny", max_tokens=6, temperature=0, seed=0)
    r = client.chat.completions.create(messages=image_msg(), **kw)
    msg = r.choices[0]
    assert isinstance(msg.message.content, str) and msg.message.role == "assistant"
    assert msg.finish_reason in ("stop", "length")
    n_img = server.pipe.config.vision.num_patches
    assert r.usage.prompt_tokens > n_img and 0 <= r.usage.completion_tokens <= 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    multi = image_msg() + [{"role": "assistant", "content": "red"}, {"role": "user", "content": "And the square?"}]
    r2 = client.chat.completions.create(messages=multi, **kw)
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens
    r3 = client.chat.completions.create(messages=[{"role": "system", "content": "Be brief."}] + multi, **kw)
    assert r3.usage.prompt_tokens < r2.usage.prompt_tokens  # replaces the (long) default system prompt

    chunks = list(client.chat.completions.create(messages=image_msg(), stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == msg.message.content  # greedy: streaming gives the same answer
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == msg.finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


# ----------------------------------------------------------------------------------- images
def test_images_generate_b64(client):
    r = client.images.generate(model="tiny", prompt="a red circle", n=2, size="16x16", response_format="b64_json",
                               extra_body={"seed": 3, "cfg": 2.0, "temperature": 0.9})
    assert len(r.data) == 2
    imgs = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in r.data]
    assert all(im.size == (16, 16) and im.format == "PNG" for im in imgs)
    again = client.images.generate(prompt="a red circle", n=2, response_format="b64_json",
                                   extra_body={"seed": 3, "cfg": 2.0, "temperature": 0.9})
    assert [d.b64_json for d in again.data] == [d.b64_json for d in r.data]  # seeded, size "auto"


def test_images_stream_previews(server, client):
    events = list(client.images.generate(prompt="a blue square", n=2, response_format="b64_json", stream=True,
                                         partial_images=2, extra_body={"seed": 1}))
    partial = [e for e in events if e.type == "image_generation.partial_image"]
    done = [e for e in events if e.type == "image_generation.completed"]
    assert len(done) == 2 and len(partial) == 4
    rows = sorted({e.model_extra["rows_done"] for e in partial})
    assert len(rows) == 2 and rows[-1] < server.pipe.config.vq.grid
    for e in partial + done:
        assert Image.open(io.BytesIO(base64.b64decode(e.b64_json))).size == (16, 16)


def test_images_best_of_with_previews(server, client, monkeypatch):
    """``best_of`` draws n x best_of candidates and answers n images; previews come per image kept."""
    monkeypatch.setattr(server.pipe.engine, "checker", lambda prompt: [("How many objects are there?", "one")])
    events = list(client.images.generate(prompt="a blue square", n=2, response_format="b64_json", stream=True,
                                         partial_images=2, extra_body={"seed": 1, "best_of": 3}))
    assert len([e for e in events if e.type == "image_generation.completed"]) == 2
    assert len([e for e in events if e.type == "image_generation.partial_image"]) == 4
    assert server.http.get("/health").json()["batcher"]["images"] >= 2


# ----------------------------------------------------------------------------------- bad inputs
BAD = [
    ("/v1/chat/completions", {"messages": []}, "non-empty"),
    ("/v1/chat/completions", {"model": "tiny"}, "missing required field 'messages'"),
    ("/v1/chat/completions", {"messages": "hi"}, "array"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "string or an array"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64,@@not-base64!!"}}]}]}, "base64"),
    ("/v1/chat/completions", {"messages": image_msg(raw=b"hello, I am not an image")}, "not an image"),
    ("/v1/chat/completions", {"messages": image_msg(raw=png_header_only(5000, 5000))}, "pixels"),
    ("/v1/chat/completions", {"messages": image_msg(raw=png_header_only(40000, 40000))}, "pixels"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "https://example.com/cat.png"}}]}]}, "--allow-remote-images"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "number"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hi"}]}, "last message"),
    ("/v1/images/generations", {"n": 1}, "missing required field 'prompt'"),
    ("/v1/images/generations", {"prompt": "x", "n": 100}, "'n'=100"),
    ("/v1/images/generations", {"prompt": "x", "n": "2"}, "integer"),
    ("/v1/images/generations", {"prompt": "x", "n": True}, "integer"),
    ("/v1/images/generations", {"prompt": 7}, "string"),
    ("/v1/images/generations", {"prompt": "   "}, "empty"),
    ("/v1/images/generations", {"prompt": "x", "size": "1024x1024"}, "16x16"),
    ("/v1/images/generations", {"prompt": "x", "response_format": "url"}, "b64_json"),
    ("/v1/images/generations", {"prompt": "x", "seed": -1}, "seed"),
    ("/v1/images/generations", {"prompt": "x", "best_of": 0}, "'best_of'=0"),
    ("/v1/images/generations", {"prompt": "x", "best_of": 2}, "self-check"),  # the tiny model names none
    ("/v1/images/generations", {"prompt": "x", "redraws": 9}, "'redraws'=9"),
]


@pytest.mark.parametrize("path,body,fragment", BAD, ids=[f"{p.split('/')[-1]}-{i}" for i, (p, _, _) in enumerate(BAD)])
def test_bad_inputs_get_400_with_message(server, path, body, fragment):
    r = server.http.post(path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and fragment in err["message"], err


def test_bad_bodies_and_the_server_keeps_serving(server, client):
    r = server.http.post("/v1/images/generations", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = server.http.post("/v1/images/generations", json=["prompt"])
    assert r.status_code == 400
    r = server.http.post("/v1/chat/completions", content=b"{" + b" " * (3 * 2**20) + b"}")
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="pixels"):
        client.chat.completions.create(model="tiny", messages=image_msg(raw=png_header_only(5000, 5000)))
    r = client.chat.completions.create(model="tiny", messages=image_msg(), max_tokens=2)
    assert r.choices[0].message.role == "assistant"
    assert httpx.get(server.url + "/health").json()["batcher"]["worker_alive"]


# ----------------------------------------------------------------------------------- batching
def test_concurrent_requests_merge_and_overflow_gets_429(server):
    b = server.batcher
    before = b.stats()
    results, errors = [], []

    def draw(seed):
        try:
            c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
            results.append(c.images.generate(prompt="a green cross", response_format="b64_json",
                                             extra_body={"seed": seed}))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    b.pause()  # hold the worker so that the merge is certain, not a matter of timing
    try:
        threads = [threading.Thread(target=draw, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        wait_queued(b, 4)
        r = server.http.post("/v1/images/generations", json={"prompt": "one too many"})  # max_queue=4
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error"
    finally:
        b.resume()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 4
    after = b.stats()
    assert after["image_batches"] == before["image_batches"] + 1  # four requests, one decode batch
    assert after["image_requests"] == before["image_requests"] + 4
    assert after["max_batch_requests"] >= 4 and after["rejected"] == before["rejected"] + 1
    h = httpx.get(server.url + "/health").json()["batcher"]
    assert h["image_batches"] == after["image_batches"]


def test_concurrent_chats_merge(server):
    b = server.batcher
    before = b.stats()["chat_batches"]
    out = []

    def ask(q):
        c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        out.append(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": q}], max_tokens=3))

    b.pause()
    try:
        threads = [threading.Thread(target=ask, args=(q,)) for q in ("How many objects are there?", "Describe.")]
        for t in threads:
            t.start()
        wait_queued(b, 2)
    finally:
        b.resume()
    for t in threads:
        t.join(60)
    assert len(out) == 2 and b.stats()["chat_batches"] == before + 1


def test_bad_job_in_merged_batch_fails_alone(server):
    """An InputError from a merged batch is retried job by job: the good neighbour still succeeds."""
    eng, b = server.pipe.engine, server.batcher
    good, bad = [], []
    b.pause()
    try:
        b.submit(ImageJob(server.pipe.image_request("a red circle", seed=0), good.append))
        b.submit(ImageJob(server.pipe.image_request("", seed=0), bad.append))  # the engine refuses it
    finally:
        b.resume()
    deadline = time.time() + 30
    while not (good and bad):
        assert time.time() < deadline
        time.sleep(0.02)
    assert good[0][0] == "done" and len(good[0][1]) == 1
    assert bad[0][0] == "error" and "empty" in str(bad[0][1])
    assert eng is b.engine


def test_timeout_gives_504_and_frees_the_queue(server):
    b = server.batcher
    server.limits.request_timeout = 0.3
    b.pause()
    try:
        r = server.http.post("/v1/images/generations", json={"prompt": "slow"})
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        assert b.queued() == 0
    finally:
        server.limits.request_timeout = 60
        b.resume()
