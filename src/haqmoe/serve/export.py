"""Export a haqmoe quantized checkpoint to compressed-tensors W8A8 (``int-quantized``) for vLLM.

What vLLM's int8 paths need, and why this layout:

* weights int8, symmetric, one scale per output channel (``weight`` int8 + ``weight_scale``
  [out, 1]; no zero point): vLLM's CUTLASS/Triton int8 GEMMs and its int8 fused-MoE kernel only
  take symmetric per-channel weights. Asymmetric haqmoe weights are refused unless
  ``requantize=True``, which re-rounds the dequantized weight symmetrically (an extra, reported,
  rounding error).
* activations dynamic, symmetric, per token: computed by vLLM at run time; nothing is stored.
* MoE experts unfused into per-expert Linears with the legacy Hugging Face names that vLLM's
  loaders map onto its fused-MoE weights: Mixtral ``block_sparse_moe.experts.E.w1`` (gate),
  ``w3`` (up), ``w2`` (down) and ``block_sparse_moe.gate`` (router); Qwen/OLMoE/DeepSeek style
  ``mlp.experts.E.gate_proj/up_proj/down_proj``. transformers' own conversion mapping reads the
  same names back into its fused experts.
* experts that are not plain ``down(act(gate) · up)`` without biases (gpt-oss: biased projections,
  clamped SwiGLU) are refused: vLLM reads gpt-oss's experts fused (MXFP4 or bf16), and has no
  per-expert int8 layout for them to load.
* routers, lm_head, embeddings (and any linear we left in float) stay unquantized and are listed
  in ``ignore``; routers decide expert choice and vLLM keeps them in float. An lm_head stored as
  int8 rows (``--int8-lm-head``) is written dequantized, in float, like the others.

The ``quantization_config`` is built with the compressed-tensors library's own classes and
written by its ``ModelCompressor.update_config``, so the format is the library's, not ours.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from safetensors.torch import save_file

from ..errors import HaqmoeError
from ..io import atomic_directory
from ..models.adapters import GLU
from ..models.lazy import INDEX_FILE, SafetensorsFolder
from ..quant.modules import Int8Embedding, QuantExperts, QuantLinear, QuantVocab
from ..quant.quantizer import QuantSpec, compute_qparams, quantize

EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2")}  # (gate, up, down) per family; default below
DEFAULT_EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")
SYMMETRIC_W8 = QuantSpec(8, symmetric=True, granularity="channel")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class ExportConfig:
    requantize: bool = False  # asymmetric weights: re-quantize symmetric instead of refusing
    dtype: str = "bfloat16"  # dtype of unquantized tensors (vLLM's int8 kernels run bf16/fp16 activations)


@dataclass
class ExportReport:
    out: str
    quantized_linears: int = 0
    ignored: list[str] = field(default_factory=list)
    requantized: bool = False
    max_requant_error: float = 0.0  # max |W_sym - W_ours| / max|W| over requantized weights
    shards: int = 1
    tensors: int = 0


def vllm_name(name: str, family: str) -> str:
    """Map a transformers-5 module path to the checkpoint name vLLM's loader expects."""
    if family == "mixtral":
        return name.replace(".mlp.", ".block_sparse_moe.")
    return name


def _symmetric(lin: QuantLinear, cfg: ExportConfig, report: ExportReport) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, fp32 scale [out, 1]) in vLLM's symmetric per-channel convention."""
    spec = lin.w_spec
    if spec.bits != 8 or spec.granularity != "channel":
        raise HaqmoeError(f"vLLM's int8 kernels need 8-bit per-channel weights; this checkpoint has "
                          f"{spec.bits}-bit {spec.granularity} weights (re-quantize with --w-sym, per channel)")
    if spec.symmetric and not torch.any(lin.w_zero != 0):
        return lin.qweight.clone(), lin.w_scale.reshape(-1, 1).float().clone()
    if not cfg.requantize:
        raise HaqmoeError("this checkpoint has asymmetric weights (zero points), which vLLM's int8 kernels do not "
                          "support: quantize with symmetric weights (haqmoe quantize --w-sym), or pass "
                          "--requantize to re-round the weights symmetrically (adds rounding error)")
    w = lin.weight_float()
    scale, zero = compute_qparams(w, SYMMETRIC_W8)
    q = quantize(w, scale, zero, SYMMETRIC_W8)
    err = float((q.float() * scale - w).abs().max() / w.abs().max().clamp_min(1e-12))
    report.requantized, report.max_requant_error = True, max(report.max_requant_error, err)
    return q, scale.reshape(-1, 1).float()


