"""llm-compressor 0.14 SmoothQuant + GPTQ W8A8 on the same model and calibration tokens as ours.

Runs in bench/peers/.venv (``make peers``); writes a compressed-tensors checkpoint that our
evaluator reads (``haqmoe compare --methods ...,ct:OUT`` or ``bench/haq.py --peer OUT``).

    bench/peers/.venv/bin/python bench/peers/llmcompressor_w8a8.py MODEL_DIR bench/peers/out/calib.pt \
        bench/peers/out/smollm2-llmc-w8a8 [--asym]

--asym: the preset as close to ours as its schemes allow (asymmetric int8 weights per channel,
asymmetric dynamic per-token activations); default: the stock symmetric ``W8A8`` preset, as users run it.
Prints the quantization wall time (what the haq/peer time ratio is computed from). MoE models
(the upcycled SmolLM2-MoE) are loaded through llm-compressor's ``load_quantizable_moe``, which
unfuses the experts into Linears so its GPTQ quantizes them; its SmoothQuant mapping for Mixtral
smooths attention only, the router stays float (ignored, as in ours).

--stage-dir DIR: run the two passes as two oneshot calls and save the SmoothQuant-smoothed float
weights (state dict of the linearized model) to DIR in between; a rerun finds it and only runs GPTQ. The same result as one call (its
independent pipeline runs SmoothQuant with quantization disabled, then GPTQ), but the MoE build,
~20 + ~35 min on 2 cores, then survives an interruption between its passes.
"""

import argparse
import contextlib
import json
import sys
import time
import types
from pathlib import Path

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modeling.moe.linearize import load_quantizable_moe
from llmcompressor.modifiers.quantization import GPTQModifier
from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
from transformers import AutoModelForCausalLM, AutoTokenizer

ap = argparse.ArgumentParser()
ap.add_argument("model_dir")
ap.add_argument("calib")
ap.add_argument("out")
ap.add_argument("--asym", action="store_true")
ap.add_argument("--alpha", type=float, default=0.8)
ap.add_argument("--stage-dir", type=Path, help="save/resume the smoothed model between the two passes")
a = ap.parse_args()

ids = torch.load(a.calib)
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})


@contextlib.contextmanager
def without_unlistable_aliases():
    """Hide, for the load, transformers' alias modules that cannot be listed. Loading a Qwen2-MoE (the
    MoEfied model) through llm-compressor's linearizing loader makes transformers 5.17 (the newest it
    accepts) list every loaded transformers module, and the alias for fast image processors imports
    torchvision when listed: without torchvision (no CPU build of it matches torch 2.13 here, and a
    text model needs none) the load fails with "No module named 'torchvision'"."""
    hidden = {}
    for name, module in list(sys.modules.items()):
        if name.startswith("transformers.") and isinstance(module, types.ModuleType) and module.__dict__.get(
                "__file__", "") is None:  # an alias: its __dir__ imports the target
            try:
                dir(module)
            except ImportError:
                hidden[name] = sys.modules.pop(name)
    try:
        yield
    finally:
        sys.modules.update(hidden)


def load(path):
    # MoE experts as per-expert Linears, so GPTQ reaches them (no-op for dense)
    with without_unlistable_aliases(), load_quantizable_moe():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def run(model, recipe) -> float:
    start = time.perf_counter()
    oneshot(model=model, processor=tok, dataset=ds, recipe=recipe, max_seq_length=ids.shape[1],
            num_calibration_samples=ids.shape[0])
    return time.perf_counter() - start


tok = AutoTokenizer.from_pretrained(a.model_dir)
if a.asym:
    scheme = {"config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "int", "symmetric": False, "strategy": "channel"},
        "input_activations": {"num_bits": 8, "type": "int", "symmetric": False, "strategy": "token",
                              "dynamic": True}}}}
    gptq = GPTQModifier(ignore=["lm_head", "re:.*mlp.gate$"], **scheme)
else:
    gptq = GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head", "re:.*mlp.gate$"])
smooth = SmoothQuantModifier(smoothing_strength=a.alpha)
stage_meta = a.stage_dir / "stage_meta.json" if a.stage_dir else None
if stage_meta is None:
    model = load(a.model_dir)
    seconds = run(model, [smooth, gptq])
else:
    setup = {"model_dir": str(a.model_dir), "calib": list(ids.shape), "alpha": a.alpha}
    saved = json.loads(stage_meta.read_text()) if stage_meta.exists() else {}
    model = load(a.model_dir)
    if saved.get("setup") == setup:  # the smoothed weights, into the same linearized module tree
        model.load_state_dict(torch.load(a.stage_dir / "smoothed.pt"), strict=True)
        smooth_seconds = saved["smooth_seconds"]
        print(f"resuming after SmoothQuant from {a.stage_dir} ({smooth_seconds:.0f} s)")
    else:
        smooth_seconds = run(model, [smooth])
        a.stage_dir.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), a.stage_dir / "smoothed.pt")
        stage_meta.write_text(json.dumps({"setup": setup, "smooth_seconds": smooth_seconds}) + "\n")
    seconds = smooth_seconds + run(model, [gptq])
model.save_pretrained(a.out, save_compressed=True)
tok.save_pretrained(a.out)
(Path(a.out) / "peer_meta.json").write_text(json.dumps({"quant_seconds": seconds, "asym": a.asym,
                                                        "alpha": a.alpha, "calib": list(ids.shape)}) + "\n")
print(json.dumps({"out": a.out, "quant_seconds": round(seconds, 1)}))
