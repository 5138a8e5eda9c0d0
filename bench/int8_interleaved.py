"""Our int8 decode vs llama.cpp Q8_0 builds, interleaved: one run, one host, the same weights.

    .venv/bin/python bench/int8_interleaved.py [--pairs 10] \\
        [--llama-python flagged=.venv/bin/python --llama-python default=bench/peers/llama-default/.venv/bin/python ...]
        # -> bench/results/int8_interleaved.{json,md}
    .venv/bin/python bench/int8_interleaved.py --model smollm2-moe --bandwidth ...
        # -> bench/results/int8_moe_peer.{json,md}
    .venv/bin/python bench/int8_interleaved.py --model smollm2-moefied --out bench/results/int8_moefied_peer.json ...

This machine shares its host: in bench/int8.py, where every mode runs in its own process, a mode's best
round moves between runs, and the ratio to llama.cpp with it. Here every decoder lives in its own
long-lived process (two OpenMP/thread-pool runtimes in one process slow each other) and they take turns
in short bursts on command (64 greedy tokens after the same 32-token prompt, 2 threads each, a short
pause between bursts, the order rotated every round), and each ratio is taken within a round, so a slow
spell of the host falls on both sides. Decode tok/s of a burst: tokens after the first over the time
from the first to the last.

Ours: the model through `haqmoe generate --aot`'s ahead-of-time package (real int8, int8 lm_head
checkpoint, RTN W8A8; its int8 products on our fused kernel where the CPU has AVX512-VNNI, see
meta.fused_kernel; an MoE's routed experts on the fused MoE op, one call per layer). MoE models add
`engine`: `haqmoe run`'s collaborative engine with no GPU tier (every expert on the CPU, --exec real,
eager), in its own process and bursts like the others, its ratios as engine_ratio_vs_*. llama.cpp: the same
checkpoint written by `haqmoe export --format gguf` (Q8_0 re-quantized from our int8 weights), one
child process per llama-cpp-python build (--llama-python LABEL=PYTHON: the python of the venv that
holds it, running bench/llama_child.py); meta.llama_builds has each build's version, system info and
the sha256 of its ggml CPU library. --bandwidth: this host's DRAM read bandwidth (bench/hostinfo.py),
measured before and after the rounds, beside the weight bytes each decoder reads per token.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))  # also in spawned workers: set at import
PROMPT, NEW, THREADS = 32, 64, 2
OURS, ENGINE = "ours", "engine"


class Stamps:
    """A streamer that only records when each token arrives (the prompt's put is not a token)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        if value.dim() == 1:  # a new token ([1]); the prompt comes as [1, T]
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def decode_tok_s(self) -> float:
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])


def checkpoint(model: str) -> Path:
    import int8 as bench_int8

    return bench_int8.ensure_quantized(model, int8_lm_head=True)


def gguf_of(model: str) -> Path:
    """Our checkpoint as Q8_0 GGUF (haqmoe export --format gguf), cached beside it."""
    from haqmoe.serve.gguf_export import export_gguf

    src = checkpoint(model)
    out = src.parent / f"{src.name}.Q8_0.gguf"
    if not out.is_file():
        export_gguf(str(src), out)
    return out


def prompt(model: str) -> list[int]:
    import int8 as bench_int8
    from transformers import AutoTokenizer

    return bench_int8.prompt_ids(AutoTokenizer.from_pretrained(checkpoint(model)), PROMPT)


def aot_decoder(model: str):
    """A burst function over `haqmoe generate --aot`'s package, and what it reads per token."""
    from haqmoe.exec.aot import AotGenerator
    from haqmoe.exec.precision import convert
    from haqmoe.sources import load_model

    lm = load_model(str(checkpoint(model)), progress=False)
    convert(lm.model, "int8")
    ids = torch.tensor([prompt(model)])
    gen = AotGenerator.for_model(lm.model, PROMPT + NEW, log=print)

    def burst() -> float:
        stamps = Stamps()
        gen.generate(ids, NEW, streamer=stamps)
        return stamps.decode_tok_s()

    return burst, weight_bytes_per_token(lm.model)


