"""Our fused W8A8 CPU kernel (``haqmoe.exec.kernels``) against the ``quantize_tokens`` + ``torch._int_mm``
path: bit-identical outputs (same activation integers, exact integer products, same float epilogue),
exact int32 sums on extreme operands, a schema and fake implementation that tracing accepts; the fused
routed-experts op against the per-expert Python path, bit-identical as well."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from haqmoe.exec import int8
from haqmoe.exec.int8 import Int8Experts, pack_weight, quantize_tokens, w8a8_linear
from haqmoe.exec.kernels import moe_op, w8a8_op
from haqmoe.models.adapters import GLU, ClampedSwiGLU
from haqmoe.quant.modules import QuantExperts, QuantLinear
from haqmoe.quant.quantizer import QuantSpec

pytestmark = pytest.mark.skipif(w8a8_op() is None, reason="the fused int8 CPU kernel cannot run here")


def _layer(n: int, k: int, w_sym: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    qw = torch.randint(-127 if w_sym else -128, 128, (n, k), dtype=torch.int8, generator=g)
    scale = torch.rand(n, 1, generator=g) * 0.01 + 1e-3
    zero = torch.zeros(n, 1) if w_sym else torch.randint(-6, 6, (n, 1), generator=g).float()
    w, ws, wz, cs = pack_weight(qw, scale, zero, w_sym)
    return w, ws, wz, cs, torch.randn(n, generator=g)


def _x(m: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 2
    x[:, torch.randperm(k, generator=g)[:3]] *= 50.0  # outlier channels
    if m > 2:
        x[1] = 0.0  # an all-zero token (scale 1)
        x[2] = -x[2].abs()  # an all-negative token
    return x


def _reference(monkeypatch, *args, **kwargs) -> torch.Tensor:
    with monkeypatch.context() as mp:
        mp.setattr(int8, "w8a8_op", lambda: None)
        return w8a8_linear(*args, **kwargs)


@pytest.mark.parametrize("a_sym", [True, False], ids=["a-sym", "a-asym"])
@pytest.mark.parametrize("w_sym", [True, False], ids=["w-sym", "w-asym"])
@pytest.mark.parametrize("m", [1, 7, 16, 17, 512])  # 17+: the op's oneDNN branch
@pytest.mark.parametrize("n,k", [(40, 96), (129, 37), (96, 200)])  # K tails of the 64-byte loop
def test_kernel_is_bit_identical_to_the_int_mm_path(monkeypatch, a_sym, w_sym, m, n, k):
    w, ws, wz, cs, bias = _layer(n, k, w_sym, seed=n + k)
    spec = QuantSpec(8, a_sym, "token")
    x = _x(m, k, seed=m)
    ref = _reference(monkeypatch, x, w, ws, wz, cs, k, spec, bias)
    got = w8a8_linear(x, w, ws, wz, cs, k, spec, bias)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("a_sym", [True, False])
@pytest.mark.parametrize("m", [1, 5, 40])
def test_residual_two_level_activations_are_bit_identical(monkeypatch, a_sym, m):
    w, ws, _, cs, _ = _layer(300, 64, True, seed=1)
    spec = QuantSpec(8, a_sym, "token")
    x = _x(m, 64, seed=m)
    ref = _reference(monkeypatch, x, w, ws, None, cs, 64, spec, residual=True)
    assert torch.equal(w8a8_linear(x, w, ws, None, cs, 64, spec, residual=True), ref)


def test_weight_row_slices_are_read_in_place(monkeypatch):
    """A fused group's traced members pass a row slice of the stacked weight (storage offset)."""
    w, ws, wz, cs, bias = _layer(64, 96, False, seed=2)
    rows = slice(24, 50)
    x, spec = _x(1, 96, seed=3), QuantSpec(8, False, "token")
    args = (x, w[rows], ws[rows], wz[rows], cs[rows], 96, spec, bias[rows])
    assert torch.equal(w8a8_linear(*args), _reference(monkeypatch, *args))


@pytest.mark.parametrize("m", [1, 3])
def test_int32_sums_exact_on_extreme_operands(m):
    """u8 x s8 products at their extremes over the longest K the kernel takes (16384): vpdpbusd sums
    4 products into int32 without saturation (vpmaddubsw-based int16 paths would saturate here)."""
    k = 16384
    qw = torch.where(torch.arange(4 * k).view(4, k) % 2 == 0, -128, 127).to(torch.int8)
    qw[1] = -128
    qw[2] = 127
    w, ws, wz, cs = pack_weight(qw, torch.ones(4, 1), torch.zeros(4, 1), False)
    x = torch.full((m, k), 1.0)
    x[:, ::3] = -1.0
    spec = QuantSpec(8, True, "token")  # codes 127 (u8 255, the largest) and -127
    act = quantize_tokens(x, spec)
    assert act.q.max() == 127 and act.q.min() == -127
    exact = (act.q.long() @ qw.long().T).double() * act.scale.double()
    internal = (act.q.long() + 128) @ qw.long().T  # the kernel's u8 x s8 sums
    assert internal.abs().max() > 2**28  # within 8x of int32's range: a saturated or wrapped sum would show
    got = w8a8_linear(x, w, ws, None, cs, k, spec)
    torch.testing.assert_close(got.double(), exact, rtol=1e-6, atol=0)


