"""Block-level checkpoints of the quantization pipeline: ``OUT.partial/`` survives a kill -9.

After block ``i`` is quantized the pipeline hands us (a) the block's state dict plus the layout of
its quantized modules, (b) the block's outputs, which are the next block's calibration inputs, and
(c) the sampling generator's state and the report so far. These three are all the pipeline carries
from one block to the next, so restoring them continues the run exactly where it stopped: the
result is bit-identical to an uninterrupted run (tests/test_reliability.py).

Layout::

    OUT.partial/
      state.json              fingerprint, blocks done, shard digests, report so far (written last)
      block-0000.safetensors  quantized block 0, keys as in the model (a shard of the final checkpoint)
      acts-0000.safetensors   outputs of the last finished block + generator state (calibrated methods)

The block files are the quantized checkpoint's own shards (``quant.checkpoint``): when the
streaming pipeline finishes, the directory gets its rest shard and metadata and is renamed to OUT.

Every file is written to a temporary name and renamed, so a kill leaves either the previous
consistent state or the new one. The fingerprint (model config, calibration ids, pipeline
config) refuses to resume a different run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import HaqmoeError
from ..io import atomic_write_text
from ..models.adapters import get_module, set_module
from ..quant.modules import QuantExperts, QuantLinear
from .manifest import FileEntry, file_digest

STATE = "state.json"
VERSION = 2  # 2: shards keyed by full names, with digests


def _acts_name(i: int) -> str:
    return f"acts-{i:04d}.safetensors"


def block_file(i: int) -> str:
    """The shard of decoder block ``i`` (in OUT.partial/ while running, in OUT when done)."""
    return f"block-{i:04d}.safetensors"


def block_tensors(block: nn.Module, layers: str, i: int) -> dict[str, torch.Tensor]:
    """Block ``i``'s tensors keyed as in the whole model (``layers``: the blocks' path), the keys of
    its shard."""
    return {f"{layers}.{i}.{k}": v for k, v in block.state_dict().items()}


def partial_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".partial")


def run_fingerprint(model: nn.Module, calib: torch.Tensor | None, cfg, reader=None) -> str:
    """What must match for a resume to be exact: architecture, weights (a sample of every tensor,
    from the model or, streaming, from the checkpoint ``reader`` without loading it), calibration
    ids, pipeline settings."""
    h = hashlib.sha256()
    h.update(model.config.to_json_string(use_diff=False).encode())
    if reader is not None:
        folder = reader.folder
        for name in sorted(folder.entries):
            e = folder.entries[name]
            h.update(f"{name}{e.shape}{e.dtype}".encode())
            h.update(folder.read(name).reshape(-1)[:4096].float().numpy().tobytes())
    else:
        for name, p in model.named_parameters():  # a sample of every tensor: another checkpoint differs
            h.update(f"{name}{tuple(p.shape)}".encode())
            h.update(p.detach().reshape(-1)[:4096].float().cpu().numpy().tobytes())
    h.update(repr(cfg).encode())
    if calib is not None:
        h.update(str((tuple(calib.shape), str(calib.dtype))).encode())
        h.update(calib.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_shard(tensors: dict[str, torch.Tensor], path: Path) -> FileEntry:
    """Write one checkpoint shard atomically (synced) and return its size + sha256 for the manifest."""
    _save_atomic(tensors, path)
    return file_digest(path)


def quant_layout(block: nn.Module) -> dict[str, list]:
    """Names and shapes of the block's quantized modules (needed to rebuild them before loading)."""
    experts = {n: [m.num_experts, m.hidden_dim, m.intermediate_dim]
               for n, m in block.named_modules() if isinstance(m, QuantExperts)}
    linears = {n: [m.in_features, m.out_features, m.bias is not None]
               for n, m in block.named_modules()
               if isinstance(m, QuantLinear) and not any(n.startswith(e + ".") for e in experts)}
    return {"linears": linears, "experts": experts}


def rebuild_quant_modules(block: nn.Module, layout: dict[str, dict], quant_cfg) -> None:
    """Swap in empty quantized modules with the recorded shapes (as ``load_quantized`` does)."""
    for name, (i, o, bias) in layout["linears"].items():
        set_module(block, name, QuantLinear(i, o, bias, quant_cfg.weights, quant_cfg.acts))
    for name in layout["experts"]:  # shaped like the fused module still there (biases, expert function)
        set_module(block, name, QuantExperts.like(get_module(block, name), quant_cfg.weights, quant_cfg.acts))


QUANTIZE_START_OVER = "pass --overwrite instead of --resume to start over"


