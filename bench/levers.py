"""Miss levers: what skipping a low-weight missed expert, serving it from an int4 copy, or prefetching the
layers ahead (lookahead) costs in accuracy and gives in decode speed.

    flock /tmp/haqmoe-heavy.lock .venv/bin/python bench/levers.py
    .venv/bin/python bench/levers.py --render   # rewrite the .md from the .json (rows kept)

Writes bench/results/levers.json/.md, four kinds of rows (docs/design.md, Miss levers; Prefetch and lookahead):

- ``accuracy``: the engine on smollm2-moefied (distinct experts) with the GPU tier emulated and a small
  GPU cache, each lever setting against the exact engine (same cache, lever off): greedy-token agreement
  on a few generations, and perplexity on a few WikiText-2 test windows teacher-forced token by token
  (each token a one-token forward, so every token is decided as a decode token is: misses, skips).
- ``speed``: the simulator on sampled Mixtral-8x7B routing (bench/simulate.py's setup, rtx5090d profile)
  for each lever setting and policy, beside the better peer policy of the same run; lookahead rows
  prefetch layers l+1 .. l+D (exact: only copies move, so no accuracy row is needed).
- ``recall``: the guess recall at each lookahead distance on smollm2-moefied's real routing (WikiText-2
  test windows), which sets the synthetic recall of the Mixtral lookahead rows (runtime/prefetch.py).
- ``bound``: the standard perplexity protocol (every 2048-token WikiText-2 test window, one forward each)
  through the engine with nothing ever resident (``always-cpu`` never copies, so every routed call is a
  miss): exact, and ``low-all``, where every routed call runs from the int4 copy, the most int4 that
  lever can serve at any hit rate. Resumable (``--work``): a full-test row is ~30 min of 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from haqmoe.costs import PROFILES, cost_model_for, memory_plan, model_spec
from haqmoe.registry import SIM_POLICIES
from haqmoe.results import run_meta, write_results
from haqmoe.runtime.cache import MAX_LOOKAHEAD
from haqmoe.runtime.prefetch import DEFAULT_GUESS_RECALL, DEFAULT_LOOKAHEAD_RECALL, PrefetchConfig
from haqmoe.runtime.simulator import CacheSpec, Replay, ReplayOptions, build_cache, spec_for_trace
from haqmoe.studies.experiments import mixtral_pair

MODEL = "smollm2-moefied"
PEERS = ("always-transfer", "always-cpu")
OURS = ("full+split", "balanced+prefetch")
# Mixtral settings (skip_below, low_below): a miss of the second-ranked expert whose renormalised weight is
# below skip_below is skipped, else below low_below served from the int4 copy; 1.0 takes every second-ranked
# miss (what any threshold above 1/2 does on smollm2-moefied, whose top-2 weights are 1/2 each)
# (skip_below, low_below, low_all): low_all serves every miss not skipped from int4, top experts too
MIXTRAL_SETTINGS = ((0.0, 0.0, False), (0.1, 0.0, False), (0.2, 0.0, False), (0.3, 0.0, False), (1.0, 0.0, False),
                    (0.0, 0.3, False), (0.0, 1.0, False), (0.1, 1.0, False), (0.2, 1.0, False), (0.0, 1.0, True),
                    (0.2, 1.0, True))
# lookahead rows (exact): (policy, lookahead D); full+split gets prefetch added (its SIM_POLICIES entry has none)
LOOKAHEAD_SETTINGS = (("balanced+prefetch", 2), ("balanced+prefetch", 3), ("full+split", 1), ("full+split", 2),
                      ("full+split", 3))
# the engine's settings on smollm2-moefied: (name, skip_below, skip_renorm, low_below, low_all)
ENGINE_SETTINGS = (("exact", 0.0, True, 0.0, False), ("low", 0.0, True, 1.0, False),
                   ("low-all", 0.0, True, 1.0, True), ("skip-drop", 1.0, False, 0.0, False),
                   ("skip-renorm", 1.0, True, 0.0, False))


def setting_name(skip: float, low: float, low_all: bool = False) -> str:
    parts = ([f"skip<{skip:g}"] if skip else []) + (["low-all"] if low and low_all else [f"low<{low:g}"] if low else [])
    return ", ".join(parts) or "exact"


# ------------------------------------------------------------------------------------ accuracy
def build(skip_below: float, skip_renorm: bool, low_below: float, low_all: bool, slots: int, policy: str):
    from haqmoe.runtime.engine import CollaborativeEngine, EngineConfig
    from haqmoe.sources import load_model

    lm = load_model(MODEL, progress=False)  # fresh: the engine swaps the model's experts modules
    cfg = EngineConfig(emulate_gpu=True, slots_per_layer=slots, decision=policy, skip_below=skip_below,
                       skip_renorm=skip_renorm, low_below=low_below, low_all=low_all)
    return CollaborativeEngine(lm, cfg)


def expert_calls(summary: dict) -> int:
    """Every routed expert call the engine decided, whatever served it (its summary's counters)."""
    return sum(summary[k] for k in ("gpu_expert_calls", "cpu_expert_calls", "split_expert_calls",
                                    "skipped_expert_calls", "low_expert_calls"))


@torch.inference_mode()
def teacher_forced_nll(engine, ids: torch.Tensor) -> tuple[float, int]:
    """Sum of next-token NLL over a window fed one token at a time through the engine's model (the KV
    cache grows as in decode): every token's experts are decided as a decode token's are."""
    past, total = None, 0.0
    engine.telemetry.step += 1
    for i in range(ids.shape[1] - 1):
        out = engine.model(input_ids=ids[:, i:i + 1], past_key_values=past, use_cache=True)
        engine.telemetry.step += 1
        past = out.past_key_values
        total -= float(torch.log_softmax(out.logits[0, -1].float(), -1)[ids[0, i + 1]])
    return total, ids.shape[1] - 1


def accuracy_rows(args) -> list[dict]:
    from haqmoe.data.text import load_text, tokenize
    from haqmoe.runtime.engine import SamplingConfig

    rows, exact_tokens, exact_ppl = [], None, None
    for name, skip_below, renorm, low_below, low_all in ENGINE_SETTINGS:
        if args.settings and name not in args.settings.split(",") + ["exact"]:
            continue
        t0 = time.perf_counter()
        engine = build(skip_below, renorm, low_below, low_all, args.slots, args.policy)
        ids = tokenize(engine.tokenizer, load_text("wikitext2:test"))
        # prompts and windows: evenly spaced, disjoint slices of the test split
        starts = np.linspace(0, ids.shape[1] - args.window - 1, args.windows + args.prompts).astype(int)
        nll, count = 0.0, 0
        for s in starts[: args.windows]:
            a, b = teacher_forced_nll(engine, ids[:, s:s + args.window])
            nll, count = nll + a, count + b
        tokens = []
        for s in starts[args.windows:]:
            gen = engine.generate(ids[:, s:s + args.prompt_tokens], SamplingConfig(max_new_tokens=args.gen_tokens))
            tokens.append(gen.tokens)
        s = engine.summary()
        ppl = math.exp(nll / count)
        if name == "exact":
            exact_tokens, exact_ppl = tokens, ppl
        same = [sum(x == y for x, y in zip(t, e)) / len(e) for t, e in zip(tokens, exact_tokens)]
        first = [next((i for i, (x, y) in enumerate(zip(t, e)) if x != y), len(e)) for t, e in zip(tokens, exact_tokens)]
        calls = expert_calls(s)
        rows.append({
            "kind": "accuracy", "setting": name, "skip_below": skip_below, "skip_renorm": renorm,
            "low_below": low_below, "low_all": low_all,
            "model": MODEL, "policy": args.policy, "slots_per_layer": args.slots,
            "ppl": ppl, "ppl_change_pct": 100 * (ppl / exact_ppl - 1),
            "ppl_tokens": count, "ppl_windows": args.windows, "window_tokens": args.window,
            "token_agreement": float(np.mean(same)), "first_divergence_mean": float(np.mean(first)),
            "generations": f"{args.prompts} x {args.gen_tokens}",
            "hit_rate": s["hit_rate"], "skipped_share_of_calls": s["skipped_expert_calls"] / max(calls, 1),
            "low_share_of_calls": s["low_expert_calls"] / max(calls, 1),
            "skipped_expert_calls": s["skipped_expert_calls"], "seconds": time.perf_counter() - t0,
        })
        print(rows[-1], flush=True)
    return rows


def bound_rows(args) -> list[dict]:
    """Full-protocol perplexity, exact and with every routed expert call served from int4 (module docstring)."""
    from haqmoe.data.text import eval_windows, load_text, tokenize
    from haqmoe.eval.perplexity import perplexity

    rows, exact = [], None
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    for name, low in (("exact", 0.0), ("low-all", 1.0)):
        engine = build(0.0, True, low, low > 0, args.slots, "always-cpu")
        windows = eval_windows(tokenize(engine.tokenizer, load_text("wikitext2:test")), 2048, args.bound_windows)
        res = perplexity(engine.model, windows, desc=f"bound {name}", progress_file=work / f"bound-{name}.json")
        s = engine.summary()
        calls = expert_calls(s)
        exact = exact or res.ppl
        rows.append({"kind": "bound", "setting": name, "skip_below": 0.0, "low_below": low, "low_all": low > 0,
                     "model": MODEL, "policy": "always-cpu", "ppl": res.ppl,
                     "ppl_change_pct": 100 * (res.ppl / exact - 1),
                     "ppl_windows": res.windows, "window_tokens": 2048, "ppl_tokens": res.predicted,
                     "hit_rate": s["hit_rate"], "low_share_of_calls": s["low_expert_calls"] / max(calls, 1),
                     "seconds": res.seconds})
        print(rows[-1], flush=True)
    return rows


# --------------------------------------------------------------------------------------- speed
def mixtral_weights(trace, seed: int = 11) -> np.ndarray:
    """Router weights for a sampled Mixtral trace, which has none (only expert fractions are public): the
    second expert's top-2-renormalised weight uniform on (0, 1/2), the first's 1 - that. An assumption,
    stated with every row: a threshold t < 1/2 then makes 2t of the second-ranked calls eligible."""
    rng = np.random.default_rng(seed)
    w2 = rng.uniform(0.0, 0.5, size=trace.experts.shape[:2]).astype(np.float32)
    return np.stack([1 - w2, w2], axis=-1)


def trace_note(kind: str, args, profile: str, weights_assumed: bool, prefetch: PrefetchConfig) -> str:
    """What a speed row was simulated on: the routing, the profile, and the assumptions it rests on."""
    note = f"simulated on sampled routing ({kind}, {args.requests} x {args.tokens} tokens), {profile}"
    if weights_assumed:
        note += "; weights assumed (second expert's ~ U(0, 1/2))"
    if prefetch.enabled and prefetch.lookahead > 1:
        recall = [prefetch.guess_recall, *prefetch.lookahead_recall[: prefetch.lookahead - 1]]
        note += "; synthetic guess recall " + ", ".join(f"{r:g}" for r in recall) + " at d = 1 .. " \
            + str(prefetch.lookahead)
    return note


def speed_rows(args) -> list[dict]:
    pair = mixtral_pair(args.requests, args.tokens)
    tr = pair.eval
    tr.weights = mixtral_weights(tr)
    profile = PROFILES["rtx5090d"]
    spec = spec_for_trace(tr, model_spec(pair.shape))
    cost = cost_model_for(profile, spec)
    slots = memory_plan(profile, spec, "w8a8").slots
    rows = []
    # (policy, skip_below, low_below, low_all, lookahead: 0 = the policy's own prefetch setting)
    grid = [(p, 0.0, 0.0, False, 0) for p in PEERS] + [(p, *x, 0) for p in OURS for x in MIXTRAL_SETTINGS]
    grid += [(p, 0.0, 0.0, False, d) for p, d in LOOKAHEAD_SETTINGS]
    for policy, t, lo, lo_all, ahead in grid:
        cpol, decision, admit, pf = SIM_POLICIES[policy]
        cache = build_cache(CacheSpec(cpol, slots), tr.num_layers, tr.num_experts, tr.top_k,
                            spec.expert_bytes("w8a8"), pair.plan, tr.experts, tr.offsets)
        prefetch = PrefetchConfig(pf or ahead > 0, guess_recall=args.guess_recall, lookahead=max(ahead, 1),
                                  lookahead_recall=args.lookahead_recall)
        opt = ReplayOptions(decision, admit, prefetch=prefetch, skip_below=t, low_below=lo, low_all=lo_all)
        res = Replay(tr, cache, cost, profile, spec, options=opt).run()
        s = res.summary()
        calls = tr.num_tokens * tr.num_layers * tr.top_k
        name = f"{policy}, {setting_name(t, lo, lo_all)}" if t or lo else policy
        if ahead:
            name = f"{policy}{'' if pf else '+prefetch'}, lookahead {ahead}"
        rows.append({
            "kind": "speed", "setting": name, "lever": "lookahead" if ahead else "miss",
            "lookahead": prefetch.lookahead if prefetch.enabled else 0,
            "prefetch_hit_rate": s["prefetch_hit_rate"], "wasted_share_of_prefetches":
                s["prefetch_wasted"] / max(s["prefetch_copies"], 1),
            "policy": policy, "skip_below": t, "low_below": lo, "low_all": lo_all, "decode_tok_s": s["decode_tok_s"], "hit_rate": s["hit_rate"],
            "skipped_share_of_calls": s.get("n_skip", 0) / calls, "low_share_of_calls": s.get("n_low", 0) / calls,
            "slots": slots,
            "trace": trace_note(pair.kind, args, profile.name, 0 < min(t or 1, (lo or 1) if not lo_all else 1) < 1,
                                prefetch),
        })
        print(rows[-1], flush=True)
    peer = max(r["decode_tok_s"] for r in rows if r["policy"] in PEERS)
    for r in rows:
        r["vs_better_peer"] = r["decode_tok_s"] / peer
    return rows


# -------------------------------------------------------------------------------------- recall
def recall_rows(args) -> list[dict]:
    """Guess recall at distances 1 .. MAX_LOOKAHEAD on smollm2-moefied's real routing: the top-k guesses of
    layer l+d made at layer l (layer l+d's router re-based onto layer l's normalised input, routing/guess.py),
    every token of a few WikiText-2 test windows, mean over layers."""
    from haqmoe.data.text import eval_windows, load_text, tokenize
    from haqmoe.routing.guess import guess_quality
    from haqmoe.routing.profile import trace_windows
    from haqmoe.sources import load_model

    lm = load_model(MODEL, progress=False)
    windows = eval_windows(tokenize(lm.tokenizer, load_text("wikitext2:test")), args.recall_window,
                           args.recall_windows)
    rows = []
    for d in range(1, MAX_LOOKAHEAD + 1):
        tr = trace_windows(lm.model, lm.adapter, windows, guess_width=lm.model.config.num_experts_per_tok,
                           distance=d)
        q = guess_quality(tr, distance=d)
        rows.append({"kind": "recall", "setting": f"lookahead {d}", "lookahead": d,
                     "recall": float(np.mean(q["recall"])), "recall_min_layer": float(np.min(q["recall"])),
                     "chance_recall": tr.top_k / tr.num_experts,
                     "trace": f"{MODEL}, {windows.shape[0]} WikiText-2 test windows of {windows.shape[1]} tokens, "
                              f"top-{tr.top_k} guesses of {tr.num_experts} experts"})
        print(rows[-1], flush=True)
    return rows


# --------------------------------------------------------------------------------------- notes
def notes_for(rows: list[dict]) -> str:
    acc = {r["setting"]: r for r in rows if r["kind"] == "accuracy"}
    speed = [r for r in rows if r["kind"] == "speed"]
    out = ["Rows by kind. **accuracy**: the engine (GPU tier emulated on the CPU) on `smollm2-moefied` "
           "against the exact engine with the same cache; **speed**: **simulated on sampled routing** "
           "(Mixtral-8x7B W8A8, rtx5090d profile, bench/simulate.py's traces), beside the better peer policy of "
           "the same run (`vs_better_peer`); **recall**: lookahead guess recall on `smollm2-moefied`'s real "
           "routing; **bound** (where present): the standard perplexity protocol with every routed call a miss. "
           "`hit_rate` = resident when needed (demand + prefetch hits, docs/design.md, Hit rates). Levers (docs/design.md, Miss levers): `skip<t` skips a missed "
           "expert whose router weight renormalised over the token's top-2 is below t (never a token's top "
           "expert); `low<t` serves such a miss from its int4 copy instead (groups of 128 input columns, "
           "0.53x the W8A8 bytes; on the CPU, copied, or split across both, whichever finishes first); "
           "`low-all` serves every miss not skipped from it, a token's top expert's too."]
    if acc:
        a = next(iter(acc.values()))
        out.append(f"Accuracy: perplexity on {a['ppl_windows']} WikiText-2 test windows of {a['window_tokens']} "
                   f"tokens ({a['ppl_tokens']} predicted tokens, each window fed one token at a time so every "
                   f"token is decided as a decode token; not the full-test-split protocol of 2048-token windows), "
                   f"greedy agreement on {a['generations']} tokens from WikiText-2 test prompts; policy "
                   f"`{a['policy']}`, {a['slots_per_layer']} GPU slots per layer of 4 routed experts (top-2, "
                   f"+ 4 shared that always run).")
        out.append("smollm2-moefied's top-2 router weights are 1/2 each (to 2^-15, docs/design.md, MoEfication): "
                   "any threshold above 1/2 takes every second-ranked miss and any below none, so its rows are "
                   "the levers at full strength (`low`: every second-ranked miss from int4; `low-all`: every "
                   "miss from int4; `skip-drop`: skipped, "
                   "the slice left out, i.e. the dense FFN minus a slice; `skip-renorm`: skipped with the kept "
                   "expert's weight raised to 1, i.e. its slice counted twice, Mixtral's renormalisation, wrong "
                   "for a sum of slices); the model cannot show a graded threshold. `low-all` here never fills the "
                   "cache (no miss is copied in whole: hit rate 0), so every routed call runs from int4: an upper "
                   "bound on what int4 misses cost (the simulated `low-all` rows serve 32 % of calls from int4). "
                   "The int4 groups are 64 input columns on this model (its widths 576 and 192 are not multiples "
                   "of 128; Mixtral's 4096 and 14336 are), slightly finer than the simulated copy's.")
    if speed:
        peer = max((r for r in speed if r["policy"] in PEERS), key=lambda r: r["decode_tok_s"])
        best = {}
        for r in speed:
            if r["policy"] in OURS and r.get("lever", "miss") == "miss":
                key = (r["skip_below"], r["low_below"], r.get("low_all", False))
                best[key] = max(best.get(key, r), r, key=lambda x: x["decode_tok_s"])
        line = "; ".join(f"{setting_name(*k)}: {r['decode_tok_s']:.1f} tok/s = {r['vs_better_peer']:.2f}x "
                         f"({r['policy']}; {100 * r['skipped_share_of_calls']:.1f} % of calls skipped, "
                         f"{100 * r['low_share_of_calls']:.1f} % int4)" for k, r in best.items())
        out.append(f"Speed, simulated on sampled routing: better peer `{peer['policy']}` "
                   f"{peer['decode_tok_s']:.1f} tok/s; ours, best policy per setting: {line}. The public Mixtral "
                   f"statistics have no router weights: the second expert's renormalised weight is assumed "
                   f"uniform on (0, 1/2), so a threshold t < 1/2 takes a share 2t of the second-ranked misses; "
                   f"t = 1 takes all of them, the setting measured for accuracy on smollm2-moefied.")
        if acc:
            pairs = {"low": (0.0, 1.0, False), "low-all": (0.0, 1.0, True), "skip-drop": (1.0, 0.0, False),
                     "skip-renorm": (1.0, 0.0, False)}
            verdict = []
            for name, key in pairs.items():
                if name in acc and key in best:
                    a, r = acc[name], best[key]
                    verdict.append(f"`{name}`: {r['vs_better_peer']:.2f}x simulated at {a['ppl_change_pct']:+.2f} % "
                                   f"PPL (token agreement {a['token_agreement']:.3f})")
            if verdict:
                out.append("Against the goal (simulated Mixtral decode >= 2x the better peer at <= +0.5 % PPL on "
                           "smollm2-moefied, same setting): " + "; ".join(verdict) + ". Mixtral's speed-up at a graded "
                           "threshold rests on the assumed weight distribution; its accuracy cost is measured here "
                           "only at full strength.")
    bound = {r["setting"]: r for r in rows if r["kind"] == "bound"}
    if "exact" in bound and "low-all" in bound:
        b = bound["low-all"]
        out.append(f"Bound, the standard protocol ({b['ppl_windows']} WikiText-2 test windows of 2048 tokens, "
                   f"{b['ppl_tokens']} predicted tokens): with nothing resident and every routed call served from "
                   f"int4 (`low-all` at hit rate 0, {100 * b['low_share_of_calls']:.0f} % of calls int4), PPL "
                   f"{b['ppl']:.3f} against the exact {bound['exact']['ppl']:.3f}: {b['ppl_change_pct']:+.2f} %. "
                   f"At any hit rate `low-all` serves fewer calls from int4.")
    out += lookahead_notes(rows)
    more = [r for r in rows if r["kind"] == "accuracy" and r["setting"].endswith("windows)")
            and not r["setting"].startswith("exact")]
    if more:
        out.append("A second run with more perplexity windows (rows `... (N windows)`, against its own exact row; "
                   "stopped before its remaining settings for time): " + "; ".join(
                       f"`{r['setting']}` {r['ppl_change_pct']:+.2f} % PPL over {r['ppl_tokens']} tokens "
                       f"(token agreement {r['token_agreement']:.3f})" for r in more)
                   + ". Its spread against the 4-window rows says how noisy a few hundred tokens are.")
    return "\n\n".join(out)


def lookahead_notes(rows: list[dict]) -> list[str]:
    """The recall measured at each distance and what lookahead gives in simulated decode speed."""
    recall = [r for r in rows if r["kind"] == "recall"]
    ahead = [r for r in rows if r["kind"] == "speed" and r.get("lever") == "lookahead"]
    out = []
    if recall:
        r0 = recall[0]
        out.append("Lookahead guess recall on real routing (" + r0["trace"] + "; chance "
                   + f"{r0['chance_recall']:.2f}): " + ", ".join(
                       f"d = {r['lookahead']}: {r['recall']:.3f} (lowest layer {r['recall_min_layer']:.2f})"
                       for r in recall)
                   + ". The Mixtral lookahead rows assume recall 0.8 at d = 1 (runtime/prefetch.py) and keep the "
                   "share of the above-chance recall measured here at d = 2, 3 (their `trace` column says which).")
    if ahead:
        base = {r["policy"]: r for r in rows if r["kind"] == "speed" and r.get("lever", "miss") == "miss"
                and not r["skip_below"] and not r["low_below"]}
        out.append("Lookahead (prefetch of layers l+1 .. l+D within the copy engine's idle time; exact, only "
                   "copies move: no accuracy cost, ΔPPL 0): " + "; ".join(
                       f"`{r['setting']}` {r['decode_tok_s']:.1f} tok/s vs {base[r['policy']]['decode_tok_s']:.1f} "
                       f"without (hit rate {r['hit_rate']:.3f}, of which prefetch {r['prefetch_hit_rate']:.3f}; "
                       f"{100 * r['wasted_share_of_prefetches']:.0f} % of prefetches wasted)"
                       for r in ahead if r["policy"] in base) + ". Why so little: on this profile one expert copy "
                   "(3.4 ms) outlasts a decode layer's expert work, and most guesses are cached already (the "
                   "prefetch hit rate is 1-3 % of lookups), so a prefetch copy, which may start while the copy engine "
                   "is idle before the layer ends, runs on into the next layer; with `full+split`, whose misses "
                   "stream part of each expert over PCIe, that delays the next layer's split copies by more than "
                   "the prefetch hits save. A rule that lets a copy start only if it lands within the idle time "
                   "admits no copy at all here (transfer > layer time).")
    return out


COLUMNS = ("kind", "setting", "skip_below", "low_below", "lookahead", "decode_tok_s", "vs_better_peer", "hit_rate",
           "prefetch_hit_rate", "wasted_share_of_prefetches", "recall",
           "skipped_share_of_calls", "low_share_of_calls", "ppl", "ppl_change_pct", "ppl_windows", "token_agreement", "first_divergence_mean", "trace")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/levers.json")
    ap.add_argument("--render", action="store_true", help="rewrite the .md from the .json")
    ap.add_argument("--skip-accuracy", action="store_true", help="keep the accuracy rows of --out, if any")
    ap.add_argument("--skip-speed", action="store_true", help="keep the speed rows of --out, if any")
    ap.add_argument("--settings", default="", help="comma-separated engine settings to measure (exact always runs; "
                    "default: all of " + ", ".join(s[0] for s in ENGINE_SETTINGS) + ")")
    ap.add_argument("--slots", type=int, default=2, help="GPU slots per layer on smollm2-moefied (of 4 routed)")
    ap.add_argument("--policy", default="always-transfer", help="engine policy for the accuracy rows")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--window", type=int, default=128, help="tokens per perplexity window")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=100, help="Mixtral decode tokens per request")
    ap.add_argument("--guess-recall", type=float, default=DEFAULT_GUESS_RECALL)
    ap.add_argument("--lookahead-recall", type=float, nargs=MAX_LOOKAHEAD - 1, default=DEFAULT_LOOKAHEAD_RECALL,
                    help="synthetic guess recall at distances 2 .. %d on the Mixtral routing" % MAX_LOOKAHEAD)
    ap.add_argument("--skip-recall", action="store_true", help="keep the recall rows of --out, if any")
    ap.add_argument("--recall-windows", type=int, default=4)
    ap.add_argument("--recall-window", type=int, default=256, help="tokens per recall window")
    ap.add_argument("--skip-bound", action="store_true", help="keep the bound rows of --out, if any")
    ap.add_argument("--bound-windows", type=int, default=None, help="2048-token windows of the bound rows "
                    "(default: the whole test split)")
    ap.add_argument("--work", default="bench/work/levers", help="the bound rows' per-window progress (resumed)")
    args = ap.parse_args()
    path = Path(args.out).with_suffix(".json")
    if args.render:
        data = json.loads(path.read_text())
        rows, meta = data["rows"], data["meta"]
    else:
        old = json.loads(path.read_text()) if path.exists() else {"rows": [], "meta": {}}
        kept = [r for r in old["rows"] if (r["kind"] == "speed" and args.skip_speed)
                or (r["kind"] == "accuracy" and args.skip_accuracy) or (r["kind"] == "recall" and args.skip_recall)
                or (r["kind"] == "bound" and args.skip_bound)]
        rows = [r for r in kept if r["kind"] == "speed"] + ([] if args.skip_speed else speed_rows(args))
        rows += [r for r in kept if r["kind"] == "accuracy"] + ([] if args.skip_accuracy else accuracy_rows(args))
        rows += [r for r in kept if r["kind"] == "recall"] + ([] if args.skip_recall else recall_rows(args))
        rows += [r for r in kept if r["kind"] == "bound"] + ([] if args.skip_bound else bound_rows(args))
        meta = run_meta()
        if kept:
            meta["kept_rows_from"] = old["meta"].get("command", "")
    if meta.get("kept_rows_from"):
        notes = notes_for(rows) + f"\n\nRows of the other kind kept from: `{meta['kept_rows_from']}`."
    else:
        notes = notes_for(rows)
    write_results(path, rows, meta, "Miss levers: skipping a low-weight miss, or serving it from an int4 copy",
                  notes, COLUMNS)
    print(path.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
