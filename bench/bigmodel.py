"""Real-size MoE, bounded memory: every command on a checkpoint larger than this machine's RAM.

    .venv/bin/python bench/bigmodel.py [--layers 6] [--work DIR] [--limit-gb 18] [--steps info,quantize-rtn,...]
    .venv/bin/python bench/bigmodel.py --layers 1 --steps quantize-haq --out bench/results/bigmodel_haq.json

Writes a random-weight checkpoint in the Hub's Mixtral layout with REAL Mixtral-8x7B widths
(hidden 4096, ffn 14336, 8 experts top-2, 32 query / 8 kv heads), ``--layers`` decoder layers,
bf16, one shard per layer, per-expert keys (``block_sparse_moe.experts.E.w1/w2/w3``) and
SmolLM2's tokenizer (so the vocabulary is SmolLM2's 49152, not Mixtral's 32000). Then runs each
haqmoe command on it as its own process and records per step the wall time and the peak
anonymous RSS (``RssAnon`` of the process tree, sampled every 0.2 s; mapped file pages do not
count: they are page cache the kernel can drop). A step that passes ``--limit-gb`` is killed and
recorded as failed, so the shared machine survives. Default 6 layers: 36 GB in fp32, 18 GB on disk.

Writes bench/results/bigmodel.json + .md (measured on this CPU).

    .venv/bin/python bench/bigmodel.py --requirements

computes instead, from the real Mixtral-8x7B config on a ``meta`` skeleton (no weights), what a
user needs for the full model: disk, the memory ``quantize`` needs by haqmoe's own guard, the W8A8
model's size, and the GPU memory of everything but the experts -> bench/results/bigmodel_requirements.*
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import save_file

from haqmoe.models.embedded import DENSE, ensure_embedded
from haqmoe.results import run_meta, write_results

ROOT = Path(__file__).resolve().parent
HAQMOE = str(Path(sys.executable).with_name("haqmoe"))
MIXTRAL = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
               num_local_experts=8, num_experts_per_tok=2, head_dim=128, rms_norm_eps=1e-5,
               rope_theta=1e6, max_position_embeddings=32768, sliding_window=None)
GB = 1e9
GOAL_GIB = 12.0  # every step's peak RssAnon (one Mixtral block is 5.8 GB in fp32)


def write_checkpoint(out: Path, layers: int) -> dict:
    """The random bf16 checkpoint, one tensor generated and written at a time (one layer in memory)."""
    from transformers import AutoTokenizer, MixtralConfig

    tok = AutoTokenizer.from_pretrained(ensure_embedded(DENSE, progress=False))
    cfg = MixtralConfig(vocab_size=len(tok), num_hidden_layers=layers, tie_word_embeddings=False,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **MIXTRAL)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    h, f, e, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.num_key_value_heads * 128

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    weight_map: dict[str, str] = {}
    files = [f"model-{i + 1:05d}-of-{layers + 1:05d}.safetensors" for i in range(layers + 1)]
    for i in range(layers):
        p = f"model.layers.{i}."
        t = {p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
             p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
             p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
             p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
             p + "block_sparse_moe.gate.weight": rand(e, h)}
        for x in range(e):
            q = f"{p}block_sparse_moe.experts.{x}."
            t |= {q + "w1.weight": rand(f, h), q + "w3.weight": rand(f, h), q + "w2.weight": rand(h, f)}
        save_file(t, str(tmp / files[i]), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(t, files[i])
        del t
    t = {"model.embed_tokens.weight": rand(cfg.vocab_size, h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
         "lm_head.weight": rand(cfg.vocab_size, h)}
    save_file(t, str(tmp / files[-1]), metadata={"format": "pt"})
    weight_map |= dict.fromkeys(t, files[-1])
    params = sum(int(torch.Size(s).numel()) for s in _shapes(tmp, weight_map))
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 2 * params}, "weight_map": weight_map}, indent=1))
    cfg.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return {"parameters": params, "fp32_gb": round(4 * params / GB, 2), "bf16_gb": round(2 * params / GB, 2)}


def _shapes(folder: Path, weight_map: dict[str, str]):
    from haqmoe.models.lazy import read_header

    for name in sorted(set(weight_map.values())):
        header = read_header(folder / name)
        yield from (v["shape"] for k, v in header.items() if not k.startswith("__"))


def rss_anon(pid: int) -> int:
    """RssAnon (bytes) of a process and its children: private memory, not mapped file pages."""
    total = 0
    try:
        procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        try:
            for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def run_step(name: str, argv: list[str], limit: int, log: Path, env: dict | None = None) -> dict:
    """One command as its own process; killed (and recorded as failed) past ``limit`` bytes."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})
        peak, killed = 0, False
        while proc.poll() is None:
            peak = max(peak, rss_anon(proc.pid))
            if peak > limit:
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
                proc.wait()
                break
            time.sleep(0.2)
    wall = time.perf_counter() - start
    tail = log.read_text().strip().splitlines()[-1:] or [""]
    status = "killed (memory limit)" if killed else ("ok" if proc.returncode == 0 else f"exit {proc.returncode}")
    print(f"{name}: {status}, {wall:.0f} s, peak RssAnon {peak / 2**30:.2f} GiB", flush=True)
    return {"step": name, "status": status, "wall_s": round(wall, 1), "peak_rss_anon_gib": round(peak / 2**30, 2),
            "last_line": tail[0][:160]}


