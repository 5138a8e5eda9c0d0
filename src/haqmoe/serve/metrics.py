"""Prometheus text-format metrics for the server, without a client-library dependency.

Request counters and latency histograms are kept here; the expert-cache counters are read live
from the engine at scrape time (they are the engine's own per-layer numpy counters), so they can
never drift from what ``haqmoe run`` reports.
"""

from __future__ import annotations

import bisect
import collections
import threading
import time
from dataclasses import dataclass, field

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")  # else "other"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclass
class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics: ``le`` buckets plus +Inf, sum, count)."""

    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out, acc = [], 0
        for le, c in zip([*map(str, self.buckets), "+Inf"], self.counts):
            acc += c
            out.append(f'{name}_bucket{{le="{le}"}} {acc}')
        return out + [f"{name}_sum {self.total:.6f}", f"{name}_count {self.n}"]


@dataclass
class ServerMetrics:
    """Counters updated by request handlers (event-loop thread) and read by /metrics."""

    requests: dict[tuple[str, int], int] = field(default_factory=dict)  # (endpoint, status) -> count
    prompt_tokens: int = 0
    generation_tokens: int = 0
    cancelled: int = 0
    failed: int = 0
    unauthorized: int = 0  # 401s: a missing or wrong API key
    waiting: int = 0
    running: int = 0
    request_latency: Histogram = field(default_factory=Histogram)
    first_token: Histogram = field(default_factory=Histogram)
    per_token: Histogram = field(default_factory=lambda: Histogram((0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                                                     0.1, 0.25, 0.5, 1.0, 2.5)))
    lock: threading.Lock = field(default_factory=threading.Lock)
    decode_tokens: int = 0  # tokens after each request's first (its decode steps) ...
    decode_s: float = 0.0  # ... and the time those steps took, per request (summed over requests)
    token_times: collections.deque = field(default_factory=lambda: collections.deque(maxlen=1 << 16))
    started: float = field(default_factory=time.monotonic)

    def token(self, n: int = 1) -> None:
        """``n`` tokens streamed now (for ``tok_s``; event-loop thread)."""
        now = time.monotonic()
        self.token_times.extend([now] * n)

    def tok_s(self, window_s: float = 5.0) -> float:
        """Tokens per second streamed over the last ``window_s`` seconds (less right after start)."""
        now = time.monotonic()
        times = self.token_times
        while times and times[0] < now - window_s:
            times.popleft()
        return len(times) / max(min(window_s, now - self.started), 1e-3)

    def count_request(self, endpoint: str, status: int) -> None:
        """Any path outside ``ENDPOINTS`` counts as "other": a client's 404s neither grow the label set nor
        put their characters into the exposition."""
        endpoint = endpoint if endpoint in ENDPOINTS else "other"
        with self.lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1

    def unauthorized_request(self, endpoint: str) -> None:
        """A request refused for its API key: counted apart (an alert on it spots key guessing or a client
        with a stale key) and in ``haqmoe_requests_total`` as a 401."""
        self.count_request(endpoint, 401)
        with self.lock:
            self.unauthorized += 1

    def finished(self, prompt_tokens: int, completion_tokens: int, latency_s: float, ttft_s: float | None,
                 token_s: list[float]) -> None:
        with self.lock:
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += completion_tokens
            self.request_latency.observe(latency_s)
            if ttft_s is not None:
                self.first_token.observe(ttft_s)
            for t in token_s:
                self.per_token.observe(t)
            self.decode_tokens += len(token_s)
            self.decode_s += sum(token_s)

    def render(self, engine) -> str:
        """The whole exposition, server counters first, then the engine's per-layer expert counters."""
        with self.lock:
            lines = _block("haqmoe_requests_total", "counter", "HTTP requests by endpoint and status.",
                           [f'haqmoe_requests_total{{endpoint="{e}",status="{s}"}} {c}'
                            for (e, s), c in sorted(self.requests.items())])
            for name, kind, help_, val in (
                    ("haqmoe_prompt_tokens_total", "counter", "Prompt tokens processed.", self.prompt_tokens),
                    ("haqmoe_generation_tokens_total", "counter", "Tokens generated.", self.generation_tokens),
                    ("haqmoe_requests_cancelled_total", "counter", "Generations stopped by a client disconnect "
                     "(streamed or not; the latter also count as status 499).", self.cancelled),
                    ("haqmoe_requests_failed_total", "counter", "Streams ended by an error or a timeout (reported "
                     "in-band).", self.failed),
                    ("haqmoe_requests_unauthorized_total", "counter", "Requests refused (401) for a missing or wrong "
                     "API key.", self.unauthorized),
                    ("haqmoe_requests_waiting", "gauge", "Requests queued for the engine.", self.waiting),
                    ("haqmoe_requests_running", "gauge", "Requests generating now (at most the server's --max-batch).", self.running)):
                lines += _block(name, kind, help_, [f"{name} {val}"])
            for name, help_, h in (
                    ("haqmoe_request_latency_seconds", "End-to-end request latency.", self.request_latency),
                    ("haqmoe_time_to_first_token_seconds", "Queue + prefill time to the first token.",
                     self.first_token),
                    ("haqmoe_time_per_output_token_seconds", "Decode latency per generated token.",
                     self.per_token)):
                lines += _block(name, "histogram", help_, h.lines(name))
        return "\n".join(lines + engine_lines(engine)) + "\n"


def _block(name: str, kind: str, help_: str, samples: list[str]) -> list[str]:
    return [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *samples]


def engine_lines(engine) -> list[str]:
    """Per-layer expert counters: cache hits/misses/evictions/bytes (GPU tier) and CPU/GPU expert calls."""
    tel = engine.telemetry
    series: list[tuple[str, str, object]] = [
        ("haqmoe_expert_calls_cpu_total", "Expert calls run on the CPU tier.", tel.cpu_experts),
        ("haqmoe_expert_calls_gpu_total", "Expert calls run on the GPU tier.", tel.gpu_experts),
        ("haqmoe_expert_calls_skipped_total", "Missed expert calls skipped (--skip-below).", tel.skipped_experts),
        ("haqmoe_expert_calls_low_precision_total", "Missed expert calls served from the int4 copy "
         "(--low-precision-below).", tel.low_experts),
    ]
    if engine.cache is not None:
        st = engine.cache.stats
        series += [
            ("haqmoe_expert_cache_hits_total", "Expert lookups found resident in the GPU cache (demand and "
             "prefetch hits: the engine's hit rate is hits / lookups).", st.hits + st.prefetch_hits),
            ("haqmoe_expert_cache_inflight_total", "Expert lookups whose copy was still in flight (neither hit "
             "nor miss).", st.inflight),
            ("haqmoe_expert_cache_misses_total", "Expert lookups not in the GPU cache.", st.misses),
            ("haqmoe_expert_cache_evictions_total", "Experts evicted from the GPU cache.", st.evictions),
            ("haqmoe_expert_bytes_transferred_total", "Expert bytes copied host-to-device.", st.bytes_moved),
            ("haqmoe_expert_prefetch_copies_total", "Experts copied ahead of need (--prefetch).", st.prefetch_copies),
            ("haqmoe_expert_prefetch_hits_total", "Lookups served by a prefetched copy (also in the hits).",
             st.prefetch_hits),
            ("haqmoe_expert_prefetch_wasted_total", "Prefetched experts evicted before any use.",
             st.prefetch_wasted),
        ]
    lines: list[str] = []
    for name, help_, arr in series:
        lines += _block(name, "counter", help_, [f'{name}{{layer="{i}"}} {int(v)}' for i, v in enumerate(arr)])
    return lines
