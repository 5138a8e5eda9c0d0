"""Real int8 execution equals fake quantization: same activation integers, exact int32 products
(no overflow on this CPU's int8 GEMM path), zero-point corrections for every sym/asym combination."""

from __future__ import annotations

import pytest
import torch

from haqmoe.models.adapters import adapter_for
from haqmoe.models.tiny import tiny_model
from haqmoe.exec import int8
from haqmoe.quant.config import QuantConfig
from haqmoe.exec.int8 import (ACT_CACHE, DequantExperts, DequantLinear, Int8Experts, Int8Linear, QuantAct, int8_matmul,
                               pack_weight, quantize_tokens)
from haqmoe.quant.modules import QuantExperts, QuantLinear
from haqmoe.quant.quantizer import QuantSpec, compute_qparams, quantize
from haqmoe.quant.rtn import quantize_rtn

TOKENS = [1, 7, 16, 17, 512]


def _inputs(m: int, k: int, outliers: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    if outliers:  # a few channels 100x larger, as real LLM activations have
        x[:, torch.randperm(k, generator=g)[:3]] *= 100.0
        x = x + 0.5  # and a shifted distribution, where asymmetric quantization matters
    return x


def _one_step(ql: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """[M, 1] output change caused by one activation integer moving by one step."""
    s_a, _ = compute_qparams(x, ql.a_spec)
    return s_a * ql.weight.abs().max()


@pytest.mark.parametrize("w_sym", [True, False], ids=["wsym", "wasym"])
@pytest.mark.parametrize("a_sym", [True, False], ids=["a-sym", "a-asym"])
@pytest.mark.parametrize("outliers", [False, True], ids=["random", "outliers"])
@pytest.mark.parametrize("m", TOKENS)
def test_int8_linear_matches_fake_quant(w_sym: bool, a_sym: bool, outliers: bool, m: int, int8_path):
    k, n = 96, 40
    g = torch.Generator().manual_seed(m)
    w, b = torch.randn(n, k, generator=g) * 0.1 + 0.02, torch.randn(n, generator=g)
    ql = QuantLinear.from_weight(w, b, QuantSpec(8, w_sym, "channel"), QuantSpec(8, a_sym, "token"))
    il = Int8Linear.from_quant_linear(ql)
    x = _inputs(m, k, outliers, seed=m + 1)
    ACT_CACHE.clear()
    y_fake, y_int8 = ql(x), il(x)
    assert y_int8.shape == y_fake.shape == (m, n)
    assert ((y_int8 - y_fake).abs() <= _one_step(ql, x)).all()
    # in fact the integers agree and only fp32 rounding of the fake-quant dot product differs
    torch.testing.assert_close(y_int8, y_fake, rtol=1e-5, atol=1e-5 * float(y_fake.abs().max()))


@pytest.mark.parametrize("a_sym", [True, False])
def test_activation_integers_identical_to_quantizer(a_sym: bool):
    spec = QuantSpec(8, a_sym, "token")
    x = _inputs(64, 128, True, seed=3)
    x[5] = 0.0  # an all-zero token
    x[6] = -torch.rand(128)  # an all-negative token
    act = quantize_tokens(x, spec)
    scale, zero = compute_qparams(x, spec)
    assert torch.equal(act.q, quantize(x, scale, zero, spec))
    torch.testing.assert_close(act.scale, scale, rtol=0, atol=0)
    if not a_sym:
        assert torch.equal(act.zero, zero.view(-1).to(torch.int32))
    for t in range(x.shape[0]):  # the one-token (decode) fast path computes the same integers
        one = quantize_tokens(x[t: t + 1], spec)
        assert torch.equal(one.q, act.q[t: t + 1]) and torch.equal(one.scale, act.scale[t: t + 1])
        assert a_sym or torch.equal(one.zero, act.zero[t: t + 1])


@pytest.mark.parametrize("k", [4096, 16384])
def test_int_mm_int32_accumulation_does_not_overflow(k: int):
    """Extreme operands over a long K: VNNI-less x86 paths (vpmaddubsw) sum pairs of u8*s8 in int16
    with saturation (127*255*2 > 32767); a buggy kernel returns a wrong, saturated sum here."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    pattern = torch.tensor([-128, 127, 127, -128, -128, -128, 127, 127], dtype=torch.int8)
    a = torch.stack([torch.full((k,), -128, dtype=torch.int8), torch.full((k,), 127, dtype=torch.int8),
                     pattern.repeat(k // 8), torch.randint(-128, 128, (k,), dtype=torch.int8)])
    b = torch.stack([torch.full((k,), -128, dtype=torch.int8), torch.full((k,), 127, dtype=torch.int8),
                     pattern.repeat(k // 8), -pattern.to(torch.int16).clamp(max=127).to(torch.int8).repeat(k // 8),
                     torch.randint(-128, 128, (k,), dtype=torch.int8)], dim=1)
    for m in (1, 4, 17):
        rows = a.repeat((m + 3) // 4, 1)[:m]
        exact = rows.long() @ b.long()
        assert exact.abs().max() < 2**31
        assert torch.equal(torch._int_mm(rows, b).long(), exact), f"int32 accumulation wrong at m={m}, K={k}"


def test_int8_linear_exact_on_extreme_long_k():
    """The whole path (corrections included) on a long K with saturated integers stays exact."""
    k, n = 8192, 16
    spec_w, spec_a = QuantSpec(8, False, "channel"), QuantSpec(8, False, "token")
    w = torch.where(torch.arange(n * k).view(n, k) % 3 == 0, 1.0, -0.5)
    ql = QuantLinear.from_weight(w, None, spec_w, spec_a)
    x = torch.where(torch.arange(2 * k).view(2, k) % 5 == 0, 3.0, -1.0)
    act = quantize_tokens(x, spec_a)
    w, sw, zw, cs = pack_weight(ql.qweight, ql.w_scale, ql.w_zero, False)
    y = int8_matmul(act, w.t(), sw, zw, cs, k)
    ref = ((act.q.double() - act.zero.double()[:, None]) @ (ql.qweight.double() - ql.w_zero.double()).T)
    ref = ref * act.scale.double() * ql.w_scale.double().view(1, -1)
    torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=0)


def test_padding_for_unaligned_shapes_is_exact(int8_path):
    """K and N that are not multiples of 8 are zero-padded at pack time (CUDA needs it)."""
    ql = QuantLinear.from_weight(torch.randn(5, 13), torch.randn(5), QuantSpec(8, False, "channel"),
                                 QuantSpec(8, False, "token"))
    il = Int8Linear.from_quant_linear(ql)
    assert il.w.shape == (8, 16)
    x = torch.randn(3, 13)
    torch.testing.assert_close(il(x), ql(x), rtol=1e-5, atol=1e-5)


def test_static_per_tensor_activations(int8_path):
    ql = QuantLinear.from_weight(torch.randn(24, 32), None, QuantSpec(8, False, "channel"),
                                 QuantSpec(8, False, "tensor", dynamic=False))
    ql.a_scale.fill_(0.02)
    ql.a_zero.fill_(-7.0)
    x = torch.randn(9, 32)
    torch.testing.assert_close(Int8Linear.from_quant_linear(ql)(x), ql(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(DequantLinear.from_quant_linear(ql)(x), ql(x), rtol=1e-5, atol=1e-5)


def test_activation_cache_is_shared_and_invalidated(monkeypatch):
    """The _int_mm path's identity cache (the fused kernel quantizes inside and does not use it)."""
    monkeypatch.setattr(int8, "w8a8_op", lambda: None)
    specs = QuantSpec(8, False, "channel"), QuantSpec(8, False, "token")
    a = Int8Linear.from_quant_linear(QuantLinear.from_weight(torch.randn(8, 16), None, *specs))
    b = Int8Linear.from_quant_linear(QuantLinear.from_weight(torch.randn(8, 16), None, *specs))
    x = torch.randn(1, 3, 16)
    ACT_CACHE.clear()
    a(x)
    first = ACT_CACHE.value
    b(x)
    assert ACT_CACHE.value is first  # b reused a's quantization of the same tensor
    x.mul_(2.0)  # an in-place edit must not reuse stale integers
    ya = a(x)
    assert ACT_CACHE.value is not first
    ACT_CACHE.clear()
    torch.testing.assert_close(a(x), ya)


@pytest.mark.parametrize("w_sym", [True, False])
@pytest.mark.parametrize("t", [1, 7, 17])
def test_experts_match_quant_experts(w_sym: bool, t: int, int8_path):
    model = tiny_model("mixtral")
    adapter = adapter_for(model)
    quantize_rtn(model, adapter, QuantConfig.w8a8("rtn", w_sym=w_sym), progress=False)
    qe = next(m for m in model.modules() if isinstance(m, QuantExperts))
    g = torch.Generator().manual_seed(t)
    h = torch.randn(t, qe.hidden_dim, generator=g)
    idx = torch.stack([torch.randperm(qe.num_experts, generator=g)[:2] for _ in range(t)])
    idx[0, 1] = qe.num_experts  # a padding id, skipped by every implementation
    w = torch.rand(t, 2, generator=g)
    ref = qe(h, idx, w)
    for impl in (Int8Experts, DequantExperts):
        torch.testing.assert_close(impl.from_quant_experts(qe)(h, idx, w), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("w_sym,a_sym", [(True, True), (False, False), (True, False), (False, True)])
def test_one_token_fast_path_is_bit_identical(w_sym: bool, a_sym: bool):
    """Decode's scalar epilogue gives exactly the general epilogue's floats (so it cannot move PPL)."""
    k, n = 100, 36  # unaligned: the padded weight is sliced back
    g = torch.Generator().manual_seed(3)
    ql = QuantLinear.from_weight(torch.randn(n, k, generator=g), torch.randn(n, generator=g),
                                 QuantSpec(8, w_sym, "channel"), QuantSpec(8, a_sym, "token"))
    il = Int8Linear.from_quant_linear(ql)
    x = _inputs(1, k, outliers=True, seed=4)
    act = quantize_tokens(x, ql.a_spec, need_rowsum=il.w_zero is not None)
    assert act.scalars is not None
    fast = int8_matmul(act, il.wt, il.w_scale, il.w_zero, il.colsum, k, il.bias)
    general_act = QuantAct(act.q, act.scale, act.zero, act.rowsum)  # the same numbers as tensors, no scalars
    general = int8_matmul(general_act, il.wt, il.w_scale, il.w_zero, il.colsum, k, il.bias)
    assert torch.equal(fast, general)


@pytest.mark.parametrize("w_sym", [True, False])
@pytest.mark.parametrize("m", [1, 7])
def test_fused_sibling_group_is_bit_identical_to_its_linears(w_sym: bool, m: int, int8_path):
    """q/k/v (gate/up) as one int8 GEMM: each member's slice equals that linear's own output exactly."""
    from haqmoe.exec.int8 import Int8LinearGroup, Int8Sibling

    g = torch.Generator().manual_seed(5)
    k = 100  # unaligned K; an unaligned member N, and one member without bias
    members = [Int8Linear.from_quant_linear(QuantLinear.from_weight(
        torch.randn(n, k, generator=g), torch.randn(n, generator=g) if bias else None,
        QuantSpec(8, w_sym, "channel"), QuantSpec(8, False, "token")))
        for n, bias in ((36, True), (20, False), (17, True))]
    group = Int8LinearGroup(members)
    siblings = [Int8Sibling(group, i) for i in range(len(members))]
    x = _inputs(m, k, outliers=True, seed=6).reshape(1, m, k)
    with torch.inference_mode():
        for lin, sib in zip(members, siblings):
            ACT_CACHE.clear()
            assert torch.equal(sib(x), lin(x))
        assert group._kept.x is None  # every member read its slice: the group holds no activation


def test_int8_conversion_fuses_qkv_and_gate_up_without_changing_logits(monkeypatch):
    import copy

    from haqmoe.exec import precision
    from haqmoe.exec.int8 import Int8Sibling
    from haqmoe.exec.precision import convert

    model = tiny_model("llama", seed=2)
    quantize_rtn(model, adapter_for(model), QuantConfig.w8a8("rtn"), progress=False)
    separate = copy.deepcopy(model)
    report = convert(model, "int8")
    with monkeypatch.context() as mp:
        mp.setattr(precision, "_fuse_siblings", lambda *a: None)
        convert(separate, "int8")
    layers = model.config.num_hidden_layers
    assert report.counts["fused-groups"] == 2 * layers  # attention q/k/v and MLP gate/up per block
    assert sum(isinstance(m, Int8Sibling) for m in model.modules()) == 5 * layers
    assert precision.weight_bytes(model) <= precision.weight_bytes(separate)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, separate(ids).logits)


def test_fused_group_recomputes_after_an_in_place_edit_of_its_input():
    from haqmoe.exec.int8 import Int8LinearGroup, Int8Sibling

    g = torch.Generator().manual_seed(8)
    members = [Int8Linear.from_quant_linear(QuantLinear.from_weight(
        torch.randn(16, 24, generator=g), None, QuantSpec(8, False, "channel"), QuantSpec(8, False, "token")))
        for _ in range(2)]
    group = Int8LinearGroup(members)
    first, second = Int8Sibling(group, 0), Int8Sibling(group, 1)
    x = torch.randn(3, 24, generator=g)
    with torch.no_grad():
        first(x)
        x.mul_(3.0)  # same object, new values: the kept output must not be served
        ACT_CACHE.clear()
        assert torch.equal(second(x), members[1](x))


def test_pack_weight_keeps_an_aligned_weight_in_place():
    """No padding needed: the int8 GEMM reads the quantized weight itself (a checkpoint's int8
    stays a view of its file), so ``--exec real`` adds no copy; unaligned widths are padded."""
    q = torch.randint(-128, 127, (16, 24), dtype=torch.int8)
    w, *_ = pack_weight(q, torch.ones(16, 1), torch.zeros(16, 1), False)
    assert w.data_ptr() == q.data_ptr()
    odd = torch.randint(-128, 127, (10, 20), dtype=torch.int8)
    w, *_ = pack_weight(odd, torch.ones(10, 1), torch.zeros(10, 1), False)
    assert w.shape == (16, 24) and torch.equal(w[:10, :20], odd) and not w[10:].any()
