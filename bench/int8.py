"""Real int8 vs fake-quant vs dequant-once vs fp32 vs llama.cpp: speed, memory, perplexity.

Every (model, mode) runs in its own subprocess, one after another in the same run, so peak RSS is
per mode and no mode inherits another's warm caches. Decode: greedy, KV cache, ``model.generate``
(``min_new_tokens`` forces the full length); decode tok/s = (new tokens - 1) / (time of the full
generation - time of the prompt plus first token). Prefill: one forward over a window, no cache.
The 2 cores are shared with other jobs: the load average is recorded, every mode is measured
``rounds`` times in interleaved order and the best round is kept.

    .venv/bin/python bench/int8.py                      # full run -> bench/results/int8.{json,md}
    .venv/bin/python bench/int8.py --quick              # smoke test (few tokens, 2 windows)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
MODES = ("fp32", "fake-quant", "dequant-once", "real-int8", "auto", "real-int8-lm-head",
         "fp32-compiled", "real-int8-compiled", "real-int8-lm-head-compiled", "real-int8-lm-head-aot",
         "real-int8-intmm", "real-int8-lm-head-intmm", "real-int8-lm-head-aot-intmm")
EXEC = {"fake-quant": "fake", "dequant-once": "dequant", "real-int8": "int8", "auto": "auto",
        "real-int8-lm-head": "int8"}
COMPILED = "-compiled"  # suffix: the same mode with its decode steps compiled (haqmoe.exec.compiled)
AOT = "-aot"  # suffix: the same mode generated through an ahead-of-time compiled package (haqmoe.exec.aot)
VARIANTS = (COMPILED, AOT)
NO_KERNEL = "-intmm"  # outer suffix: the same mode with our fused CPU kernel off (HAQMOE_KERNELS=0: _int_mm)
GGUF_MODES = ("llama.cpp-q8_0", "llama.cpp-q4_1")
DEFAULT_MODES = ("fp32", "fake-quant", "dequant-once", "real-int8", "auto", "real-int8-lm-head", "real-int8-intmm",
                 "real-int8-lm-head-aot")


@dataclass(frozen=True)
class BenchConfig:
    models: tuple[str, ...] = ("smollm2-135m", "smollm2-moe")
    threads: int = 2
    new_tokens: int = 128
    prompt_tokens: int = 32
    prefill_tokens: int = 512
    rounds: int = 2
    ppl_windows: int = 20
    seqlen: int = 2048
    out: str = str(ROOT / "bench" / "results" / "int8")


# ----------------------------------------------------------------------------- helpers
def quantized_dir(model: str, int8_lm_head: bool = False) -> Path:
    """RTN W8A8 (asym/asym, the paper default) checkpoint of ``model``, built once in the cache;
    ``int8_lm_head``: lm_head (and the tied embedding) stored as int8 rows too."""
    from haqmoe.paths import cache_dir

    return cache_dir() / "bench-int8" / f"{model}-rtn-w8a8{'-int8-lm-head' if int8_lm_head else ''}"


def ensure_quantized(model: str, int8_lm_head: bool = False) -> Path:
    from haqmoe.sources import load_model
    from haqmoe.quant.checkpoint import save_quantized
    from haqmoe.quant.config import QuantConfig
    from haqmoe.quant.modules import quantize_vocabulary
    from haqmoe.quant.rtn import quantize_rtn

    out = quantized_dir(model, int8_lm_head)
    if not (out / "haqmoe_quant.json").is_file():
        cfg = QuantConfig.w8a8("rtn")
        lm = load_model(model, progress=False)
        quantize_rtn(lm.model, lm.adapter, cfg, progress=False)
        if int8_lm_head:
            quantize_vocabulary(lm.model)
        save_quantized(lm.model, lm.tokenizer, out, cfg, {"source": model}, overwrite=True)
    return out


def ensure_gguf(kind: str) -> Path:
    """The package's Q4_1 file, or a Q8_0 requantization of it (same weights as our fp32 model,
    which is the dequantized Q4_1), cached and never committed."""
    from haqmoe.models.embedded import smollm2_gguf
    from haqmoe.paths import cache_dir

    src = smollm2_gguf()
    if kind == "llama.cpp-q4_1":
        return src
    dst = cache_dir() / "bench-int8" / "SmolLM2-135M-Instruct.Q8_0.gguf"
    if not dst.is_file():
        import llama_cpp

        dst.parent.mkdir(parents=True, exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
        params.allow_requantize = True
        params.nthread = 2
        tmp = dst.with_suffix(".tmp")
        if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params) != 0:
            raise RuntimeError("llama.cpp quantization to Q8_0 failed")
        tmp.rename(dst)
    return dst


def prompt_ids(tok, n: int) -> list[int]:
    from haqmoe.data.text import load_text

    return tok(load_text("wikitext2:test")[:20000])["input_ids"][1000: 1000 + n]


def peak_rss_gb() -> float:
    """VmHWM of this process: unlike ru_maxrss it is reset at exec, so it is the worker's own peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def file_gb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*.safetensors")) / 1e9 if path.is_dir() else path.stat().st_size / 1e9