def engine_decoder(model: str):
    """A burst function over `haqmoe run`'s engine without a GPU tier (all experts on the CPU, real int8)."""
    from haqmoe.runtime.engine import CollaborativeEngine, EngineConfig, SamplingConfig
    from haqmoe.sources import load_model

    lm = load_model(str(checkpoint(model)), progress=False)
    per_token = weight_bytes_per_token(lm.model)  # before the engine takes the experts over
    engine = CollaborativeEngine(lm, EngineConfig(device="cpu", exec_mode="real"))
    ids = torch.tensor([prompt(model)])
    sampling = SamplingConfig(max_new_tokens=NEW, temperature=0.0)

    def burst() -> float:  # wall time between streamed tokens, as llama.cpp's side is timed
        times = [time.perf_counter() for _ in engine.stream(ids, sampling)]
        return (len(times) - 1) / (times[-1] - times[0])

    return burst, per_token


def weight_bytes_per_token(model) -> float:
    """Bytes of weights one decode step reads: every parameter and buffer, routed experts counted at
    top_k / experts of their size (the share a token runs), embedding tables not at all (one row is
    read) unless the lm_head reads the same tensor (tied: counted once)."""
    from torch import nn

    from haqmoe.quant.modules import Int8Embedding, QuantExperts

    cfg = model.config
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    share = cfg.num_experts_per_tok / experts if experts else 1.0
    seen: set[int] = set()
    total = 0.0
    for mod in model.modules():
        if isinstance(mod, (nn.Embedding, Int8Embedding)):
            continue
        routed = isinstance(mod, QuantExperts)
        for t in list(mod.parameters(recurse=routed)) + list(mod.buffers(recurse=routed)):
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size() * (share if routed else 1.0)
    return total


def gguf_bytes_per_token(path: Path, model_cfg) -> float:
    """The same for a GGUF file: tensor bytes, ``*_exps`` tensors at top_k / experts (a tied model has no
    ``output`` tensor: its ``token_embd`` is the lm_head, counted once)."""
    from gguf import GGUFReader

    experts = getattr(model_cfg, "num_local_experts", None) or getattr(model_cfg, "num_experts", None)
    share = model_cfg.num_experts_per_tok / experts if experts else 1.0
    return sum(int(t.n_bytes) * (share if "_exps." in t.name else 1.0) for t in GGUFReader(str(path)).tensors)


def is_moe(model: str) -> bool:
    return "moe" in model


def our_sides(model: str) -> list[str]:
    """Our decoders: the ahead-of-time package, and for an MoE also the engine."""
    return [OURS, ENGINE] if is_moe(model) else [OURS]


def serve_ours(model: str, side: str, conn) -> None:
    """Worker process: build one of our decoders, then run one burst per request until told to stop."""
    torch.set_num_threads(THREADS)
    from haqmoe.exec.kernels import w8a8_op

    burst, per_token = (engine_decoder if side == ENGINE else aot_decoder)(model)
    burst()  # warm-up
    conn.send({"bytes_per_token": per_token, "fused_kernel": w8a8_op() is not None})
    while conn.recv():
        conn.send(burst())


class LlamaChild:
    """One llama.cpp build in a child process of its venv's python (bench/llama_child.py)."""

    def __init__(self, label: str, python: str, gguf: Path, ids: list[int]):
        self.label, self.python = label, python
        job = json.dumps({"gguf": str(gguf), "ids": ids, "new": NEW, "threads": THREADS})
        env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
        env.pop("PYTHONPATH", None)
        self.proc = subprocess.Popen([python, str(ROOT / "bench" / "llama_child.py"), job], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"llama.cpp build '{label}' ({python}) failed to start")
        self.info = {"python": python, "gguf": gguf.name, **json.loads(line)}

    def burst(self) -> float:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"llama.cpp build '{self.label}' died during a burst")
        return json.loads(line)["tok_s"]

    def close(self) -> None:
        try:
            self.proc.stdin.write("stop\n")
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.wait(10)


def ratio_key(ours: str, build: str) -> str:
    """The row key of one of our sides over a llama.cpp build (``ratio_vs_*`` for the package, as ever)."""
    return f"ratio_vs_{build}" if ours == OURS else f"{ours}_ratio_vs_{build}"


def summarise(rows: list[dict], ours: list[str], labels: list[str]) -> dict:
    """Median tok/s of every side, median within-round ratio of each of ours to each build."""
    med = {f"{s}_tok_s": statistics.median(r[f"{s}_tok_s"] for r in rows) for s in ours + labels}
    ratios = {ratio_key(o, b): statistics.median(r[ratio_key(o, b)] for r in rows) for o in ours for b in labels}
    return {"pair": "median", **med, **ratios}


