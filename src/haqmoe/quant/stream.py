"""``haqmoe quantize``: a checkpoint quantized one decoder block at a time, in bounded memory.

The pipeline (llm-compressor's sequential on-loading, GPTQModel's layer-by-layer from ``meta``):

1. config + tokenizer, calibration ids; the model skeleton on ``meta`` (no weights);
2. the memory guard, from the skeleton's shapes, BEFORE anything is loaded;
3. the weights outside the blocks (embedding, final norm, lm_head) loaded, the calibration inputs
   of block 0 captured, and the float embedding and lm_head released again until step 5;
4. per block: load it from the source's shards (upcast to fp32 only now), collect statistics,
   smooth, quantize, run the quantized block for the next block's inputs, write its shard into
   ``OUT.partial/``, release it;
5. the embedding and lm_head reloaded; the rest shard, index and metadata; ``OUT.partial/`` renamed to ``OUT``.

So at most one block plus the non-block weights are in memory at once, and the shards written in
step 4 are what ``--resume`` continues from. A hub id is downloaded first and streamed the same way;
sources without safetensors weights (a GGUF file, a folder of .bin files) are loaded whole and then
take the same steps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..data.text import calibration_ids
from ..errors import HaqmoeError
from ..models.adapters import ArchSpec, adapter_for
from ..models.base import QUANT_CONFIG, is_compressed_tensors, load_config, load_tokenizer
from ..models.lazy import ModelReader, SafetensorsFolder, materialize, release, skeleton
from ..reliability.guard import check_quant_memory
from ..reliability.resume import BlockCheckpoint, run_fingerprint
from ..sources import lazy_folder, load_model
from .checkpoint import finish_streamed
from .config import QuantConfig
from .methods import MethodOptions, needs_calibration, quantize_with
from .modules import quantize_vocabulary, vocab_names
from .pipeline import QuantReport, check_finite


@dataclass(frozen=True)
class CalibSpec:
    source: str = "wikitext2:valid"
    samples: int = 128
    length: int = 512
    seed: int = 0


class LazyBlocks:
    """The pipeline's ``BlockLoader`` for a model skeleton whose weights stay in the source's shards."""

    def __init__(self, model: nn.Module, reader: ModelReader, adapter: ArchSpec):
        self.model, self.reader, self.prefix = model, reader, adapter.layers

    def inputs_captured(self) -> None:
        """Release the float embedding and lm_head until the blocks are done (``restore_rest``):
        with a 49k vocabulary at Mixtral's width they are 1.6 GB in fp32, a quarter of a block.
        An int8 vocabulary (``--int8-lm-head``) was made in memory and stays."""
        for module in (self.model.get_input_embeddings(), self.model.get_output_embeddings()):
            if isinstance(module, (nn.Embedding, nn.Linear)):
                release(module)

    def restore_rest(self) -> None:
        """Reload whatever ``inputs_captured`` released (tied weights stay one tensor)."""
        materialize(self.model, "", self.reader, skip=(self.prefix,))

    def load(self, i: int, block: nn.Module) -> None:
        materialize(self.model, f"{self.prefix}.{i}", self.reader)
        check_finite(block, f"{self.prefix}.{i}.")

    def release(self, i: int, block: nn.Module) -> None:
        release(block)


@dataclass
class Source:
    """A model to quantize: a skeleton with its non-block weights real and a reader for the blocks
    (streaming), or a whole model in memory (``reader`` None)."""

    model: nn.Module
    tokenizer: object
    adapter: ArchSpec
    reader: ModelReader | None


def open_source(source: str, progress: bool) -> Source:
    """The model behind ``source``, streamed where it is a safetensors folder."""
    path = lazy_folder(source, progress)
    if path is not None:
        if (path / QUANT_CONFIG).is_file() or is_compressed_tensors(path):
            raise HaqmoeError(f"{source} is already quantized")
        config = load_config(str(path))
        model = skeleton(config, torch.float32)
        reader = ModelReader(SafetensorsFolder.open(path), model)
        return Source(model, load_tokenizer(path), adapter_for(config.model_type), reader)
    lm = load_model(source, progress=progress)  # GGUF, folders of .bin weights: loaded whole
    if lm.quant is not None:
        raise HaqmoeError(f"{source} is already quantized")
    return Source(lm.model, lm.tokenizer, lm.adapter, None)


def quantize_checkpoint(source: str, out: Path, method: str, cfg: QuantConfig, opts: MethodOptions,
                        calib: CalibSpec, int8_lm_head: bool = False, progress: bool = True,
                        resume: bool = False, overwrite: bool = False) -> QuantReport:
    """Quantize ``source`` into the sharded checkpoint ``out`` (see the module docstring)."""
    src = open_source(source, progress)
    model, adapter, streaming = src.model, src.adapter, src.reader is not None
    ids = None
    if needs_calibration(method, cfg):
        if src.tokenizer is None:
            raise HaqmoeError(f"{source} has no tokenizer: cannot tokenize the calibration text")
        ids = calibration_ids(src.tokenizer, calib.source, calib.samples, calib.length, calib.seed,
                              eval_spec="wikitext2:test")
    check_quant_memory(model, adapter, ids, opts.batch_size, streaming=streaming)
    if streaming:
        materialize(model, "", src.reader, skip=(adapter.layers,))
    check_finite(model)  # streaming: the non-block weights (each block is checked when it loads)
    if int8_lm_head:  # first, so calibration sees the embedding that inference will read
        quantize_vocabulary(model)
    fingerprint = run_fingerprint(model, ids, (method, cfg, opts, int8_lm_head), reader=src.reader)
    ckpt = BlockCheckpoint.open(out, fingerprint, cfg, resume, adapter.layers)
    loader = LazyBlocks(model, src.reader, adapter) if streaming else None
    report = quantize_with(model, adapter, method, cfg, ids, opts, progress, ckpt, loader)
    if loader is not None:
        loader.restore_rest()
    extra = {"source": source, "options": opts.__dict__, "calib": None if ids is None else asdict(calib),
             "report": report.as_dict()}
    modules = ckpt.modules()
    vocab = vocab_names(model)
    if vocab:
        modules["vocab"] = vocab
    ckpt.clear_run_state()
    finish_streamed(ckpt.root, Path(out), model, adapter, src.tokenizer, cfg, modules, extra, ckpt.shards, overwrite)
    return report