# ----------------------------------------------------------------------------- workers
def time_model(m, ids, cfg: BenchConfig, pad_id: int, variant: str = "") -> dict:
    """Prefill tok/s (one eager forward, no cache) and greedy decode tok/s with the KV cache. ``variant``
    COMPILED: decode steps compiled over a static cache (compiled by a warm-up generation, not timed);
    AOT: prompt and decode through the ahead-of-time package (built or loaded first, not timed)."""
    import torch

    from haqmoe.exec.aot import AotGenerator
    from haqmoe.exec.compiled import compiled_decode_kwargs

    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    row = {}
    max_len = cfg.prompt_tokens + cfg.new_tokens
    extra = (lambda: compiled_decode_kwargs(m, max_len)) if variant == COMPILED else dict
    gen = dict(do_sample=False, pad_token_id=pad_id)
    with torch.inference_mode():
        m(ids[:, :16])  # warm-up (and the fake-quant weight cache)
        t = time.perf_counter()
        if variant == AOT:
            aot = AotGenerator.for_model(m, max_len)
            generate = lambda p, n: aot.generate(p, n)  # noqa: E731 (no EOS stop: n tokens exactly)
        else:
            generate = lambda p, n: m.generate(p, max_new_tokens=n, min_new_tokens=n, **gen, **extra())  # noqa: E731
        if variant:
            generate(ids[:, : cfg.prompt_tokens], 4)
            row["compile_s"] = time.perf_counter() - t
        sync()
        t = time.perf_counter()
        m(ids, use_cache=False)
        sync()
        row["prefill_tok_s"] = ids.shape[1] / (time.perf_counter() - t)
        prompt = ids[:, : cfg.prompt_tokens]
        row["decode_tok_s"], row["decode_cpu_tok_s"], out = decode_rate(lambda n: generate(prompt, n),
                                                                        cfg.new_tokens, sync)
        row["generated"] = out[0, cfg.prompt_tokens:].tolist()
    return row


def decode_rate(generate: Callable[[int], Any], new_tokens: int, sync: Callable[[], None] = lambda: None
                ) -> tuple[float, float, Any]:
    """Decode (wall, CPU-time) tok/s of a ``new_tokens`` generation beyond its first token: its time minus
    a one-token generation's (the prompt's share); and its output. ``generate(n)`` generates n tokens."""
    t, c = time.perf_counter(), time.process_time()
    generate(1)
    sync()
    first, first_cpu = time.perf_counter() - t, time.process_time() - c
    t, c = time.perf_counter(), time.process_time()
    out = generate(new_tokens)
    sync()
    total, total_cpu = time.perf_counter() - t, time.process_time() - c
    return ((new_tokens - 1) / max(total - first, 1e-9), (new_tokens - 1) / max(total_cpu - first_cpu, 1e-9), out)


CUDA_MODES = ("fp16", "fp32", "fake-quant", "dequant-once", "real-int8")


