"""The one place where Janus generates: text -> image and (image, text) -> text.

The CLI, the Python API, the server and the evaluations all call these two loops. Speed lives
here, around a plain model (gpt-fast style): a preallocated static KV cache written at
``input_pos``, a precomputed boolean mask sliced per step, CFG as the two halves of one batch,
the prompt prefilled once per request and the cache expanded to its ``n`` images.

Several requests can share one decode batch (the server merges concurrent calls): prompts of
different lengths are left-padded, padding keys masked, and RoPE positions shifted per row, so a
request's result does not depend on its neighbours.

``best_of``: a request may draw several candidates per image and keep the ones the model's own
answers about them rate best (``Engine.checker`` gives the questions; ``zuoyou.selfcheck`` the answers'
log-probabilities, the image prefilled once per candidate and shared by its questions).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import torch

from . import selfcheck
from .errors import ConfigError, InputError
from .kvcache import KV_CACHES, cache_class
from .memory import release_freed_memory
from .models.janus import Janus
from .processor import Message, Processor, TextStream, to_pil
from .sampling import check_sampling, guide, make_generator, sample


@dataclass
class ImageRequest:
    prompt: str
    n: int = 1
    cfg: float = 5.0
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    best_of: int = 1  # draw n * best_of and keep the n that pass the model's own check best (``Engine.checker``)
    redraws: int = 0  # up to this many more rounds of best_of candidates per kept image that fails the check


@dataclass
class TextRequest:
    messages: list[Message]
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    system: str | None = None


@dataclass
class _Batch:
    """Left-padded prompt rows with their attention mask and RoPE positions."""

    ids: torch.Tensor  # (B, L)
    valid: torch.Tensor  # (B, L) bool, False on left padding
    positions: torch.Tensor  # (B, L) RoPE positions, 0 at each row's first real token
    image_mask: torch.Tensor | None = None  # (B, L) bool, understanding image slots
    pixels: torch.Tensor | None = None  # (N, 3, S, S)


DECODE_PIXELS = 384 * 384  # per VQ-decoder call (see ``Engine.decode_chunk``)
MAX_BEST_OF = 16
MAX_REDRAWS = 8
# a candidate passes the self-check when the model finds every expected answer more likely than not
PASS_LOGP = -0.6931471805599453  # log(1/2)


def _round_seed(seed: int | None, rnd: int) -> int | None:
    """The seed of redraw round ``rnd`` of a request seeded ``seed``: reproducible, and far from the
    neighbouring seeds callers give consecutive requests (None stays unseeded)."""
    return None if seed is None else (seed + rnd * 0x9E3779B97F4A7C15) % 2**63


def _best(candidates: list, n: int) -> list:
    """The ``n`` best of (passes, score, image) candidates, best first: passing before failing, then by score
    (ties keep the earlier candidate)."""
    return sorted(candidates, key=lambda c: c[:2], reverse=True)[:n]


class Engine:
    def __init__(self, model: Janus, processor: Processor, device: torch.device, dtype: torch.dtype,
                 context: int | None = None, compile: bool | str = False, kv_cache: str = "model",
                 kernels: bool = False):
        self.model, self.processor, self.device, self.dtype = model, processor, device, dtype
        # how the KV cache stores keys and values: "model" in the compute dtype, "int8" ``zuoyou.kvcache``;
        # ``kernels``: zuoyou's CPU kernels are in use (quantised modes), so one-token attention runs on them too
        if kv_cache not in KV_CACHES:
            raise ConfigError(f"kv_cache={kv_cache!r}: use one of {', '.join(KV_CACHES)}")
        self._cache = cache_class(kv_cache, kernels)
        self.config = model.config
        self.context = context or self.config.lm.max_position_embeddings
        # prompt -> [(question, answer), ...] that a correct drawing answers so (e.g. ``zuoyou.shapes.
        # self_checks``, named by the model folder's generation defaults); what ``best_of`` ranks by
        self.checker: Callable[[str], list] | None = None  # (question, answer) pairs and FollowUps
        # drawing rounds run so far (batches of images decoded; ``best_of`` redraws add rounds): for
        # benchmarks and logs, which read how often the self-check sent images back
        self.rounds_drawn = 0
        # the one-token decode step; ``compile=True`` hands it to torch.compile (the first request of a
        # new batch size / length recompiles, after which torch marks the changing sizes dynamic);
        # "max-autotune" also freezes the weights as constants, which lets inductor pick its packed
        # (AMX / AVX-512) GEMM templates, int8 weights included, specialised to each batch shape
        # (static shapes: every new shape compiles anew, which takes minutes on a large model)
        if compile not in (False, True, "default", "max-autotune"):
            raise ConfigError(f"compile={compile!r}: use False, True or 'max-autotune'")
        tuned = compile == "max-autotune"
        # each decode step attends over the slots written so far only (about half the cache reads of an
        # image, on average); a statically shaped compiled step keeps the full-length mask instead
        self._whole_cache = tuned
        self._compiled = None if not compile else torch.compile(
            model.hidden, dynamic=False if tuned else None,
            options={"max_autotune": True, "freezing": True} if tuned else None)

    # ----------------------------------------------------------------------------------- helpers
    def _pad(self, rows: list[list[int]]) -> _Batch:
        L = max(len(r) for r in rows)
        ids = torch.full((len(rows), L), self.processor.pad, dtype=torch.long)
        valid = torch.zeros(len(rows), L, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, L - len(r):] = torch.tensor(r)
            valid[i, L - len(r):] = True
        positions = (valid.cumsum(1) - 1).clamp(min=0)
        return _Batch(ids.to(self.device), valid.to(self.device), positions.to(self.device))

    def _mask(self, valid: torch.Tensor, S: int) -> torch.Tensor:
        """(B, 1, S, S) bool: query slot q may see key slot k iff k <= q and k is not padding."""
        B, L = valid.shape
        keys = torch.ones(B, S, dtype=torch.bool, device=self.device)
        keys[:, :L] = valid
        causal = torch.ones(S, S, dtype=torch.bool, device=self.device).tril()
        mask = causal[None] & keys[:, None, :]  # (B, S, S)
        # a padded query row would see no key at all (NaN softmax): let it see itself
        mask |= torch.eye(S, dtype=torch.bool, device=self.device)[None]
        return mask[:, None]

    def _prefill(self, x: torch.Tensor, batch: _Batch, S: int, mask: torch.Tensor) -> torch.Tensor:
        lm = self.model.language_model
        lm.setup_cache(x.shape[0], S, dtype=self.dtype, device=self.device, cache=self._cache)
        L = x.shape[1]
        input_pos = torch.arange(L, device=self.device)
        return self.model.hidden(x, input_pos, mask[:, :, :L, :L], batch.positions)  # (B, L, D)

    def _step_mask(self, mask: torch.Tensor, slot: int) -> torch.Tensor:
        """(B, 1, 1, S') mask row of the query at cache ``slot``: keys up to the slot (or the whole cache)."""
        return mask[:, :, slot:slot + 1] if self._whole_cache else mask[:, :, slot:slot + 1, :slot + 1]

    def _expand_cache(self, index: torch.Tensor) -> None:
        """Replace every layer's cache rows by ``rows[index]`` (prefill once, decode n times)."""
        rows = self.model.language_model.caches()[0].rows
        if index.numel() == rows and torch.equal(index.cpu(), torch.arange(rows)):
            return  # one image per request: the rows are already in place (a copy would double the cache)
        for cache in self.model.language_model.caches():
            cache.select_rows(index)

    # ----------------------------------------------------------------------------------- text -> image
    def generate_images(self, requests: list[ImageRequest], progress: bool = False,
                        preview: Callable[[int, list], None] | None = None, preview_every: int = 0):
        """Returns one list of PIL images per request.

        ``preview(rows_done, images)`` is called every ``preview_every`` code rows with the images
        decoded so far (rows not yet drawn are grey), for progressive display.

        A request with ``best_of=K > 1`` whose prompt the ``checker`` has questions for is drawn ``n * K``
        times in the same batch, and the n images kept are the n candidates the model's own answers about them
        rate best (``check_scores``), best first: those that pass (every expected answer more likely than not)
        before those that do not, then by the highest sum of the answers' log-probabilities. The candidates
        are one pool, not n runs of K: a prompt whose candidates pass half the time keeps n passing images far
        more often than if each image had only its own K. ``redraws=R``: while f of the n kept
        images fail, f * K more candidates are drawn, up to R more rounds, and the n best of all the request's
        candidates are kept (hard prompts cost more; easy ones nothing). Previews show candidates 0, K, 2K, ...
        of the first round.
        """
        for r in requests:
            self._check_image_request(r)
        if all(r.best_of == 1 for r in requests):
            return self._draw(requests, progress, preview, preview_every)
        if self.checker is None:
            raise InputError("best_of > 1 needs a self-check, and this model names none (its "
                             "generation_defaults.json has no \"self_check\")")
        checks = [self.checker(r.prompt) if r.best_of > 1 else [] for r in requests]
        K = [r.best_of if c else 1 for r, c in zip(requests, checks)]
        drawn = [replace(r, n=r.n * k) for r, k in zip(requests, K)]
        first, start = [], 0  # candidates 0, K, 2K, ... of each request, for previews
        for r, k in zip(requests, K):
            first += range(start, start + r.n * k, k)
            start += r.n * k
        shown = (lambda rows, images: preview(rows, [images[i] for i in first])) if preview else None
        out = self._draw(drawn, progress, shown, preview_every)
        # per request: (passes, score, image) of the n best candidates so far, best first
        kept = [_best(self._ranked(imgs, c), r.n) if k > 1 else [(True, 0.0, im) for im in imgs]
                for imgs, c, k, r in zip(out, checks, K, requests)]
        for rnd in range(1, max(r.redraws for r in requests) + 1):
            failed = [sum(not ok for ok, _, _ in kept[i]) if K[i] > 1 and rnd <= r.redraws else 0
                      for i, r in enumerate(requests)]
            redo = [i for i, f in enumerate(failed) if f]
            if not redo:
                break
            more = self._draw([replace(requests[i], n=failed[i] * K[i], seed=_round_seed(requests[i].seed, rnd))
                               for i in redo], progress, None, 0)
            for i, imgs in zip(redo, more):
                kept[i] = _best(kept[i] + self._ranked(imgs, checks[i]), requests[i].n)
        return [[im for _, _, im in k] for k in kept]

    def _ranked(self, images: list, checks: list, chunk: int = 16) -> list:
        """(passes, score, image) of each candidate: passes when every expected answer has P >= 1/2; the score
        is the sum of the answers' log-probabilities (see ``generate_images``)."""
        logp = torch.cat([self._check_logp(images[i:i + chunk], checks) for i in range(0, len(images), chunk)])
        ok, score = (logp >= PASS_LOGP).all(-1), logp.sum(-1)  # (N,) each
        return [(bool(o), float(s), im) for o, s, im in zip(ok.tolist(), score.tolist(), images)]

    def _check_logp(self, images: list, checks: list) -> torch.Tensor:
        return selfcheck.check_logp(self, images, checks)

    def check_scores(self, images: list, checks: list) -> torch.Tensor:
        """(N, Q) log P(answer_q | image_n, question_q) (``zuoyou.selfcheck.check_scores``)."""
        return selfcheck.check_scores(self, images, checks)

    @torch.inference_mode()
    def _draw(self, requests: list[ImageRequest], progress: bool, preview, preview_every: int):
        self.rounds_drawn += 1
        vq = self.config.vq
        T, P = vq.num_tokens, len(requests)
        prompts = [self.processor.generation_ids(r.prompt) for r in requests]
        if max(len(p) for p in prompts) + T > self.context:
            raise InputError(f"prompt too long: {max(len(p) for p in prompts)} tokens + {T} image tokens "
                             f"exceed the model context of {self.context}")
        # unique rows: P conditional then P unconditional prompts
        batch = self._pad(prompts + [self.processor.uncond_ids(p) for p in prompts])
        L = batch.ids.shape[1]
        S = L + T
        mask = self._mask(batch.valid, S)
        h = self._prefill(self.model.embed_text(batch.ids).to(self.dtype), batch, S, mask)

        # expand: request i's cond row -> n_i rows (first half), its uncond row -> n_i rows (second half)
        owner = torch.tensor([i for i, r in enumerate(requests) for _ in range(r.n)], device=self.device)
        index = torch.cat([owner, owner + P])
        self._expand_cache(index)
        mask, h = mask.index_select(0, index), h[:, -1].index_select(0, index)  # (2R, D)
        row_pos = batch.positions[:, -1].index_select(0, index)[:, None]  # (2R, 1) last prompt position
        R = owner.numel()
        cfg = torch.tensor([r.cfg for r in requests for _ in range(r.n)], device=self.device)[:, None]
        gens = [make_generator(r.seed, self.device) for r in requests]
        groups, start = [], 0
        for r in requests:
            groups.append(slice(start, start + r.n))
            start += r.n
        codes = torch.zeros(R, T, dtype=torch.long, device=self.device)
        # every step's cache slot and RoPE positions, made once (no per-step tensor allocations)
        slots = torch.arange(L, S, device=self.device)  # (T,)
        step_pos = row_pos + 1 + torch.arange(T, device=self.device)  # (2R, T)
        step = self._compiled or self.model.hidden
        steps = range(T)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="drawing", unit="tok", leave=False)
        for i in steps:
            logits = self.model.image_logits(h).float()  # (2R, K)
            logits = guide(logits, cfg)  # (R, K)
            for r, g, sl in zip(requests, gens, groups):
                codes[sl, i] = sample(logits[sl], r.temperature, r.top_k, r.top_p, g)
            if i == T - 1:
                break
            nxt = codes[:, i].repeat(2)  # same code for the cond and uncond halves
            x = self.model.embed_image_codes(nxt)[:, None].to(self.dtype)  # (2R, 1, D)
            h = step(x, slots[i:i + 1], self._step_mask(mask, L + i), step_pos[:, i:i + 1])[:, -1]
            if preview and preview_every and (i + 1) % (vq.grid * preview_every) == 0:
                preview((i + 1) // vq.grid, self._decode(codes, upto=i + 1))
        self.model.language_model.clear_cache()
        release_freed_memory()  # glibc would keep the freed cache: the VQ decoder's memory would come on top
        images = self._decode(codes)
        return [images[sl] for sl in groups]

    def _decode(self, codes: torch.Tensor, upto: int | None = None):
        if upto is not None:  # fill undrawn rows with the code that decodes closest to grey
            codes = codes.clone()
            codes[:, upto:] = codes[:, :1]
        return to_pil(self.model.decode_images(codes, chunk=self.decode_chunk))

    @property
    def decode_chunk(self) -> int:
        """Images per VQ-decoder call: about 384 x 384 pixels' worth. The decoder's activations dwarf
        a small model's weights; at 384 px one image at a time was also faster on CPU (Janus-Pro-1B VQ,
        4 images, bf16, 2 threads: 9.6 s and +232 MB peak one by one, 11.3 s and +904 MB all four)."""
        return max(1, DECODE_PIXELS // self.model.config.vq.image_size ** 2)

    def _check_image_request(self, r: ImageRequest):
        if not isinstance(r.prompt, str) or not r.prompt.strip():
            raise InputError("the prompt is empty")
        if not isinstance(r.n, int) or r.n < 1:
            raise InputError(f"n={r.n}: must be an integer >= 1")
        if r.cfg is None or r.cfg < 0:
            raise InputError(f"cfg={r.cfg}: must be >= 0")
        check_sampling(r.temperature, r.top_k, r.top_p)
        if not isinstance(r.best_of, int) or not 1 <= r.best_of <= MAX_BEST_OF:
            raise InputError(f"best_of={r.best_of}: must be an integer from 1 to {MAX_BEST_OF}")
        if not isinstance(r.redraws, int) or not 0 <= r.redraws <= MAX_REDRAWS:
            raise InputError(f"redraws={r.redraws}: must be an integer from 0 to {MAX_REDRAWS}")

    # ----------------------------------------------------------------------------------- understanding
    @torch.inference_mode()
    def stream_tokens(self, requests: list[TextRequest]) -> Iterator[list[int | None]]:
        """Yields, per decode step, one new token id per request (None once it has stopped)."""
        rows, pixels = [], []
        for r in requests:
            check_sampling(r.temperature, r.top_k, r.top_p)
            if r.max_new_tokens is None or r.max_new_tokens < 1:
                raise InputError(f"max_new_tokens={r.max_new_tokens}: must be >= 1")
            ids, px = self.processor.understanding_inputs(r.messages, r.system)
            if len(ids) >= self.context:
                raise InputError(f"prompt too long: {len(ids)} tokens for a context of {self.context}")
            rows.append(ids)
            pixels.append(px)
        batch = self._pad(rows)
        B, L = batch.ids.shape
        new = [min(r.max_new_tokens, self.context - len(ids)) for r, ids in zip(requests, rows)]
        S = L + max(new)
        image_mask = batch.ids == self.processor.image_id
        image_mask &= batch.valid
        px = torch.cat(pixels).to(self.device, self.dtype)
        x = self.model.prepare_inputs_embeds(batch.ids, px, image_mask).to(self.dtype)
        mask = self._mask(batch.valid, S)
        h = self._prefill(x, batch, S, mask)[:, -1]  # (B, D)
        gens = [make_generator(r.seed, self.device) for r in requests]
        done = [False] * B
        row_pos = batch.positions[:, -1:]
        slots = torch.arange(L, S, device=self.device)
        step_pos = row_pos + 1 + torch.arange(S - L, device=self.device)  # (B, max new)
        step = self._compiled or self.model.hidden
        try:
            for i in range(max(new)):
                logits = self.model.text_logits(h).float()  # (B, V)
                toks = [int(sample(logits[b:b + 1], r.temperature, r.top_k, r.top_p, g)) for b, (r, g)
                        in enumerate(zip(requests, gens))]
                out = []
                for b, t in enumerate(toks):
                    if done[b]:
                        out.append(None)
                        continue
                    if t == self.processor.eos or i + 1 >= new[b]:
                        done[b] = True
                    out.append(None if t == self.processor.eos else t)
                yield out
                if all(done):
                    break
                x = self.model.embed_text(torch.tensor(toks, device=self.device)[:, None]).to(self.dtype)
                h = step(x, slots[i:i + 1], self._step_mask(mask, L + i), step_pos[:, i:i + 1])[:, -1]
        finally:
            self.model.language_model.clear_cache()

    @torch.inference_mode()
    def answer_logprobs(self, requests: list[TextRequest], answers: list[str]) -> list[float]:
        """log P(`` {answer}<eos>`` | request), teacher-forced: the tokens training puts after the
        template's ``{Assistant}:``. One forward pass over prompt + answer, no cache."""
        if len(answers) != len(requests):
            raise InputError(f"{len(requests)} requests but {len(answers)} answers")
        rows, pixels, spans = [], [], []
        for r, a in zip(requests, answers):
            ids, px = self.processor.understanding_inputs(r.messages, r.system)
            ans = self.processor.answer_ids(a)
            if len(ids) + len(ans) > self.context:
                raise InputError(f"prompt and answer too long: {len(ids) + len(ans)} tokens for a context "
                                 f"of {self.context}")
            rows.append(ids + ans)
            pixels.append(px)
            spans.append(ans)
        batch = self._pad(rows)
        B, L = batch.ids.shape
        image_mask = (batch.ids == self.processor.image_id) & batch.valid
        x = self.model.prepare_inputs_embeds(batch.ids, torch.cat(pixels).to(self.device, self.dtype),
                                             image_mask).to(self.dtype)
        h = self.model.hidden(x, None, self._mask(batch.valid, L), batch.positions)  # (B, L, D)
        out = []
        for b, ans in enumerate(spans):  # left padding: each answer ends its row
            A = len(ans)
            logp = self.model.text_logits(h[b, L - A - 1:L - 1]).float().log_softmax(-1)  # (A, V)
            out.append(logp[torch.arange(A), torch.tensor(ans, device=self.device)].sum().item())
        return out

    def generate_text(self, requests: list[TextRequest]) -> list[str]:
        streams = [TextStream(self.processor) for _ in requests]
        for step in self.stream_tokens(requests):
            for stream, t in zip(streams, step):
                if t is not None:
                    stream.ids.append(t)
        return [s.text for s in streams]

    def stream_text(self, request: TextRequest) -> Iterator[str]:
        """Text pieces of one answer as they are decoded."""
        stream = TextStream(self.processor)
        for step in self.stream_tokens([request]):
            if step[0] is not None and (piece := stream.push(step[0])):
                yield piece
        if piece := stream.flush():
            yield piece
