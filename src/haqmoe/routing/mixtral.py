"""Importers for the real Mixtral-8x7B routing statistics in the shared data folder (frequency only).

Sources (see ``shared/data/README.md`` sections 3-4):

- ``frac_vecs/<subject>.npy`` [Q, 32, 8]: per MMLU prompt and layer, each expert's share of the
  prompt's top-2 selections; times ``2 * N_q`` (the inferred prompt length) this gives exact
  integer counts. Per prompt, so it supports held-out splits by subject and exact hit rates.
- Fiddler ``expert_popularity_<subject>.json`` [32, 8]: per-subject selection counts (question
  stems only), a second, independent frequency source.

Neither has per-token data: no activation paths, no co-selection. For path-based strategies we
sample SYNTHETIC tokens: each prompt's tokens pick, at each layer independently, 2 distinct
experts with probabilities from that prompt's fractions. Paths built this way carry prompt-level
correlation only; rows that use them are labelled ``synthetic_paths``. Per-request numbers for
short inputs (25/50/100 tokens) likewise sample requests from held-out prompts' fractions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import HaqmoeError
from ..paths import shared_data_dir
from .stats import DEFAULT_WINDOW, RoutingStats, path_counts
from .trace import RoutingTrace

NUM_LAYERS, NUM_EXPERTS, TOP_K = 32, 8, 2


def routing_dir(root: str | Path | None = None) -> Path:
    base = Path(root) if root is not None else shared_data_dir()
    if base is None:
        raise HaqmoeError("Mixtral routing data not found: set HAQMOE_DATA to the shared data folder")
    d = base / "mixtral-routing" if (base / "mixtral-routing").is_dir() else base
    if not (d / "frac_vecs").is_dir():
        raise HaqmoeError(f"{d} has no frac_vecs/ folder (Mixtral routing statistics)")
    return d


@dataclass
class PromptCounts:
    """Per-prompt integer selection counts of one or more MMLU subjects."""

    counts: np.ndarray  # [Q, L, E] float64 (integers)
    tokens: np.ndarray  # [Q] prompt lengths
    subjects: list[str]

    def total(self) -> np.ndarray:
        return self.counts.sum(axis=0)


def list_subjects(root: str | Path | None = None) -> list[str]:
    return sorted(p.stem for p in (routing_dir(root) / "frac_vecs").glob("*.npy"))


def load_frac_vecs(subjects: list[str] | None = None, root: str | Path | None = None) -> PromptCounts:
    d = routing_dir(root)
    subjects = subjects or list_subjects(root)
    tok_file = d / "frac_vecs_inferred_token_counts.json"
    try:
        ntok = json.loads(tok_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise HaqmoeError(f"cannot read {tok_file}: {exc}") from exc
    counts, tokens = [], []
    for s in subjects:
        f = d / "frac_vecs" / f"{s}.npy"
        if not f.is_file() or s not in ntok:
            raise HaqmoeError(f"unknown MMLU subject '{s}' (no {f.name} or no token counts)")
        frac = np.load(f, allow_pickle=False).astype(np.float64)
        n = np.asarray(ntok[s], np.float64)
        if frac.shape[1:] != (NUM_LAYERS, NUM_EXPERTS) or len(n) != frac.shape[0]:
            raise HaqmoeError(f"{f} has shape {frac.shape}, expected (Q, 32, 8) with {len(n)} prompts")
        counts.append(np.rint(frac * (TOP_K * n)[:, None, None]))
        tokens.append(n)
    return PromptCounts(np.concatenate(counts), np.concatenate(tokens).astype(np.int64), list(subjects))


def load_fiddler(variant: str = "original", root: str | Path | None = None) -> dict[str, np.ndarray]:
    """{subject: [32, 8] counts} from Fiddler's popularity files (``original`` or ``instruct``)."""
    d = routing_dir(root) / "fiddler-popularity" / f"mixtral_8x7b_{variant}"
    files = sorted(d.glob("expert_popularity_*.json"))
    if not files:
        raise HaqmoeError(f"no Fiddler popularity files in {d}")
    out = {}
    for f in files:
        arr = np.asarray(json.loads(f.read_text())["expert_popularity"], np.float64)
        if arr.shape != (NUM_LAYERS, NUM_EXPERTS):
            raise HaqmoeError(f"{f} has shape {arr.shape}, expected (32, 8)")
        out[f.stem.removeprefix("expert_popularity_")] = arr
    return out


