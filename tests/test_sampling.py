"""Sampling: the draws follow the filtered softmax, never a token of zero probability, seeded."""

import pytest
import torch

from zuoyou.errors import InputError
from zuoyou.sampling import check_sampling, make_generator, sample


def test_draws_follow_the_softmax_and_skip_zero_probability():
    torch.manual_seed(0)
    logits = torch.randn(3, 10) * 2
    logits[:, 3] = float("-inf")
    n = 100_000
    ids = sample(logits.repeat(n, 1), 1.0, generator=make_generator(0, "cpu")).view(n, 3)
    for r in range(3):
        freq = torch.bincount(ids[:, r], minlength=10).double() / n
        assert freq[3] == 0
        # binomial standard error <= 0.0016 at n = 1e5: 4 sigma
        assert (freq - logits[r].double().softmax(-1)).abs().max() < 0.0064


def test_filters_temperature_and_seeds():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(2000, 1)
    assert set(sample(logits, 1.0, top_k=2, generator=make_generator(1, "cpu")).tolist()) == {2, 3}
    # top-p 0.6: 3 alone holds 0.64 of the mass
    assert set(sample(logits, 1.0, top_p=0.6, generator=make_generator(1, "cpu")).tolist()) == {3}
    assert torch.equal(sample(logits, 0), torch.full((2000,), 3))
    a, b = (sample(logits, 1.0, generator=make_generator(7, "cpu")) for _ in range(2))
    assert torch.equal(a, b) and len(set(a.tolist())) == 4
    with pytest.raises(InputError, match="temperature"):
        check_sampling(-1.0, None, None)
