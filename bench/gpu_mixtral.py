"""GPU rows: the real engine on a Mixtral-8x7B-shaped model, measured vs the simulator.

Two steps, because the GPU machine has no data folder (../shared/data; `.gpu_inputs` is git-ignored: the device tool
takes it along when `carry` names it):

    .venv/bin/python bench/gpu_mixtral.py prepare .gpu_inputs         # here: Mixtral routing traces
    python3 bench/gpu_mixtral.py run .gpu_inputs --out $OUT           # on the GPU machine (device tool)

`run` builds a model with Mixtral-8x7B's dimensions (hidden 4096, ffn 14336, 8 experts top-2, 32/8
heads, vocab 32000) and --layers layers, random W8A8 experts built directly in int8, routers that
replay held-out Mixtral routing (synthetic-from-statistics, as bench/simulate.py), non-expert weights
in fp16 on the GPU. The GPU budget is --budget of the model's FP16 size: non-expert weights + 1 GB
reserve + as many int8 expert slots as fit. Per policy it runs the real engine (CPU tier: real int8
GEMM on all cores; GPU tier: int8 GEMM or per-call dequantization of the int8 slots, whichever the
engine measures faster at start-up — int8 here; one-token experts replayed as one CUDA graph per
slot) for one 512-token prefill and --tokens decode tokens, and the simulator on the same routing
with the engine's own calibrated cost model and a profile measured on the machine
(runtime/calibrate.measure_profile). The all-resident row fits the one free parameter of the
simulator, the framework's host time per layer (layer_overhead_ms); the other rows are predictions.
Also writes int8-vs-fp16 GEMM timings of the expert shapes on the GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from haqmoe.routing.trace import RoutingTrace

@dataclass(frozen=True)
class GpuPolicy:
    slots: str  # "budget" | "all"
    cache: str  # engine cache policy
    decision: str
    admit: bool = False  # background admission of CPU-served misses
    graphs: bool = True  # one-token GPU experts as CUDA graphs
    compiled: bool = False  # decode steps compiled, non-expert parts as CUDA graphs (EngineConfig.compile)


GPU_POLICIES = {
    "all-resident": GpuPolicy("all", "lru", "always-transfer"),
    "always-transfer": GpuPolicy("budget", "lru", "always-transfer"),  # mixtral-offloading
    "always-cpu": GpuPolicy("budget", "lru", "always-cpu"),  # Fiddler (plan resident, nothing admitted)
    "predictor": GpuPolicy("budget", "lru", "predictor"),  # the paper
    "balanced": GpuPolicy("budget", "lru", "balanced"),  # ours: a layer's misses divided between CPU and PCIe
    "split": GpuPolicy("budget", "lru", "split"),  # ours: + one miss served by CPU rows and a partial copy
    "full": GpuPolicy("budget", "lru", "predictor", admit=True),  # + CPU-served misses copied in behind
    # the same engine without CUDA graphs (what the graphs buy; no prediction: the fit is per mode)
    "all-resident-eager": GpuPolicy("all", "lru", "always-transfer", graphs=False),
    "always-transfer-eager": GpuPolicy("budget", "lru", "always-transfer", graphs=False),
    # compiled decode: what removing the per-layer launch cost buys (host costs fitted on its own rows)
    "all-resident-compiled": GpuPolicy("all", "lru", "always-transfer", compiled=True),
    "always-transfer-compiled": GpuPolicy("budget", "lru", "always-transfer", compiled=True),
    "always-cpu-compiled": GpuPolicy("budget", "lru", "always-cpu", compiled=True),
    "balanced-compiled": GpuPolicy("budget", "lru", "balanced", compiled=True),
    "split-compiled": GpuPolicy("budget", "lru", "split", compiled=True),
}
SIM_CACHE = {"always-cpu": "static", "predictor": "static"}  # the engine never admits there at decode


def prepare(out: Path, requests: int, tokens: int, prefill: int) -> None:
    from haqmoe.routing.trace_io import save_trace
    from haqmoe.studies.experiments import mixtral_pair, prompt_trace

    pair = mixtral_pair(requests, tokens)
    out.mkdir(parents=True, exist_ok=True)
    save_trace(pair.plan, out / "plan", overwrite=True)
    save_trace(pair.eval.request(0), out / "eval", overwrite=True)
    np.save(out / "prompt.npy", prompt_trace(pair, prefill))
    print(f"wrote {out}: plan {pair.plan.num_tokens} tokens, eval {pair.eval.request(0).num_tokens}, "
          f"prompt {prefill}")


GEMM_SHAPES = (("mixtral gate_up", 4096, 28672), ("mixtral down", 14336, 4096),
               ("smollm2 gate_up", 576, 3072), ("smollm2 down", 1536, 576))


GEMM_NOTES = (
    'exec/int8.py `int8_matmul` including the per-token activation quantization, vs fp16 `F.linear`, '
    'median of 20 after a warm-up (bench/gpu_mixtral.py run). In eager PyTorch the int8 path is ~25 small'
    ' kernels per linear (quantize, zero-point corrections, rescale) and is launch-bound at ~0.3 ms '
    'whatever the shape: 0.07-0.3x the speed of one fp16 GEMM. The engine therefore measures both GPU-'
    'tier precisions of a quantized expert at start-up (int8 GEMM vs dequantize-per-call) and keeps the '
    "faster: int8 at Mixtral's shape, dequant on tiny models. Fusing the activation quantization into one"
    ' kernel (Triton) is the way to make int8 pay on the GPU. With CUDA graphs (runtime/store.py) the '
    'launches are recorded once per expert slot: one Mixtral expert at one token then takes 0.27 ms '
    'instead of 1.05 ms (runtime_gpu.md).')


def gemm_rows(device: str = "cuda", shapes=GEMM_SHAPES, ms=(1, 16, 128, 512)) -> list[dict]:
    """int8 GEMM (dynamic per-token activations, exec/int8.py) vs fp16 F.linear, expert shapes."""
    from haqmoe.exec.int8 import int8_matmul, quantize_tokens
    from haqmoe.quant.quantizer import QuantSpec
    from haqmoe.runtime.calibrate import time_ms

    spec = QuantSpec(8, False, "token")
    sync = torch.cuda.synchronize if device == "cuda" else None
    rows = []
    for name, k, n in shapes:
        w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
        ws, cs = torch.rand(n, device=device) * 1e-3, w8.sum(1, dtype=torch.int32)
        w16 = torch.randn(n, k, dtype=torch.float16, device=device)
        for m in ms:
            x = torch.randn(m, k, dtype=torch.float16, device=device)
            t8 = time_ms(lambda: int8_matmul(quantize_tokens(x, spec, False), w8.t(), ws, None, cs, k), 20, sync)
            t16 = time_ms(lambda: torch.nn.functional.linear(x, w16), 20, sync)
            rows.append({"shape": name, "k": k, "n": n, "tokens": m, "int8_ms": t8, "fp16_ms": t16,
                         "int8_speedup": t16 / t8})
    return rows


@dataclass
class Inputs:
    """The routing of one run: plan trace (profiling), prompt + decode routes, and the simulator's trace."""

    plan: "RoutingTrace"
    routes: np.ndarray  # [P + tokens, L, k]
    prefill: int
    tokens: int

    @classmethod
    def load(cls, d: Path, layers: int, tokens: int) -> "Inputs":
        from haqmoe.routing.trace_io import load_trace

        plan = load_trace(d / "plan")
        plan = replace(plan, experts=plan.experts[:, :layers], guesses=None, weights=None)
        prompt = np.load(d / "prompt.npy")[:, :layers]
        decode = load_trace(d / "eval").experts[:tokens, :layers]
        return cls(plan, np.concatenate([prompt, decode]).astype(np.int64), len(prompt), tokens)

    def sim_trace(self, num_experts: int) -> "RoutingTrace":
        """Prompt + the decode rows the engine consumes (the last new token is never fed back)."""
        from haqmoe.routing.trace import RoutingTrace

        n = self.prefill + self.tokens - 1
        return RoutingTrace(self.routes[:n], num_experts, np.array([0, n]), decode=np.arange(n) >= self.prefill)


