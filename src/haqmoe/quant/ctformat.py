"""Read checkpoints in the compressed-tensors ``int-quantized`` format (what llm-compressor writes),
so a peer's W8A8 model is evaluated by OUR evaluator with OUR fake-quant execution.

Each quantized linear stores ``weight`` (int8), ``weight_scale`` and, when asymmetric,
``weight_zero_point``; ``config.json``'s ``quantization_config`` says how activations are
quantized (``input_activations``: bits, symmetric, strategy token/tensor, dynamic). The integer
convention is the same as ours (``x ≈ (q − z)·scale``), so tensors map one to one onto
``QuantLinear`` buffers; static per-tensor activation scales become ``a_scale``/``a_zero``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..errors import HaqmoeError
from ..models.adapters import adapter_for, get_module, set_module
from .modules import QuantLinear
from .quantizer import QuantSpec


def _spec(d: dict | None, weights: bool) -> QuantSpec | None:
    if not d:
        return None
    strategy = d.get("strategy", "channel" if weights else "token")
    gran = {"channel": "channel", "token": "token", "tensor": "tensor", "group": "group"}.get(strategy)
    if gran is None or d.get("type", "int") != "int":
        raise HaqmoeError(f"compressed-tensors strategy '{strategy}'/{d.get('type')} is not supported")
    dynamic = bool(d.get("dynamic", not weights))
    return QuantSpec(int(d.get("num_bits", 8)), bool(d.get("symmetric", True)), gran, d.get("group_size"),
                     dynamic=dynamic)


def load_compressed_tensors(path: str | Path, dtype: torch.dtype = torch.float32):
    from ..models.loading import LoadedModel

    path = Path(path)
    try:
        raw = json.loads((path / "config.json").read_text())
        qcfg = raw["quantization_config"]
    except (OSError, ValueError, KeyError) as exc:
        raise HaqmoeError(f"{path} is not a compressed-tensors checkpoint: {exc}") from exc
    if qcfg.get("format") not in ("int-quantized", "naive-quantized", None):
        raise HaqmoeError(f"compressed-tensors format '{qcfg.get('format')}' is not supported (int-quantized)")
    group = next(iter(qcfg["config_groups"].values()))
    w_spec, a_spec = _spec(group.get("weights"), True), _spec(group.get("input_activations"), False)
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                tensors[k] = st.get_tensor(k)
    if not tensors:
        raise HaqmoeError(f"no .safetensors files in {path}")
    quantized = sorted(k[: -len(".weight_scale")] for k in tensors if k.endswith(".weight_scale"))
    for name in quantized:
        lin = get_module(model, name)
        q = QuantLinear(lin.in_features, lin.out_features, lin.bias is not None, w_spec, a_spec, dtype)
        scale = tensors.pop(f"{name}.weight_scale").float()
        zero = tensors.pop(f"{name}.weight_zero_point", torch.zeros_like(scale)).float()
        q.set_quantized(tensors.pop(f"{name}.weight").to(torch.int8), scale, zero,
                        tensors.pop(f"{name}.bias", None))
        if a_spec is not None and not a_spec.dynamic:
            q.a_scale.copy_(tensors.pop(f"{name}.input_scale").float().reshape(1, 1))
            q.a_zero.copy_(tensors.pop(f"{name}.input_zero_point", torch.zeros(1)).float().reshape(1, 1))
        set_module(model, name, q)
    tensors = {k: v for k, v in tensors.items() if not k.endswith(("input_scale", "input_zero_point"))}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [m for m in missing if not any(m.startswith(n + ".") for n in quantized)]
    if config.tie_word_embeddings:
        missing = [m for m in missing if m != "lm_head.weight"]
        model.tie_weights()
    if missing or unexpected:
        raise HaqmoeError(f"{path} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    tok = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    return LoadedModel(model, tok, str(path), adapter_for(config.model_type),
                       quant={"quant": {"method": "compressed-tensors", "config": qcfg}})