def steps(ckpt: Path, work: Path) -> dict[str, list[str]]:
    rtn, haq = work / "q-rtn", work / "q-haq"
    return {
        "info": [HAQMOE, "info", str(ckpt), "--json"],
        "quantize-rtn": [HAQMOE, "-q", "quantize", str(ckpt), "-o", str(rtn), "--method", "rtn", "--overwrite"],
        "quantize-haq": [HAQMOE, "-q", "quantize", str(ckpt), "-o", str(haq), "--method", "haq", "--calib", "pydoc",
                         "--calib-samples", "4", "--calib-len", "128", "--grid", "5", "--overwrite"],
        "info-w8a8": [HAQMOE, "info", str(rtn), "--json"],
        "eval": [HAQMOE, "-q", "eval", str(rtn), "--data", "pydoc", "--seqlen", "512", "--windows", "1", "--json"],
        "profile": [HAQMOE, "-q", "profile", str(rtn), "-o", str(work / "trace"), "--data", "pydoc", "--seqlen", "64",
                    "--requests", "2", "--chunk", "2", "--overwrite"],
        "run": [HAQMOE, "-q", "run", str(rtn), "--emulate-gpu", "--max-tokens", "4", "--prompt", "The capital of"],
        "run-real": [HAQMOE, "-q", "run", str(rtn), "--emulate-gpu", "--exec", "real", "--max-tokens", "4",
                     "--prompt", "The capital of"],
        "export": [HAQMOE, "-q", "export", str(rtn), "-o", str(work / "ct"), "--requantize", "--overwrite"],
    }


