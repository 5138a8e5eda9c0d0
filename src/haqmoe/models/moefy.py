"""MoEfication: a dense Llama-family model's FFN neurons carved into experts that differ.

Sparse upcycling (``upcycle.py``) copies the whole FFN into every expert, so expert choice cannot
change the output. Here each FFN's ``N`` intermediate neurons are split into disjoint slices, the
way training-free FFN-to-MoE carving does it (MoEfication, Zhang et al. 2022; CMoE, Pei et al.
2025), from activation statistics of calibration text and without any training:

1. **Activation statistics.** For every calibration token t and neuron i the neuron's contribution
   is ``c[t, i] = |act(g_i·x) · (u_i·x)| · ||d_i||`` (``d_i``: its down-projection column), and a
   neuron counts as *active* on t when it is among the token's top ``active_fraction`` (15 %) of
   neurons.
2. **Shared experts** (``shared`` slices): the neurons with the highest activation rate, the ones
   nearly every token needs, always run.
3. **Routed experts** (``experts`` slices of equal size): the other neurons are clustered by
   co-activation (their binary activation patterns over the calibration tokens, cosine k-means with
   a balanced assignment so every expert has the same width).
4. **Router** (analytic): per expert j, the norm of its output ``||W_down[:, S_j] a_{S_j}(x)||`` is
   regressed on the FFN input x by ridge least squares (closed form, fp64). A token's top-k
   experts are those with the largest predicted contribution.

**Router weights sum the selected experts.** The dense FFN is the plain *sum* of its slices, but
Mixtral / Qwen2-MoE multiply each selected expert by its softmax weight, renormalised over the
top-k (so the k weights sum to 1). The router rows are multiplied by a power of two ``2^-p`` chosen
so that a token's logits spread over at most ``2^-ROUTER_SPREAD_BITS``: the softmax is then uniform
to within that (each selected weight is ``1/k · (1 ± 2^-15)``), while its order, which is all top-k
reads, is the regression's order (a power-of-two scale is exact in floating point; only logits
closer than ~1/300 of the token's spread can tie). Every routed expert's down projection is
multiplied by k, so a token gets ``Σ_{j in top-k} expert_j(x)``. Qwen2-MoE's shared expert is
scaled by ``sigmoid(shared_expert_gate · x)``: that gate is zero (sigmoid = 1/2, exact) and the
shared down projection is doubled. With every expert selected the model computes the dense FFN.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import MixtralForCausalLM, PreTrainedModel, Qwen2MoeConfig, Qwen2MoeForCausalLM

from ..data.text import calibration_ids
from ..errors import HaqmoeError
from ..io import atomic_directory
from ..paths import shared_data_dir
from .adapters import ExpertWeights, FusedExperts, adapter_for
from .base import LoadedModel
from .upcycle import collect_ffn_inputs, mixtral_config_from_dense

ROUTER_SPREAD_BITS = 15  # a token's router logits span at most 2^-15 (calibration tokens)
META_FILE = "haqmoe_moefy.json"


@dataclass(frozen=True)
class MoefyConfig:
    """How the FFN is carved. Neurons per expert m = N / (experts + shared); the active share of the
    FFN per token is (top_k + shared) / (experts + shared)."""

    experts: int = 8  # routed experts per layer
    top_k: int = 2  # routed experts per token
    shared: int = 0  # always-active experts (each m neurons wide); > 0 builds a Qwen2-MoE
    router: str = "fitted"  # "fitted" (ridge regression) or "random" (Gaussian rows: the baseline)
    calib_source: str | None = None  # None: wikitext2:valid when the data folder has it, else pydoc
    calib_samples: int = 16
    calib_len: int = 512
    seed: int = 0
    # A neuron is "active" on a token when among its top 15 % by contribution: sparse markers tell
    # neurons apart (marking as many as the MoE keeps, up to 75 %, makes every pattern nearly all
    # ones); on SmolLM2 15 % gave the lowest per-layer FFN error of 5 / 15 / 30 % / the active share.
    active_fraction: float | None = 0.15  # None: the active share
    kmeans_iters: int = 25
    ridge: float = 1e-3  # λ relative to mean(diag XᵀX)

    @property
    def slices(self) -> int:
        return self.experts + self.shared

    @property
    def active_share(self) -> float:
        """Share of the FFN's neurons a token runs."""
        return (self.top_k + self.shared) / self.slices


def default_calib_source() -> str:
    """WikiText-2 valid when the development data folder has it (never test, the evaluation split),
    else Python's own pydoc text, which is always installed."""
    root = shared_data_dir()
    return "wikitext2:valid" if root is not None and (root / "wikitext-2-raw" / "wiki.valid.raw").is_file() \
        else "pydoc"


