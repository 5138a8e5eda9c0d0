"""Plots of routing statistics and placements (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..routing.stats import RoutingStats, entropy_bits, load_skew, path_counts
from ..routing.trace import RoutingTrace


def _plt():
    import matplotlib  # here: the Agg backend must be chosen before pyplot is imported

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_layer_hits(per_layer: dict[str, np.ndarray], out: str | Path, title: str, highlight=()) -> None:
    """Per-layer hit rate (percent) of several plans, one line each (the paper's Figs. 5-10)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4))
    for name, hit in per_layer.items():
        ax.plot(np.arange(len(hit)), hit, marker="o", ms=3, lw=2.2 if name in highlight else 1.2,
                label=f"{name} (mean {np.mean(hit):.1f}, std {np.std(hit):.1f})")
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("hit rate (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_stats(stats: RoutingStats, out: str | Path, title: str, trace: RoutingTrace | None = None) -> None:
    """Left: per-layer expert-share heat map. Right: rank/share of activation paths per window."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    im = axes[0].imshow(100 * stats.frequency.T, aspect="auto", cmap="viridis")
    axes[0].set_xlabel("MoE layer")
    axes[0].set_ylabel("expert")
    axes[0].set_title(f"{title}: share of selections (%)\nentropy {entropy_bits(stats).mean():.2f} of "
                      f"{np.log2(stats.num_experts):.0f} bits, max/mean load {load_skew(stats).mean():.2f}",
                      fontsize=9)
    fig.colorbar(im, ax=axes[0])
    if trace is not None and trace.num_tokens:
        for w in sorted({1, 2, 4, trace.num_layers}):
            if w > trace.num_layers:
                continue
            c = np.sort(np.fromiter(path_counts(trace, w).values(), float))[::-1]
            axes[1].loglog(np.arange(1, len(c) + 1), c / c.sum(), label=f"window {w} ({len(c)} distinct)")
        axes[1].legend(fontsize=7)
        axes[1].set_title("activation paths: rank vs share of occurrences", fontsize=9)
    else:
        axes[1].text(0.5, 0.5, "no per-token paths in this source", ha="center", va="center")
    axes[1].set_xlabel("path rank")
    axes[1].set_ylabel("share of path occurrences")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
