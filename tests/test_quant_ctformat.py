"""Peers' compressed-tensors checkpoints load into our QuantLinear and evaluate like our own."""

import pytest
import torch

from haqmoe.errors import HaqmoeError
from haqmoe.models.adapters import adapter_for
from haqmoe.models.tiny import tiny_model
from haqmoe.quant.checkpoint import save_quantized
from haqmoe.quant.config import QuantConfig
from haqmoe.quant.ctformat import load_compressed_tensors
from haqmoe.quant.methods import quantize_with
from haqmoe.quant.modules import QuantLinear


def test_compressed_tensors_checkpoint_matches_ours(tmp_path):
    from haqmoe.serve.export import ExportConfig, export_compressed_tensors

    model = tiny_model("llama")
    cfg = QuantConfig.w8a8("rtn", w_sym=True, a_sym=True)
    quantize_with(model, adapter_for(model), "rtn", cfg, None, progress=False)
    save_quantized(model, None, tmp_path / "ours", cfg)
    export_compressed_tensors(str(tmp_path / "ours"), tmp_path / "ct", ExportConfig(dtype="float32"))
    peer = load_compressed_tensors(tmp_path / "ct").model
    assert sum(isinstance(m, QuantLinear) for m in peer.modules()) == 14
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(peer(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_not_a_compressed_tensors_checkpoint(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "fp")
    with pytest.raises(HaqmoeError, match="not a compressed-tensors checkpoint"):
        load_compressed_tensors(tmp_path / "fp")
