"""Next-layer guesses: the re-based router reads layer l's normalised input as layer l+1's norm would."""

import torch
from torch import nn
from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm

from haqmoe.routing.guess import guess_for_batch, guess_topk, guess_weight


def _norm(seed: int) -> MixtralRMSNorm:
    n = MixtralRMSNorm(16)
    with torch.no_grad():
        n.weight.copy_(torch.rand(16, generator=torch.Generator().manual_seed(seed)) * 4 + 0.05)
    return n


def test_rebased_router_equals_next_router_on_next_norm():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 16, generator=g) * 3  # residual stream
    here, nxt = _norm(1), _norm(2)
    router = nn.Linear(16, 8, bias=False)
    with torch.no_grad():
        w = guess_weight(router, here, nxt)
        torch.testing.assert_close(here(x) @ w.t(), router(nxt(x)), rtol=1e-5, atol=1e-5)
        assert torch.equal(guess_topk(here(x), w, router, 3), router(nxt(x)).topk(3).indices)
        plain = here(x) @ router.weight.t()  # without re-basing the ranking differs here
        assert not torch.equal(plain.topk(3).indices, router(nxt(x)).topk(3).indices)
        batch = guess_for_batch(here(x), w, router, 2)
        assert batch == torch.softmax(router(nxt(x)), -1).sum(0).topk(2).indices.tolist()


def test_layernorm_with_bias_falls_back_to_the_plain_router():
    router = nn.Linear(16, 8, bias=False)
    w = guess_weight(router, nn.LayerNorm(16), nn.LayerNorm(16))
    assert torch.equal(w, router.weight.detach())
