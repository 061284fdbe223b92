"""The one thread that runs the model, and the bounded queue that feeds it.

Why one thread: the engine keeps its KV cache inside the model (``setup_cache``/``clear_cache``),
so two decodes at once would overwrite each other; torch also gains nothing from Python-level
parallelism here. The asyncio handlers never touch the model: they ``submit`` a job and await the
events it emits (``loop.call_soon_threadsafe`` into an ``asyncio.Queue``).

How requests are merged (both kinds use the same policy):

* The queue is FIFO. When the worker is free it looks at the oldest job (the *head*) and waits up
  to ``window`` seconds (default 20 ms) for more jobs of the same kind, unless the queue already
  holds a full batch.
* It then takes, in arrival order, every queued job of the head's kind that fits the budget:
  ``max_image_rows`` images (sum of ``n`` x ``best_of``) for drawing, ``max_chat_rows`` conversations for chat.
  The head is always taken, so nothing starves: jobs of the other kind stay queued in order and
  the oldest of them is the head of the next round.
* Images: one ``Engine.generate_images`` call for the whole batch (prompts are left-padded, so a
  request's result does not depend on its neighbours). The decode is a fixed number of steps, so
  merging is nearly free throughput.
* Chat: one ``Engine.stream_tokens`` call; each step yields one token per conversation, which is
  decoded and sent to its own client at once. A batch runs until its longest answer ends; new
  chats wait for the next batch (the engine cannot add rows to a running decode). With the default
  ``max_tokens`` bound this is a fair trade: a merged batch of B answers costs little more than one.

Failures: an ``InputError`` raised by a merged batch is retried job by job, so one bad request
cannot fail its neighbours. A job whose client went away is cancelled: it is dropped from the queue,
and a running batch stops early once all its jobs are cancelled.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import deque
from typing import Callable

from ..engine import Engine, ImageRequest, TextRequest
from ..errors import InputError
from ..processor import TextStream

_ids = itertools.count(1)


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class _Abort(Exception):
    """Raised from the preview callback to stop a batch whose clients are all gone."""


class Job:
    """One request. ``sink(event)`` must be thread-safe; events are tuples:
    ``("delta", text)``, ``("preview", rows_done, images)``, ``("done", result)``, ``("error", exc)``."""

    kind = ""

    def __init__(self, request, sink: Callable[[tuple], None], rows: int = 1):
        self.request, self.sink, self.rows = request, sink, rows
        self.id = next(_ids)
        self.cancelled = self.finished = False
        self.enqueued = time.monotonic()

    def emit(self, *event) -> None:
        if self.cancelled:
            return
        self.finished = self.finished or event[0] in ("done", "error")
        try:
            self.sink(event)
        except RuntimeError:  # the handler's event loop is closed: nobody listens any more
            self.cancelled = True


class ImageJob(Job):
    kind = "image"

    def __init__(self, request: ImageRequest, sink, preview_every: int = 0):
        super().__init__(request, sink, rows=request.n * request.best_of)  # best_of: candidates drawn per image
        self.preview_every = preview_every  # code rows between previews; 0 = none
        self.next_preview = preview_every


class ChatJob(Job):
    kind = "chat"

    def __init__(self, request: TextRequest, sink, prompt_tokens: int = 0):
        super().__init__(request, sink, rows=1)
        self.prompt_tokens = prompt_tokens


class Batcher:
    def __init__(self, engine: Engine, max_queue: int = 64, window: float = 0.02, max_image_rows: int = 16,
                 max_chat_rows: int = 8):
        self.engine = engine
        self.max_queue, self.window = max_queue, window
        self.budget = {"image": max_image_rows, "chat": max_chat_rows}
        self._queue: deque[Job] = deque()
        self._cv = threading.Condition()
        self._stop = self._paused = False
        self._thread: threading.Thread | None = None
        self._ema = 1.0  # seconds per batch, for Retry-After
        self.running = 0  # jobs in the batch being run
        self.counters = dict(image_batches=0, image_requests=0, images=0, chat_batches=0, chat_requests=0,
                             completion_tokens=0, max_batch_requests=0, rejected=0, cancelled=0, errors=0)

    # ------------------------------------------------------------------ control
    def start(self) -> "Batcher":
        if self._thread is None or not self._thread.is_alive():
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="zuoyou-model", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            for job in self._queue:
                job.emit("error", RuntimeError("the server is shutting down"))
            self._queue.clear()
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def pause(self) -> None:
        """Stop taking new batches (the running one finishes); queued jobs wait. For maintenance/tests."""
        with self._cv:
            self._paused = True

    def resume(self) -> None:
        with self._cv:
            self._paused = False
            self._cv.notify_all()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def queued(self) -> int:
        with self._cv:
            return len(self._queue)

    def stats(self) -> dict:
        with self._cv:
            return dict(self.counters, queued=len(self._queue), running=self.running, max_queue=self.max_queue,
                        paused=self._paused, worker_alive=self.alive, batch_seconds_avg=round(self._ema, 4))

    # ------------------------------------------------------------------ submit / cancel
    def submit(self, job: Job) -> Job:
        with self._cv:
            if self._stop:
                raise RuntimeError("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                self.counters["rejected"] += 1
                ahead = (len(self._queue) + self.running) / max(1, self.budget[job.kind])
                raise QueueFull(max(1, math.ceil(self._ema * ahead)))
            self._queue.append(job)
            self._cv.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        if job.cancelled or job.finished:
            return
        job.cancelled = True
        with self._cv:
            self.counters["cancelled"] += 1
            try:
                self._queue.remove(job)
            except ValueError:
                pass

    # ------------------------------------------------------------------ the worker
    def _full(self, kind: str) -> bool:
        return sum(j.rows for j in self._queue if j.kind == kind) >= self.budget[kind]

    def _take(self) -> list[Job] | None:
        with self._cv:
            while True:
                while not self._stop and (self._paused or not self._queue):
                    self._cv.wait()
                if self._stop:
                    return None
                kind = self._queue[0].kind
                end = time.monotonic() + self.window
                while not self._stop and not self._paused and self._queue and not self._full(kind):
                    left = end - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                if self._stop or self._paused or not self._queue:
                    continue
                head = self._queue[0]
                chosen, rows = [], 0
                for j in list(self._queue):
                    if j.kind != head.kind or (chosen and rows + j.rows > self.budget[head.kind]):
                        continue
                    chosen.append(j)
                    rows += j.rows
                for j in chosen:
                    self._queue.remove(j)
                self.running = len(chosen)
                return chosen

    def _loop(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            t0 = time.monotonic()
            try:
                (self._run_images if jobs[0].kind == "image" else self._run_chat)(jobs)
            except BaseException as e:  # never let the worker die: report and go on
                self.counters["errors"] += 1
                for j in jobs:
                    j.emit("error", e)
            finally:
                self._ema = 0.8 * self._ema + 0.2 * (time.monotonic() - t0)
                with self._cv:
                    self.running = 0

    def _count(self, kind: str, jobs: list[Job]) -> None:
        c = self.counters
        c[f"{kind}_batches"] += 1
        c[f"{kind}_requests"] += len(jobs)
        c["max_batch_requests"] = max(c["max_batch_requests"], len(jobs))

    def _retry_alone(self, jobs: list[Job], run, e: InputError) -> None:
        if len(jobs) == 1:
            jobs[0].emit("error", e)
            return
        for j in jobs:
            run([j])

    # ------------------------------------------------------------------ drawing
    def _run_images(self, jobs: list[ImageJob]) -> None:
        jobs = [j for j in jobs if not j.cancelled]
        if not jobs:
            return
        groups, start = [], 0
        for j in jobs:
            groups.append(slice(start, start + j.request.n))  # previews show each image's first candidate
            start += j.request.n
        every = min((j.preview_every for j in jobs if j.preview_every), default=0)

        def preview(rows_done, images):
            if all(j.cancelled for j in jobs):
                raise _Abort
            for j, sl in zip(jobs, groups):
                if j.preview_every and rows_done >= j.next_preview:
                    j.next_preview = rows_done + j.preview_every
                    j.emit("preview", rows_done, images[sl])

        try:
            out = self.engine.generate_images([j.request for j in jobs], preview=preview if every else None,
                                              preview_every=every)
        except _Abort:
            self.engine.model.language_model.clear_cache()
            return
        except InputError as e:
            self.engine.model.language_model.clear_cache()
            return self._retry_alone(jobs, self._run_images, e)
        self._count("image", jobs)
        self.counters["images"] += start
        for j, images in zip(jobs, out):
            j.emit("done", images)

    # ------------------------------------------------------------------ chat
    def _run_chat(self, jobs: list[ChatJob]) -> None:
        jobs = [j for j in jobs if not j.cancelled]
        if not jobs:
            return
        eng = self.engine
        streams = [TextStream(eng.processor) for _ in jobs]
        steps = eng.stream_tokens([j.request for j in jobs])
        try:
            try:
                first = next(steps, None)
            except InputError as e:
                return self._retry_alone(jobs, self._run_chat, e)
            self._count("chat", jobs)
            step = first
            while step is not None:
                for b, t in enumerate(step):
                    if t is None or jobs[b].cancelled:
                        continue
                    if piece := streams[b].push(t):
                        jobs[b].emit("delta", piece)
                if all(j.cancelled for j in jobs):
                    return
                step = next(steps, None)
        finally:
            steps.close()
        for j, stream in zip(jobs, streams):
            if piece := stream.flush():  # a trailing incomplete UTF-8 sequence: send what there is
                j.emit("delta", piece)
            n = len(stream.ids)
            limit = min(j.request.max_new_tokens, eng.context - j.prompt_tokens)
            self.counters["completion_tokens"] += n
            j.emit("done", {"text": stream.text, "completion_tokens": n,
                            "finish_reason": "length" if n >= limit else "stop"})