def cuda_rows(config_dir: Path, cfg: BenchConfig, device: str = "cuda") -> list[dict]:
    """Speed on a GPU of random-weight models with the two models' exact configs (speed does not depend
    on weight values; the GPU machine has no model files). Quantized modes: RTN W8A8 in memory."""
    import copy

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from haqmoe.models.adapters import adapter_for
    from haqmoe.quant.config import QuantConfig
    from haqmoe.exec.precision import convert, weight_bytes
    from haqmoe.quant.rtn import quantize_rtn

    rows = []
    for model in cfg.models:
        mc = AutoConfig.from_pretrained(config_dir / model)
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(mc, dtype=torch.float32).eval()
        quant = copy.deepcopy(base)
        quantize_rtn(quant, adapter_for(quant), QuantConfig.w8a8("rtn"), progress=False)
        ids = torch.randint(0, mc.vocab_size, (1, cfg.prefill_tokens), generator=torch.Generator().manual_seed(1))
        for mode in CUDA_MODES:
            m = copy.deepcopy(base if mode in ("fp16", "fp32") else quant)
            m = m.to(device, torch.float16) if mode == "fp16" else m.to(device)
            if mode in EXEC:
                convert(m, EXEC[mode])
            if device == "cuda":
                torch.cuda.empty_cache()
            row = {"model": model, "mode": mode, "device": torch.cuda.get_device_name(0) if device == "cuda" else device,
                   "weights": "random (the model's config.json)"}
            row.update(time_model(m, ids.to(device), cfg, 0))
            row["weights_gb"] = weight_bytes(m) / 1e9
            row.pop("generated")
            rows.append(row)
            print(f"{model:14s} {mode:14s} decode {row['decode_tok_s']:7.1f} tok/s  prefill {row['prefill_tok_s']:8.1f}"
                  f" tok/s  weights {row['weights_gb']:.3f} GB", flush=True)
            del m
    return rows


def torch_worker(model: str, mode: str, cfg: BenchConfig, ppl: bool) -> dict:
    import torch

    from haqmoe.models.embedded import ensure_embedded
    from haqmoe.sources import load_model
    from haqmoe.exec.precision import convert, weight_bytes

    torch.set_num_threads(cfg.threads)
    off = NO_KERNEL if mode.endswith(NO_KERNEL) else ""  # spawn() switched the kernel off
    mode = mode.removesuffix(off)
    variant = next((v for v in VARIANTS if mode.endswith(v)), "")
    mode = mode.removesuffix(variant)
    src = ensure_embedded(model, progress=False) if mode == "fp32" else \
        ensure_quantized(model, int8_lm_head=mode.endswith("lm-head"))
    lm = load_model(str(src), progress=False)
    m = lm.model
    report = None
    if mode in EXEC:
        report = convert(m, EXEC[mode])  # a checkpoint with int8 lm_head rows runs them on the int8 GEMM
    ids = torch.tensor([prompt_ids(lm.tokenizer, cfg.prefill_tokens)])
    row: dict = {"model": model, "mode": mode + variant + off, "device": "cpu",
                 "threads": cfg.threads, "disk_gb": file_gb(src)}
    row.update(time_model(m, ids, cfg, lm.tokenizer.eos_token_id, variant))
    row["weights_gb"] = weight_bytes(m) / 1e9
    if report is not None:
        from haqmoe.exec.kernels import w8a8_op

        row["exec"] = report.summary()
        if report.counts.get("int8"):
            row["fused_kernel"] = w8a8_op() is not None  # our CPU kernel ran the int8 products (else _int_mm)
        if report.choices:
            row["auto_choices"] = [asdict(c) for c in report.choices]
    if ppl:
        from haqmoe.data.text import eval_windows, load_text, tokenize
        from haqmoe.eval.perplexity import perplexity

        wins = eval_windows(tokenize(lm.tokenizer, load_text("wikitext2:test")), cfg.seqlen, cfg.ppl_windows)
        res = perplexity(m, wins, progress=False)
        row.update(ppl=res.ppl, windows=res.windows, ppl_seconds=res.seconds)
    row["peak_rss_gb"] = peak_rss_gb()
    return row


def llama_worker(mode: str, cfg: BenchConfig) -> dict:
    import llama_cpp

    path = ensure_gguf(mode)
    llm = llama_cpp.Llama(str(path), n_threads=cfg.threads, n_threads_batch=cfg.threads, n_ctx=1024,
                          n_batch=cfg.prefill_tokens, verbose=False)
    from transformers import AutoTokenizer

    from haqmoe.models.embedded import ensure_embedded

    tok = AutoTokenizer.from_pretrained(ensure_embedded("smollm2-135m", progress=False))
    ids = prompt_ids(tok, cfg.prefill_tokens)
    llm.eval(ids[:16])
    llm.reset()
    t = time.perf_counter()
    llm.eval(ids)
    prefill = len(ids) / (time.perf_counter() - t)
    llm.reset()
    out: list[int] = []
    t, c = time.perf_counter(), time.process_time()
    first = first_cpu = None
    for token in llm.generate(ids[: cfg.prompt_tokens], top_k=1, temp=0.0, reset=True):
        if first is None:
            first, first_cpu = time.perf_counter() - t, time.process_time() - c
        out.append(token)
        if len(out) == cfg.new_tokens:
            break
    total, total_cpu = time.perf_counter() - t, time.process_time() - c
    return {"model": "smollm2-135m", "mode": mode, "device": "cpu", "threads": cfg.threads,
            "prefill_tok_s": prefill, "decode_tok_s": (cfg.new_tokens - 1) / max(total - first, 1e-9),
            "decode_cpu_tok_s": (cfg.new_tokens - 1) / max(total_cpu - first_cpu, 1e-9),
            "disk_gb": file_gb(path), "weights_gb": file_gb(path), "generated": out, "peak_rss_gb": peak_rss_gb()}


