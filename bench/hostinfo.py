"""What a CPU result was measured on: the CPU model and flags (lscpu), and this host's DRAM read bandwidth."""

from __future__ import annotations

import subprocess
import time


def cpu_info() -> dict:
    """lscpu's model name, counts, caches and flags (every CPU result file carries them)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    keep = ("Model name", "Vendor ID", "CPU family", "Model", "CPU(s)", "Thread(s) per core", "L2 cache",
            "L3 cache", "Hypervisor vendor", "Flags")
    return {k: fields[k].strip() for k in keep if k in fields}


def dram_read_gb_s(threads: int = 2, gib: float = 1.0, repeats: int = 5) -> float:
    """Best of ``repeats`` timed sums over a ``gib`` GiB float32 tensor (far beyond the caches) with
    ``threads`` torch threads: the read bandwidth a decode that streams its weights can reach here
    (a float sum is vectorised; torch's integer sums are not and measure the ALU instead)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
        x.sum()  # pages touched before timing
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            x.sum()
            best = min(best, time.perf_counter() - t)
        return x.numel() * 4 / best / 1e9
    finally:
        torch.set_num_threads(old)