def cost_spec(shape):
    """Mixtral-8x7B's cost shape with the run's layer count and expert dimensions (one place for the
    memory budget and the simulator)."""
    from haqmoe.costs.shapes import model_spec

    return replace(model_spec("mixtral-8x7b"), num_layers=shape.layers, hidden=shape.hidden, ffn=shape.ffn,
                   vocab=shape.vocab)


def predict(name: str, cost, profile, inp: Inputs, shape, per_layer: int) -> tuple[float, float]:
    """Simulated (decode tok/s, prefill ms) of one policy's engine configuration."""
    from haqmoe.runtime.simulator import CacheSpec, Replay, ReplayOptions, build_cache

    L = shape.layers
    pol = GPU_POLICIES[name]
    slots = (shape.experts if pol.slots == "all" else per_layer) * L
    spec = cost_spec(shape)
    sim_cache = SIM_CACHE.get(name.removesuffix("-compiled"), pol.cache)
    cache = build_cache(CacheSpec(sim_cache, slots), L, shape.experts, shape.top_k, spec.expert_bytes("w8a8"), inp.plan)
    res = Replay(inp.sim_trace(shape.experts), cache, cost, profile, spec,
                 options=ReplayOptions(pol.decision, pol.admit, served=True)).run()
    return float(1e3 / res.token_ms.mean()), float(res.prefill_ms)