def llama_cpp_build() -> dict:
    """Version and CPU features of the llama-cpp-python in this venv: builds of one version differ
    by their compile flags (a default pip build is -march=native, ours is flagged), which decides its speed."""
    try:
        import llama_cpp
    except ImportError:
        return {}
    return {"llama_cpp": llama_cpp.__version__,
            "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode().strip()}


def run_worker(job: dict) -> None:
    cfg = BenchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in job["cfg"].items()})
    if job["mode"].startswith("llama.cpp"):
        row = llama_worker(job["mode"], cfg)
    else:
        row = torch_worker(job["model"], job["mode"], cfg, job.get("ppl", False))
    row["load_during"] = os.getloadavg()[0]
    print("RESULT " + json.dumps(row), flush=True)


def spawn(job: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(job["cfg"]["threads"])}
    if job["mode"].endswith(NO_KERNEL):
        env["HAQMOE_KERNELS"] = "0"
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True,
                          text=True, env=env, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"worker {job['model']}/{job['mode']} failed:\n{proc.stderr[-3000:]}")


# ----------------------------------------------------------------------------- orchestration
def best_of(rows: list[dict]) -> dict:
    best = max(rows, key=lambda r: r["decode_tok_s"])
    best = dict(best)
    best["prefill_tok_s"] = max(r["prefill_tok_s"] for r in rows)
    best["rounds"] = len(rows)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker")
    ap.add_argument("--render", help="re-render the markdown of this results JSON and exit")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--models", default="smollm2-135m,smollm2-moe")
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES + GGUF_MODES),
                    help=f"modes to run, of {', '.join(MODES + GGUF_MODES)}")
    ap.add_argument("--no-ppl", action="store_true")
    ap.add_argument("--ppl-windows", type=int, default=BenchConfig.ppl_windows)
    ap.add_argument("--seqlen", type=int, default=BenchConfig.seqlen)
    ap.add_argument("--out", default=BenchConfig.out)
    ap.add_argument("--cuda-configs", type=Path, help="GPU rows instead: random-weight models built from the "
                    "config.json files in DIR/<model>/ (copy them there from the model cache)")
    args = ap.parse_args()
    if args.worker:
        run_worker(json.loads(args.worker))
        return
    if args.cuda_configs:
        import torch

        from haqmoe.results import run_meta, write_results

        device = "cuda" if torch.cuda.is_available() else "cpu"
        cfg = BenchConfig(models=tuple(args.models.split(",")), new_tokens=16 if args.quick else 128,
                          prefill_tokens=64 if args.quick else 512)
        rows = cuda_rows(args.cuda_configs, cfg, device)
        write_results(Path(args.out).with_name(Path(args.out).name + "_cuda.json"), rows, run_meta(),
                      "int8 execution on the GPU", CUDA_NOTES)
        return
    if args.render:
        render(args.render)
        return
    cfg = BenchConfig(models=tuple(args.models.split(",")), threads=args.threads, rounds=args.rounds,
                      ppl_windows=args.ppl_windows, seqlen=args.seqlen, out=args.out)
    if args.quick:
        cfg = BenchConfig(models=cfg.models, threads=cfg.threads, new_tokens=16, prefill_tokens=64, rounds=1,
                          ppl_windows=2, seqlen=128, out=cfg.out + "-quick")
    load_start = os.getloadavg()
    for model in cfg.models:
        ensure_quantized(model)
        if any(m.startswith("real-int8-lm-head") for m in args.modes.split(",")):
            ensure_quantized(model, int8_lm_head=True)
    for kind in GGUF_MODES:
        ensure_gguf(kind)
    wanted = set(args.modes.split(","))
    # ahead-of-time packages are for dense models (MoE dispatch does not export)
    jobs = [(model, mode) for model in cfg.models for mode in MODES
            if mode in wanted and not (AOT in mode and model == "smollm2-moe")]
    if "smollm2-135m" in cfg.models:
        jobs += [("smollm2-135m", mode) for mode in GGUF_MODES if mode in wanted]
    results: dict[tuple[str, str], list[dict]] = {j: [] for j in jobs}
    started = time.time()
    for r in range(cfg.rounds):
        for model, mode in (jobs if r % 2 == 0 else jobs[::-1]):
            row = spawn({"model": model, "mode": mode, "cfg": asdict(cfg)})
            results[(model, mode)].append(row)
            print(f"round {r}: {model:14s} {mode:16s} decode {row['decode_tok_s']:7.1f} tok/s  prefill "
                  f"{row['prefill_tok_s']:7.1f} tok/s  rss {row['peak_rss_gb']:.2f} GB  load {row['load_during']:.1f}",
                  flush=True)
    rows = [best_of(results[j]) for j in jobs]
    if not args.no_ppl and "smollm2-135m" in cfg.models:
        for mode in ("fake-quant", "real-int8", "real-int8-lm-head"):
            if mode not in wanted:
                continue
            row = spawn({"model": "smollm2-135m", "mode": mode, "cfg": asdict(cfg), "ppl": True})
            target = next(x for x in rows if x["model"] == "smollm2-135m" and x["mode"] == mode)
            target.update(ppl=row["ppl"], windows=row["windows"])
            print(f"ppl {mode}: {row['ppl']:.4f} ({row['windows']} windows)", flush=True)
    write(rows, cfg, load_start, time.time() - started)


