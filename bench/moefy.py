"""MoEfied SmolLM2: perplexity of the carved MoE at several activation ratios, fitted router vs random.

    .venv/bin/python bench/moefy.py --windows all --resume      # the table (bench/results/moefy.{json,md})
    .venv/bin/python bench/moefy.py --windows 16 --shapes 8:4:0 --out /tmp/moefy.json

Every shape E:K:S (E routed experts, K per token, S shared) is carved once from the same calibration
pass (16 x 512 tokens of wikitext2:valid, seed 0: never the test split) and evaluated with the fitted
router and with Gaussian random router rows (same experts, routing that knows nothing); `--routers
...,oracle` adds the best any router of these experts could do (each token's K experts with the
largest actual output, computed from all of them: a measurement, not a model), the most a router
fine-tune could add. The
dense model is evaluated by the same protocol as `haqmoe eval` (WikiText-2 test, non-overlapping
2048-token windows). Rows are written as each finishes; --resume keeps rows of the same setup and
continues an interrupted row from its last window (bench/work/moefy/).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

from haqmoe.data.text import calibration_ids, eval_windows, load_text, tokenize
from haqmoe.eval.perplexity import perplexity
from haqmoe.models import moefy as M
from haqmoe.sources import load_model
from haqmoe.results import run_meta, write_results

SHAPES = "4:3:4,4:2:4,8:6:0,12:4:4,8:4:0,14:2:2,8:2:0"
MAX_LOSS = 0.15  # the default's perplexity may exceed the dense model's by at most this share
CLEAR_MARGIN = 1.10  # random routing's perplexity must be at least this multiple of the fitted one's
SPARSE_PCT = 75  # when no shape is within MAX_LOSS: the best one that still leaves a quarter of the FFN idle
COLUMNS = ["model", "shape", "router", "ffn_active_pct", "active_params_pct", "ppl", "delta_pct", "windows",
           "tokens", "build_seconds", "eval_seconds"]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def param_counts(model) -> tuple[int, int]:
    """(total parameters, parameters one token uses): routed experts count only K of E."""
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    cfg = model.config
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", 0)
    if not experts:
        return total, total
    per_expert = 3 * cfg.hidden_size * (getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size)
    idle = cfg.num_hidden_layers * (experts - cfg.num_experts_per_tok) * per_expert
    return total, total - idle


def random_carving(carving: list[M.LayerCarving], feats: list[torch.Tensor], seed: int) -> list[M.LayerCarving]:
    """Same experts, Gaussian router rows scaled the same way (the routing baseline)."""
    out = []
    for i, (lc, x) in enumerate(zip(carving, feats)):
        r = M.random_router(len(lc.groups), x.shape[1], seed + 1000 + i)
        r = r * M.uniform_softmax_scale(x.double() @ r.T)
        out.append(dataclasses.replace(lc, router=r.float()))
    return out


class OracleRouter(nn.Module):
    """Top-k by each expert's actual output norm (all experts computed), weights 1/k: the routing an
    ideal router would pick for these experts. Drop-in for Mixtral's / Qwen2-MoE's router module."""

    def __init__(self, experts: nn.Module, top_k: int):
        super().__init__()
        self.experts, self.top_k = experts, top_k

    def forward(self, hidden_states: torch.Tensor):
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        gate_up, down = self.experts.gate_up_proj, self.experts.down_proj
        gate, up = torch.einsum("th,eoh->eto", x, gate_up).chunk(2, dim=-1)
        norms = torch.einsum("eti,ehi->eth", self.experts.act_fn(gate) * up, down).norm(dim=-1).T  # [T, E]
        idx = norms.topk(self.top_k, dim=-1).indices
        return norms, torch.full(idx.shape, 1 / self.top_k, dtype=x.dtype), idx


def with_oracle_routers(moe: nn.Module, top_k: int) -> nn.Module:
    for layer in moe.model.layers:
        layer.mlp.gate = OracleRouter(layer.mlp.experts, top_k)
    return moe


def choose_default(rows: list[dict]) -> tuple[dict | None, str]:
    """The smallest activation ratio within MAX_LOSS of dense with fitted routing clearly ahead of
    random; the sentence that says so is generated from the rows."""
    dense = next((r for r in rows if r["router"] == "dense"), None)
    fitted = [r for r in rows if r["router"] == "fitted"]  # oracle rows are a bound, never a default
    if dense is None or not fitted:
        return None, ""
    rand = {r["shape"]: r for r in rows if r["router"] == "random"}
    ok = [r for r in fitted if r["ppl"] <= dense["ppl"] * (1 + MAX_LOSS) and r["shape"] in rand
          and rand[r["shape"]]["ppl"] >= CLEAR_MARGIN * r["ppl"]]
    if ok:
        best = min(ok, key=lambda r: (r["ffn_active_pct"], r["ppl"]))
        return best, (f"Default: {best['shape']} (E:K:S), {best['ffn_active_pct']:.1f} % of the FFN neurons and "
                      f"{best['active_params_pct']:.1f} % of the parameters active per token: PPL "
                      f"{best['ppl']:.2f} vs dense {dense['ppl']:.2f} ({best['delta_pct']:+.1f} %), random routing "
                      f"{rand[best['shape']]['ppl']:.2f}, measured on this CPU over {best['windows']} windows.")
    closest = min(fitted, key=lambda r: r["ppl"])
    sparse = [r for r in fitted if r["ffn_active_pct"] <= SPARSE_PCT and r["shape"] in rand
              and rand[r["shape"]]["ppl"] >= CLEAR_MARGIN * r["ppl"]]
    best = min(sparse, key=lambda r: r["ppl"]) if sparse else closest
    oracle = {r["shape"]: r for r in rows if r["router"] == "oracle"}
    bound = (f" With oracle routing (the most a router fine-tune could reach with these experts) that shape's PPL "
             f"is {oracle[best['shape']]['ppl']:.2f} ({oracle[best['shape']]['delta_pct']:+.1f} %)."
             if best["shape"] in oracle else "")
    reach = [r for r in oracle.values() if r["ppl"] <= dense["ppl"] * (1 + MAX_LOSS)]
    bound += "".join(f" Oracle routing brings {r['shape']} within {100 * MAX_LOSS:.0f} % ({r['ppl']:.2f}, "
                     f"{r['delta_pct']:+.1f} %): a router fine-tune is worth trying there." for r in reach
                     if r["shape"] != best["shape"])
    return best, (f"No shape is within {100 * MAX_LOSS:.0f} % of dense with fitted routing clearly ahead of random. "
                  f"Closest: {closest['shape']} (E:K:S), {closest['ffn_active_pct']:.1f} % of the FFN active, PPL "
                  f"{closest['ppl']:.2f} vs dense {dense['ppl']:.2f} ({closest['delta_pct']:+.1f} %). Default (the "
                  f"lowest PPL with at most {SPARSE_PCT} % of the FFN active and fitted routing at least "
                  f"{CLEAR_MARGIN:.2f}x better than random): {best['shape']}, {best['ffn_active_pct']:.1f} % of the FFN "
                  f"and {best['active_params_pct']:.1f} % of the parameters active per token, PPL {best['ppl']:.2f} "
                  f"({best['delta_pct']:+.1f} %), random routing {rand[best['shape']]['ppl']:.2f}." + bound +
                  f" Measured on this CPU over {best['windows']} windows.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", default="all", help="number of 2048-token test windows, or 'all'")
    ap.add_argument("--shapes", default=SHAPES, help="E:K:S,... (routed experts, per token, shared)")
    ap.add_argument("--routers", default="fitted,random")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="bench/results/moefy.json")
    ap.add_argument("--work", default="bench/work/moefy", help="per-row window progress (for --resume)")
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    windows = None if args.windows == "all" else int(args.windows)
    out, work = Path(args.out), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    calib_src = "wikitext2:valid"
    setup = {"data": "wikitext2:test", "seqlen": 2048, "windows": args.windows, "calib": calib_src,
             "calib_samples": args.calib_samples, "calib_len": args.calib_len, "seed": 0}
    meta = run_meta("python " + " ".join(sys.argv), cpu=cpu_model(), setup=setup)
    rows: list[dict] = []
    if args.resume and out.is_file():
        old = json.loads(out.read_text())
        if old["meta"].get("setup") == setup:  # the first run's meta stays; later runs are listed
            rows = old["rows"]
            meta = {**old["meta"], "resumed_by": [*old["meta"].get("resumed_by", []), meta["command"]]}
    done = {(r["shape"], r["router"]) for r in rows}

    lm = load_model(args.model, progress=False)
    wins = eval_windows(tokenize(lm.tokenizer, load_text("wikitext2:test")), 2048, windows)
    dense_total, _ = param_counts(lm.model)

    def save() -> None:
        best, sentence = choose_default(rows)
        notes = (f"Perplexity on WikiText-2 test ({len(wins)} windows x 2048 tokens), fp32, measured on this CPU "
                 f"({meta['cpu']}). shape = E:K:S (routed experts, routed per token, shared; neurons per expert = "
                 f"1536 / (E + S)); ffn_active_pct = (K + S) / (E + S); active_params_pct = parameters one token "
                 f"uses / the dense model's {dense_total} (embeddings and attention included). fitted = "
                 f"least-squares router from activation statistics; random = the same experts with Gaussian "
                 f"router rows; oracle (where present) = each token's K experts of largest actual output, an "
                 f"upper bound for any router of these experts. Router calibration: {args.calib_samples} x {args.calib_len} tokens of "
                 f"{calib_src}, seed 0. Times: this shared 2-core machine, upper bounds.\n\n{sentence}")
        write_results(out, rows, meta, f"MoEfied {args.model}: perplexity by activation ratio", notes, COLUMNS)

    def evaluate(model, shape: str, router: str, build_s: float, total: int, active: int, ffn: float) -> None:
        key = f"{shape.replace(':', '-')}-{router}"
        res = perplexity(model, wins, progress=False, progress_file=work / f"{key}.progress.json")
        dense = next((r["ppl"] for r in rows if r["router"] == "dense"), res.ppl)
        rows.append({"model": args.model, "shape": shape, "router": router, "ffn_active_pct": round(100 * ffn, 2),
                     "active_params_pct": round(100 * active / dense_total, 2), "total_params": total,
                     "active_params": active, "ppl": res.ppl, "delta_pct": round(100 * (res.ppl / dense - 1), 2),
                     "windows": res.windows, "tokens": res.tokens, "build_seconds": round(build_s, 1),
                     "eval_seconds": round(res.seconds, 1)})
        save()
        print(f"{shape} {router}: ppl {res.ppl:.3f} ({res.seconds:.0f} s)", flush=True)

    if ("dense", "dense") not in done:
        evaluate(lm.model, "dense", "dense", 0.0, dense_total, dense_total, 1.0)
    routers = args.routers.split(",")
    feats = None
    for spec in args.shapes.split(","):
        e, k, s = (int(v) for v in spec.split(":"))
        if all((spec, r) in done for r in routers):
            continue
        if feats is None:
            calib = calibration_ids(lm.tokenizer, calib_src, args.calib_samples, args.calib_len, 0,
                                    eval_spec="wikitext2:test")
            feats = M.collect_ffn_inputs(lm.model, calib, progress=False)
        cfg = M.MoefyConfig(experts=e, top_k=k, shared=s)
        t = time.perf_counter()
        carving = M.carve_from_inputs(lm.model, feats, cfg, progress=False)
        build_s = time.perf_counter() - t
        for router in routers:
            if (spec, router) in done:
                continue
            moe = M.assemble(lm.model, random_carving(carving, feats, 0) if router == "random" else carving, cfg)
            total, active = param_counts(moe)  # before an oracle replaces the router (same shape, same share)
            if router == "oracle":
                with_oracle_routers(moe, k)
            evaluate(moe, spec, router, build_s, total, active, cfg.active_share)
            del moe
    save()  # the notes and the default from every row, resumed ones included
    best, sentence = choose_default(rows)
    print(sentence)
    if best is not None and math.isfinite(best["ppl"]):
        print(f"chosen shape: {best['shape']}")


if __name__ == "__main__":
    main()
