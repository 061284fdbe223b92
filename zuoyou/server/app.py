"""The FastAPI app: OpenAI-compatible chat and image endpoints over one batched model worker.

Endpoints
  POST /v1/chat/completions     OpenAI chat (text + ``image_url`` data-URI parts), ``stream`` as SSE.
  POST /v1/images/generations   OpenAI images (``b64_json`` only, native size), extras ``cfg``,
                                ``temperature``, ``top_k``, ``top_p``, ``seed``, ``best_of`` (candidates
                                per image, ranked by the model's own check; default: the model's),
                                ``redraws`` (more rounds of them while an image fails that check; the
                                requests batched with it wait for them).
                                With ``"stream": true`` it answers server-sent events in the OpenAI
                                image-streaming shape: ``image_generation.partial_image`` events (grey
                                where not yet drawn; ``partial_images`` of them per image, default 3,
                                plus our fields ``index``, ``rows_done``, ``rows_total``), then one
                                ``image_generation.completed`` event per image, then ``data: [DONE]``.
  GET  /v1/models, /v1/models/{id}
  GET  /health                  status, queue and batching counters (no key needed)
  GET  /                        the web page (static files under /static)

With ``api_key`` set, every /v1 route wants ``Authorization: Bearer <key>``. One model per
server: the ``model`` field is accepted and ignored. Unset sampling fields take the model folder's
``generation_defaults.json`` values (chat: greedy unless the folder says otherwise). Errors are
OpenAI-shaped: 400 bad input (the message names the field), 401 key, 404, 413 body too large,
429 queue full (``Retry-After``), 504 over the per-request timeout, 500 model failure.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import InputError
from .batcher import Batcher, ChatJob, ImageJob, QueueFull
from .openai_schema import APIError, Limits, bad, parse_chat, parse_images

STATIC = Path(__file__).parent / "static"


def create_app(pipe, api_key: str | None = None, max_queue: int = 64, limits: Limits | None = None,
               batch_window: float = 0.02, max_image_rows: int = 16, max_chat_rows: int = 8,
               allow_remote_images: bool = False, model_id: str | None = None) -> FastAPI:
    limits = limits or Limits()
    if allow_remote_images:
        limits.allow_remote_images = True
    batcher = Batcher(pipe.engine, max_queue, batch_window, max_image_rows, max_chat_rows)
    model_id = model_id or Path(pipe.folder).name
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="zuoyou", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.pipe, app.state.batcher, app.state.limits, app.state.model_id = pipe, batcher, limits, model_id

    # ------------------------------------------------------------------ errors
    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(e.body(), e.status, headers=e.headers)

    @app.exception_handler(InputError)
    async def _input_error(request, e: InputError):
        return JSONResponse(bad(str(e)).body(), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(e.status_code, str(e.detail), kind).body(), e.status_code)

    @app.exception_handler(Exception)
    async def _crash(request, e):
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error").body(), 500)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("api-key", "")
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           "invalid_request_error", None, "invalid_api_key")

    async def read_json(request: Request) -> dict:
        check_key(request)
        cl = request.headers.get("content-length")
        if cl and cl.isdigit() and int(cl) > limits.max_body_bytes:
            raise APIError(413, f"the body is {int(cl):,} bytes, over the limit of {limits.max_body_bytes:,}",
                           code="request_too_large")
        buf = bytearray()
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > limits.max_body_bytes:
                raise APIError(413, f"the body is over the limit of {limits.max_body_bytes:,} bytes",
                               code="request_too_large")
        try:
            body = json.loads(buf)
        except (ValueError, UnicodeDecodeError) as e:
            raise bad(f"the body is not valid JSON ({e})", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise bad("the body must be a JSON object", None, "invalid_json")
        return body

    def submit(job_cls, *args, **kw):
        loop, q = asyncio.get_running_loop(), asyncio.Queue()
        job = job_cls(*args, sink=lambda ev: loop.call_soon_threadsafe(q.put_nowait, ev), **kw)
        job.queue, job.deadline = q, time.monotonic() + limits.request_timeout
        try:
            batcher.submit(job)
        except QueueFull as e:
            raise APIError(429, f"the server is busy ({batcher.max_queue} requests queued); retry in "
                           f"{e.retry_after} s", "rate_limit_error", None, "queue_full",
                           {"Retry-After": str(e.retry_after)}) from None
        except RuntimeError as e:
            raise APIError(503, str(e), "server_error", None, "shutting_down") from None
        return job

    async def next_event(job) -> tuple:
        try:
            ev = await asyncio.wait_for(job.queue.get(), max(0.0, job.deadline - time.monotonic()))
        except asyncio.TimeoutError:
            batcher.cancel(job)
            raise APIError(504, f"the request took longer than {limits.request_timeout:g} s", "timeout_error",
                           None, "timeout") from None
        if ev[0] == "error":
            raise to_api_error(ev[1])
        return ev

    async def wait_done(job):
        """The payload of a non-streamed job's final event (the job is dropped however this ends)."""
        try:
            while (ev := await next_event(job))[0] != "done":
                pass
        finally:
            batcher.cancel(job)
        return ev[1]

    def sse(obj, event: str | None = None) -> str:
        head = f"event: {event}\n" if event else ""
        return f"{head}data: {json.dumps(obj, separators=(',', ':'))}\n\n"

    async def sse_guard(job, gen):
        """Runs an SSE generator; errors become an OpenAI error event; the job is cancelled on exit
        (a client that disconnects closes the generator)."""
        try:
            async for piece in gen:
                yield piece
        except APIError as e:
            yield sse(e.body())
            yield "data: [DONE]\n\n"
        finally:
            batcher.cancel(job)

    # ------------------------------------------------------------------ routes
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health():
        cfg = pipe.config
        return {"status": "ok" if batcher.alive else "starting", "model": model_id, "auth": api_key is not None,
                "image_size": cfg.vq.image_size, "context": pipe.engine.context, "batcher": batcher.stats(),
                "limits": {"max_n": limits.max_n, "max_tokens": limits.max_tokens,
                           "max_image_pixels": limits.max_image_pixels, "max_body_bytes": limits.max_body_bytes,
                           "max_partial_images": limits.max_partial_images}}

    def model_card():
        return {"id": model_id, "object": "model", "created": created, "owned_by": "zuoyou"}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        check_key(request)
        if name != model_id:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_id!r}",
                           "not_found_error", "model", "model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_json(request)
        spec = await asyncio.to_thread(parse_chat, body, pipe, limits)
        job = submit(ChatJob, spec.request, prompt_tokens=spec.prompt_tokens)
        cid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def usage(done):
            return {"prompt_tokens": spec.prompt_tokens, "completion_tokens": done["completion_tokens"],
                    "total_tokens": spec.prompt_tokens + done["completion_tokens"]}

        if not spec.stream:
            done = await wait_done(job)
            return {"id": cid, "object": "chat.completion", "created": now, "model": model_id,
                    "system_fingerprint": None, "usage": usage(done),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": done["text"]},
                                 "logprobs": None, "finish_reason": done["finish_reason"]}]}

        def chunk(delta, finish=None):
            return {"id": cid, "object": "chat.completion.chunk", "created": now, "model": model_id,
                    "system_fingerprint": None,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        async def events():
            yield sse(chunk({"role": "assistant", "content": ""}))
            while True:
                ev = await next_event(job)
                if ev[0] == "delta":
                    yield sse(chunk({"content": ev[1]}))
                elif ev[0] == "done":
                    yield sse(chunk({}, ev[1]["finish_reason"]))
                    if spec.include_usage:
                        yield sse(dict(chunk({}), choices=[], usage=usage(ev[1])))
                    yield "data: [DONE]\n\n"
                    return

        return StreamingResponse(sse_guard(job, events()), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/images/generations")
    async def images(request: Request):
        body = await read_json(request)
        spec = await asyncio.to_thread(parse_images, body, pipe, limits)
        grid = pipe.config.vq.grid
        every = max(1, -(-grid // (spec.partial_images + 1))) if spec.partial_images else 0
        job = submit(ImageJob, spec.request, preview_every=every)
        now = int(time.time())
        n_tok = pipe.config.vq.num_tokens * spec.request.n
        use = {"input_tokens": spec.prompt_tokens, "output_tokens": n_tok, "total_tokens": spec.prompt_tokens + n_tok,
               "input_tokens_details": {"text_tokens": spec.prompt_tokens, "image_tokens": 0}}

        if not spec.stream:
            images = await wait_done(job)
            pngs = await asyncio.to_thread(lambda: [b64png(im) for im in images])
            return {"created": now, "data": [{"b64_json": p, "revised_prompt": None} for p in pngs],
                    "output_format": "png", "size": spec.size, "usage": use}

        common = {"created_at": now, "size": spec.size, "output_format": "png", "quality": "auto",
                  "background": "opaque"}

        async def events():
            count = 0
            while True:
                ev = await next_event(job)
                if ev[0] == "preview":
                    pngs = await asyncio.to_thread(lambda: [b64png(im) for im in ev[2]])
                    for i, p in enumerate(pngs):
                        yield sse(dict(common, type="image_generation.partial_image", b64_json=p,
                                       partial_image_index=count, index=i, rows_done=ev[1], rows_total=grid),
                                  "image_generation.partial_image")
                    count += 1
                elif ev[0] == "done":
                    pngs = await asyncio.to_thread(lambda: [b64png(im) for im in ev[1]])
                    for i, p in enumerate(pngs):
                        yield sse(dict(common, type="image_generation.completed", b64_json=p, index=i, usage=use),
                                  "image_generation.completed")
                    yield "data: [DONE]\n\n"
                    return

        return StreamingResponse(sse_guard(job, events()), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def b64png(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def to_api_error(e: BaseException) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, InputError):
        return bad(str(e))
    return APIError(500, f"the model failed: {type(e).__name__}: {e}", "server_error", None, "model_error")