def test_op_schema_and_fake_implementation():
    """What torch.compile / torch.export rely on: schema, fake (meta) shapes, no aliasing."""
    w, ws, wz, cs, bias = _layer(40, 96, False, seed=4)
    torch.library.opcheck(w8a8_op(), (_x(3, 96, 5), w, ws, wz, cs, bias, 96, -128, 127, False, False))


def test_bad_input_is_a_clear_error():
    w, ws, wz, cs, bias = _layer(40, 96, True, seed=6)
    op = w8a8_op()
    with pytest.raises(RuntimeError, match="x must be contiguous float32"):
        op(_x(1, 96, 0).double(), w, ws, wz, cs, bias, 96, -127, 127, True)
    with pytest.raises(RuntimeError, match="features, expected"):
        op(_x(1, 95, 0), w, ws, wz, cs, bias, 95 + 1, -127, 127, True)
    with pytest.raises(RuntimeError, match="contiguous rows"):
        op(_x(1, 96, 0), w.t(), ws, wz, cs, bias, 96, -127, 127, True)
    with pytest.raises(RuntimeError, match="colsum must be"):
        op(_x(1, 96, 0), w, ws, wz, cs.long(), bias, 96, -127, 127, True)


def test_conversion_report_names_the_int8_path(monkeypatch):
    """Users see which CPU path ran their int8 products (the kernel, or _int_mm where it cannot run)."""
    from haqmoe.models.adapters import adapter_for
    from haqmoe.models.tiny import tiny_model
    from haqmoe.exec import precision
    from haqmoe.quant.config import QuantConfig
    from haqmoe.quant.rtn import quantize_rtn

    model = tiny_model("mixtral")
    quantize_rtn(model, adapter_for(model), QuantConfig.w8a8("rtn"), progress=False)
    assert "fused VNNI kernel" in precision.convert(model, "int8").summary()
    monkeypatch.setattr(int8, "w8a8_op", lambda: None)
    assert "torch._int_mm" in precision.ConversionReport("int8", "cpu", {"int8": 3}).summary()


def _experts(n: int, hidden: int, inter: int, w_sym: bool, a_sym: bool, seed: int,
             glu: nn.Module | None = None) -> Int8Experts:
    """Random int8 experts (distinct per expert) of unaligned widths."""
    g = torch.Generator().manual_seed(seed)
    w_spec, a_spec = QuantSpec(8, w_sym, "channel"), QuantSpec(8, a_sym, "token")
    qe = QuantExperts(n, hidden, inter, glu or GLU(nn.SiLU()), w_spec, a_spec)
    for part, (o, i) in (("gate", (inter, hidden)), ("up", (inter, hidden)), ("down", (hidden, inter))):
        setattr(qe, part, nn.ModuleList(QuantLinear.from_weight(torch.randn(o, i, generator=g) * 0.1, None,
                                                                w_spec, a_spec) for _ in range(n)))
    return Int8Experts.from_quant_experts(qe)


def _routes(t: int, k: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k ids with padding (-1 and ``n``: skipped) and router weights."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(t)])
    idx[0, -1] = -1
    if t > 1:
        idx[1, 0] = n
    return idx, torch.rand(t, k, generator=g)


@pytest.mark.parametrize("w_sym,a_sym", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("t,k", [(1, 1), (1, 2), (1, 3), (5, 2), (40, 3)])  # 40 x 3 / 6: >16 rows, oneDNN
def test_fused_moe_is_bit_identical_to_the_per_expert_path(monkeypatch, w_sym, a_sym, t, k):
    experts = _experts(6, 100, 44, w_sym, a_sym, seed=t + k)
    x = _x(t, 100, seed=t)
    idx, w = _routes(t, k, 6, seed=k)
    assert experts.fused_kernel(x.device) is not None
    got = experts(x, idx, w)
    with monkeypatch.context() as mp:
        mp.setattr(int8, "moe_op", lambda: None)  # the per-expert path, products on our kernel
        assert experts.fused_kernel(x.device) is None
        ref = experts(x, idx, w)
    assert torch.equal(got, ref)
    monkeypatch.setattr(int8, "w8a8_op", lambda: None)  # quantize_tokens + torch._int_mm
    assert torch.equal(experts(x, idx, w), ref)


def test_fused_moe_keeps_the_input_dtype_and_all_padding_is_zero():
    experts = _experts(4, 64, 32, True, False, seed=1)
    x = _x(3, 64, seed=2).to(torch.bfloat16)
    idx, w = _routes(3, 2, 4, seed=3)
    got = experts(x, idx, w.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    assert not experts(x[:1], torch.tensor([[-1, 4]]), w[:1]).any()


def test_clamped_glu_experts_stay_on_the_per_expert_path():
    """gpt-oss's clamped SwiGLU is not what the fused op computes: those experts keep the Python path."""
    experts = _experts(4, 64, 32, True, True, seed=1, glu=ClampedSwiGLU(1.702, 7.0))
    assert experts.fused_kernel(torch.device("cpu")) is None


def test_moe_op_schema_and_fake_implementation():
    experts = _experts(4, 64, 32, False, False, seed=5)
    idx, w = _routes(5, 2, 4, seed=6)
    torch.library.opcheck(moe_op(), (_x(5, 64, 7), idx, w, *experts.fused_args, -128, 127, False))