MODES = {"eager": "", "compiled": "-compiled"}  # engine mode -> policy-name suffix


def add_predictions(rows: list[dict], costs: dict, profile, inp: Inputs, shape, per_layer: int) -> dict:
    """Fill each measured row's predictions; returns the fitted profile per engine mode (``MODES``).

    ``predicted_raw``: the measured profile as is (CPU and GPU experts of a layer overlap). Then the
    engine's known host costs: GPU expert kernels are launched by the thread that next runs the CPU tier
    (``cpu_gpu_overlap = 0``), and two numbers fitted per mode, each on one row: the framework's host time
    per layer on all-resident, and what a layer with host expert work loses by reading the router's output
    off the GPU (``host_sync_ms``) on always-cpu. The other rows are predictions (``fit`` empty). Eager
    and compiled decode have their own host costs, so each mode is fitted on its own rows."""
    done = {r["policy"]: r for r in rows if r.get("decode_tok_s") and GPU_POLICIES[r["policy"]].graphs}
    fitted = {}
    for mode, suffix in MODES.items():
        measured = {n: r for n, r in done.items() if GPU_POLICIES[n].compiled == bool(suffix)}
        res, cpu = f"all-resident{suffix}", f"always-cpu{suffix}"
        fit = replace(profile, cpu_gpu_overlap=0.0)
        if res in measured:
            raw, _ = predict(res, costs[res], fit, inp, shape, per_layer)
            per_layer_ms = max(1e3 / measured[res]["decode_tok_s"] - 1e3 / raw, 0.0) / shape.layers
            fit = replace(fit, layer_overhead_ms=per_layer_ms)
            measured[res]["fit"] = "layer_overhead_ms"
        if cpu in measured:
            fit = replace(fit, host_sync_ms=_fit_host_sync(measured[cpu]["decode_tok_s"], costs[cpu], fit, inp, shape,
                                                           per_layer, cpu))
            measured[cpu]["fit"] = "host_sync_ms"
        for name, r in measured.items():
            r.setdefault("fit", "")
            r["predicted_raw_decode_tok_s"] = predict(name, costs[name], profile, inp, shape, per_layer)[0]
            r["predicted_decode_tok_s"], r["predicted_prefill_ms_512"] = predict(name, costs[name], fit, inp, shape,
                                                                                per_layer)
            r["prediction_error"] = r["predicted_decode_tok_s"] / r["decode_tok_s"] - 1
        fitted[mode] = fit
    return fitted