NOTES = """
Every figure in this file is computed from the rows above (the table, the checks line and the
comparisons paragraph); the text below only says how the rows were made and how to read them.

Modes. All quantized modes compute the same RTN W8A8 function (asymmetric weights per channel,
asymmetric activations per token); `fp32` is the unquantized model; llama.cpp runs the same SmolLM2
weights (our fp32 is the dequantized Q4_1 file; Q8_0 is a requantization of it), through the
llama-cpp-python installed in .venv (`make peer-llamacpp`), the version in meta.llama_cpp. `real-int8` runs every
decoder linear and expert on the int8 GEMM with int8 weights only; `dequant-once` holds fp32 weights;
`fake-quant` holds both; lm_head and the tied embedding stay fp32 in those modes (as in fake-quant, so
PPL is comparable). `real-int8-lm-head` reads a checkpoint written by `haqmoe quantize --int8-lm-head`
and also runs lm_head on the int8 GEMM (two-level activations: value + residual, one GEMM call), the tied
embedding reading the same int8 rows. `auto` benchmarks int8 against dequant per weight shape at load
(the `auto` row's auto_choices column in the JSON records what it picked).

Fused kernel: where the CPU has AVX512-VNNI, every real-int8 product of up to 16 token rows runs in
haqmoe's own op `haqmoe::w8a8_linear` (src/haqmoe/exec/kernels/): per-token activation quantization,
int8 dot products streaming the weight rows, the integer zero-point terms and the float epilogue in one
call, bit-identical to the `quantize_tokens` + `_int_mm` path (tests/test_kernels.py); more rows (prefill,
PPL windows) go to oneDNN's GEMM inside the same op. `-intmm` rows are the same mode with the kernel off
(`HAQMOE_KERNELS=0`), side by side in the same run.

`-compiled` rows (`compiled_decode_kwargs`): transformers compiles each decode step with torch.compile
(inductor, static KV cache; prefill stays eager). `-aot` rows (`haqmoe generate --aot`): one forward with
a dynamic token count over a static KV cache, exported with torch.export and compiled by AOTInductor into
a C++ package (built once per weights and cache bucket, then cached); prompt and decode run through it from
a small Python loop. Their prefill_tok_s is the eager forward's. They compute the same function in another
float order, so greedy tokens may part from eager's where two tokens nearly tie (docs/design.md,
Precision); meta.generated_tokens holds every mode's tokens.

PPL: real int8 differs from fake-quant only by fp32 rounding (the integer products are exact), which the
W8A8 model amplifies at rounding boundaries, so the two PPLs differ by a noise that shrinks with the
number of windows (the checks line gives the measured difference).

Timing conditions: 2 threads unless the threads column says otherwise, every (model, mode) in its own
process, rounds in alternating order, best round kept; the load average at start and end is above, and
`load_during` (where present) is the machine's load while the row ran. Each mode's best round moves
between runs on a shared machine: compare rows of the same file (same run), not across files.
GPU rows (random-weight models with the same configs): int8_cuda.md and int8_gpu.md.
"""