def notes_text(rows: list[dict], labels: list[str], meta: dict) -> str:
    """Every figure below is computed from the rows and meta of this run."""
    rounds = [r for r in rows if r["pair"] != "median"]
    med = next(r for r in rows if r["pair"] == "median")
    fastest = max(labels, key=lambda b: med[f"{b}_tok_s"])
    cpu = meta.get("cpu", {})
    lines = [f"CPU (lscpu): {cpu.get('Model name', '?')}, family {cpu.get('CPU family', '?')} model "
             f"{cpu.get('Model', '?')}, {cpu.get('CPU(s)', '?')} CPUs, L3 {cpu.get('L3 cache', '?')}; flags: "
             f"{cpu.get('Flags', '?')}", ""]
    lines += [f"Measured on this CPU ({meta.get('cpu', {}).get('Model name', '?')}, {THREADS} threads each), "
             f"{len(rounds)} rounds. Median decode tok/s: ours {med[f'{OURS}_tok_s']:.1f}; "
             + ", ".join(f"llama.cpp `{b}` {med[f'{b}_tok_s']:.1f}" for b in labels) + "."]
    ours = [s for s in (OURS, ENGINE) if f"{s}_tok_s" in med]
    for o in ours:
        for b in labels:
            rs = [r[ratio_key(o, b)] for r in rounds]
            lines.append(f"- {o} / `{b}`: median {med[ratio_key(o, b)]:.2f} (rounds {min(rs):.2f}-{max(rs):.2f})")
    lines.append(f"Fastest llama.cpp build here: `{fastest}`; ours against it: {med[f'ratio_vs_{fastest}']:.2f}x"
                 + (f" (engine: {med[ratio_key(ENGINE, fastest)]:.2f}x, median {med[f'{ENGINE}_tok_s']:.1f} tok/s)."
                    if ENGINE in ours else "."))
    if len(labels) > 1:
        slowest = min(labels, key=lambda b: med[f"{b}_tok_s"])
        lines.append(f"`{fastest}` decodes {med[f'{fastest}_tok_s'] / med[f'{slowest}_tok_s']:.2f}x `{slowest}` "
                     f"(median tok/s).")
    bw = meta.get("dram_read_gb_s")
    if bw:
        lines.append(f"DRAM read bandwidth of this host, same run: {min(bw):.1f}-{max(bw):.1f} GB/s "
                     f"({len(bw)} probes, {THREADS} threads).")
        for side, key in ((OURS, "ours_bytes_per_token"), (fastest, "gguf_bytes_per_token")):
            per = meta.get("llama_builds", {}).get(side, {}).get("bytes_per_token") or meta.get(key)
            if per:
                gbs = med[f"{side}_tok_s"] * per / 1e9
                who = "ours" if side == OURS else f"llama.cpp `{side}`"
                lines.append(f"- {who}: {per / 1e6:.1f} MB of weights per token x {med[f'{side}_tok_s']:.1f} tok/s "
                             f"= {gbs:.2f} GB/s, {gbs / max(bw):.0%} of the best probe")
    return "\n".join(lines)


def title_for(model: str) -> str:
    return f"{model} int8 decode: ours vs llama.cpp Q8_0 builds, interleaved (measured on this CPU)"


def render(path: Path) -> None:
    from transformers import AutoConfig

    from haqmoe.results import write_results
    from haqmoe.sources import load_model

    data = json.loads(path.read_text())
    meta, rows = data["meta"], data["rows"]
    sides = [k[: -len("_tok_s")] for k in rows[0] if k.endswith("_tok_s")]
    labels = [s for s in sides if s not in (OURS, ENGINE)]
    if "dram_read_gb_s" in meta:
        src = checkpoint(meta["model"])
        lm = load_model(str(src), progress=False)
        meta["ours_bytes_per_token"] = weight_bytes_per_token(lm.model)
        model_cfg = AutoConfig.from_pretrained(src)
        meta["gguf_bytes_per_token"] = gguf_bytes_per_token(src.parent / meta["gguf"], model_cfg)
        for label, info in meta["llama_builds"].items():
            info["bytes_per_token"] = gguf_bytes_per_token(src.parent / info.get("gguf", meta["gguf"]), model_cfg)
    write_results(path, rows, meta, title_for(meta["model"]), (__doc__ or "") + "\n\n" + notes_text(rows, labels, meta))


