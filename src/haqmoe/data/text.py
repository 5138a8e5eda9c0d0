"""Text sources, the standard perplexity windows, and a seeded calibration sampler.

Source specs (one string, so the CLI and configs stay simple):

- ``wikitext2:test`` / ``wikitext2:valid`` / ``wikitext2:train`` — raw WikiText-2 from the local
  data folder (``$HAQMOE_DATA`` or ``../shared/data``), else from Hugging Face datasets.
- ``wikitext2-tokens:test`` / ``:valid`` — the tokenized (``<unk>``) WikiText-2 files.
- ``c4`` — the C4 validation shard from Hugging Face datasets (needs network).
- ``pydoc`` — Python's own ``pydoc_data.topics``: always available offline.
- any file path — read as UTF-8 text.

Perplexity protocol (GPTQ/LLMC): ``"\\n\\n".join(rows)``, tokenize once, ``numel // seqlen``
non-overlapping windows. WikiText rows are rebuilt as the HF dataset has them (blank lines as
empty rows, text lines with their trailing newline), so numbers match the usual tables. Tokenized
without special tokens: SmolLM2's tokenizer adds none anyway; Llama/Mixtral tokenizers would put one
BOS before the first window in the GPTQ scripts, shifting every window by a token (not done here).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import HaqmoeError
from ..models.base import require_tokenizer
from ..paths import shared_data_dir

WIKITEXT_FILES = {
    "test": "wikitext-2-raw/original-layout/wiki.test.raw",
    "valid": "wikitext-2-raw/wiki.valid.raw",
    "train": "wikitext-2-raw/wiki.train.raw",
}
TOKEN_FILES = {"test": "wikitext-2-tokens/test.txt", "valid": "wikitext-2-tokens/valid.txt"}


def wikitext_rows(raw: str) -> list[str]:
    """Rows as the HF ``wikitext-2-raw-v1`` dataset stores them."""
    lines = raw.replace("\r\n", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return ["" if not line.strip() else line + "\n" for line in lines]


def _local(rel: str) -> Path | None:
    root = shared_data_dir()
    path = root / rel if root else None
    return path if path is not None and path.is_file() else None


def _hf_rows(name: str, config: str | None, split: str, column: str = "text", limit: int | None = None) -> list[str]:
    try:
        import datasets  # optional: the 'hub' extra
    except ImportError as exc:
        raise HaqmoeError(f"'{name}' is not available locally and the 'datasets' package is not installed "
                          "(pip install 'haqmoe[hub]')") from exc
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # network / hub errors come in many types
        raise HaqmoeError(f"cannot load dataset {name}/{config} ({split}): {str(exc).splitlines()[0]}") from exc
    rows = ds[column]
    return rows[:limit] if limit else rows


_SPLIT_NAMES = {Path(f).name: split for files in (WIKITEXT_FILES, TOKEN_FILES) for split, f in files.items()}


def source_key(spec: str) -> str:
    """A normalised identity of a text source, to refuse calibrating on evaluation text: a WikiText-2
    split is one source whatever names it (``wikitext2`` = its test split, the ``-tokens`` variant, a
    local copy of its file)."""
    name, _, split = spec.strip().lower().partition(":")
    if name in ("wikitext2", "wikitext2-tokens"):
        return f"wikitext2:{split or 'test'}"
    path = Path(spec).expanduser()
    if not path.exists():
        return spec.strip().lower()
    resolved = path.resolve()  # the data folder's own files are named like this too
    if resolved.name in _SPLIT_NAMES and "wikitext" in str(resolved).lower():
        return f"wikitext2:{_SPLIT_NAMES[resolved.name]}"
    return str(resolved)


def load_text(spec: str) -> str:
    """Resolve a source spec to one string (already joined by the protocol's separator)."""
    name, _, split = spec.partition(":")
    if name == "pydoc":
        from pydoc_data.topics import topics  # a 1 MB module, read only for this text source

        return "\n\n".join(topics[k] for k in sorted(topics))
    if name == "wikitext2":
        split = split or "test"
        if split not in WIKITEXT_FILES:
            raise HaqmoeError(f"wikitext2 split must be one of {', '.join(WIKITEXT_FILES)}, got '{split}'")
        local = _local(WIKITEXT_FILES[split])
        rows = (wikitext_rows(local.read_text(encoding="utf-8")) if local
                else _hf_rows("wikitext", "wikitext-2-raw-v1", {"valid": "validation"}.get(split, split)))
        return "\n\n".join(rows)
    if name == "wikitext2-tokens":
        split = split or "test"
        local = _local(TOKEN_FILES.get(split, ""))
        if local is None:
            raise HaqmoeError(f"tokenized WikiText-2 '{split}' not found in the data folder")
        return "\n\n".join(wikitext_rows(local.read_text(encoding="utf-8")))
    if name == "c4":
        return "\n\n".join(_hf_rows("allenai/c4", "en", "validation", limit=3000))
    path = Path(spec).expanduser()
    if not path.is_file():
        raise HaqmoeError(f"text source '{spec}' not found (a file path, wikitext2:SPLIT, "
                          "wikitext2-tokens:SPLIT, c4 or pydoc)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise HaqmoeError(f"{path} is not UTF-8 text") from exc
    if not text.strip():
        raise HaqmoeError(f"text file {path} is empty")
    return text


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids [1, N] of the whole text, tokenized once."""
    require_tokenizer(tokenizer)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    if ids.numel() == 0:
        raise HaqmoeError("the text produced no tokens")
    return ids


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [n, seqlen]; the tail shorter than a window is dropped."""
    n = ids.numel() // seqlen
    if n == 0:
        raise HaqmoeError(f"text has {ids.numel()} tokens, shorter than one window of {seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids.reshape(-1)[: n * seqlen].reshape(n, seqlen)


def sample_windows(ids: torch.Tensor, n: int, length: int, seed: int) -> torch.Tensor:
    """GPTQ-style calibration: ``n`` random windows of ``length`` tokens, seeded."""
    flat = ids.reshape(-1)
    if flat.numel() <= length:
        raise HaqmoeError(f"calibration text has {flat.numel()} tokens; need more than {length} "
                          f"for {n} samples of {length}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, flat.numel() - length, (n,), generator=g)
    return torch.stack([flat[s: s + length] for s in starts.tolist()])


def calibration_ids(tokenizer, spec: str, n: int, length: int, seed: int,
                    eval_spec: str | None = None) -> torch.Tensor:
    """Calibration windows from ``spec``; refuses the evaluation text itself."""
    if eval_spec is not None and source_key(spec) == source_key(eval_spec):
        raise HaqmoeError(f"calibration text '{spec}' is the evaluation text: calibrate on other data "
                          "(e.g. wikitext2:valid when evaluating on wikitext2:test)")
    return sample_windows(tokenize(tokenizer, load_text(spec)), n, length, seed)
