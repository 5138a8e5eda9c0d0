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
"""

import argparse
import json
import time
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
a = ap.parse_args()

ids = torch.load(a.calib)
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
with load_quantizable_moe():  # MoE experts as per-expert Linears, so GPTQ reaches them (no-op for dense)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
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
recipe = [SmoothQuantModifier(smoothing_strength=a.alpha), gptq]
start = time.perf_counter()
oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=ids.shape[1], num_calibration_samples=ids.shape[0])
seconds = time.perf_counter() - start
model.save_pretrained(a.out, save_compressed=True)
tok.save_pretrained(a.out)
(Path(a.out) / "peer_meta.json").write_text(json.dumps({"quant_seconds": seconds, "asym": a.asym,
                                                        "alpha": a.alpha, "calib": list(ids.shape)}) + "\n")
print(json.dumps({"out": a.out, "quant_seconds": round(seconds, 1)}))
