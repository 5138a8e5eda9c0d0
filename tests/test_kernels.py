"""Our fused W8A8 CPU kernel (``haqmoe.exec.kernels``) against the ``quantize_tokens`` + ``torch._int_mm``
path: bit-identical outputs (same activation integers, exact integer products, same float epilogue),
exact int32 sums on extreme operands, a schema and fake implementation that tracing accepts."""

from __future__ import annotations

import pytest
import torch

from haqmoe.exec import int8
from haqmoe.exec.int8 import pack_weight, quantize_tokens, w8a8_linear
from haqmoe.exec.kernels import w8a8_op
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
