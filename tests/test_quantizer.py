"""Quantizer primitives: round-to-nearest error stays within half a step, ranges are respected."""

from __future__ import annotations

import pytest
import torch

from haqmoe.errors import HaqmoeError
from haqmoe.quant.quantizer import QuantSpec, compute_qparams, dequantize, fake_quant, quantize

SPECS = [
    QuantSpec(8, True, "channel"), QuantSpec(8, False, "channel"), QuantSpec(4, False, "channel"),
    QuantSpec(8, False, "token"), QuantSpec(8, True, "tensor"), QuantSpec(6, False, "group", 16),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.bits}{'s' if s.symmetric else 'a'}-{s.granularity}")
def test_rtn_error_within_half_step(spec):
    torch.manual_seed(0)
    x = torch.randn(32, 64) * torch.logspace(-2, 1, 64)  # channels of very different scale
    x[3, 5] = 40.0  # an outlier
    scale, zero = compute_qparams(x, spec)
    q = quantize(x, scale, zero, spec)
    assert q.dtype == torch.int8
    assert int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax
    xr = dequantize(q, scale, zero, spec)
    half = scale / 2
    err = (xr - x).abs()
    if spec.granularity == "group":
        err = err.reshape(32, -1, spec.group_size)
    assert bool((err <= half * (1 + 1e-5) + 1e-7).all())
    torch.testing.assert_close(fake_quant(x, spec), xr)


def test_asymmetric_keeps_zero_exact_and_uses_full_range():
    spec = QuantSpec(8, False, "token")
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0], [-1.0, 0.0, 5.0, 7.0]])
    xr = fake_quant(x, spec)
    assert xr[0, 0] == 0 and xr[1, 1] == 0
    scale, zero = compute_qparams(x, spec)
    q = quantize(x, scale, zero, spec)
    assert int(q[1].min()) == -128 and int(q[1].max()) == 127


def test_symmetric_has_no_zero_point_and_restricted_range():
    spec = QuantSpec(8, True, "channel")
    x = torch.randn(4, 8)
    scale, zero = compute_qparams(x, spec)
    assert bool((zero == 0).all())
    assert int(quantize(x, scale, zero, spec).min()) >= -127


def test_all_zero_rows_are_exact():
    for spec in SPECS[:4]:
        assert bool((fake_quant(torch.zeros(3, 16), spec) == 0).all())


def test_bad_bits_is_a_clear_error():
    with pytest.raises(HaqmoeError, match="unsupported bit width 9"):
        QuantSpec(9)
