"""Read checkpoints in the compressed-tensors ``int-quantized`` format (what llm-compressor writes),
so a peer's W8A8 model is evaluated by OUR evaluator with OUR fake-quant execution.

Each quantized linear stores ``weight`` (int8), ``weight_scale`` and, when asymmetric,
``weight_zero_point``; ``config.json``'s ``quantization_config`` says how activations are
quantized (``input_activations``: bits, symmetric, strategy token/tensor, dynamic). The integer
convention is the same as ours (``x ≈ (q − z)·scale``), so tensors map one to one onto
``QuantLinear`` buffers; static per-tensor activation scales become ``a_scale``/``a_zero``.

MoE experts arrive unfused, one Linear per expert, under the names their writers use:
llm-compressor's Mixtral ``block_sparse_moe.experts.E.gate_proj|up_proj|down_proj``, vLLM's legacy
Mixtral ``w1|w3|w2`` (what ``haqmoe export`` writes), Qwen/OLMoE ``mlp.experts.E.gate_proj|...``.
They become one ``QuantExperts`` in the place of transformers' fused experts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..errors import HaqmoeError
from ..models.adapters import FusedExperts, adapter_for, get_module, set_module
from ..models.base import LoadedModel
from .modules import QuantExperts, QuantLinear
from .quantizer import QuantSpec


def _spec(d: dict | None, weights: bool) -> QuantSpec | None:
    if not d:
        return None
    strategy = d.get("strategy", "channel" if weights else "token")
    gran = {"channel": "channel", "token": "token", "tensor": "tensor", "group": "group"}.get(strategy)
    if gran is None or d.get("type", "int") != "int":
        raise HaqmoeError(f"compressed-tensors strategy '{strategy}'/{d.get('type')} is not supported")
    dynamic = bool(d.get("dynamic", not weights))
    if weights and gran == "tensor":  # one scale for all rows = per-channel scales all equal (_fill repeats it)
        gran = "channel"
    return QuantSpec(int(d.get("num_bits", 8)), bool(d.get("symmetric", True)), gran, d.get("group_size"),
                     dynamic=dynamic)


_EXPERT = re.compile(r"^(?P<experts>.+\.experts)\.(?P<e>\d+)\.(?P<kind>gate_proj|up_proj|down_proj|w1|w2|w3)$")
_KINDS = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}


def _fill(q: QuantLinear, tensors: dict[str, torch.Tensor], name: str) -> None:
    """Move ``name``'s quantized tensors out of ``tensors`` into ``q``."""
    scale = tensors.pop(f"{name}.weight_scale").float()
    zero = tensors.pop(f"{name}.weight_zero_point", torch.zeros_like(scale)).float()
    if scale.numel() == 1 and q.out_features > 1:  # a per-tensor weight scale, on per-channel buffers
        scale, zero = (t.reshape(1, 1).expand(q.out_features, 1).contiguous() for t in (scale, zero))
    q.set_quantized(tensors.pop(f"{name}.weight").to(torch.int8), scale, zero, tensors.pop(f"{name}.bias", None))
    if q.a_spec is not None and not q.a_spec.dynamic:
        q.a_scale.copy_(tensors.pop(f"{name}.input_scale").float().reshape(1, 1))
        q.a_zero.copy_(tensors.pop(f"{name}.input_zero_point", torch.zeros(1)).float().reshape(1, 1))


def _load_experts(model, path: str, names: dict[tuple[int, str], str], tensors: dict[str, torch.Tensor],
                  w_spec: QuantSpec, a_spec: QuantSpec | None) -> None:
    """Per-expert quantized Linears -> one ``QuantExperts`` in the place of the fused experts at ``path``."""
    fused = get_module(model, path)
    n = FusedExperts.count(fused)
    lacking = [(e, k) for e in range(n) for k in ("gate", "up", "down") if (e, k) not in names]
    if lacking:
        raise HaqmoeError(f"{path}: experts {sorted({e for e, _ in lacking})[:5]} are not quantized in this "
                          f"checkpoint (a partly quantized MoE layer is not supported)")
    qe = QuantExperts.like(fused, w_spec, a_spec)
    for (e, kind), name in names.items():
        _fill(getattr(qe, kind)[e], tensors, name)
    set_module(model, path, qe)


def load_compressed_tensors(path: str | Path, dtype: torch.dtype = torch.float32):
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
    adapter = adapter_for(config.model_type)
    if adapter.moe is not None:  # legacy Mixtral module name -> transformers 5's
        tensors = {k.replace(".block_sparse_moe.", f".{adapter.moe.block}."): v for k, v in tensors.items()}
    quantized = sorted(k[: -len(".weight_scale")] for k in tensors if k.endswith(".weight_scale"))
    experts: dict[str, dict[tuple[int, str], str]] = {}
    try:  # names come from the file: a name the model lacks must not become a traceback
        for name in quantized:
            m = _EXPERT.match(name)
            if m and not isinstance(get_module(model, m["experts"]), nn.ModuleList):
                experts.setdefault(m["experts"], {})[(int(m["e"]), _KINDS[m["kind"]])] = name
                continue
            lin = get_module(model, name)
            q = QuantLinear(lin.in_features, lin.out_features, lin.bias is not None, w_spec, a_spec, dtype)
            _fill(q, tensors, name)
            set_module(model, name, q)
        for exp_path, names in experts.items():
            _load_experts(model, exp_path, names, tensors, w_spec, a_spec)
    except (AttributeError, IndexError, KeyError, TypeError) as exc:
        raise HaqmoeError(f"{path}: a quantized tensor names a module this {config.model_type} model does not "
                          f"have ({type(exc).__name__}: {exc})") from exc
    owners = quantized + list(experts)
    tensors = {k: v for k, v in tensors.items() if not k.endswith(("input_scale", "input_zero_point"))}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [m for m in missing if not any(m.startswith(n + ".") for n in owners)]
    if config.tie_word_embeddings:
        missing = [m for m in missing if m != "lm_head.weight"]
        model.tie_weights()
    if missing or unexpected:
        raise HaqmoeError(f"{path} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    tok = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    return LoadedModel(model, tok, str(path), adapter,
                       quant={"quant": {"method": "compressed-tensors", "config": qcfg}})