def save_fitted(out: Path, fitted: dict) -> None:
    for mode, fit in fitted.items():
        (out / f"profile_fitted{MODES[mode].replace('-', '_')}.json").write_text(fit.to_json())


def _fit_host_sync(decode_tok_s: float, cost, profile, inp: Inputs, shape, per_layer: int,
                   policy: str = "always-cpu") -> float:
    """The host_sync_ms at which the simulator's decode of ``policy`` matches the measured one (bisection:
    the prediction falls as the sync grows); 0 when even no sync predicts slower."""
    def tok_s(sync: float) -> float:
        return predict(policy, cost, replace(profile, host_sync_ms=sync), inp, shape, per_layer)[0]

    lo, hi = 0.0, 50.0
    if tok_s(lo) <= decode_tok_s:
        return 0.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tok_s(mid) > decode_tok_s else (lo, mid)
    return (lo + hi) / 2


def repredict(inputs: Path, results: Path) -> None:
    """Recompute the predictions of a finished run from its saved cost models and profile."""
    from haqmoe.results import write_results
    from haqmoe.costs.curves import CostModel
    from haqmoe.costs.hardware import HardwareProfile
    from haqmoe.runtime.shaped import MoEShape

    d = json.loads((results / "runtime_gpu.json").read_text())
    rows = d["rows"]
    costs = {k: CostModel.from_dict(v) for k, v in json.loads((results / "cost_models.json").read_text()).items()}
    profile = HardwareProfile.from_dict(json.loads((results / "profile.json").read_text()))
    L = int(rows[0]["layers"])
    shape = MoEShape(layers=L)
    per_layer = min(r["slots_per_layer"] for r in rows)
    tokens = int(d["meta"]["command"].split("--tokens")[1].split()[0]) if "--tokens" in d["meta"]["command"] else 64
    fitted = add_predictions(rows, costs, profile, Inputs.load(inputs, L, tokens), shape, per_layer)
    save_fitted(results, fitted)
    d["meta"]["repredicted"] = "python bench/gpu_mixtral.py predict " + f"{inputs} {results}"
    write_results(results / "runtime_gpu.json", rows, d["meta"], TITLE, notes(fitted, L, per_layer, rows))


TITLE = "Real engine on the GPU: Mixtral-shaped W8A8 model"


def notes(fitted: dict, L: int, per_layer: int, rows: list[dict]) -> str:
    r = next((r for r in rows if r.get("budget_gb")), {})
    fits = "; ".join(f"{mode}: per-layer framework time {f.layer_overhead_ms:.3f} ms, host sync {f.host_sync_ms:.3f} ms"
                     for mode, f in fitted.items())
    return (__doc__ or "") + (
        f"\n\n{L} layers; GPU budget {r.get('budget_gb', 0):.1f} GB = 40 % of the FP16 size "
        f"{r.get('fp16_model_gb', 0):.1f} GB; {per_layer}/8 expert slots per layer; GPU tier precision: "
        f"{r.get('gpu_precision')}. `predicted_raw_decode_tok_s` = simulator with the measured profile as is; "
        f"`predicted_decode_tok_s` = with the engine's host costs (cpu_gpu_overlap 0; the per-layer framework "
        f"time fitted on the all-resident row and the host sync per layer with host expert work fitted on the "
        f"always-cpu row, per engine mode ({fits}): `fit` names them; every other row is a prediction); "
        f"`prediction_error` = predicted / measured - 1 (goal: within 20 %). `full` = predictor + background "
        f"admission of CPU-served misses (one copy in flight at most). `-eager` rows: the same engine without "
        f"CUDA graphs. `-compiled` rows: decode steps compiled (`EngineConfig.compile`: inductor graphs replayed "
        f"as CUDA graphs between the eager routers and hybrid experts), compiled and recorded by 8 warm-up "
        f"tokens (in `engine_build_s`).")


