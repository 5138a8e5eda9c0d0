"""Sparse upcycling: the MoE computes exactly the dense function, and routing is input-dependent."""

from __future__ import annotations

import pytest
import torch

from haqmoe.errors import HaqmoeError
from haqmoe.models.tiny import tiny_model
from haqmoe.models.upcycle import UpcycleConfig, kmeans, upcycle


def test_upcycled_logits_equal_dense_and_routing_is_skewed_but_used():
    dense = tiny_model("llama")
    torch.manual_seed(0)
    calib = torch.randint(0, 128, (8, 32))
    moe = upcycle(dense, calib, UpcycleConfig(num_experts=4, top_k=2), progress=False)
    assert moe.config.model_type == "mixtral" and moe.config.num_local_experts == 4
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
        logits = moe.model.layers[0].mlp.gate(moe.model.embed_tokens(ids).reshape(-1, 64))[0]
    chosen = logits.argmax(-1)
    assert len(torch.unique(chosen)) >= 2  # routing depends on the input


def test_kmeans_recovers_separated_clusters():
    torch.manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    x = torch.cat([c + 0.05 * torch.randn(50, 16) for c in centers])
    found = kmeans(x, 3, iters=20, seed=0)
    sims = found @ centers.T
    assert bool((sims.max(dim=0).values > 0.98).all())


def test_upcycle_refuses_non_llama_and_bad_topk():
    with pytest.raises(HaqmoeError, match="Llama-family"):
        upcycle(tiny_model("opt"), torch.zeros(1, 8, dtype=torch.long), progress=False)
    with pytest.raises(HaqmoeError, match="top-k"):
        upcycle(tiny_model("llama"), torch.zeros(1, 8, dtype=torch.long), UpcycleConfig(num_experts=2, top_k=3),
                progress=False)
