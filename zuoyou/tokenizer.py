"""Train a small byte-level BPE tokenizer (``tokenizers``) carrying the Janus special tokens by string.

Used for our own small models (ShapesWorld) and for tests. The official checkpoints ship their
DeepSeek ``tokenizer.json``; nothing here is needed to load them.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .processor import BOS, EOS, IMAGE_END, IMAGE_START, IMAGE_TAG, PAD, PRO_ROLES

SPECIAL_TOKENS = [BOS, EOS, PAD, IMAGE_TAG, IMAGE_START, IMAGE_END, *PRO_ROLES]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> Tokenizer:
    """BPE over bytes (as DeepSeek's), with the special tokens first (ids 0..7)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok
