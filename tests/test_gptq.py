"""GPTQ: lower output error than RTN, every column order, damping recovery, dead channels."""

import pytest
import torch

from haqmoe.errors import HaqmoeError
from haqmoe.devices import resolve_device
from haqmoe.quant.gptq import GPTQConfig, column_order, gptq_quantize
from haqmoe.quant.config import QuantConfig
from haqmoe.quant.methods import MethodOptions, pipeline_config
from haqmoe.quant.quantizer import QuantSpec, dequantize, fake_quant


pytestmark = pytest.mark.usefixtures("one_thread")


SPEC = QuantSpec(4, symmetric=False, granularity="channel")  # 4 bits makes the gap unmistakable


def _layer(seed=0, tokens=1024, cols=160):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5
    x = torch.randn(tokens, cols, generator=g) @ (torch.eye(cols) + mix)  # correlated channels
    x[:, 3] *= 8
    w = torch.randn(64, cols, generator=g)
    return w, x


def _err(w, wq, x):
    return float((x @ w.T - x @ wq.T).pow(2).sum())


@pytest.mark.parametrize("order", ["natural", "act", "rank1", "rank2"])
def test_gptq_beats_rtn_on_output_error(order):
    w, x = _layer()
    res = gptq_quantize(w, x.T @ x, SPEC, GPTQConfig(order=order), x.abs().amax(0))
    wq = dequantize(res.qweight, res.scale, res.zero, SPEC)
    assert res.qweight.dtype == torch.int8
    assert _err(w, wq, x) < 0.7 * _err(w, fake_quant(w, SPEC), x)


def test_group_quantization_with_act_order():
    spec = QuantSpec(4, False, "group", 32)
    w, x = _layer(1)
    res = gptq_quantize(w, x.T @ x, spec, GPTQConfig(order="act"))
    wq = dequantize(res.qweight, res.scale, res.zero, spec)
    assert _err(w, wq, x) < _err(w, fake_quant(w, spec), x)


def test_rank2_is_act_order_permutation():
    h = torch.rand(50)
    assert torch.equal(column_order("rank2", h, None), column_order("act", h, None))


def test_cholesky_failure_recovered_with_more_damping():
    w, x = _layer(2, tokens=40)  # 40 tokens, 160 channels: singular Hessian
    h = x.T @ x
    h[7, 7] = -5.0  # and not even positive semi-definite
    with pytest.warns(UserWarning, match="recovered with damping"):
        res = gptq_quantize(w, h, SPEC, GPTQConfig(damp=0.0))
    assert res.damp > 0
    wq = dequantize(res.qweight, res.scale, res.zero, SPEC)
    assert torch.isfinite(wq).all()


def test_dead_channels_get_zero_weight():
    w, x = _layer(3)
    x[:, 10] = 0
    res = gptq_quantize(w, x.T @ x, SPEC)
    wq = dequantize(res.qweight, res.scale, res.zero, SPEC)
    assert torch.all(wq[:, 10] == 0)
    assert torch.isfinite(wq).all()


def test_consumed_hessian_is_freed_and_gives_the_same_result():
    """``consume`` works on the caller's Hessian in place and empties it (its 1.6 GB for Mixtral's
    down projection go back before the column loop) without changing a single value."""
    w, x = _layer(4)
    h = (x.T @ x).double()
    kept = gptq_quantize(w, h, SPEC, GPTQConfig(order="act"))
    given = h.clone()
    used = gptq_quantize(w, given, SPEC, GPTQConfig(order="act"), consume=True)
    assert given.numel() == 0 and h.numel() > 0
    assert torch.equal(kept.qweight, used.qweight) and torch.equal(kept.scale, used.scale)


def test_quant_device_resolution():
    """quantize --device goes through the engine's device check."""
    assert pipeline_config("haq", QuantConfig.w8a8("haq"), MethodOptions(device="cpu")).gptq.device == "cpu"
    auto = pipeline_config("haq", QuantConfig.w8a8("haq")).gptq.device
    assert auto == ("cuda" if torch.cuda.is_available() else "cpu") == resolve_device("auto").type
    with pytest.raises(HaqmoeError, match="unknown device"):
        pipeline_config("haq", QuantConfig.w8a8("haq"), MethodOptions(device="tpu"))
    if not torch.cuda.is_available():
        with pytest.raises(HaqmoeError, match="sees no CUDA device"):
            resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("order", ["natural", "act"])
def test_gptq_on_cuda_matches_the_cpu(order):
    """Other kernels, so not bit-identical: nearly every code equal, none more than one step off,
    results back on the CPU, and the consumed Hessian freed on the host."""
    w, x = _layer(5)
    h = (x.T @ x).double()
    cpu = gptq_quantize(w, h, SPEC, GPTQConfig(order=order))
    given = h.clone()
    gpu = gptq_quantize(w, given, SPEC, GPTQConfig(order=order, device="cuda"), consume=True)
    assert gpu.qweight.device.type == "cpu" and given.numel() == 0
    diff = (gpu.qweight.int() - cpu.qweight.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.02
