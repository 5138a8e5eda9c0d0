"""The server's live telemetry (``/v1/haqmoe/telemetry``) and the web page's static files.

The snapshot is what the page's live panel draws: server load (queue depth, running batch, tok/s),
the expert cache as a layers x experts heatmap (resident now, and the share of each expert's calls
found resident: the hit rate of docs/design.md per expert), bytes moved, host and GPU memory. It
reads counters the engine and the scheduler keep anyway; nothing is computed on the model.
"""

from __future__ import annotations

import os
import time
from importlib import resources

import numpy as np
from fastapi.responses import FileResponse, JSONResponse

STATIC = "static"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}


def _static_dir():
    return resources.files(__package__) / STATIC


def page_response(name: str):
    """One of the page's files by name (only files shipped in the package; no paths), else 404."""
    root = _static_dir()
    names = {p.name for p in root.iterdir() if p.is_file()}
    ext = os.path.splitext(name)[1]
    if name not in names or ext not in _TYPES:
        return JSONResponse({"error": {"message": f"no page file '{name}'", "type": "invalid_request_error",
                                       "param": None, "code": None}}, status_code=404)
    return FileResponse(str(root / name), media_type=_TYPES[ext], headers={"Cache-Control": "no-cache"})


def _host_memory() -> dict:
    try:
        import psutil

        vm, rss = psutil.virtual_memory(), psutil.Process().memory_info().rss
        return {"host_rss_bytes": int(rss), "host_total_bytes": int(vm.total),
                "host_available_bytes": int(vm.available)}
    except Exception:  # psutil missing or refused: leave the figures out
        return {}


def _gpu_memory(engine) -> dict:
    out: dict = {}
    if engine.store is not None and engine.cache is not None:
        slots = engine.cache.num_slots
        used = sum(len(engine.cache.resident(layer)) for layer in range(engine.telemetry.num_layers))
        out["expert_slot_bytes"] = int(engine.store.expert_bytes)
        out["experts_resident"] = int(used)
        out["experts_resident_bytes"] = int(used * engine.store.expert_bytes)
        out["expert_slots"] = int(slots)
        out["expert_slots_bytes"] = int(slots * engine.store.expert_bytes)
    if engine.device.type == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info(engine.device)
        out.update(gpu_allocated_bytes=int(torch.cuda.memory_allocated(engine.device)),
                   gpu_total_bytes=int(total), gpu_free_bytes=int(free))
    out["emulated"] = bool(engine.cfg.emulate_gpu)
    return out


def snapshot(engine, metrics, worker: dict, model_name: str) -> dict:
    """The JSON the page polls (plain numbers and lists; null where a figure does not apply)."""
    tel = engine.telemetry
    layers = tel.num_layers
    experts = tel.num_experts or int(engine.hybrids[0].num_experts)
    calls = tel.expert_calls[:, :experts]
    hits = tel.expert_hits[:, :experts]
    resident = [[0] * experts for _ in range(layers)]
    slots_per_layer = None
    if engine.cache is not None:
        for layer in range(layers):
            for e in engine.cache.resident(layer):
                resident[layer][e] = 1
        slots_per_layer = [int(c) for c in engine.cache.capacity]
    summary = engine.summary()
    with metrics.lock:
        generated, prompt_tokens = metrics.generation_tokens, metrics.prompt_tokens
        requests = sum(metrics.requests.values())
        cancelled = metrics.cancelled
    return {
        "model": model_name,
        "time": time.time(),
        "uptime_s": time.monotonic() - metrics.started,
        "server": {**worker, "tok_s": metrics.tok_s(), "generated_tokens": generated,
                   "prompt_tokens": prompt_tokens, "requests": requests, "cancelled": cancelled},
        "engine": {"device": str(engine.device), "gpu_tier": engine.cache is not None,
                   "emulated_gpu": bool(engine.cfg.emulate_gpu), "policy": engine.cfg.decision,
                   "layers": layers, "experts": experts, "top_k": engine.top_k,
                   "slots_per_layer": slots_per_layer,
                   "hit_rate": summary.get("hit_rate"), "bytes_moved": summary.get("bytes_moved", 0),
                   "misses": summary.get("misses"), "evictions": summary.get("evictions"),
                   "cpu_expert_calls": summary["cpu_expert_calls"], "gpu_expert_calls": summary["gpu_expert_calls"],
                   "hit_rate_per_layer": summary.get("hit_rate_per_layer")},
        "heatmap": {"resident": resident, "calls": calls.tolist(),
                    "hit_rate": np.where(calls > 0, hits / np.maximum(calls, 1), -1.0).round(4).tolist()},
        "memory": {**_host_memory(), **_gpu_memory(engine)},
    }