def check_dense(dense_cfg) -> None:
    """Carving reads a Llama-style gated FFN (gate_proj, up_proj, down_proj, no biases)."""
    if dense_cfg.model_type not in ("llama", "mistral"):
        raise HaqmoeError(f"moefy needs a Llama-family dense model, got '{dense_cfg.model_type}'")
    if getattr(dense_cfg, "mlp_bias", False):
        raise HaqmoeError("moefy needs an FFN without biases")


def check_config(cfg: MoefyConfig, intermediate: int) -> int:
    """Refuse impossible shapes; return m, the neurons per expert."""
    if cfg.experts < 1 or not 1 <= cfg.top_k <= cfg.experts:
        raise HaqmoeError(f"top-k must be between 1 and the number of experts ({cfg.experts}), got {cfg.top_k}")
    if cfg.shared < 0:
        raise HaqmoeError("--shared must be 0 or more")
    if intermediate % cfg.slices:
        raise HaqmoeError(f"the FFN's {intermediate} neurons do not split into {cfg.slices} equal experts "
                          f"({cfg.experts} routed + {cfg.shared} shared)")
    if cfg.router not in ("fitted", "random"):
        raise HaqmoeError(f"router must be 'fitted' or 'random', got '{cfg.router}'")
    return intermediate // cfg.slices


# --------------------------------------------------------------------------- statistics
@torch.no_grad()
def neuron_contributions(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                         act: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Intermediate activations a [T, N] and each neuron's output magnitude |a|·||d_i|| [T, N]:
    what dropping the neuron would take away from the token's FFN output (|a| alone ignores that
    the down-projection columns have different norms)."""
    a = act(x @ gate.T) * (x @ up.T)
    return a, a.abs() * down.norm(dim=0)


def activation_mask(contrib: torch.Tensor, fraction: float) -> torch.Tensor:
    """[T, N] bool: the token's top ``fraction`` of neurons by contribution."""
    k = max(1, round(fraction * contrib.shape[1]))
    idx = contrib.topk(k, dim=1).indices
    return torch.zeros_like(contrib, dtype=torch.bool).scatter_(1, idx, True)


