"""The collaborative engine: a transformers MoE model whose routed experts live on a GPU cache or
the CPU, generating token by token with a KV cache.

Only the experts modules are replaced (``HybridExperts``); attention, norms, routers and shared
experts are the model's own. Non-expert weights go to the compute device. Without a GPU every
expert is on the CPU tier and the engine is the plain model plus a decode loop; ``emulate_gpu``
runs the GPU-tier code path (slots, cache, predictor, copies) on the CPU, for tests and traces.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from transformers import StaticCache

from ..costs import DECISION_POLICIES, CostModel, ModelSpec, cost_model_for, load_profile
from ..devices import resolve_device
from ..errors import HaqmoeError
from ..exec.compiled import cache_len, require_compiler
from ..exec.int8 import Int8Experts, cpu_int8_path
from ..exec.precision import convert, int8_experts, normalize_mode, weight_bytes
from ..models.adapters import set_module
from ..models.base import LoadedModel, context_of, encode_prompt
from ..registry import ENGINE_CACHE_POLICIES  # per-layer slot allocation: simulator only
from ..routing.guess import GuessPlan, guess_weight
from ..routing.placement import Plan
from ..routing.trace_io import load_trace
from .cache import CacheConfig, ExpertCache
from .calibrate import cached_cost_model, calibrate_split, calibrate_tiers, machine_key, time_ms
from .hybrid import HybridExperts, Telemetry
from .prefetch import check_lookahead
from .policies import make_policy, policy_uses_pins
from .store import ExpertStore, StoreConfig, expert_transfer_bytes

KV_TOKENS = 4096  # the KV cache the GPU budget keeps room for
GPU_RESERVE = 1 << 30  # activations, CUDA context and allocator slack


def gpu_slots(budget: int, resident: int, expert_bytes: int, moe_layers: int, num_experts: int, top_k: int) -> int:
    """Expert slots per layer that fit ``budget`` bytes of GPU memory after ``resident`` bytes
    (non-expert weights, KV cache, reserve). A layer needs at least ``top_k`` slots (one token's
    experts); a budget below that is refused, naming the budget that would do."""
    per_slot = expert_bytes * moe_layers  # one slot in every MoE layer
    fit = min(num_experts, max(0, budget - resident) // per_slot)
    if fit < top_k:
        need = resident + top_k * per_slot
        raise HaqmoeError(f"the GPU memory budget of {budget / 2**30:.2f} GiB does not hold the non-expert weights, "
                          f"KV cache and reserve ({resident / 2**30:.2f} GiB) plus {top_k} experts per layer "
                          f"({top_k * per_slot / 2**30:.2f} GiB): give at least --gpu-memory {need / 1e9:.1f}GB, or "
                          "run every expert on the CPU (--device cpu)")
    return int(fit)


@dataclass
class EngineConfig:
    device: str = "auto"  # "auto" = cuda when available, else cpu
    emulate_gpu: bool = False  # run the GPU tier on the CPU (no GPU needed; exercises every path)
    slots_per_layer: int | None = None  # GPU expert slots per layer (default: what GPU memory holds, see gpu_slots)
    gpu_memory: int | None = None  # bytes of GPU memory the engine may use (default: all that is free)
    cache_policy: str = "lru"  # ENGINE_CACHE_POLICIES; pinned+* pin the plan's experts (needs plan)
    decision: str = "predictor"  # predictor | always-transfer | always-cpu | balanced | split
    plan: str | None = None  # placement plan JSON (haqmoe plan)
    profile: str = "rtx5090d"  # hardware profile for the cost model when no GPU is measured
    n_critical: float | None = None  # override the predictor's threshold
    prefetch: int = 0  # experts to prefetch per layer ahead (0 = off; GPU tier only)
    lookahead: int = 1  # ... guessed for layers l+1 .. l+lookahead at layer l (1: the next layer only)
    prefetch_budget: float = 1.0  # ... copies starting within this many x the layer's predicted expert time
    guess_trace: str | None = None  # profiled trace: learn per-layer transition guesses (routing/guess.py)
    exec_mode: str = "fake"  # quantized CPU-tier execution: fake | dequant | real | auto (exec/precision.py)
    admit: bool | None = None  # also copy CPU-served misses into the cache while the copy engine is idle
    # (None: ``default_admit``)
    cuda_graphs: bool = True  # CUDA: one-token GPU experts replay one graph per slot (eager is launch-bound)
    compile: bool = False  # decode steps through torch.compile over a static KV cache (see _compile_decode)
    skip_below: float = 0.0  # miss lever: skip a miss whose renormalised router weight is below this (0: off)
    skip_renorm: bool = True  # ... giving its weight to the token's kept experts (False: dropped)
    low_below: float = 0.0  # miss lever: serve such a miss on the CPU from an int4 copy (0: off, no copy built)
    low_all: bool = False  # ... every miss not skipped, a token's top expert's too (with low_below > 0)


def default_admit(cfg: EngineConfig) -> bool:
    """Background admission unless told otherwise, where nothing else would fill the cache: at
    decode the predictor (and ``balanced``/``split``) serves a one-token miss on the CPU, so without
    a plan or prefetch the slots stayed empty and every expert ran on the CPU (hit rate 0). Off for
    the peer policies, which define what they move (``always-cpu`` never copies, ``always-transfer``
    copies every miss anyway), and with a plan, whose placement is the point."""
    if cfg.admit is not None:
        return cfg.admit
    return cfg.plan is None and cfg.decision not in ("always-cpu", "always-transfer")


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.temperature < 0 or not 0 < self.top_p <= 1:
            raise HaqmoeError(f"sampling needs max_new_tokens >= 1, temperature >= 0 and 0 < top_p <= 1 "
                              f"(got {self.max_new_tokens}, {self.temperature}, {self.top_p})")


@dataclass
class Generation:
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    prefill_ms: float = 0.0
    token_ms: list[float] = field(default_factory=list)  # decode latency of each generated token
    finish_reason: str = "length"


def _spec_from_config(cfg, num_experts: int, top_k: int):
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads) * head_dim
    attn = 2 * cfg.hidden_size * cfg.num_attention_heads * head_dim + 2 * cfg.hidden_size * kv
    inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    return ModelSpec(cfg.model_type, cfg.num_hidden_layers, num_experts, top_k, cfg.hidden_size, inter,
                     cfg.vocab_size, attn, kv)


def _resolve_device(cfg: EngineConfig) -> torch.device:
    """``auto``: CUDA when torch sees it. ``emulate_gpu`` runs on the CPU, its GPU tier included."""
    if cfg.emulate_gpu and cfg.device.startswith("cuda"):
        raise HaqmoeError("--emulate-gpu runs the GPU tier on the CPU: leave out --device cuda or --emulate-gpu")
    device = resolve_device(cfg.device)
    return torch.device("cpu") if cfg.emulate_gpu else device


class CollaborativeEngine:
    def __init__(self, lm: LoadedModel, cfg: EngineConfig = EngineConfig()):
        if cfg.decision not in DECISION_POLICIES:
            raise HaqmoeError(f"unknown policy '{cfg.decision}' (choose from {', '.join(DECISION_POLICIES)})")
        if cfg.cache_policy not in ENGINE_CACHE_POLICIES:
            raise HaqmoeError(f"unknown cache policy '{cfg.cache_policy}' for the engine "
                              f"(choose from {', '.join(ENGINE_CACHE_POLICIES)})")
        if policy_uses_pins(cfg.cache_policy) and cfg.plan is None:
            raise HaqmoeError(f"--cache-policy {cfg.cache_policy} pins a placement plan's experts: pass --plan")
        self.lm, self.cfg = lm, cfg
        self.model, self.tokenizer, adapter = lm.model, lm.tokenizer, lm.adapter
        self.device = _resolve_device(cfg)
        blocks = [b for b in adapter.blocks(self.model) if adapter.is_moe_block(b)]
        if not blocks:
            raise HaqmoeError(f"{lm.name} has no MoE layers: the collaborative engine needs a MoE model")
        experts = [adapter.experts(b) for b in blocks]
        num_experts = int(experts[0].num_experts)
        if cfg.prefetch > num_experts:
            raise HaqmoeError(f"--prefetch {cfg.prefetch}: a layer of {lm.name} has only {num_experts} experts")
        check_lookahead(cfg.lookahead)
        self.top_k = int(getattr(self.model.config, "num_experts_per_tok", 2))
        self.telemetry = Telemetry(len(blocks), num_experts=num_experts)
        plan = self._load_plan(len(blocks), num_experts)  # checked even where every expert stays on the CPU
        self.cache: ExpertCache | None = None
        self.cost: CostModel | None = None
        self.store: ExpertStore | None = None
        if self.device.type == "cuda" or cfg.emulate_gpu:  # a GPU tier
            slots = cfg.slots_per_layer
            budget = self._gpu_budget()
            if budget is not None:  # slots follow GPU memory: all that fits beside the rest
                fit = gpu_slots(budget, self._resident_gpu_bytes(experts), expert_transfer_bytes(experts[0]),
                                len(blocks), num_experts, self.top_k)
                if slots is not None and slots > fit:
                    raise HaqmoeError(f"--slots {slots} does not fit the GPU memory budget of "
                                      f"{budget / 2**30:.2f} GiB: at most --slots {fit}")
                slots = fit if slots is None else slots
            elif slots is None:  # an emulated GPU tier without a budget: the plan's size, else half
                slots = max(self.top_k, max(len(r) for r in plan.resident) if plan else num_experts // 2)
            if slots <= 0:
                raise HaqmoeError("the GPU cache needs at least one slot per layer "
                                  "(use --policy always-cpu to keep every expert on the CPU)")
            if cfg.exec_mode != "fake":  # converted before the store reads them: one host copy for both tiers
                experts = [self._int8_cpu_tier(adapter, b, ex) for b, ex in zip(blocks, experts)]
            store_device = "cpu" if cfg.emulate_gpu else str(self.device)
            splits = self.top_k if cfg.decision == "split" else 0  # scratch slots: a layer's misses at decode
            # emulated slots compute as the CPU tier does (int8 GEMM beside an int8 tier, else fake-quant), so an
            # answer cannot depend on which experts happened to be resident
            int8_slots = isinstance(experts[0], Int8Experts) if cfg.emulate_gpu else None
            self.store = ExpertStore(experts, StoreConfig(store_device, slots * len(blocks), split_slots=splits,
                                                          int8_gemm=int8_slots))
            pinned = {i: r for i, r in enumerate(plan.resident)} if policy_uses_pins(cfg.cache_policy) else {}
            self.cache = ExpertCache(CacheConfig(len(blocks), num_experts, slots, "layer", self.store.expert_bytes,
                                                 pinned), make_policy(cfg.cache_policy),
                                     top_k=self.top_k)
        routers, norms = [adapter.router(b) for b in blocks], [adapter.router_norm(b) for b in blocks]
        guess_plan = self._guess_plan(len(blocks), num_experts)
        self.hybrids: list[HybridExperts] = []
        for layer, (block, ex) in enumerate(zip(blocks, experts)):
            ahead = range(layer + 1, min(layer + 1 + cfg.lookahead, len(blocks))) if self.cache is not None else ()
            gws = [guess_weight(routers[a], norms[layer], norms[a]) for a in ahead]
            hybrid = HybridExperts(layer, ex, self.store, self.cache, None, cfg.decision, self.telemetry,
                                   [routers[a] for a in ahead], cfg.prefetch, gws, guess_plan, admit=default_admit(cfg),
                                   skip_below=cfg.skip_below, skip_renorm=cfg.skip_renorm, low_below=cfg.low_below,
                                   low_all=cfg.low_all, budget_layers=cfg.prefetch_budget)
            set_module(block, adapter.moe.experts, hybrid)
            self.hybrids.append(hybrid)
        if cfg.exec_mode != "fake":  # the rest of the model (and, without a GPU tier, the experts); quantized
            convert(self.model, normalize_mode(cfg.exec_mode))  # in memory counts too
        if self.cache is not None:
            self.cost = self._cost_model(num_experts)  # after conversion: it times the CPU tier as it will run
            if cfg.low_below > 0:  # the miss lever's int4 host copies (docs/design.md, Miss levers)
                self.store.build_low()
                self.cost.low_ratio = self.store.low_bytes / self.store.expert_bytes
            for h in self.hybrids:
                h.cost = self.cost
            if plan is not None:  # the plan's experts start resident (pinned or not)
                for layer, resident in enumerate(plan.resident):
                    for e in resident:
                        slot = self.cache.admit(layer, e) if not self.cache.contains(layer, e) else \
                            self.cache.get(layer, e).slot
                        if slot is not None:
                            self.store.load_slot(slot, layer, e)
                self.reset_telemetry()  # count from generation on
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # the plan's side-stream copies land before any use
        self._place_non_experts()
        self._decode = self._compile_decode(len(blocks)) if cfg.compile else None
        self._kv: tuple[int, object] | None = None  # (length, static KV cache) reused by compiled decode

    # ------------------------------------------------------------------ set-up
    def _compile_decode(self, num_layers: int) -> Callable:
        """The model's forward compiled for one-token decode steps; prefill stays eager (any length).

        Why: eager decode launches every non-expert kernel from Python after the layer's host-side expert
        work, so the GPU waits on launches once per layer (the ``host_sync_ms`` the H100 runs measured).
        Compiled, the hybrid experts and routers stay eager (``torch.compiler.disable``: graph breaks),
        and everything between them becomes one inductor graph; on CUDA each graph is replayed as a CUDA
        graph (``reduce-overhead``), so a layer's attention costs one launch. Decoder layers differ in
        ``layer_idx`` and compile once each: the recompile limit is raised to cover them. Nested graph
        breaks (where torch has them) resume tracing inside the decoder layer instead of splitting every
        enclosing frame (fewer guarded frames: a tiny 2-layer Mixtral's emulated-GPU step on this CPU went
        from 2.9 to 1.7-2.5 ms)."""
        require_compiler(self.device.type)
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, 2 * num_layers + 8)
        if hasattr(dynamo, "nested_graph_breaks"):  # resume inside the layer at a break: fewer, larger graphs
            dynamo.nested_graph_breaks = True
        mode = "reduce-overhead" if self.device.type == "cuda" else "default"
        return torch.compile(self.model.forward, mode=mode, dynamic=False)

    def _static_cache(self, tokens: int):
        """A static KV cache for ``tokens`` positions, rounded up to its bucket (``cache_len``): the compiled
        graphs depend on its length, so nearby generation lengths reuse them. The same cache is reset and reused
        while the length holds: CUDA graphs are recorded on its buffers' addresses, and a new cache would
        re-record every graph (measured on the H100: a 100-180 ms first decode token)."""
        length = cache_len(tokens)
        if self._kv is not None and self._kv[0] == length:
            self._kv[1].reset()
        else:
            self._kv = (length, StaticCache(self.model.config, max_cache_len=length))
        return self._kv[1]

    def _load_plan(self, num_layers: int, num_experts: int):
        if self.cfg.plan is None:
            return None

        return Plan.load(self.cfg.plan, num_layers, num_experts)

    def _guess_plan(self, num_layers: int, num_experts: int) -> GuessPlan | None:
        if self.cfg.guess_trace is None:
            return None

        return GuessPlan.learn(load_trace(self.cfg.guess_trace, num_layers=num_layers, num_experts=num_experts))

    def _cost_model(self, num_experts: int) -> CostModel:
        """On CUDA: the engine's own tiers timed at start-up (runtime/calibrate.calibrate_tiers); without
        a GPU: the stored hardware profile's roofline for this model's shape."""
        if self.device.type == "cuda":
            cost = self._calibrate_tiers()
        else:
            spec = _spec_from_config(self.model.config, num_experts, self.top_k)
            cost = cost_model_for(load_profile(self.cfg.profile), spec, *self._tier_precisions())
        cost.n_critical_override = self.cfg.n_critical
        return cost

    @staticmethod
    def _int8_cpu_tier(adapter, block: torch.nn.Module, experts: torch.nn.Module) -> torch.nn.Module:
        """The CPU tier of a model run beside a GPU tier, with ``--exec`` other than fake: int8 experts
        (``precision.int8_experts``) in place of the fake-quant ones, whose int8 tensors are freed with
        them. ``dequant`` and ``auto`` apply to the rest of the model only: a dequantized tier would
        be an fp32 second copy of every expert beside the int8 one the transfers read."""
        converted = int8_experts(experts)
        if converted is not experts:
            set_module(block, adapter.moe.experts, converted)
        return converted

    def _float_dtype(self) -> torch.dtype:
        """The model's floating-point dtype (its first float parameter's)."""
        return next(p.dtype for p in self.model.parameters() if p.is_floating_point())

    def _tier_precisions(self) -> tuple[str, str]:
        """(GPU slots, CPU tier) in the profile's precision names: the bytes each tier reads per expert."""
        dtype = self._float_dtype()
        floating = "fp32" if dtype == torch.float32 else "fp16"
        cpu_int8 = isinstance(self.hybrids[0].original, Int8Experts)
        return ("w8a8" if self.store.quantized else floating), ("w8a8" if cpu_int8 else floating)

    def _choose_gpu_precision(self, dtype: torch.dtype, hidden: int) -> None:
        """Quantized slots: keep the int8 GEMM or dequantize per call, whichever runs one expert faster
        here (measured at 1 and 32 tokens, on slot 0). In eager mode the int8 path's ~25 small kernels
        per linear (activation quantization, zero-point corrections) can cost more than the GEMM it saves."""
        store = self.store
        if not store.quantized or not store.int8_gemm:
            return
        times = {}
        for mode in (True, False):
            store.int8_gemm = mode
            times[mode] = sum(time_ms(lambda: store.gpu_forward(0, x), 10, torch.cuda.synchronize)
                              for x in (torch.randn(n, hidden, device=self.device, dtype=dtype) for n in (1, 32)))
        store.int8_gemm = times[True] <= times[False]

    def _calibration_executors(self, dtype: torch.dtype):
        """(cpu_fn(x, i), copy_fn(i), cpu_rows_fn(x, rows, i)) for ``calibrate_tiers`` / ``calibrate_split``:
        the i-th call runs or copies the i-th of every (layer, expert) in turn, so each meets its weights
        cold, as the engine's CPU tier does. Copies go to slot 0 (free before the plan is loaded)."""
        rotation = [(l, e) for l, h in enumerate(self.hybrids) for e in range(h.num_experts)]

        def turn(i: int) -> tuple[int, int]:
            return rotation[i % len(rotation)]

        def cpu_fn(x: torch.Tensor, i: int) -> torch.Tensor:
            layer, e = turn(i)
            n = x.shape[0]
            return self.hybrids[layer].original(x.to(dtype), torch.full((n, 1), e), torch.ones(n, 1, dtype=dtype))

        return (cpu_fn, lambda i: self.store.load_slot(0, *turn(i)),
                lambda x, rows, i: self.store.cpu_rows(*turn(i), x, rows))

    def _calibrate_tiers(self) -> CostModel:
        """CUDA only. Slot 0 is free at this point (nothing admitted yet; the plan overwrites it after):
        it holds expert (0, 0) for the precision choice, then each expert the copy timing rotates through."""
        cpu_tier, store = self.hybrids[0].original, self.store  # every layer's CPU tier is of one kind
        dtype = self._float_dtype()
        cfg = self.model.config
        hidden = int(cfg.hidden_size)
        ffn = int(getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size)
        torch.cuda.current_stream().wait_event(store.load_slot(0, 0, 0))
        with torch.inference_mode():
            self._choose_gpu_precision(dtype, hidden)
            if self.cfg.cuda_graphs:
                store.capture_decode_graphs(hidden, dtype)
        cpu = type(cpu_tier).__name__  # an int8 tier's speed also depends on its executor (kernel or _int_mm)
        cpu += f"-{cpu_int8_path().replace(' ', '-')}" if isinstance(cpu_tier, Int8Experts) else ""
        tiers = f"cpu-{cpu}-gpu-{'int8' if store.int8_gemm else str(dtype).split('.')[-1]}" \
                f"{'-graphs' if self.cfg.cuda_graphs else ''}{'-split' if store.cfg.split_slots else ''}"

        cpu_fn, copy_fn, cpu_rows_fn = self._calibration_executors(dtype)

        def measure() -> CostModel:
            cost = calibrate_tiers(cpu_fn, lambda x: store.gpu_forward(0, x), copy_fn, hidden, dtype,
                                   str(store.device))
            if store.cfg.split_slots:  # the split's parts as the engine runs them (a whole split slot)
                slot = store.split_slot(0)
                torch.cuda.current_stream().wait_event(store.load_slot(slot, 0, 0))
                cost.split_ms = calibrate_split(cpu_rows_fn,
                                                lambda x, h, rows: store.split_forward(slot, x, h, rows),
                                                store.split_rows, hidden, dtype, str(store.device))
            return cost

        return cached_cost_model(machine_key(self.lm.name, hidden, ffn, tiers), measure)

    def _gpu_budget(self) -> int | None:
        """GPU memory the engine may fill: ``gpu_memory`` capped by what CUDA reports free (None: no
        limit known, i.e. an emulated GPU tier without ``gpu_memory``)."""
        free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None
        caps = [b for b in (self.cfg.gpu_memory, free) if b is not None]
        return min(caps) if caps else None

    def _resident_gpu_bytes(self, experts: list) -> int:
        """What the GPU holds besides expert slots: every non-expert weight, a KV cache of the
        model's context (at most KV_TOKENS tokens), and a reserve for activations and CUDA itself."""
        weights = weight_bytes(self.model) - sum(weight_bytes(m) for m in experts)
        c = self.model.config
        kv_heads = int(getattr(c, "num_key_value_heads", None) or c.num_attention_heads)
        head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
        tokens = min(context_of(c) or KV_TOKENS, KV_TOKENS)
        kv = 2 * c.num_hidden_layers * kv_heads * head_dim * tokens * self._float_dtype().itemsize
        return weights + kv + GPU_RESERVE

    def _place_non_experts(self) -> None:
        """Move everything except the routed experts (held by the store / CPU tier) to the device."""
        if self.device.type == "cpu":
            return
        hybrids = [m for m in self.model.modules() if isinstance(m, HybridExperts)]
        originals = [h.original for h in hybrids]
        for h in hybrids:  # detach the CPU-tier experts so .to() leaves them on the CPU
            del h._modules["original"]
        self.model.to(self.device)
        for h, orig in zip(hybrids, originals):
            object.__setattr__(h, "original", orig)

    # ---------------------------------------------------------------- generation
    def encode(self, prompt: str | list[dict]) -> torch.Tensor:
        """Token ids of a prompt (a string, or chat messages rendered with the model's template)."""
        return encode_prompt(self.tokenizer, self.model.config, prompt)

    def _sample(self, logits: torch.Tensor, s: SamplingConfig, gen: torch.Generator) -> int:
        if s.temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / s.temperature, dim=-1)
        if s.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < s.top_p
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs.cpu(), 1, generator=gen))

    def eos_ids(self) -> set[int]:
        """Tokens that end a generation: the tokenizer's EOS and the generation config's (chat models list
        their end-of-turn token there too). None without a tokenizer (random-weight test and benchmark
        models): they generate the count asked for."""
        if self.tokenizer is None:
            return set()
        ids = {self.tokenizer.eos_token_id}
        configured = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids |= set(configured) if isinstance(configured, (list, tuple)) else {configured}
        return {int(i) for i in ids if i is not None}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def stream(self, prompt: str | list[dict] | torch.Tensor, sampling: SamplingConfig = SamplingConfig(),
               should_stop: Callable[[], bool] | None = None) -> Iterator[tuple[str, Generation]]:
        """Yield (new text, generation so far) per token; the final Generation has the timings."""
        ids = prompt if isinstance(prompt, torch.Tensor) else self.encode(prompt)
        context = context_of(self.model.config)
        if context and ids.shape[1] + sampling.max_new_tokens > context:
            raise HaqmoeError(f"prompt ({ids.shape[1]} tokens) + max tokens ({sampling.max_new_tokens}) exceeds "
                              f"the model's context of {context} tokens")
        gen = Generation(prompt_tokens=int(ids.shape[1]))
        rng = torch.Generator().manual_seed(sampling.seed)
        eos = self.eos_ids()
        t0 = time.perf_counter()
        self.telemetry.step += 1
        ids = ids.to(self.device)
        prompt_len = int(ids.shape[1])
        if self._decode is None:  # only the last position's logits: the LM head over the prompt is wasted work
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        else:
            out = self.model(input_ids=ids, past_key_values=self._static_cache(prompt_len + sampling.max_new_tokens),
                             use_cache=True, cache_position=torch.arange(prompt_len, device=self.device),
                             logits_to_keep=1)
        past, logits = out.past_key_values, out.logits[0, -1]
        self._sync()
        gen.prefill_ms = 1e3 * (time.perf_counter() - t0)
        shown = TextStream(sampling.stop)
        for i in range(sampling.max_new_tokens):
            tok = self._sample(logits, sampling, rng)
            gen.tokens.append(tok)
            ended = tok in eos
            last = ended or i == sampling.max_new_tokens - 1
            decoded = self.tokenizer.decode(gen.tokens, skip_special_tokens=True) if self.tokenizer else ""
            delta, stopped = shown.push(decoded, final=last)
            gen.text = shown.text
            if ended or stopped:  # every generation ends with a yield, even at a first-token EOS
                gen.finish_reason = "stop"
                yield delta, gen
                return
            yield delta, gen
            if last or (should_stop is not None and should_stop()):
                break
            t = time.perf_counter()
            self.telemetry.step += 1
            out = self._step(tok, past, prompt_len + i)
            past, logits = out.past_key_values, out.logits[0, -1]
            self._sync()
            gen.token_ms.append(1e3 * (time.perf_counter() - t))

    def _step(self, tok: int, past, position: int):
        """One decode step: the eager model over the growing cache, or the compiled one over the static cache."""
        ids = torch.tensor([[tok]], device=self.device)
        if self._decode is None:
            return self.model(input_ids=ids, past_key_values=past, use_cache=True)
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs may be reused
        return self._decode(input_ids=ids, past_key_values=past, use_cache=True,
                            cache_position=torch.tensor([position], device=self.device))

    def warm_up(self, prompt, sampling: SamplingConfig, tokens: int = 8) -> None:
        """Generate up to ``tokens`` tokens untimed, then count from zero. With compiled decode, pass the
        timed run's prompt and ``max_new_tokens`` (same cache length): the steps compile and record graphs."""
        for n, _ in enumerate(self.stream(prompt, sampling)):
            if n == tokens:
                break
        self.reset_telemetry()

    def generate(self, prompt, sampling: SamplingConfig = SamplingConfig()) -> Generation:
        gen = Generation(0)
        for _, gen in self.stream(prompt, sampling):
            pass
        return gen

    def set_prefetch(self, width: int) -> None:
        """Turn prefetch on (``width`` experts per layer ahead) or off (0) between generations."""
        for m in self.model.modules():
            if isinstance(m, HybridExperts):
                m.set_prefetch(width)

    # ---------------------------------------------------------------- telemetry
    def reset_telemetry(self) -> None:
        """Count from here on (e.g. after a warm-up generation); the cache keeps its contents."""
        fresh = Telemetry(self.telemetry.num_layers, num_experts=self.telemetry.num_experts)
        for name, value in vars(fresh).items():
            if name != "step":  # the policy clock keeps running: recency stays ordered
                setattr(self.telemetry, name, value)
        if self.cache is not None:
            self.cache.stats = type(self.cache.stats).zeros(self.telemetry.num_layers)

    def summary(self) -> dict:
        tel = self.telemetry
        gpu_precision = None
        if self.store is not None:
            gpu_precision = "int8-gemm" if self.store.int8_gemm else ("dequant" if self.store.quantized else "float")
        out = {"device": str(self.device), "gpu_tier": self.cache is not None, "gpu_precision": gpu_precision,
               "cpu_expert_calls": int(tel.cpu_experts.sum()), "gpu_expert_calls": int(tel.gpu_experts.sum()),
               "split_expert_calls": int(tel.split_experts.sum()),
               "skipped_expert_calls": int(tel.skipped_experts.sum()), "low_expert_calls": int(tel.low_experts.sum()),
               **tel.host_ms_per_token()}
        if self.cache is not None:
            st = self.cache.stats
            resident = st.hits + st.prefetch_hits  # hit_rate (docs/design.md, Hit rates), per layer
            out.update({
                **st.rates(),  # hit_rate, demand_hit_rate and the prefetch counters, as the simulator reports them
                "hit_rate_per_layer": [float(h / max(n, 1)) for h, n in zip(resident, st.lookups)],
                "misses": int(st.misses.sum()), "inflight": int(st.inflight.sum()),  # waited on a landing copy
                "evictions": int(st.evictions.sum()),
                "bytes_moved": int(st.bytes_moved.sum()) + tel.split_bytes,  # + the copied parts of splits
                "n_critical": float(self.cost.n_critical) if self.cost is not None else None,
                "guess_ms": tel.guess_ms,
                "background_copies": tel.background_copies,
            })
        return out