COMPARISONS = (  # (faster mode, baseline mode, what the pair shows) within one model and one run
    ("real-int8", "real-int8-intmm", "fused kernel vs `_int_mm`"),
    ("real-int8-lm-head", "real-int8-lm-head-intmm", "fused kernel vs `_int_mm`"),
    ("real-int8-lm-head-aot", "real-int8-lm-head-aot-intmm", "fused kernel vs `_int_mm`, ahead of time"),
    ("real-int8-compiled", "real-int8", "`--compile` vs eager"),
    ("real-int8-lm-head-compiled", "real-int8-lm-head", "`--compile` vs eager"),
    ("real-int8-lm-head-aot", "real-int8-lm-head", "`--aot` vs eager"),
    ("real-int8-lm-head-aot", "real-int8-lm-head-compiled", "`--aot` vs `--compile`"),
    ("fp32-compiled", "fp32", "`--compile` vs eager, fp32"),
    ("real-int8-lm-head", "real-int8", "int8 lm_head vs fp32 lm_head"),
)


def comparisons(rows: list[dict]) -> str:
    """Decode speed ratios of the mode pairs this run measured, computed from its rows."""
    by = {(r["model"], r["mode"]): r for r in rows}
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for fast, base, what in COMPARISONS:
            a, b = by.get((model, fast)), by.get((model, base))
            if a and b and a.get("decode_tok_s") and b.get("decode_tok_s"):
                lines.append(f"- {model}: {what}: `{fast}` {a['decode_tok_s']:.1f} vs `{base}` "
                             f"{b['decode_tok_s']:.1f} decode tok/s ({a['decode_tok_s'] / b['decode_tok_s']:.2f}x)")
    return ("Decode comparisons in this run (computed from the rows):\n\n" + "\n".join(lines)) if lines else ""


CUDA_NOTES = """Random-weight models with SmolLM2-135M's and the upcycled MoE's exact config.json (the GPU
machine holds no model files; speed does not depend on weight values). Quantized modes run the RTN
W8A8 function (asym/asym) quantized in memory; `fp16` is the plain model in half precision. Decode:
greedy, KV cache, 128 new tokens after a 32-token prompt; prefill: one 512-token forward. One run.
Eager PyTorch: at these sizes every mode is bound by kernel launches, not by bytes or FLOPs."""


def render(json_path: str) -> None:
    """Re-render the markdown of an existing results JSON (notes updated, numbers untouched)."""
    sys.path.insert(0, str(ROOT / "src"))
    from haqmoe.results import write_results

    data = json.loads(Path(json_path).read_text())
    meta, rows = data["meta"], data["rows"]
    meta["checks"] = compute_checks({(r["model"], r["mode"]): r for r in rows})
    write_results(json_path, rows, meta, TITLE, _notes(meta, rows), _columns(rows))


def _columns(rows: list[dict]) -> list[str]:
    """COLUMNS that most rows have (results of older bench versions lack the newer ones)."""
    return [c for c in COLUMNS if c in ("ppl", "windows") or sum(c in r for r in rows) * 2 > len(rows)]


TITLE = "Real int8 execution vs fp32, fake-quant, dequant-once and llama.cpp"
COLUMNS = ["model", "mode", "device", "threads", "decode_tok_s", "decode_cpu_tok_s", "prefill_tok_s", "ppl", "windows", "weights_gb",
           "disk_gb", "peak_rss_gb", "decode_vs_fp32", "decode_cpu_vs_fp32", "weights_vs_fp32", "disk_vs_fp32", "decode_vs_llamacpp_q8",
           "load_during"]


def _notes(meta: dict, rows: list[dict]) -> str:
    checks = meta.get("checks", {})
    lines = "Checks: " + ", ".join(f"{k} = {v:.4g}" for k, v in checks.items() if isinstance(v, float))
    load = f"Load average at start {meta['loadavg_start'][0]:.1f}, at end {meta['loadavg_end'][0]:.1f}."
    pairs = comparisons(rows)
    return lines + "\n\n" + load + "\n\n" + (pairs + "\n\n" if pairs else "") + _llama_build_note(meta, rows) + NOTES


