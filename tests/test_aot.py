"""Ahead-of-time compiled generation computes what transformers' ``generate`` computes."""

from __future__ import annotations

import json

import pytest
import torch

from haqmoe.errors import HaqmoeError
from haqmoe.models.adapters import adapter_for
from haqmoe.models.tiny import tiny_model
from haqmoe.exec.aot import AotGenerator, package_key
from haqmoe.exec.compiled import cache_len, compiler_available
from haqmoe.exec.kernels import w8a8_op
from haqmoe.quant.config import QuantConfig
from haqmoe.exec.precision import convert
from haqmoe.quant.rtn import quantize_rtn

needs_compiler = pytest.mark.skipif(not compiler_available(), reason="AOTInductor needs a C++ compiler")
needs_kernel = pytest.mark.skipif(w8a8_op() is None, reason="MoE export needs the fused int8 CPU kernel")


def _reference(model, ids: torch.Tensor, new: int) -> tuple[list[int], torch.Tensor]:
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True, output_logits=True)
    return out.sequences[0, ids.shape[1]:].tolist(), torch.cat(out.logits)


def _aot_logits(gen: AotGenerator, ids: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """Teacher-forced: the logits after the prompt, then after each of ``tokens`` but the last."""
    rows = [gen.logits(ids, 0)]
    rows += [gen.logits(torch.tensor([[t]]), ids.shape[1] + i) for i, t in enumerate(tokens[:-1])]
    return torch.stack(rows)


def _check_prompts(gen: AotGenerator, model, rel_tol: float) -> torch.Tensor:
    """The package's greedy tokens equal the model's and its teacher-forced logits are within ``rel_tol``
    (relative norm), for a long prompt and then a shorter one (which runs over the first one's stale cache
    entries). Returns the last prompt."""
    rng = torch.Generator().manual_seed(5)
    for length in (23, 6):
        ids = torch.randint(0, 128, (1, length), generator=rng)
        with torch.inference_mode():
            ref_tokens, ref_logits = _reference(model, ids, 10)
            tokens = gen.generate(ids, 10)[0, length:].tolist()
            logits = _aot_logits(gen, ids, ref_tokens)
        assert tokens == ref_tokens
        assert float((logits - ref_logits).norm() / ref_logits.norm()) < rel_tol
    return ids


@needs_compiler
@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "real-int8"])
def test_aot_generation_matches_transformers(tmp_path, int8: bool):
    model = tiny_model("llama", layers=2)
    if int8:
        quantize_rtn(model, adapter_for(model), QuantConfig.w8a8("rtn"), progress=False)
        convert(model, "int8", int8_lm_head=True)
    gen = AotGenerator.for_model(model, 40, root=tmp_path)
    # int8: the same integers, float ops possibly fused in another order (see test_compiled.py)
    ids = _check_prompts(gen, model, 2e-3 if int8 else 1e-5)
    # sampling: the same warpers in the same order and the same random draws as transformers
    sampling = dict(temperature=0.7, top_k=20, top_p=0.9)
    torch.manual_seed(11)
    with torch.inference_mode():
        ref = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=True, pad_token_id=0, **sampling)
    torch.manual_seed(11)
    assert gen.generate(ids, 12, **sampling).tolist() == ref.tolist()


@needs_compiler
@needs_kernel
@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])  # shared expert + router gate; plain top-k
def test_aot_int8_moe_matches_eager(tmp_path, family: str):
    """An int8 MoE whose experts run on the fused op exports: the package's greedy tokens and logits are
    eager int8's (same integers; float ops around them possibly fused in another order)."""
    model = tiny_model(family, layers=2)
    quantize_rtn(model, adapter_for(model), QuantConfig.w8a8("rtn"), progress=False)
    convert(model, "int8", int8_lm_head=True)
    gen = AotGenerator.for_model(model, 40, root=tmp_path)
    _check_prompts(gen, model, 2e-3)  # prefill routes many tokens per expert, decode one


@needs_compiler
def test_aot_package_is_reused_and_keyed_by_weights(tmp_path):
    model = tiny_model("llama", layers=1)
    first = AotGenerator.for_model(model, 10, root=tmp_path)
    stamp = first.path.stat().st_mtime_ns
    assert AotGenerator.for_model(model, 200, root=tmp_path).path == first.path  # same 256-token bucket
    assert first.path.stat().st_mtime_ns == stamp  # loaded, not rebuilt
    assert package_key(model, 512) != package_key(model, 256)
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1
    assert package_key(model, 256) != first.path.stem