def split_subjects(subjects: list[str]) -> tuple[list[str], list[str]]:
    """Build on alphabetically even-indexed subjects, hold out the odd-indexed ones (deterministic)."""
    s = sorted(subjects)
    return s[0::2], s[1::2]


def _pick_two(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Two distinct experts per row of ``p`` [..., E] (Gumbel top-2 = sampling without replacement)."""
    g = np.log(np.maximum(p, 1e-12)) + rng.gumbel(size=p.shape)
    return np.argsort(-g, axis=-1)[..., :TOP_K]


def synthetic_trace(pc: PromptCounts, tokens_per_prompt: int, seed: int = 0) -> RoutingTrace:
    """Per-token trace sampled from per-prompt fractions (layers independent given the prompt)."""
    rng = np.random.default_rng(seed)
    p = pc.counts / np.maximum(pc.counts.sum(axis=2, keepdims=True), 1)  # [Q, L, E]
    Q = p.shape[0]
    ex = _pick_two(np.repeat(p, tokens_per_prompt, axis=0), rng).astype(np.int16)  # [Q*n, L, 2]
    offsets = np.arange(Q + 1, dtype=np.int64) * tokens_per_prompt
    return RoutingTrace(ex, NUM_EXPERTS, offsets, meta={"model": "mixtral-8x7b", "synthetic": True})


def synthetic_requests(pc: PromptCounts, request_len: int, per_prompt: int = 1, seed: int = 0,
                       max_prompts: int | None = 2000) -> np.ndarray:
    """[C, L, E] counts of sampled requests of ``request_len`` tokens, each from one prompt's fractions
    (at most ``max_prompts`` prompts, a seeded random subset: sampling cost grows with Q x n)."""
    rng = np.random.default_rng(seed)
    p = pc.counts / np.maximum(pc.counts.sum(axis=2, keepdims=True), 1)
    if max_prompts is not None and p.shape[0] > max_prompts:
        p = p[np.sort(rng.choice(p.shape[0], max_prompts, replace=False))]
    out = []
    for _ in range(per_prompt):
        for q0 in range(0, p.shape[0], 256):  # blocks of prompts bound memory (Q x n x L x E floats)
            ex = _pick_two(np.repeat(p[q0:q0 + 256, None], request_len, axis=1), rng)  # [q, n, L, 2]
            Q, _, L, _ = ex.shape
            flat = (np.arange(Q)[:, None, None, None] * L * NUM_EXPERTS
                    + np.arange(L)[None, None, :, None] * NUM_EXPERTS + ex).ravel()
            out.append(np.bincount(flat, minlength=Q * L * NUM_EXPERTS).reshape(Q, L, NUM_EXPERTS))
    return np.concatenate(out).astype(np.float64)


def stats_from_prompts(pc: PromptCounts, window: int = DEFAULT_WINDOW, synthetic_tokens_per_prompt: int = 16,
                       seed: int = 0) -> RoutingStats:
    """Exact frequency from the prompts; paths (if ``synthetic_tokens_per_prompt``) from synthetic tokens."""
    paths: dict = {}
    if synthetic_tokens_per_prompt:
        paths = path_counts(synthetic_trace(pc, synthetic_tokens_per_prompt, seed), window)
    return RoutingStats(NUM_LAYERS, NUM_EXPERTS, TOP_K, pc.total(), int(pc.tokens.sum()), window, paths, None,
                        "mixtral-8x7b", synthetic_paths=bool(synthetic_tokens_per_prompt))


def stats_from_counts(counts: np.ndarray, source: str = "mixtral-8x7b") -> RoutingStats:
    """Frequency-only statistics from a [L, E] count matrix (e.g. Fiddler popularity)."""
    counts = np.asarray(counts, np.float64)
    tokens = int(round(counts[0].sum() / TOP_K))
    return RoutingStats(counts.shape[0], counts.shape[1], TOP_K, counts, tokens, 1, {}, None, source)