def _llama_build_note(meta: dict, rows: list[dict]) -> str:
    """Which llama.cpp build the llama.cpp rows ran: its speed depends on how it was compiled."""
    if not any(r["mode"] in GGUF_MODES for r in rows):
        return ""
    info = meta.get("llama_cpp_system_info")
    build = (f"its CPU features: `{info}`" if info else
             "this run did not record its compile flags, so these rows stand for the build then in .venv only")
    return (f"llama.cpp build: llama-cpp-python {meta.get('llama_cpp', '(version not recorded)')}, {build}. The comparison against llama.cpp "
            "as its users install it (default pip build) and its fastest build here, interleaved in one run, "
            "is int8_interleaved.md.\n")


def compute_checks(by: dict) -> dict:
    """Acceptance ratios (kernel, compiled, ahead-of-time vs eager and llama.cpp) from rows keyed by (model, mode)."""
    checks = {}
    fake, real = by.get(("smollm2-135m", "fake-quant")), by.get(("smollm2-135m", "real-int8"))
    if fake and real and "ppl" in fake and "ppl" in real:
        checks["ppl_rel_diff_real_vs_fake"] = abs(real["ppl"] / fake["ppl"] - 1)
    lm_head = by.get(("smollm2-135m", "real-int8-lm-head"))
    if real and lm_head and "ppl" in real and "ppl" in lm_head:
        checks["ppl_rel_diff_int8_lm_head_vs_real"] = lm_head["ppl"] / real["ppl"] - 1
    wanted = {  # (model, results prefix): {check suffix: row column}
        ("smollm2-moe", "moe"): {"decode_{}_vs_fp32": "decode_vs_fp32", "decode_cpu_time_{}_vs_fp32": "decode_cpu_vs_fp32",
                                 "weights_{}_vs_fp32": "weights_vs_fp32", "disk_{}_vs_fp32": "disk_vs_fp32"},
        ("smollm2-135m", "smollm2"): {"decode_{}_vs_llamacpp_q8": "decode_vs_llamacpp_q8",
                                      "decode_cpu_time_{}_vs_llamacpp_q8": "decode_cpu_vs_llamacpp_q8",
                                      "weights_{}_vs_fp32": "weights_vs_fp32"},
    }
    for (model, prefix), columns in wanted.items():
        variants = (m for m in MODES if m.endswith((*VARIANTS, NO_KERNEL)))
        for mode in ("real-int8", "auto", "real-int8-lm-head", *variants):
            row = by.get((model, mode))
            for name, col in (columns.items() if row else ()):
                checks[f"{prefix}_{name.format(mode)}"] = row.get(col)
    return checks


def write(rows: list[dict], cfg: BenchConfig, load_start: tuple, seconds: float) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from haqmoe.results import run_meta, write_results

    by = {(r["model"], r["mode"]): r for r in rows}
    for r in rows:
        base = by.get((r["model"], "fp32"))
        if base:
            r["decode_vs_fp32"] = r["decode_tok_s"] / base["decode_tok_s"]
            r["decode_cpu_vs_fp32"] = r["decode_cpu_tok_s"] / base["decode_cpu_tok_s"]
            r["prefill_vs_fp32"] = r["prefill_tok_s"] / base["prefill_tok_s"]
            r["weights_vs_fp32"] = r["weights_gb"] / base["weights_gb"]
            r["disk_vs_fp32"] = r["disk_gb"] / base["disk_gb"]
        q8 = by.get(("smollm2-135m", "llama.cpp-q8_0"))
        if q8 and r["model"] == "smollm2-135m":
            r["decode_vs_llamacpp_q8"] = r["decode_tok_s"] / q8["decode_tok_s"]
            r["decode_cpu_vs_llamacpp_q8"] = r["decode_cpu_tok_s"] / q8["decode_cpu_tok_s"]
    checks = compute_checks(by)
    generated = {f"{r['model']}/{r['mode']}": r.pop("generated") for r in rows}
    for r in rows:
        r.pop("auto_choices", None) if r["mode"] != "auto" else None
    meta = run_meta(config=asdict(cfg), **llama_cpp_build(), loadavg_start=load_start,
                    loadavg_end=os.getloadavg(),
                    seconds=seconds, checks=checks, generated_tokens=generated)
    write_results(cfg.out, rows, meta, TITLE, _notes(meta, rows), _columns(rows))


if __name__ == "__main__":
    main()