def main() -> None:
    import multiprocessing as mp

    from haqmoe.results import run_meta, write_results
    from hostinfo import cpu_info, dram_read_gb_s

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m",
                    help="smollm2-135m, smollm2-moe or smollm2-moefied (ours: --aot; MoE models also: engine)")
    ap.add_argument("--pairs", type=int, default=10, help="rounds (each decoder bursts once per round)")
    ap.add_argument("--llama-python", action="append", default=[],
                    help="LABEL=PYTHON[@GGUF] of a venv holding a llama-cpp-python build (repeatable); "
                         "@GGUF runs that build on another file (default: our checkpoint's export); "
                         "default: flagged=<this python>")
    ap.add_argument("--bandwidth", action="store_true", help="probe DRAM read bandwidth before and after")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--render", type=Path, default=None,
                    help="rewrite this results .json's .md (notes from its rows; weight bytes per token recounted "
                         "from the checkpoint and files, which needs no timing), measure nothing")
    args = ap.parse_args()
    if args.render:
        return render(args.render)
    builds = [b.split("=", 1) for b in (args.llama_python or [f"flagged={sys.executable}"])]
    labels = [label for label, _ in builds]
    out = args.out or ROOT / "bench" / "results" / ("int8_moe_peer.json" if is_moe(args.model)
                                                     else "int8_interleaved.json")
    gguf, ids = gguf_of(args.model), prompt(args.model)  # built before any timing
    bandwidth = [dram_read_gb_s(THREADS)] if args.bandwidth else []

    ctx = mp.get_context("spawn")
    ours = our_sides(args.model)
    pipes, workers, infos = {}, [], {}
    for side in ours:  # one after the other: each builds (the package: minutes once) before any timing
        here, there = ctx.Pipe()
        worker = ctx.Process(target=serve_ours, args=(args.model, side, there), daemon=True)
        worker.start()
        pipes[side], infos[side] = here, here.recv()
        workers.append(worker)
    ours_info = infos[OURS]
    files = {label: Path(python.split("@", 1)[1]) if "@" in python else gguf for label, python in builds}
    children = {label: LlamaChild(label, python.split("@", 1)[0], files[label], ids) for label, python in builds}

    def burst(side: str) -> float:
        if side in pipes:
            pipes[side].send(True)
            return pipes[side].recv()
        return children[side].burst()

    sides = ours + labels
    rows = []
    try:
        for i in range(args.pairs):
            order = sides[i % len(sides):] + sides[:i % len(sides)]
            speeds = {}
            for side in order:
                time.sleep(0.2)  # let the other sides' spinning worker threads go idle
                speeds[side] = burst(side)
            row = {"pair": i, "first": order[0], **{f"{s}_tok_s": speeds[s] for s in sides},
                   **{ratio_key(o, b): speeds[o] / speeds[b] for o in ours for b in labels}}
            rows.append(row)
            print(row, flush=True)
    finally:
        for pipe in pipes.values():
            pipe.send(False)
        for worker in workers:
            worker.join(10)
        for child in children.values():
            child.close()
    if args.bandwidth:
        bandwidth.append(dram_read_gb_s(THREADS))
    rows.append(summarise(rows, ours, labels))
    from transformers import AutoConfig

    import int8 as bench_int8

    meta = run_meta(model=args.model, pairs=args.pairs, prompt_tokens=PROMPT, new_tokens=NEW, threads=THREADS,
                    ours="aot", **({ENGINE: "engine (no GPU tier, --exec real)"} if ENGINE in ours else {}),
                    checkpoint=checkpoint(args.model).name, gguf=gguf.name, gguf_bytes=gguf.stat().st_size,
                    fused_kernel=ours_info["fused_kernel"], llama_cpp=bench_int8.llama_cpp_build().get("llama_cpp"),
                    llama_builds={label: child.info for label, child in children.items()}, cpu=cpu_info())
    if args.bandwidth:
        model_cfg = AutoConfig.from_pretrained(checkpoint(args.model))
        meta.update(dram_read_gb_s=bandwidth, ours_bytes_per_token=ours_info["bytes_per_token"],
                    gguf_bytes_per_token=gguf_bytes_per_token(gguf, model_cfg))
        for label in labels:
            meta["llama_builds"][label]["bytes_per_token"] = gguf_bytes_per_token(files[label], model_cfg)
    write_results(out, rows, meta, title_for(args.model), (__doc__ or "") + "\n\n" + notes_text(rows, labels, meta))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
