"""Training examples, their collation, and the unified loss of a Janus model.

An ``Example`` is one token sequence in the chat format, of one of three kinds:
- understanding: ``...<begin_of_image> N x <image_placeholder> <end_of_image>\\n{question}...{answer}<eos>``
  with the image fed through the understanding encoder at the placeholder slots;
- text: the same without an image;
- generation: ``{User}: {prompt}\\n\\n{Assistant}:<begin_of_image>`` followed by the image's VQ codes,
  fed through ``gen_embed``/``gen_aligner`` and predicted by ``gen_head``.

The loss is the mean cross-entropy over answer tokens (``lm_head``) plus the mean cross-entropy
over image codes (``gen_head``): averaging each kind separately keeps the few answer tokens of
an understanding example from being drowned by the 64+ codes of a generation example.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.janus import Janus
from ..processor import Message, Processor


@dataclass
class Example:
    ids: list[int]  # prompt (+ answer) token ids, BOS first
    loss_from: int  # first position whose token is a training target (answer start); len(ids) = none
    image: torch.Tensor | None = None  # (3, S, S) understanding image, or (N, 3, S, S) several, in [-1, 1]
    codes: torch.Tensor | None = None  # (T,) VQ codes to generate after ids (ids end with <begin_of_image>)
    loss_mask: list[bool] | None = None  # per id: is it a target? (multi-turn: the assistant turns); overrides loss_from
    # (v26) targets of the training-only place heads (``zuoyou.train.relations.PlaceHeads``): [(position, x, y)] of
    # named objects' shape words, [(position, xA, yA, xB, yB)] at two-object questions' answers
    places: list[tuple] | None = None
    pairs: list[tuple] | None = None


def generation_example(proc: Processor, prompt: str, codes: torch.Tensor, drop: bool = False) -> Example:
    """``drop=True`` (CFG prompt dropout) gives the unconditional prompt exactly as inference builds
    it from this prompt: same length, BOS and ``<begin_of_image>`` kept, the rest pad."""
    ids = proc.generation_ids(prompt)
    if drop:
        ids = proc.uncond_ids(ids)
    return Example(ids, len(ids), codes=codes)


def conversation(proc: Processor, msgs: list[Message], system: str | None = None) -> tuple[list[int], list[bool]]:
    """Token ids of a whole conversation in the chat format, and which of them are targets.

    Built turn by turn: the tokens are exactly those the processor gives the conversation's
    text at inference (turns meet at special tokens); targets are `` {answer}<eos>`` per
    assistant turn (a single question and answer is the
    understanding example of the module docstring).
    """
    ids: list[int] = []
    mask: list[bool] = []
    for m in msgs:
        if m.role == "user":
            text = proc.chat_prompt([m], system=system if not ids else "")
            seg = proc.encode(text) if not ids else proc.tokenizer.encode(text, add_special_tokens=False).ids
            seg = proc.expand_images(seg)
        else:
            seg = proc.answer_ids(m.content)
        ids += seg
        mask += [m.role == "assistant"] * len(seg)
    return ids, mask


@dataclass
class Batch:
    ids: torch.Tensor  # (B, T) right-padded
    text_targets: torch.Tensor  # (B, T) next-token targets, -100 where no text loss
    und_mask: torch.Tensor  # (B, T) positions fed by the understanding encoder
    pixels: torch.Tensor | None  # (N, 3, S, S)
    gen_mask: torch.Tensor  # (B, T) positions fed by image codes
    gen_codes: torch.Tensor  # (M,) codes at gen_mask positions, in order
    code_targets: torch.Tensor  # (B, T) next-code targets, -100 elsewhere
    places: torch.Tensor | None = None  # (K, 4) rows (batch row, position, x, y) of the examples' ``places``
    pairs: torch.Tensor | None = None  # (M, 6) rows (batch row, position, xA, yA, xB, yB)


def collate(examples: list[Example], proc: Processor) -> Batch:
    lens = [len(e.ids) + (len(e.codes) if e.codes is not None else 0) for e in examples]
    B, T = len(examples), max(lens)
    ids = torch.full((B, T), proc.pad, dtype=torch.long)
    text_t = torch.full((B, T), -100, dtype=torch.long)
    code_t = torch.full((B, T), -100, dtype=torch.long)
    gen_mask = torch.zeros(B, T, dtype=torch.bool)
    pixels, codes = [], []
    for b, e in enumerate(examples):
        n = len(e.ids)
        ids[b, :n] = torch.tensor(e.ids)
        if e.loss_mask is not None:
            m = torch.tensor(e.loss_mask[1:], dtype=torch.bool)
            text_t[b, : n - 1][m] = ids[b, 1:n][m]
        elif e.loss_from < n:  # predict ids[loss_from:] from the position before each
            text_t[b, e.loss_from - 1: n - 1] = ids[b, e.loss_from: n]
        if e.codes is not None:
            k = len(e.codes)
            gen_mask[b, n: n + k] = True
            code_t[b, n - 1: n + k - 1] = e.codes  # <begin_of_image> predicts code 0, and so on
            codes.append(e.codes)
        if e.image is not None:
            pixels.extend(e.image if e.image.dim() == 4 else [e.image])
    und_mask = ids == proc.image_id
    places = [(b, *p) for b, e in enumerate(examples) for p in e.places or ()]
    pairs = [(b, *p) for b, e in enumerate(examples) for p in e.pairs or ()]
    return Batch(ids, text_t, und_mask, torch.stack(pixels) if pixels else None, gen_mask,
                 torch.cat(codes) if codes else torch.zeros(0, dtype=torch.long), code_t,
                 torch.tensor(places, dtype=torch.float32).reshape(-1, 4) if places else None,
                 torch.tensor(pairs, dtype=torch.float32).reshape(-1, 6) if pairs else None)


def num_targets(examples: list[Example]) -> tuple[int, int]:
    """(text targets, image-code targets) of the examples, as ``collate`` will set them."""
    text = sum(sum(e.loss_mask[1:]) if e.loss_mask is not None else max(0, len(e.ids) - e.loss_from) for e in examples)
    return text, sum(len(e.codes) for e in examples if e.codes is not None)


def loss_fn(model: Janus, batch: Batch, norm: tuple[int, int] | None = None, trunk=None) -> tuple[torch.Tensor, dict]:
    """Mean text CE + mean image-code CE (each over its own targets).

    ``trunk``: a stand-in for ``model.hidden`` (the loop passes the compiled transformer trunk).

    ``norm=(text, codes)``: summed CEs divided by these counts instead, the counts of a whole
    global batch; the losses of its slices (micro-batches, ranks) then add up to its mean loss.
    """
    x = model.prepare_inputs_embeds(batch.ids, batch.pixels, batch.und_mask)  # text + understanding images
    if batch.gen_codes.numel():
        x = x.clone()
        x[batch.gen_mask] = model.embed_image_codes(batch.gen_codes).to(x.dtype)  # (M, D) image codes
    h = (model.hidden if trunk is None else trunk)(x)  # (B, T, D), causal
    stats, total = {}, 0.0
    heads = (("text", batch.text_targets, model.text_logits), ("image", batch.code_targets, model.image_logits))
    for i, (name, targets, head) in enumerate(heads):
        m = targets >= 0
        if not m.any():
            continue
        loss = F.cross_entropy(head(h[m]).float(), targets[m], reduction="mean" if norm is None else "sum")
        if norm is not None:
            loss = loss / norm[i]
        total = total + loss
        stats[name] = loss.item()
    heads = getattr(model, "place_heads", None)  # (v26) training-only place heads, while attached
    if heads is not None and (batch.places is not None or batch.pairs is not None):
        aux = heads.loss(batch.places, batch.pairs)
        if aux.requires_grad:
            total = total + aux
            stats["places"] = aux.item()
    return total, stats