def run(inputs: Path, out: Path, layers: int, tokens: int, budget_frac: float, dry_run: bool = False,
        policies: list[str] | None = None) -> None:
    """``dry_run``: the same steps on this CPU with a tiny shape and the GPU tier emulated (checks the script)."""
    from haqmoe.results import run_meta, write_results
    from haqmoe.routing.placement import Plan
    from haqmoe.runtime.calibrate import measure_profile
    from haqmoe.runtime.engine import CollaborativeEngine, EngineConfig, SamplingConfig, decode_tok_s, latency_stats
    from haqmoe.costs.hardware import PROFILES
    from haqmoe.runtime.shaped import MoEShape, restore_experts, shaped_mixtral
    from haqmoe.runtime.simulator import frequency_plan

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if dry_run:
        profile = PROFILES["h100-pcie"]
    else:
        torch.set_num_threads(os.cpu_count() or 1)
        try:
            profile = measure_profile(f"{torch.cuda.get_device_name(0)} (measured)")
        except Exception:  # noqa: BLE001 - a datasheet profile still lets the engine rows run
            traceback.print_exc()
            profile = PROFILES["h100-pcie"]
    (out / "profile.json").write_text(profile.to_json())
    print(f"[{time.perf_counter() - t0:.0f}s] profile: h2d {profile.h2d_gb_s:.1f} GB/s, gpu {profile.gpu_mem_bw_gb_s:.0f} "
          f"GB/s, cpu {profile.cpu_mem_bw_gb_s:.1f} GB/s, cpu int8 {profile.cpu_int8_tops:.2f} TOPS", flush=True)
    try:
        gemm = gemm_rows() if not dry_run else gemm_rows("cpu", GEMM_SHAPES[2:3], (1,))
        write_results(out / "int8_gpu.json", gemm, run_meta(), "int8 vs fp16 GEMM on the GPU",
                      GEMM_NOTES)
    except Exception:  # noqa: BLE001 - the engine rows matter more; report and go on
        traceback.print_exc()
    print(f"[{time.perf_counter() - t0:.0f}s] gemm rows done", flush=True)

    L = layers
    inp = Inputs.load(inputs, L, tokens)
    P = inp.prefill
    shape = MoEShape(layers=L)
    if dry_run:
        shape = MoEShape(hidden=256, ffn=512, heads=4, kv_heads=2, vocab=1000, layers=L)
    lm, feed, experts = shaped_mixtral(shape, inp.routes, device="cpu" if dry_run else "cuda",
                                       dtype=torch.float32 if dry_run else torch.float16)
    spec = cost_spec(shape)
    fp16_gb = spec.total_bytes("fp16") / 1e9
    budget_gb = budget_frac * fp16_gb
    nonexpert_gb = sum(p.numel() * p.element_size() for p in lm.model.parameters() if p.device.type != "meta") / 1e9
    expert_gb = spec.expert_bytes("w8a8") / 1e9
    reserve_gb = 0.0 if dry_run else 1.0
    per_layer = min(shape.experts, int((budget_gb - nonexpert_gb - reserve_gb) / expert_gb) // L)
    if per_layer < shape.top_k:
        raise SystemExit(f"budget {budget_gb:.1f} GB leaves {per_layer} slots per layer")
    print(f"[{time.perf_counter() - t0:.0f}s] model built: fp16 size {fp16_gb:.1f} GB, budget {budget_gb:.1f} GB, "
          f"non-expert {nonexpert_gb:.2f} GB, {per_layer} of {shape.experts} experts per layer", flush=True)

    tmp = Path(tempfile.mkdtemp())
    plans = {}
    for k, n in (("budget", per_layer), ("all", shape.experts)):
        resident = frequency_plan(inp.plan, [n] * L)
        plans[k] = str(Plan(L, shape.experts, [sorted(resident[l]) for l in range(L)], "frequency").save(
            tmp / f"plan_{k}.json"))
    ids = torch.randint(0, shape.vocab, (1, P), generator=torch.Generator().manual_seed(0))

    rows, costs, token_ms = [], {}, {}
    for i, name in enumerate(["all-resident", *(policies or GPU_POLICIES)]):  # the first only warms CUDA/oneDNN up
        pol = GPU_POLICIES[name]
        slots = shape.experts if pol.slots == "all" else per_layer
        try:
            restore_experts(lm, experts)
            feed.pos = 0
            gc.collect()
            if not dry_run:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            tb = time.perf_counter()
            engine = CollaborativeEngine(lm, EngineConfig(device="cpu" if dry_run else "cuda", emulate_gpu=dry_run,
                                                          slots_per_layer=slots, cache_policy=pol.cache,
                                                          decision=pol.decision, plan=plans[pol.slots],
                                                          exec_mode="real", admit=pol.admit,
                                                          cuda_graphs=pol.graphs, compile=pol.compiled))
            if pol.compiled:  # compile and record the decode graphs (same cache length), then start over
                engine.warm_up(ids, SamplingConfig(max_new_tokens=tokens))
                feed.pos = 0
            build_s = time.perf_counter() - tb
            gen = engine.generate(ids, SamplingConfig(max_new_tokens=tokens))
            s = engine.summary()
            peak = 0.0 if dry_run else torch.cuda.max_memory_allocated() / 1e9
            lat = latency_stats(gen.token_ms)
            costs[name] = engine.cost
            if i == 0:
                print(f"[{time.perf_counter() - t0:.0f}s] warm-up done (engine build {build_s:.1f}s)", flush=True)
                del engine
                continue
            rows.append({
                "case": "gpu-mixtral-shape", "policy": name, "decode_tok_s": decode_tok_s(gen.token_ms),
                "prefill_ms_512": gen.prefill_ms, "latency_p50_ms": lat["p50_ms"], "latency_p99_ms": lat["p99_ms"],
                "latency_std_ms": lat["std_ms"], "hit_rate": s["hit_rate"], "gpu_mem_gb": peak,
                "bytes_moved_gb": s["bytes_moved"] / 1e9, "predicted_decode_tok_s": None,
                "predicted_raw_decode_tok_s": None, "predicted_prefill_ms_512": None,
                "slots_per_layer": slots, "layers": L, "cpu_expert_calls": s["cpu_expert_calls"],
                "gpu_expert_calls": s["gpu_expert_calls"], "n_critical": s["n_critical"],
                "engine_build_s": build_s, "budget_gb": budget_gb if pol.slots == "budget" else None,
                "fp16_model_gb": fp16_gb, "gpu_precision": s.get("gpu_precision"), "cuda_graphs": pol.graphs,
                "background_copies": s.get("background_copies", 0),
                **{k: v for k, v in s.items() if k.startswith("host_")},  # per decode token (HOST_PHASES)
            })
            token_ms[name] = gen.token_ms
            print(f"[{time.perf_counter() - t0:.0f}s] {name}: {rows[-1]['decode_tok_s']:.1f} tok/s, prefill "
                  f"{gen.prefill_ms:.0f} ms, hit {s['hit_rate']:.3f}, peak {peak:.1f} GB", flush=True)
            del engine
        except Exception:  # noqa: BLE001 - keep the other policies' rows
            traceback.print_exc()
            rows.append({"case": "gpu-mixtral-shape", "policy": name, "error": traceback.format_exc(limit=3)})
    (out / "token_ms.json").write_text(json.dumps(token_ms))  # per-token decode latencies, per policy
    (out / "cost_models.json").write_text(json.dumps({k: c.as_dict() for k, c in costs.items()}, indent=1,
                                                     default=str))

    fitted = add_predictions(rows, costs, profile, inp, shape, per_layer)
    save_fitted(out, fitted)
    write_results(out / "runtime_gpu.json", rows, run_meta(" ".join(sys.argv)), TITLE,
                  notes(fitted, L, per_layer, rows) + ("\n\nDRY RUN on the CPU (tiny shape, GPU tier emulated)."
                                                      if dry_run else ""))
    print((out / "runtime_gpu.md").read_text())


def combine(out: Path, runs: list[Path], notes_file: Path | None) -> None:
    """One table from several ``run`` outputs (a ``run`` column, 1-based): repeated runs on one lease."""
    from haqmoe.results import write_results

    rows, metas = [], []
    for i, d in enumerate(runs, 1):
        data = json.loads((d / "runtime_gpu.json").read_text())
        rows += [{"run": i, **r} for r in data["rows"]]
        metas.append(data["meta"])
    meta = {**metas[0], "command": "; ".join(m["command"] for m in metas), "runs": [str(d) for d in runs]}
    text = notes_file.read_text() if notes_file else ""
    write_results(out, rows, meta, TITLE, text, columns=COMBINED_COLUMNS)


COMBINED_COLUMNS = ("run", "policy", "decode_tok_s", "predicted_decode_tok_s", "prediction_error", "fit",
                    "prefill_ms_512", "latency_p50_ms", "latency_p99_ms", "latency_std_ms", "hit_rate", "gpu_mem_gb",
                    "bytes_moved_gb", "cpu_expert_calls", "gpu_expert_calls", "n_critical", "host_route_wait_ms",
                    "host_decide_ms", "host_cpu_tier_ms", "host_cpu_tier_est_ms", "host_layer_ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="write the routing inputs (needs ../shared/data)")
    p.add_argument("dir", type=Path)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--tokens", type=int, default=100)
    p.add_argument("--prefill", type=int, default=512)
    r = sub.add_parser("run", help="measure on a CUDA machine")
    r.add_argument("dir", type=Path)
    r.add_argument("--out", type=Path, default=Path("bench/results"))
    r.add_argument("--layers", type=int, default=8)
    r.add_argument("--tokens", type=int, default=64)
    r.add_argument("--budget", type=float, default=0.4, help="GPU budget as a fraction of the FP16 model size")
    r.add_argument("--dry-run", action="store_true", help="check the script on the CPU: tiny shape, GPU emulated")
    r.add_argument("--policies", default=",".join(GPU_POLICIES),
                   help="comma-separated subset of: " + ", ".join(GPU_POLICIES))
    q = sub.add_parser("predict", help="recompute the simulator predictions of a finished run")
    q.add_argument("dir", type=Path)
    q.add_argument("results", type=Path)
    c = sub.add_parser("combine", help="one table from several run outputs (a run column)")
    c.add_argument("out", type=Path, help="combined JSON (the .md is written beside it)")
    c.add_argument("runs", type=Path, nargs="+", help="run output folders, in order")
    c.add_argument("--notes", type=Path, help="a markdown file appended under the table")
    args = ap.parse_args()
    if args.cmd == "combine":
        combine(args.out, args.runs, args.notes)
    elif args.cmd == "predict":
        repredict(args.dir, args.results)
    elif args.cmd == "prepare":
        prepare(args.dir, args.requests, args.tokens, args.prefill)
    else:
        if not torch.cuda.is_available() and not args.dry_run:
            raise SystemExit("run needs a CUDA GPU (use the device tool; see bench/results/runtime_gpu.md)")
        policies = [p for p in args.policies.split(",") if p]
        unknown = sorted(set(policies) - set(GPU_POLICIES))
        if unknown:
            raise SystemExit(f"unknown policies {unknown}; known: {', '.join(GPU_POLICIES)}")
        run(args.dir, args.out, args.layers, args.tokens, args.budget, args.dry_run, policies)


if __name__ == "__main__":
    main()