def test_toolchain_deprecation_warnings_are_silenced():
    """torch's export raises a FutureWarning about its own pytree internals; the CLI printed it as
    "haqmoe: warning: ..." on every package build."""
    import warnings

    from torch.utils._pytree import LeafSpec

    from haqmoe.exec.aot import quiet_toolchain

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_toolchain():
            LeafSpec()  # what torch's export does internally
    assert not seen, [str(w.message) for w in seen]


@pytest.mark.slow
@needs_compiler
def test_aot_on_smollm2_w8a8_parts_from_eager_only_within_its_noise_floor(capsys):
    """SmolLM2 W8A8 (RTN), greedy: the package may answer differently from eager int8, and this is the
    tolerance. The W8A8 model amplifies float rounding (an activation on a rounding boundary flips an
    int8 step), so two eager evaluations of the same tokens (token by token, then one forward pass) are
    already far apart; the package's logits on eager's tokens must be no further from eager's than that
    noise floor allows, and its greedy tokens must equal eager's up to the first step where eager's
    top-2 margin lies within the floor (for "The capital of France is": step 9, " 2018" vs " 100")."""
    from haqmoe.sources import load_model

    lm = load_model("smollm2-135m", progress=False)
    quantize_rtn(lm.model, lm.adapter, QuantConfig.w8a8("rtn"), progress=False)
    convert(lm.model, "int8")
    ids = lm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    new = 24
    with torch.inference_mode():
        eager, eager_logits = _reference(lm.model, ids, new)
        one_pass = lm.model(torch.tensor([ids[0].tolist() + eager])).logits[0, ids.shape[1] - 1:-1]
        gen = AotGenerator.for_model(lm.model, ids.shape[1] + new)  # the user cache: built once, minutes
        aot = gen.generate(ids, new)[0, ids.shape[1]:].tolist()
        aot_logits = _aot_logits(gen, ids, eager)
    floor = float((one_pass - eager_logits).abs().max())
    deviation = float((aot_logits - eager_logits).abs().max())
    top2 = eager_logits.topk(2, dim=-1).values
    margins = (top2[:, 0] - top2[:, 1]).tolist()
    parted = next((i for i, (a, e) in enumerate(zip(aot, eager)) if a != e), None)
    with capsys.disabled():
        print(f"\nnoise floor {floor:.3f}, package deviation {deviation:.3f}, parted at {parted} "
              f"(eager margin there {margins[parted] if parted is not None else None})")
    assert deviation <= 2 * floor
    assert parted is None or margins[parted] < floor
    assert aot[:parted] == eager[:parted]


def test_cache_length_buckets():
    assert [cache_len(n) for n in (1, 256, 257, 600)] == [256, 256, 512, 768]


def test_aot_refuses_per_expert_moe_models_and_overlong_generations(tmp_path):
    """Float (and fake-quant) experts dispatch per expert in Python, data-dependent: refused before tracing."""
    with pytest.raises(HaqmoeError, match="fused int8 CPU op"):
        AotGenerator.for_model(tiny_model("mixtral", layers=1), 10, root=tmp_path)
    gen = AotGenerator(runner=lambda **kw: None, max_len=256, path=tmp_path / "x.pt2")
    with pytest.raises(HaqmoeError, match="exceed"):
        gen.generate(torch.zeros(1, 250, dtype=torch.long), 10)


@needs_compiler
def test_haqmoe_generate_aot_keeps_the_text(tmp_path, monkeypatch, capsys):
    """`generate --aot` (int8, greedy) prints what plain `generate` prints; the package lands in the cache."""
    from haqmoe.sources import load_model
    from haqmoe.quant.checkpoint import save_quantized
    from haqmoe.serve.fixtures import tiny_chat_model
    from tests.test_cli import run

    monkeypatch.setenv("HAQMOE_CACHE", str(tmp_path / "cache"))
    lm = load_model(str(tiny_chat_model(tmp_path / "m", "llama")), progress=False)
    cfg = QuantConfig.w8a8("rtn")
    quantize_rtn(lm.model, lm.adapter, cfg, progress=False)
    save_quantized(lm.model, lm.tokenizer, tmp_path / "q", cfg, {"source": "tiny"})
    args = ["generate", str(tmp_path / "q"), "-p", "Hello there", "--max-tokens", "12", "--exec", "real", "--json"]
    rows = []
    for extra in ([], ["--aot"], ["--aot"]):  # the second --aot run loads the package built by the first
        code, out, err = run(args + extra, capsys)
        assert code == 0 and "warning" not in err, err  # nothing of torch's own deprecations
        rows.append(json.loads(out))
    assert rows[1]["text"] == rows[2]["text"] == rows[0]["text"] and rows[1]["tokens"] == 12
    assert len(list((tmp_path / "cache" / "aot").glob("*.pt2"))) == 1
    code, _, err = run(args + ["--aot", "--compile"], capsys)
    assert code == 2 and "pick one" in err