def latency_stats(ms: list[float]) -> dict:
    if not ms:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "std_ms": None, "mean_ms": None}
    a = np.asarray(ms)
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
            "p99_ms": float(np.percentile(a, 99)), "std_ms": float(a.std()), "mean_ms": float(a.mean())}


class TextStream:
    """Decoded text in, deltas out that are never taken back: the tail is held while it ends inside a
    character (U+FFFD: a multi-byte character split across tokens) or could be the start of a stop
    string, until a later token settles it or the generation ends. ``text``: the answer so far (cut
    before the earliest stop string once one appears)."""

    def __init__(self, stops: tuple[str, ...] = ()):
        self.stops = tuple(s for s in stops if s)
        self.text = ""
        self.sent = 0  # characters of ``text`` already streamed

    def push(self, decoded: str, final: bool = False) -> tuple[str, bool]:
        """(delta to stream, whether a stop string appeared) for the text decoded so far."""
        found = [decoded.find(s) for s in self.stops if s in decoded]
        self.text = decoded[:min(found)] if found else decoded
        upto = len(self.text) if found or final else len(decoded) - self._unsettled(decoded)
        delta, self.sent = self.text[self.sent:max(upto, self.sent)], max(upto, self.sent)
        return delta, bool(found)

    def _unsettled(self, text: str) -> int:
        partial = len(text) - len(text.rstrip("\ufffd"))
        stop_start = max((n for s in self.stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        return max(partial, stop_start)


def decode_tok_s(ms: list[float]) -> float | None:
    """Tokens per second over per-token latencies (None when no token was decoded, e.g. EOS first)."""
    return 1e3 / float(np.mean(ms)) if ms else None


def plan_path(path: str | None) -> str | None:
    if path is not None and not Path(path).is_file():
        raise HaqmoeError(f"plan file {path} not found")
    return path