@dataclass
class BlockCheckpoint:
    """Saves each finished block as a shard and restores the state of an interrupted run."""

    root: Path
    fingerprint: str
    quant_cfg: object  # QuantConfig: the specs of rebuilt modules
    layers: str  # the decoder blocks' path in the model ("model.layers"): shard keys are full names
    layouts: list[dict] = field(default_factory=list)
    shards: dict[str, FileEntry] = field(default_factory=dict)
    start_over: str = QUANTIZE_START_OVER  # how the user's command throws the interrupted run away

    @classmethod
    def open(cls, out: str | Path, fingerprint: str, quant_cfg, resume: bool, layers: str,
             start_over: str = QUANTIZE_START_OVER) -> "BlockCheckpoint":
        """``start_over``: the flag that discards the interrupted run in the calling command, named
        in the refusal (without it the two refusals, with and without --resume, point at each other)."""
        root = partial_dir(out)
        if root.exists() and not resume:
            shutil.rmtree(root)
        root.mkdir(parents=True, exist_ok=True)
        return cls(root, fingerprint, quant_cfg, layers, start_over=start_over)

    def _state(self) -> dict | None:
        path = self.root / STATE
        if not path.is_file():
            return None
        try:
            state = json.loads(path.read_text())
        except ValueError as exc:
            raise HaqmoeError(f"{path} is corrupt ({exc}): delete {self.root} to start over") from exc
        if state.get("fingerprint") != self.fingerprint or state.get("version") != VERSION:
            raise HaqmoeError(f"{self.root} belongs to a different run (other model, calibration, options or "
                              f"haqmoe version): rerun with the same options to continue it, or {self.start_over}")
        return state

    def restore(self, blocks: nn.ModuleList, inputs: list | None, gen: torch.Generator | None, report,
                load_blocks: bool = True) -> tuple[int, list | None]:
        """The state of the interrupted run: (first block to do, its inputs). ``load_blocks``: also
        load the finished blocks into ``blocks`` (an in-memory model; streaming leaves them on disk)."""
        state = self._state()
        if state is None or state["done"] == 0:
            return 0, inputs
        done = int(state["done"])
        try:
            for i in range(done):
                name = block_file(i)
                want = FileEntry(**state["shards"][name])
                if (self.root / name).stat().st_size != want.size:
                    raise OSError(f"{name} is truncated")
                if load_blocks:
                    rebuild_quant_modules(blocks[i], state["layouts"][i], self.quant_cfg)
                    prefix = f"{self.layers}.{i}."
                    sd = {k.removeprefix(prefix): v for k, v in load_file(str(self.root / name)).items()}
                    blocks[i].load_state_dict(sd, strict=True)
            acts = load_file(str(self.root / _acts_name(done - 1))) if inputs is not None else None
        except (OSError, RuntimeError, KeyError, TypeError) as exc:
            raise HaqmoeError(f"cannot resume from {self.root}: {str(exc).splitlines()[0][:200]} "
                              f"(delete it to start over)") from exc
        if acts is not None:
            if len(inputs) != int(state["batches"]):
                raise HaqmoeError(f"{self.root}: calibration batches differ from the interrupted run")
            gen.set_state(acts.pop("__generator__"))
            inputs = [(acts[f"hs.{j}"], a, k) for j, (_, a, k) in enumerate(inputs)]
        rep = state["report"]
        report.groups[:] = rep["groups"]
        report.fallbacks[:] = rep["fallbacks"]
        report.seconds = float(rep.get("seconds", 0.0))
        self.layouts = list(state["layouts"])
        self.shards = {k: FileEntry(**v) for k, v in state["shards"].items()}
        return done, inputs

    def save(self, i: int, block: nn.Module, inputs: list | None, gen: torch.Generator | None, report) -> None:
        """Block ``i`` is finished and ``inputs`` are block ``i+1``'s (None: a method without
        calibration): persist, then advance state.json."""
        self.shards[block_file(i)] = write_shard(block_tensors(block, self.layers, i), self.root / block_file(i))
        if inputs is not None:
            acts = {f"hs.{j}": hs for j, (hs, _, _) in enumerate(inputs)}
            acts["__generator__"] = gen.get_state()
            _save_atomic(acts, self.root / _acts_name(i))
        self.layouts = self.layouts[:i] + [quant_layout(block)]
        atomic_write_text(self.root / STATE, json.dumps({
            "version": VERSION, "fingerprint": self.fingerprint, "done": i + 1,
            "batches": 0 if inputs is None else len(inputs), "layouts": self.layouts,
            "shards": {k: v.__dict__ for k, v in self.shards.items()},
            "report": {"groups": report.groups, "fallbacks": report.fallbacks, "seconds": report.seconds}}))
        if i > 0:  # only now is the previous block's activation file no longer needed
            (self.root / _acts_name(i - 1)).unlink(missing_ok=True)
        _fault_point(i)

    def modules(self) -> dict:
        """``haqmoe_quant.json``'s module lists (full names) from the finished blocks' layouts."""
        linears, experts = [], []
        for i, layout in enumerate(self.layouts):
            linears += [f"{self.layers}.{i}.{n}" for n in layout["linears"]]
            experts += [f"{self.layers}.{i}.{n}" for n in layout["experts"]]
        return {"linears": linears, "experts": experts}

    def clear_run_state(self) -> None:
        """Before publishing: only the shards stay (activations and state.json are the run's, not the model's)."""
        for p in list(self.root.glob("acts-*.safetensors")) + [self.root / STATE]:
            p.unlink(missing_ok=True)

    def discard(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _fault_point(block: int) -> None:
    """Fault injection for the kill-then-resume tests: ``HAQMOE_KILL_AFTER_BLOCK=k`` sends this
    process SIGKILL right after block k is checkpointed (a real kill -9: no cleanup runs)."""
    want = os.environ.get("HAQMOE_KILL_AFTER_BLOCK")
    if want is not None and want.strip() == str(block):
        os.kill(os.getpid(), signal.SIGKILL)