def collect_tensors(lm, cfg: ExportConfig, report: ExportReport, prefix: str | None = None
                    ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The exported tensors (vLLM names) and ignore entries of the modules under ``prefix`` (one
    decoder block, "model.layers.3"), or of everything outside the blocks (``prefix`` None): export
    and verification go block by block, so only one block's tensors exist at a time."""
    model, family = lm.model, lm.adapter.name
    layers = lm.adapter.layers + "."
    gate, up, down = EXPERT_NAMES.get(family, DEFAULT_EXPERT_NAMES)
    dtype = DTYPES[cfg.dtype]

    def mine(name: str) -> bool:
        return name.startswith(prefix + ".") if prefix is not None else not name.startswith(layers)

    tensors: dict[str, torch.Tensor] = {}
    owned: set[str] = set()  # module prefixes whose state the loop below already wrote
    ignore: list[str] = []
    for name, mod in model.named_modules():
        if not mine(name):
            continue
        if isinstance(mod, QuantExperts):
            for e in range(mod.num_experts):
                for kind, lins in ((gate, mod.gate), (up, mod.up), (down, mod.down)):
                    base = vllm_name(f"{name}.{e}.{kind}", family)
                    tensors[f"{base}.weight"], tensors[f"{base}.weight_scale"] = _symmetric(lins[e], cfg, report)
                    report.quantized_linears += 1
            owned.add(name)
        elif isinstance(mod, QuantLinear) and not any(name.startswith(o + ".") for o in owned):
            base = vllm_name(name, family)
            if _is_router(lm, name) or name == "lm_head":  # kept float for vLLM
                tensors[f"{base}.weight"] = mod.weight_float().to(dtype)
                ignore.append(base)
            else:
                tensors[f"{base}.weight"], tensors[f"{base}.weight_scale"] = _symmetric(mod, cfg, report)
                report.quantized_linears += 1
            if mod.bias is not None:
                tensors[f"{base}.bias"] = mod.bias.to(dtype)
            owned.add(name)
        elif isinstance(mod, (QuantVocab, Int8Embedding)):  # int8 rows (--int8-lm-head): float for vLLM
            base = vllm_name(name, family)
            if not (model.config.tie_word_embeddings and base == "lm_head"):
                tensors[f"{base}.weight"] = mod.weight_float().to(dtype)
            ignore.append(base)
            owned.add(name)
        elif isinstance(mod, nn.Linear) or _is_router(lm, name) or isinstance(mod, nn.Embedding):
            ignore.append(vllm_name(name, family))  # float linears / routers / embeddings: not quantized
    for key, t in model.state_dict().items():
        if not mine(key) or any(key.startswith(o + ".") for o in owned):
            continue
        if "experts." in key and t.dim() == 3:
            raise HaqmoeError(f"{key}: routed experts are not quantized in this checkpoint")
        tensors[vllm_name(key, family)] = t.to(dtype) if t.is_floating_point() else t
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    return {k: v.contiguous() for k, v in tensors.items()}, ignore


def export_parts(lm) -> list[str | None]:
    """What export writes one shard each for: every decoder block, then the rest (None)."""
    return [f"{lm.adapter.layers}.{i}" for i in range(len(lm.adapter.blocks(lm.model)))] + [None]


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _is_router(lm, name: str) -> bool:
    """Routers (and Qwen2-MoE's shared-expert gate) pick experts: vLLM keeps them in float."""
    moe = lm.adapter.moe
    return moe is not None and any(p and name.endswith("." + p) for p in (moe.router, moe.shared_gate))


def quantization_config(ignore: list[str]):
    """The compressed-tensors W8A8 config: int8 sym per-channel weights, dynamic sym per-token activations."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    weights = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel", dynamic=False)
    acts = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)
    return QuantizationConfig(config_groups={"group_0": scheme}, ignore=ignore, format="int-quantized",
                              quantization_status="compressed")


def export_compressed_tensors(source: str, out: str | Path, cfg: ExportConfig = ExportConfig(),
                              overwrite: bool = False) -> ExportReport:
    """Write ``source`` (a haqmoe quantized checkpoint) as a compressed-tensors W8A8 directory."""
    from compressed_tensors.compressors import ModelCompressor

    from ..sources import load_model

    if cfg.dtype not in DTYPES:
        raise HaqmoeError(f"unknown dtype '{cfg.dtype}' (choose from {', '.join(DTYPES)})")
    if not (Path(source) / "haqmoe_quant.json").is_file():
        raise HaqmoeError(f"{source} is not a haqmoe quantized checkpoint directory (run haqmoe quantize first)")
    lm = load_model(source, progress=False)
    if lm.quant is None or "linears" not in lm.quant:
        raise HaqmoeError(f"{source} is not a haqmoe quantized checkpoint (run haqmoe quantize first)")
    if lm.adapter.moe is None and lm.is_moe:
        raise HaqmoeError(f"{source}: unsupported MoE layout for export")
    for name, mod in lm.model.named_modules():
        if isinstance(mod, QuantExperts) and (mod.has_bias or not isinstance(mod.glu, GLU)):
            raise HaqmoeError(f"{source}: the experts at {name} ({type(mod.glu).__name__}"
                              f"{', biased' if mod.has_bias else ''}) have no compressed-tensors int8 layout that "
                              f"vLLM loads ({lm.adapter.name} experts are read fused): export is not supported "
                              "for this architecture")
    out = Path(out)
    report = ExportReport(str(out))
    parts = export_parts(lm)
    ignore: list[str] = []
    weight_map: dict[str, str] = {}
    total = 0
    with atomic_directory(out, overwrite=overwrite) as tmp:
        for i, prefix in enumerate(parts):  # one block's tensors in memory at a time
            tensors, ign = collect_tensors(lm, cfg, report, prefix)
            ignore += ign
            name = shard_name(i, len(parts))
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, name))
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            del tensors
        if report.quantized_linears == 0:
            raise HaqmoeError(f"{lm.name} has no quantized layers: quantize it first (haqmoe quantize)")
        report.ignored, report.tensors, report.shards = sorted(set(ignore)), len(weight_map), len(parts)
        (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2) + "\n")
        config = lm.model.config.to_dict()
        config.pop("quantization_config", None)
        config["torch_dtype"] = config["dtype"] = cfg.dtype
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        ModelCompressor(quantization_config=quantization_config(report.ignored)).update_config(str(tmp))
        if lm.tokenizer is not None:
            lm.tokenizer.save_pretrained(tmp)
        src_dir = Path(source)
        if (src_dir / "generation_config.json").is_file():
            shutil.copy(src_dir / "generation_config.json", tmp / "generation_config.json")
        (tmp / "haqmoe_export.json").write_text(json.dumps(
            {"source": str(source), "source_quant": lm.quant["quant"], "requantized": report.requantized,
             "max_requant_error": report.max_requant_error}, indent=2) + "\n")
    return report


# ------------------------------------------------------------------------------ verification
@dataclass
class VerifyReport:
    tensors_compared: int = 0
    quantized_compared: int = 0
    max_weight_diff: float = 0.0  # library-dequantized vs haqmoe-dequantized weights
    layers_run: list[str] = field(default_factory=list)
    max_weight_output_rel_diff: float = 0.0  # library decompressed linear vs ours, activations unquantized
    max_output_rel_diff: float = 0.0  # library W8A8 QDQ forward vs haqmoe QuantLinear forward (see below)


def _library_linears(names: list[str], tensors: dict[str, torch.Tensor], qconfig) -> nn.Module:
    """A module tree holding ``names`` as nn.Linear, quantized and decompressed by compressed-tensors."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config
    from compressed_tensors.utils import replace_direct_state_dict

    root = nn.Module()
    for name in names:
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        w = tensors[f"{name}.weight"]
        parent.add_module(leaf, nn.Linear(w.shape[1], w.shape[0], bias=False))
    apply_quantization_config(root, qconfig, show_progress=False)
    for name in names:
        mod = root.get_submodule(name)
        if hasattr(mod, "quantization_scheme"):
            state = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == name}
            replace_direct_state_dict(mod, state)
            if "bias" not in state:  # replace_direct_state_dict drops what the state lacks
                mod.register_parameter("bias", None)
    ModelCompressor(quantization_config=qconfig).decompress_model(root)
    return root.float()  # compare in fp32 whatever the export dtype


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def verify_export(out: str | Path, source: str, layers: int = 2, seed: int = 0) -> VerifyReport:
    """Load the export with the compressed-tensors library and compare it with our checkpoint.

    1. The library's model-free dequantizer (``CompressedTensorsDequantizer.validate``) must consume
       every quantization parameter and dequantize every targeted weight; each result must equal our
       dequantized weight, and every other tensor must equal ours (after the export dtype cast).
    2. For the linears of the first ``layers`` decoder layers, the library's own quantized forward
       (dynamic per-token activation QDQ, decompressed weight) must match our ``QuantLinear``: exactly
       without activation quantization; to rounding with it, since the library's reference QDQ
       scales symmetric int8 by amax/127.5 where vLLM's kernels (and we) use amax/127.
    """
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
    from compressed_tensors.quantization import QuantizationConfig

    from ..sources import load_model

    out = Path(out)
    folder = SafetensorsFolder.open(out)
    qconfig = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    requantized = json.loads((out / "haqmoe_export.json").read_text()).get("requantized")
    lm = load_model(source, progress=False)
    family = lm.adapter.name
    ours_q: dict[str, QuantLinear] = {}
    for name, mod in lm.model.named_modules():
        if isinstance(mod, QuantExperts):
            gate, up, down = EXPERT_NAMES.get(family, DEFAULT_EXPERT_NAMES)
            for e in range(mod.num_experts):
                for kind, lins in ((gate, mod.gate), (up, mod.up), (down, mod.down)):
                    ours_q[vllm_name(f"{name}.{e}.{kind}", family)] = lins[e]
        elif isinstance(mod, QuantLinear) and ".experts." not in name:
            ours_q[vllm_name(name, family)] = mod
    ours_float = {vllm_name(k, family): v for k, v in lm.model.state_dict().items()}  # views: no copies
    vocab = {f"{vllm_name(n, family)}.weight": m for n, m in lm.model.named_modules()
             if isinstance(m, (QuantVocab, Int8Embedding))}
    dequantizer = CompressedTensorsDequantizer(out, dtype=torch.float32)
    rep = VerifyReport()
    for shard in sorted({e.file for e in folder.entries.values()}):  # one shard's tensors at a time
        raw = {k: folder.read(k) for k, e in folder.entries.items() if e.file == shard}
        for key, t in dequantizer.validate(dict(raw)).items():
            _verify_tensor(key, t, raw, ours_q, ours_float, vocab, requantized, source, rep)
    exported = {k.rsplit(".", 1)[0] for k in folder.entries if k.endswith(".weight_scale")}
    lost = [n for n in ours_q if n not in exported and n not in qconfig.ignore]
    if lost:
        raise HaqmoeError(f"the export lacks quantized linears of the checkpoint: {lost[:3]}")
    prefixes = tuple(f"model.layers.{i}." for i in range(layers))
    names = [n for n in ours_q if n.startswith(prefixes) and f"{n}.weight_scale" in folder]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in names:  # one decompressed linear at a time (a Mixtral expert's is 235 MB in fp32)
            lin = ours_q[name]
            x = torch.randn(5, lin.in_features, generator=gen)
            own = {k: folder.read(k) for k in folder.entries if k.rsplit(".", 1)[0] == name}
            mod = _library_linears([name], own, qconfig).get_submodule(name)
            theirs, ours = mod(x), lin(x)
            rep.max_output_rel_diff = max(rep.max_output_rel_diff, _rel(theirs, ours))
            mod.quantization_enabled = False  # the decompressed weight alone
            rep.max_weight_output_rel_diff = max(rep.max_weight_output_rel_diff,
                                                 _rel(mod(x), nn.functional.linear(x, lin.weight_float())))
            mod.quantization_enabled = True
    rep.layers_run = names
    return rep


