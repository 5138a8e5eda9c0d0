"""Sparse upcycling (Komatsuzaki et al. 2022): a dense Llama-family model becomes a Mixtral MoE.

Every expert starts as a copy of the dense FFN, so the MoE computes exactly the dense function
(Mixtral renormalises the top-k router weights to sum 1). Routers come from k-means centroids of
the real hidden states entering each FFN, so routing is input-dependent and skewed the way a
trained router is, which is what placement, caching and per-expert calibration need.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedModel

from ..data.text import calibration_ids
from ..errors import HaqmoeError
from ..io import atomic_directory
from .adapters import FusedExperts, ExpertWeights, adapter_for
from .base import LoadedModel


@dataclass(frozen=True)
class UpcycleConfig:
    num_experts: int = 8
    top_k: int = 2
    calib_source: str = "pydoc"  # text for the k-means hidden states (never the eval split)
    calib_samples: int = 16
    calib_len: int = 512
    seed: int = 0
    kmeans_iters: int = 30
    router_scale: float = 8.0  # logit spread: router rows are unit centroids * scale / mean ||x||


def kmeans(x: torch.Tensor, k: int, iters: int, seed: int) -> torch.Tensor:
    """Spherical k-means (cosine) with k-means++ seeding; returns unit centroids [k, d]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(x.double(), dim=-1)
    centroids = x[torch.randint(len(x), (1,), generator=g)]
    for _ in range(1, k):
        d = (1 - (x @ centroids.T).max(dim=1).values).clamp_min(0)
        probs = d / d.sum() if d.sum() > 0 else torch.full_like(d, 1 / len(d))
        centroids = torch.cat([centroids, x[torch.multinomial(probs, 1, generator=g)]])
    for _ in range(iters):
        assign = (x @ centroids.T).argmax(dim=1)
        new = torch.zeros_like(centroids).index_add_(0, assign, x)
        empty = new.norm(dim=1) == 0
        new[empty] = centroids[empty]
        new = torch.nn.functional.normalize(new, dim=-1)
        if torch.allclose(new, centroids):
            break
        centroids = new
    return centroids.float()


@torch.no_grad()
def collect_ffn_inputs(dense: PreTrainedModel, calib: torch.Tensor, progress: bool = True) -> list[torch.Tensor]:
    """Hidden states entering each block's FFN (post-attention norm output), per layer."""
    adapter = adapter_for(dense)
    blocks = adapter.blocks(dense)
    feats: list[list[torch.Tensor]] = [[] for _ in blocks]
    hooks = [b.mlp.register_forward_pre_hook(lambda m, a, i=i: feats[i].append(a[0].reshape(-1, a[0].shape[-1])))
             for i, b in enumerate(blocks)]
    try:
        for row in tqdm(calib, desc="upcycle: hidden states", disable=not progress, leave=False):
            dense(row[None])
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(f) for f in feats]


def mixtral_config_from_dense(cfg, num_experts: int, top_k: int) -> MixtralConfig:
    if cfg.model_type not in ("llama", "mistral"):
        raise HaqmoeError(f"upcycling needs a Llama-family dense model, got '{cfg.model_type}'")
    if getattr(cfg, "mlp_bias", False) or getattr(cfg, "attention_bias", False):
        raise HaqmoeError("upcycling to Mixtral needs a model without linear biases")
    if not 1 <= top_k <= num_experts:
        raise HaqmoeError(f"top-k must be between 1 and the number of experts ({num_experts}), got {top_k}")
    return MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=getattr(cfg, "head_dim", None),
        hidden_act=cfg.hidden_act, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, rope_parameters=dict(cfg.rope_parameters),
        tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
        sliding_window=getattr(cfg, "sliding_window", None),  # Mistral's window stays (Llama: none)
        num_local_experts=num_experts, num_experts_per_tok=top_k, router_jitter_noise=0.0,
    )


@torch.no_grad()
def upcycle(dense: PreTrainedModel, calib: torch.Tensor, cfg: UpcycleConfig = UpcycleConfig(),
            progress: bool = True) -> MixtralForCausalLM:
    """Build the Mixtral MoE: copied weights, identical experts, k-means routers."""
    mcfg = mixtral_config_from_dense(dense.config, cfg.num_experts, cfg.top_k)
    feats = collect_ffn_inputs(dense, calib, progress)
    moe = MixtralForCausalLM(mcfg).eval()
    dense_sd = dense.state_dict()
    moe_sd = moe.state_dict()
    for name in moe_sd:
        if name in dense_sd:
            moe_sd[name].copy_(dense_sd[name])
    for i, (dblock, mblock) in enumerate(zip(adapter_for(dense).blocks(dense), moe.model.layers)):
        w = ExpertWeights(dblock.mlp.gate_proj.weight, dblock.mlp.up_proj.weight, dblock.mlp.down_proj.weight)
        for e in range(cfg.num_experts):
            FusedExperts.set(mblock.mlp.experts, e, w)
        x = feats[i]
        centroids = kmeans(x, cfg.num_experts, cfg.kmeans_iters, cfg.seed + i)
        mblock.mlp.gate.weight.copy_(centroids * (cfg.router_scale / x.norm(dim=-1).mean()))
    if mcfg.tie_word_embeddings:
        moe.tie_weights()
    return moe


def upcycle_to_dir(lm: LoadedModel, target: Path, cfg: UpcycleConfig = UpcycleConfig(),
                   progress: bool = True, overwrite: bool = True) -> Path:
    """Upcycle a loaded dense model and save the MoE as a plain Mixtral checkpoint (atomic)."""
    mixtral_config_from_dense(lm.model.config, cfg.num_experts, cfg.top_k)  # refuse before tokenizing
    calib = calibration_ids(lm.tokenizer, cfg.calib_source, cfg.calib_samples, cfg.calib_len, cfg.seed)
    moe = upcycle(lm.model, calib, cfg, progress)
    with atomic_directory(target, overwrite=overwrite) as tmp:
        moe.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        (tmp / "haqmoe_upcycle.json").write_text(
            json.dumps({"dense": lm.name, **asdict(cfg)}, indent=2) + "\n")
    return target