def pick_shared(mask: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` neurons with the highest activation rate (ties: lower index), sorted."""
    rate = mask.float().mean(dim=0)
    order = torch.sort(-rate, stable=True).indices
    return order[:count].sort().values


def balanced_assign(scores: torch.Tensor, capacity: int) -> torch.Tensor:
    """Each row to one column, every column exactly ``capacity`` rows: in rounds, every unplaced row
    proposes to its best column that still has room, and each column keeps its highest-scoring
    proposers up to its room. Deterministic (stable sorts, no randomness); at most k rounds."""
    n, k = scores.shape
    if n != k * capacity:
        raise ValueError(f"{n} rows do not fill {k} columns of {capacity}")
    out = torch.full((n,), -1, dtype=torch.long)
    room = torch.full((k,), capacity, dtype=torch.long)
    open_scores = scores.clone().double()
    while bool((out < 0).any()):
        free = (out < 0).nonzero().squeeze(1)
        choice = open_scores[free].argmax(dim=1)
        for c in range(k):
            rows = free[choice == c]
            if len(rows) == 0:
                continue
            keep = rows[torch.sort(-scores[rows, c].double(), stable=True).indices[: int(room[c])]]
            out[keep] = c
            room[c] -= len(keep)
            if room[c] == 0:
                open_scores[:, c] = -math.inf
    return out


def balanced_kmeans(features: torch.Tensor, k: int, iters: int, seed: int) -> torch.Tensor:
    """Cluster rows (neurons) of ``features`` [n, T] into k equal clusters by cosine similarity;
    returns the cluster id of each row. Seeding: k-means++ with a seeded generator."""
    n = features.shape[0]
    f = torch.nn.functional.normalize(features.double(), dim=1)
    if k == 1:
        return torch.zeros(n, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    centroids = f[torch.randint(n, (1,), generator=g)]
    for _ in range(1, k):
        d = (1 - (f @ centroids.T).max(dim=1).values).clamp_min(0)
        probs = d / d.sum() if d.sum() > 0 else torch.full_like(d, 1 / n)
        centroids = torch.cat([centroids, f[torch.multinomial(probs, 1, generator=g)]])
    assign = balanced_assign(f @ centroids.T, n // k)
    for _ in range(iters):
        centroids = torch.nn.functional.normalize(torch.zeros(k, f.shape[1], dtype=f.dtype).index_add_(0, assign, f),
                                                  dim=1)
        new = balanced_assign(f @ centroids.T, n // k)
        if torch.equal(new, assign):
            break
        assign = new
    return assign


def carve_layer(mask: torch.Tensor, cfg: MoefyConfig, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(shared neurons, routed experts' neurons): disjoint sorted index sets covering all N neurons.
    Routed experts are ordered by their smallest neuron, so the expert ids do not depend on the
    clustering's arbitrary labels."""
    n = mask.shape[1]
    m = n // cfg.slices
    shared = pick_shared(mask, cfg.shared * m)
    rest = torch.ones(n, dtype=torch.bool)
    rest[shared] = False
    routed_ids = rest.nonzero().squeeze(1)
    labels = balanced_kmeans(mask[:, routed_ids].T.float(), cfg.experts, cfg.kmeans_iters, seed)
    groups = [routed_ids[labels == j].sort().values for j in range(cfg.experts)]
    groups.sort(key=lambda g: int(g[0]))
    return shared, groups


# --------------------------------------------------------------------------- router
def expert_output_norms(a: torch.Tensor, down: torch.Tensor, groups: list[torch.Tensor]) -> torch.Tensor:
    """[T, E]: the norm of each routed expert's output for each token (the regression target)."""
    return torch.stack([(a[:, g] @ down[:, g].T).norm(dim=1) for g in groups], dim=1)


def ridge_router(x: torch.Tensor, target: torch.Tensor, ridge: float) -> torch.Tensor:
    """Router rows [E, H] whose logits x·Wᵀ best predict ``target`` [T, E] (least squares, fp64,
    λ·mean(diag XᵀX) on the diagonal). No intercept: Mixtral's router has no bias."""
    xd = x.double()
    gram = xd.T @ xd
    gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram, xd.T @ target.double()).T


def random_router(experts: int, hidden: int, seed: int) -> torch.Tensor:
    """Gaussian router rows: input-dependent routing that knows nothing of the experts (the baseline)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(experts, hidden, generator=g, dtype=torch.float64)


def uniform_softmax_scale(logits: torch.Tensor) -> float:
    """The power of two that makes every token's logit spread at most 2^-ROUTER_SPREAD_BITS (see
    the module doc: a near-uniform softmax whose order is the logits' order)."""
    spread = float((logits.max(dim=1).values - logits.min(dim=1).values).max())
    if spread <= 0 or not math.isfinite(spread):
        return 1.0
    return 2.0 ** -(math.ceil(math.log2(spread)) + ROUTER_SPREAD_BITS)


# --------------------------------------------------------------------------- model
def qwen2_moe_config_from_dense(cfg, experts: int, top_k: int, m: int, shared_width: int) -> Qwen2MoeConfig:
    """A Qwen2-MoE config with the dense model's attention (no qkv bias, no sliding window)."""
    return Qwen2MoeConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=dict(cfg.rope_parameters), tie_word_embeddings=cfg.tie_word_embeddings,
        use_sliding_window=False, qkv_bias=False, decoder_sparse_step=1, mlp_only_layers=[],
        num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=m,
        shared_expert_intermediate_size=shared_width, norm_topk_prob=True,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
    )


def moe_skeleton(dense_cfg, cfg: MoefyConfig, m: int) -> PreTrainedModel:
    """The empty MoE: Mixtral without shared experts, Qwen2-MoE with them."""
    check_dense(dense_cfg)
    head_dim = getattr(dense_cfg, "head_dim", None)
    if cfg.shared == 0:
        mcfg = mixtral_config_from_dense(dense_cfg, cfg.experts, cfg.top_k)
        mcfg.intermediate_size = m  # one expert's width
        return MixtralForCausalLM(mcfg).eval()
    if getattr(dense_cfg, "sliding_window", None) or getattr(dense_cfg, "mlp_bias", False) \
            or getattr(dense_cfg, "attention_bias", False):
        raise HaqmoeError("shared experts (Qwen2-MoE) need a dense model without sliding window or biases")
    if head_dim not in (None, dense_cfg.hidden_size // dense_cfg.num_attention_heads):
        raise HaqmoeError("shared experts (Qwen2-MoE) need head_dim = hidden_size / heads")
    return Qwen2MoeForCausalLM(qwen2_moe_config_from_dense(dense_cfg, cfg.experts, cfg.top_k, m,
                                                          cfg.shared * m)).eval()


@dataclass
class LayerCarving:
    """One layer's carving: neuron ids of the shared part and of each routed expert, router rows."""

    shared: torch.Tensor
    groups: list[torch.Tensor]
    router: torch.Tensor  # [E, H], already scaled for a uniform softmax


@torch.no_grad()
def carve(dense: PreTrainedModel, calib: torch.Tensor, cfg: MoefyConfig = MoefyConfig(),
          progress: bool = True) -> list[LayerCarving]:
    """Every layer's carving from the FFN inputs of ``calib`` [n, T] (token ids)."""
    check_dense(dense.config)
    check_config(cfg, dense.config.intermediate_size)
    return carve_from_inputs(dense, collect_ffn_inputs(dense, calib, progress), cfg, progress)


@torch.no_grad()
def carve_from_inputs(dense: PreTrainedModel, feats: list[torch.Tensor], cfg: MoefyConfig,
                      progress: bool = True) -> list[LayerCarving]:
    """``carve`` from each layer's FFN inputs [tokens, H] (one calibration pass serves many shapes)."""
    check_dense(dense.config)
    check_config(cfg, dense.config.intermediate_size)
    fraction = cfg.active_fraction if cfg.active_fraction is not None else cfg.active_share
    out = []
    for i, block in enumerate(tqdm(adapter_for(dense).blocks(dense), desc="moefy: carving", disable=not progress,
                                   leave=False)):
        mlp, x = block.mlp, feats[i].float()
        gate, up, down = mlp.gate_proj.weight.float(), mlp.up_proj.weight.float(), mlp.down_proj.weight.float()
        a, contrib = neuron_contributions(x, gate, up, down, mlp.act_fn)
        shared, groups = carve_layer(activation_mask(contrib, fraction), cfg, cfg.seed + i)
        if cfg.router == "fitted":
            router = ridge_router(x, expert_output_norms(a, down, groups), cfg.ridge)
        else:
            router = random_router(cfg.experts, x.shape[1], cfg.seed + 1000 + i)
        router = router * uniform_softmax_scale(x.double() @ router.T)
        out.append(LayerCarving(shared, groups, router.float()))
    return out


@torch.no_grad()
def assemble(dense: PreTrainedModel, carving: list[LayerCarving], cfg: MoefyConfig) -> PreTrainedModel:
    """The MoE model: dense weights outside the FFNs, expert j = the dense FFN restricted to its
    neurons, down projections scaled to undo the router's 1/k weights (module doc)."""
    m = dense.config.intermediate_size // cfg.slices
    moe = moe_skeleton(dense.config, cfg, m)
    dense_sd = dense.state_dict()
    for name, t in moe.state_dict().items():
        if name in dense_sd:
            t.copy_(dense_sd[name])
    for dblock, mblock, lc in zip(adapter_for(dense).blocks(dense), moe.model.layers, carving):
        gate, up, down = dblock.mlp.gate_proj.weight, dblock.mlp.up_proj.weight, dblock.mlp.down_proj.weight
        for e, g in enumerate(lc.groups):
            FusedExperts.set(mblock.mlp.experts, e, ExpertWeights(gate[g], up[g], down[:, g] * cfg.top_k))
        mblock.mlp.gate.weight.copy_(lc.router)
        if cfg.shared:
            s = lc.shared
            mblock.mlp.shared_expert.gate_proj.weight.copy_(gate[s])
            mblock.mlp.shared_expert.up_proj.weight.copy_(up[s])
            mblock.mlp.shared_expert.down_proj.weight.copy_(down[:, s] * 2)  # sigmoid(0) = 1/2
            mblock.mlp.shared_expert_gate.weight.zero_()
    if moe.config.tie_word_embeddings:
        moe.tie_weights()
    return moe


def moefy(dense: PreTrainedModel, calib: torch.Tensor, cfg: MoefyConfig = MoefyConfig(),
          progress: bool = True) -> tuple[PreTrainedModel, list[LayerCarving]]:
    """Carve ``dense`` into an MoE (see the module doc); returns the model and the carving."""
    carving = carve(dense, calib, cfg, progress)
    return assemble(dense, carving, cfg), carving


def built_with(target: Path, cfg: MoefyConfig) -> bool:
    """Whether the checkpoint in ``target`` was carved with ``cfg`` (its build record says so)."""
    try:
        record = json.loads((target / META_FILE).read_text())
    except (OSError, ValueError):
        return False
    want = asdict(cfg)
    want.pop("calib_source")  # recorded resolved
    return all(record.get(k) == v for k, v in want.items())


def moefy_to_dir(lm: LoadedModel, target: Path, cfg: MoefyConfig = MoefyConfig(), progress: bool = True,
                 overwrite: bool = True) -> dict:
    """Carve a loaded dense model and save the MoE as a plain transformers checkpoint (atomic, and
    byte-identical for the same inputs). Returns the build record written beside it."""
    check_dense(lm.model.config)
    m = check_config(cfg, lm.model.config.intermediate_size)
    moe_skeleton(lm.model.config, cfg, m)  # refuse an unsupported model before tokenizing
    source = cfg.calib_source or default_calib_source()
    calib = calibration_ids(lm.tokenizer, source, cfg.calib_samples, cfg.calib_len, cfg.seed,
                            eval_spec="wikitext2:test")
    moe, _ = moefy(lm.model, calib, cfg, progress)
    record = {"dense": lm.name, **asdict(cfg), "calib_source": source, "neurons_per_expert": m,
              "active_share": cfg.active_share, "architecture": moe.config.model_type,
              "router_spread_bits": ROUTER_SPREAD_BITS}
    with atomic_directory(target, overwrite=overwrite) as tmp:
        moe.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record