def requirements(out: Path) -> None:
    """What Mixtral-8x7B needs, computed with haqmoe's own footprint and memory-guard functions."""
    from transformers import MixtralConfig

    from haqmoe.models.adapters import adapter_for
    from haqmoe.models.footprint import footprint
    from haqmoe.models.lazy import skeleton
    from haqmoe.reliability.guard import estimate_quant_memory
    from haqmoe.runtime.engine import GPU_RESERVE, KV_TOKENS

    cfg = MixtralConfig(vocab_size=32000, num_hidden_layers=32, **MIXTRAL)
    model = skeleton(cfg)
    adapter = adapter_for(model)
    size = footprint(model, adapter)
    calib = torch.zeros(128, 512, dtype=torch.long)
    experts = size.expert_parameters
    expert_rows = cfg.num_hidden_layers * cfg.num_local_experts * (2 * cfg.intermediate_size + cfg.hidden_size)
    non_expert_w8a8 = size.w8a8_bytes - (experts + 8 * expert_rows)  # int8 + fp32 scale and zero per row
    kv_bf16 = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * 128 * KV_TOKENS * 2
    expert_int8 = (3 * cfg.hidden_size * cfg.intermediate_size + 8 * (2 * cfg.intermediate_size + cfg.hidden_size))
    rows = [
        {"what": "parameters (B)", "value": size.parameters / 1e9},
        {"what": "disk: source checkpoint, bf16 (GB)", "value": size.bf16_bytes / GB},
        {"what": "disk: haqmoe W8A8 checkpoint (GB)", "value": size.w8a8_bytes / GB},
        {"what": "RAM: quantize rtn, streaming (GB, guard estimate)",
         "value": estimate_quant_memory(model, adapter, None, 8, streaming=True).total / GB},
        {"what": "RAM: quantize haq, 128 x 512 calibration, streaming (GB, guard estimate)",
         "value": estimate_quant_memory(model, adapter, calib, 8, streaming=True).total / GB},
        {"what": "RAM: W8A8 model for eval/run/serve (GB, mapped from the shards)", "value": size.w8a8_bytes / GB},
        {"what": "GPU: non-expert weights W8A8 + bf16 KV cache of 4096 tokens + reserve (GB)",
         "value": (non_expert_w8a8 + kv_bf16 + GPU_RESERVE) / GB},
        {"what": "GPU: one int8 expert slot in all 32 layers (GB)", "value": 32 * expert_int8 / GB},
    ]
    meta = run_meta(evidence="computed from the Mixtral-8x7B config with haqmoe's footprint and memory-guard "
                             "functions (no weights); the measured peaks are in bigmodel.md")
    write_results(out, [{**r, "value": round(r["value"], 2)} for r in rows], meta,
                  "Mixtral-8x7B: what haqmoe needs (computed)", f"Evidence: {meta['evidence']}.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--work", type=Path, default=ROOT / "work" / "bigmodel")
    ap.add_argument("--limit-gb", type=float, default=18.0, help="GiB of RssAnon at which a step is killed")
    ap.add_argument("--steps", default=",".join(s for s in steps(Path(), Path()) if s != "quantize-haq"),
                    help="comma-separated subset (default: all but quantize-haq, which takes ~20 min per layer "
                         "here: run it alone with --layers 1)")
    ap.add_argument("--keep", action="store_true", help="reuse an existing checkpoint of the same depth")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bigmodel.json")
    ap.add_argument("--requirements", action="store_true", help="only compute the full model's requirements")
    args = ap.parse_args()
    if args.requirements:
        requirements(ROOT / "results" / "bigmodel_requirements.json")
        return
    args.work.mkdir(parents=True, exist_ok=True)
    ckpt = args.work / f"mixtral-shape-{args.layers}l"
    limit = int(args.limit_gb * 2**30)
    rows = []
    if not (args.keep and (ckpt / "config.json").is_file()):
        t = time.perf_counter()
        size = write_checkpoint(ckpt, args.layers)
        rows.append({"step": "write checkpoint", "status": "ok", "wall_s": round(time.perf_counter() - t, 1),
                     "peak_rss_anon_gib": None, "last_line": ""})
    else:
        from haqmoe.models.lazy import SafetensorsFolder

        n = sum(e.numel for e in SafetensorsFolder.open(ckpt).entries.values())
        size = {"parameters": n, "fp32_gb": round(4 * n / GB, 2), "bf16_gb": round(2 * n / GB, 2)}
    print(f"checkpoint {ckpt}: {size}", flush=True)
    cmds = steps(ckpt, args.work)
    env = {"HAQMOE_NO_VERIFY": "0"}
    for name in [s for s in args.steps.split(",") if s]:
        rows.append(run_step(name, cmds[name], limit, args.work / f"{name}.log", env))
    meta = run_meta(layers=args.layers, limit_gib=args.limit_gb, checkpoint=size,
                    ram_gib=round(psutil.virtual_memory().total / 2**30, 1),
                    evidence="measured on this CPU (no GPU): wall time and peak RssAnon per command")
    peaks = [r for r in rows if r["peak_rss_anon_gib"] is not None]
    worst = max(peaks, key=lambda r: r["peak_rss_anon_gib"]) if peaks else None
    goal = "" if worst is None else (
        f"Largest peak: {worst['peak_rss_anon_gib']} GiB ({worst['step']}); goal at most {GOAL_GIB} GiB: "
        f"{'met' if worst['peak_rss_anon_gib'] <= GOAL_GIB else 'NOT met'}. ")
    notes = goal + (f"Checkpoint: Mixtral-8x7B widths, {args.layers} layer(s), {size['parameters'] / 1e9:.2f} B parameters: "
             f"{size['fp32_gb']} GB in fp32, {size['bf16_gb']} GB in bf16 (on disk); this machine has "
             f"{meta['ram_gib']} GiB of RAM. Peak RssAnon = private memory of the command's process tree "
             f"(mapped checkpoint pages are page cache and do not count). Evidence: {meta['evidence']}.")
    write_results(args.out, rows, meta, "Real-size MoE checkpoint, bounded memory", notes,
                  ["step", "status", "wall_s", "peak_rss_anon_gib", "last_line"])


if __name__ == "__main__":
    main()