def _verify_tensor(key: str, t: torch.Tensor, raw: dict, ours_q: dict, ours_float: dict, vocab: dict,
                   requantized: bool, source: str, rep: VerifyReport) -> None:
    """One dequantized export tensor against the checkpoint's own (see ``verify_export``)."""
    module = key.rsplit(".", 1)[0]
    if f"{module}.weight_scale" in raw and key.endswith(".weight"):
        lin = ours_q.get(module)
        if lin is None:
            raise HaqmoeError(f"{key}: quantized in the export but not in {source}")
        diff = float((t - lin.weight_float()).abs().max())
        if not torch.equal(raw[key], lin.qweight) and not requantized:
            raise HaqmoeError(f"{key}: int8 weights differ from the checkpoint's")
        rep.max_weight_diff = max(rep.max_weight_diff, diff)
        rep.quantized_compared += 1
    elif key.endswith(".bias") and module in ours_q:
        if not torch.equal(t, ours_q[module].bias.to(t.dtype)):
            raise HaqmoeError(f"{key}: bias differs from the checkpoint's")
    elif module in ours_q:  # a quantized linear exported in float (router, lm_head)
        diff = float((t.float() - ours_q[module].weight_float()).abs().max())
        if diff > 1e-2 * float(t.abs().max()):
            raise HaqmoeError(f"{key}: float export differs from the dequantized checkpoint")
    else:
        ref = vocab[key].weight_float() if key in vocab else ours_float.get(key)
        if ref is None or not torch.equal(t, ref.to(t.dtype)):
            raise HaqmoeError(f"{key}: missing from or different in the export")
    rep.tensors_compared += 1
