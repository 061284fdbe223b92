"""The self-check's scoring: how likely the model finds the answers a correct drawing gives (``Engine._ranked``
ranks ``best_of`` candidates by it; the questions come from ``Engine.checker``, e.g. ``zuoyou.shapes.checks``).

``check_scores`` prefills each image with the part its questions share (the image and the template before the
question) once, then runs all its questions' remaining tokens in one row after it, each question seeing the
prefix and itself only. ``check_logp`` also resolves ``FollowUp`` checks, whose
question depends on the drawing: the model's pick among an ``ask`` question's options is read in the same pass
that scores the fixed checks, and the question it leads to is asked in a second pass over the same prefix.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .errors import ConfigError, InputError
from .processor import Message

# what a follow-up check scores when the model's own picks make no question of it: a failure, ranked like an
# answer of probability 1e-6 so that the candidate's other checks still rank it
UNASKABLE_LOGP = -13.815510557964274  # log(1e-6)
FOLLOW_UP_SLOTS = 32  # cache slots kept for a follow-up question longer than the first ones (else prefilled anew)


@torch.inference_mode()
def check_logp(engine, images: list, checks: list) -> torch.Tensor:
    """(N, Q) log-probabilities of the checker's checks, as ``check_scores`` gives them, with its
    ``FollowUp`` ones (questions that depend on the drawing: ``zuoyou.shapes.checks.FollowUp``) resolved per
    image: the same pass that scores the fixed checks reads the model's pick among each ``ask`` question's
    ``options`` (by the option's first token at the answer), and a second pass over the same prefilled
    image asks ``then(picks)``; a follow-up whose picks make no question scores ``UNASKABLE_LOGP``."""
    fixed = [c for c in checks if isinstance(c, tuple)]
    follow = [c for c in checks if not isinstance(c, tuple)]
    if not follow:
        return engine.check_scores(images, fixed)
    asks = [(q, opts) for f in follow for q, opts in zip(f.ask, f.options)]
    firsts = [[engine.processor.answer_ids(o)[0] for o in opts] for _, opts in asks]  # per ask question
    for (q, opts), f in zip(asks, firsts):  # an option is told by its first token: two that share it cannot be
        if len(set(f)) < len(f):  # told apart
            raise ConfigError(f"follow-up check {q!r}: its options {opts} do not all start with different tokens")
    with prefilled(engine, images, fixed + [(q, opts[0]) for q, opts in asks]) as score:
        logp, nxt = score()
        out = [logp[:, :len(fixed)]]
        # per ask question: (N,) index of the option whose first token is likeliest
        picks = [nxt[:, len(fixed) + j, f].argmax(-1) for j, f in enumerate(firsts)]
        j = 0
        for f in follow:
            mine = range(j, j + len(f.ask))  # this follow-up's ask questions
            j += len(f.ask)
            pairs = [f.then(tuple(asks[a][1][int(picks[a][n])] for a in mine)) for n in range(len(images))]
            col = torch.full((len(images), 1), UNASKABLE_LOGP)
            asked = [n for n, pq in enumerate(pairs) if pq is not None]
            if asked:
                col[asked] = score([[pairs[n]] for n in asked], asked)[0]
            out.append(col)
    return torch.cat(out, 1)


@torch.inference_mode()
def check_scores(engine, images: list, checks: list) -> torch.Tensor:
    """(N, Q) log P(answer_q | image_n, question_q), as ``answer_logprobs`` gives them, with the part
    the questions share (the image and the template before the question) run once per image, and its Q
    questions' remaining tokens packed into one row after it (about 4x less work for the bundled model than a
    row per question). ``checks``: Q ``(question, answer)`` pairs for every image, or a list
    of Q pairs per image."""
    with prefilled(engine, images, checks) as score:
        return score()[0]


@contextmanager
def prefilled(engine, images: list, checks: list):
    """Prefill ``images`` with the prefix their questions share (of ``checks``: pairs for every image, or a list
    per image) and yield ``score(more=None, which=None) -> ((n, Q) logp, (n, Q, V) next-token logp at each
    answer's first position)``: ``more`` None scores ``checks``; later calls score other questions about the
    images numbered ``which`` (default all), the prefix reused while they share it (else prefilled again)."""
    proc = engine.processor
    per_image = lambda c, n: c if c and isinstance(c[0], list) else [c] * n  # noqa: E731
    first = per_image(checks, len(images))
    if len(first) != len(images) or len({len(c) for c in first}) != 1:
        raise InputError("check_scores: one list of the same number of checks per image")
    known: dict[tuple[str, str], tuple[list[int], int]] = {}

    def packed(rows: list[list[int]], Q: int) -> list[int]:
        """Per image, the slots its Q questions' suffixes (rows n * Q + q, after the prefix of P) take packed."""
        return [sum(len(r) - P for r in rows[i:i + Q]) for i in range(0, len(rows), Q)]

    def tokens(qa: list[list]) -> tuple[list[list[int]], list[int]]:
        """Rows (prompt + answer ids) and answer lengths of per-image checks, row n * Q + q; each distinct pair
        tokenised once (checks shared by every image repeat per image)."""
        for pair in {pair for c in qa for pair in c} - known.keys():
            q, a = pair
            ans = proc.answer_ids(a)
            known[pair] = proc.understanding_ids([Message("user", q, [images[0]])]) + ans, len(ans)
        return [known[pair][0] for c in qa for pair in c], [known[pair][1] for c in qa for pair in c]

    rows0, spans = tokens(first)
    # shared prefix: every suffix keeps at least the token that predicts its answer's first token
    P = min(len(r) - a - 1 for r, a in zip(rows0, spans))
    while any(r[:P] != rows0[0][:P] for r in rows0):
        P -= 1
    prefix, N = rows0[0][:P], len(images)
    if max(len(r) for r in rows0) > engine.context:
        raise InputError(f"a check of {max(len(r) for r in rows0)} tokens exceeds the model context of {engine.context}")
    pixels = torch.stack([proc.image_processor(img) for img in images]).to(engine.device, engine.dtype)
    ptoks = torch.tensor([prefix] * N, device=engine.device)  # (N, P)
    x = engine.model.prepare_inputs_embeds(ptoks, pixels, ptoks == proc.image_id).to(engine.dtype)
    lm = engine.model.language_model
    # slots for each image's packed questions (RoPE positions restart at P for each question, so only the
    # longest question counts against the context) and for later ones up to FOLLOW_UP_SLOTS longer (else
    # prefilled anew)
    length = P + max(packed(rows0, len(first[0]))) + FOLLOW_UP_SLOTS
    lm.setup_cache(N, length, dtype=engine.dtype, device=engine.device, cache=engine._cache)
    owner = list(range(N))  # per image a cache row whose slots [0, P) hold its prefix (None: no longer held)

    def score(more=None, which=None):
        nonlocal owner
        which = list(range(N)) if which is None else which
        qa = first if more is None else per_image(more, len(which))
        r_ids, r_ans = tokens(qa)
        Q, B = len(qa[0]), len(which)
        # each image's Q question suffixes packed into one row after its prefix, each seeing the prefix and its
        # own earlier tokens only (no copy of the prefix's cache per question, no padding between questions)
        lens = [len(r) - P for r in r_ids]  # per (image, question), row n * Q + q
        T = max(packed(r_ids, Q))
        if (any(r[:P] != prefix or len(r) - a - 1 < P for r, a in zip(r_ids, r_ans)) or P + T > length
                or any(owner[n] is None for n in which)):  # not this prefix, or too long: prefilled anew
            owner = [None] * N  # (that replaces this cache)
            with prefilled(engine, [images[n] for n in which], qa) as again:
                return again()
        engine._expand_cache(torch.tensor([owner[n] for n in which], device=engine.device))
        owner = [None] * N  # the cache now holds the images of ``which``, in that order
        for i, n in enumerate(which):
            owner[n] = i
        suffix = torch.full((B, T), proc.pad, dtype=torch.long)  # right-padded: no real token sees the padding
        seg = torch.full((B, T), -1, dtype=torch.long)  # which question each slot holds
        pos = torch.full((B, T), P, dtype=torch.long)  # RoPE positions: each question starts at P
        rows, cols, tgt, first_at = [], [], [], []  # where each answer token is predicted, and the token
        for j, (r, A) in enumerate(zip(r_ids, r_ans)):
            i, q = divmod(j, Q)
            off = sum(lens[i * Q:j])
            L = lens[j]  # the answer is the suffix's last A tokens, each predicted from one position earlier
            suffix[i, off:off + L], seg[i, off:off + L] = torch.tensor(r[P:]), q
            pos[i, off:off + L] = torch.arange(P, P + L)
            first_at.append(len(rows))
            rows += [i] * A
            cols += range(off + L - A - 1, off + L - 1)
            tgt += r[-A:]
        t = torch.arange(T)
        mask = torch.ones(B, 1, T, P + T, dtype=torch.bool)
        mask[:, 0, :, P:] = (seg[:, :, None] == seg[:, None, :]) & (t[None, :, None] >= t[None, None, :])
        dev = engine.device
        h = engine.model.hidden(engine.model.embed_text(suffix.to(dev)).to(engine.dtype),
                                torch.arange(P, P + T, device=dev), mask.to(dev), pos.to(dev))  # (B, T, D)
        # logits only where an answer token is predicted (a large vocabulary makes every position costly)
        rows, cols = torch.tensor(rows), torch.tensor(cols)
        lp = engine.model.text_logits(h[rows.to(dev), cols.to(dev)]).float().log_softmax(-1).cpu()  # (K, V)
        got = lp.gather(-1, torch.tensor(tgt)[:, None])[:, 0]  # (K,)
        which_check = torch.repeat_interleave(torch.arange(len(r_ids)), torch.tensor(r_ans))  # (K,)
        total = torch.zeros(len(r_ids)).index_add_(0, which_check, got)  # (B*Q,)
        return total.view(-1, Q), lp[first_at].view(-1, Q, lp.shape[-1])

    try:
        causal = torch.ones(P, P, dtype=torch.bool, device=engine.device).tril()
        engine.model.hidden(x, torch.arange(P, device=engine.device), causal[None, None])  # fills slots [0, P)
        yield score
    finally:
        lm.clear_cache()
