"""Continuous batching over one ``CollaborativeEngine``: requests join and leave a running batch
between decode steps.

One scheduler thread owns the model. Each turn it

1. drops waiting requests that were cancelled or ran past their deadline before they started;
2. admits waiting requests while the batch has room (``max_batch``) and their prompts fit one prefill
   (``prefill_tokens``, at least one request): they are prefilled together in one forward, their
   prompts packed into one sequence with each prompt's own positions under transformers' causal mask
   kept block-diagonal (no prompt sees another's tokens), so every layer's weights are read once for
   all of them and the routed experts see exactly the prompts' tokens (no padding). With
   ``reuse_prefix``, the prefix the prompts share with the last prefilled prompt (a chat template's
   system prompt, say: more than half of a short chat prompt) is not computed again: its keys and
   values are that prompt's, and the prompts' own tokens are packed after it. Only each prompt's last
   position goes through the LM head. Each one's first token is
   sampled and streamed; a request that is not finished by then joins the batch, its keys and values
   cut out of the packed cache;
3. runs one decode step for every running request together: one forward of ``[B, 1]`` tokens over
   one KV cache (transformers' ``DynamicCache``) in which each request's keys and values are
   left-padded to a common length, with an attention mask hiding the padding and per-request
   ``position_ids`` (so RoPE sees each request's own positions);
4. samples each request's next token with its own settings and generator (temperature, top-p,
   seed), streams it, and retires the requests that finished (EOS, a stop string, ``max_new_tokens``)
   or left (``should_stop``: a client disconnect or a deadline); their cache rows are dropped and
   padding columns no remaining request needs are cut.

The routed experts see the batch's tokens together: the MoE block flattens ``[B, 1]`` to B tokens,
so ``HybridExperts`` decides each layer once per step with the number of the batch's tokens routed
to each expert (decide.routed_counts: the cost predictor's ``n_inputs``), as it does for a prefill
(a packed prefill: the joining prompts' tokens together).

Prefills stall the running batch (one forward per turn): ``prefill_tokens`` bounds that stall, and
requests beyond it wait for the next turn, one decode step later.

Attention is transformers' own. Under ``sdpa`` (what checkpoints load with) the scheduler calls it once
per request, on exactly the shapes a lone request's call has: each decode row on its own keys (its
padding cut off), each packed prompt on its own block, causal, with no mask (``ROW_ATTENTION``). One
batched SDPA call over padded or packed keys gives the same values in exact arithmetic but not in the
last bits (the kernel sums in another order), and a model whose activations are quantized per token
turns a last-bit difference into a different rounding of every entry of that token (its scale moves):
on the W8A8 MoEfied model 15 of 24 greedy answers of a batched load differed from their solo runs.
Per request, attention then gives the solo bits, and so do int8 products, norms and the experts,
which work token by token; float matrix products (a router, a float LM head) can still differ in
their last bits with the number of rows they multiply. A prompt prefix reused from the last prompt
(``reuse_prefix``) cannot give the solo bits (its prompt's queries meet keys computed by another
call): it is off by default. Greedy decoding gives each request the tokens it gets alone
(tests/test_batching.py checks it token for token, and the attention bit for bit on a W8A8 model).
A batch of one without padding runs the very call ``stream`` runs.
"""

from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import Executor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import AttentionInterface, AttentionMaskInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import create_causal_mask, sdpa_mask

from ..errors import HaqmoeError
from ..models.base import context_of
from .engine import CollaborativeEngine, Generation, SamplingConfig, TextStream

# Events a request's ``emit`` receives, from the scheduler thread, in this order: ``("admitted", None)``
# once, when its prefill starts; ``("token", (delta, generation))`` per token; then ``("done", generation)``
# (None when it never started: cancelled or expired while waiting) or ``("error", exception)``.
ADMITTED, TOKEN, DONE, ERROR = "admitted", "token", "done", "error"


@dataclass
class BatchRequest:
    ids: torch.Tensor  # prompt token ids [1, n]
    sampling: SamplingConfig
    emit: Callable[[str, object], None]
    should_stop: Callable[[], bool] = lambda: False


@dataclass
class _Row:
    """A running request: its generation so far and what its next decode step needs."""

    req: BatchRequest
    gen: Generation
    rng: torch.Generator
    shown: TextStream
    eos: set[int]
    kv_len: int = 0  # real (unpadded) tokens of this request in the KV cache = its next position

    @property
    def last(self) -> int:
        return self.gen.tokens[-1]


@dataclass
class BatchStats:
    """What the scheduler has done (read by the server's telemetry; plain counters)."""

    steps: int = 0  # batched decode steps
    decode_tokens: int = 0  # tokens those steps produced
    prefills: int = 0
    admitted: int = 0
    retired: int = 0
    decode_s: float = 0.0  # wall time of those steps (sampling and streaming included)
    prefill_s: float = 0.0  # wall time of the prefills (first token included)
    reused_tokens: int = 0  # prompt tokens whose keys and values came from the remembered prompt
    last_batch: int = 0  # requests in the latest decode step
    max_seen: int = 0  # the largest batch so far
    batch_sizes: collections.Counter = field(default_factory=collections.Counter)  # batch size -> steps


PREFILL_TOKENS = 2048  # prompt tokens prefilled together in one forward between two decode steps
REUSE_MIN = 16  # a shared prompt prefix shorter than this is computed again (with reuse_prefix)
ROW_ATTENTION = "haqmoe_rows"  # transformers' sdpa, called per request (row_attention)


def _row_starts(mask: torch.Tensor) -> list[int] | None:
    """Decode (one query per row) over left-padded rows: each row's first real key, or None when some
    row's real keys are not one run to the end."""
    valid = mask[:, 0, 0]  # [B, kv]
    starts = valid.int().argmax(-1)
    if not bool((valid.sum(-1) == valid.shape[-1] - starts).all()):
        return None
    return starts.tolist()


def _blocks(mask: torch.Tensor) -> list[tuple[int, int]] | None:
    """Packed prompts (batch 1, no cache before them): the (start, end) of each prompt, or None unless
    every query sees exactly the keys from its prompt's start to itself."""
    kv = mask.shape[-1]
    if mask.shape[0] != 1 or mask.shape[-2] != kv:
        return None
    valid = mask[0, 0]  # [q, kv]
    first = valid.int().argmax(-1)
    q = torch.arange(kv, device=mask.device)
    if not bool((valid.sum(-1) == q - first + 1).all()) or int(first[0]) != 0:
        return None
    starts = (first == q).nonzero().flatten().tolist()
    blocks = list(zip(starts, starts[1:] + [kv]))
    expected = torch.cat([torch.full((b - a,), a, device=mask.device) for a, b in blocks])
    return blocks if torch.equal(first, expected) else None


_last_plan: tuple[torch.Tensor, list | None] | None = None  # (mask, _row_starts or _blocks of it)


def _plan(mask: torch.Tensor, decode: bool) -> list | None:
    """``_row_starts`` (decode) or ``_blocks`` of ``mask``, read once per forward: every layer gets the
    same mask tensor (kept here, so its identity cannot pass to another tensor)."""
    global _last_plan
    last = _last_plan
    if last is not None and last[0] is mask:
        return last[1]
    plan = _row_starts(mask) if decode else _blocks(mask)
    _last_plan = (mask, plan)
    return plan


def row_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention, called once per request on the shapes a lone request's call has:
    a decode row on its own keys, a packed prompt on its own block with no mask (so SDPA runs causal,
    as for a prompt alone). Any other mask (a reused prefix, a batch of one) goes to SDPA as it is."""
    if attention_mask is not None and attention_mask.dtype == torch.bool and attention_mask.shape[-1] == key.shape[2]:
        if query.shape[2] == 1 and query.shape[0] > 1:
            starts = _plan(attention_mask, decode=True)
            if starts is not None:
                outs = [sdpa_attention_forward(module, query[b:b + 1], key[b:b + 1, :, a:], value[b:b + 1, :, a:],
                                               None, **kwargs)[0] for b, a in enumerate(starts)]
                return torch.cat(outs, dim=0), None
        elif query.shape[2] > 1:
            blocks = _plan(attention_mask, decode=False)
            if blocks is not None:
                outs = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None,
                                               **kwargs)[0] for a, b in blocks]
                return torch.cat(outs, dim=1), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ROW_ATTENTION, row_attention)
AttentionMaskInterface.register(ROW_ATTENTION, sdpa_mask)  # the masks SDPA gets, for row_attention to read


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, heads, T, d]`` keys or values with ``n`` zero positions in front."""
    return t if n == 0 else torch.cat([t.new_zeros(*t.shape[:2], n, *t.shape[3:]), t], dim=2)


def _unpack(t: torch.Tensor, starts: list[int], lengths: list[int], width: int, prefix: int = 0) -> torch.Tensor:
    """Prompts of a packed ``[1, heads, T, d]`` cache tensor (the first ``prefix`` positions shared, then
    each prompt's own ``n - prefix`` from ``starts``) as ``[k, heads, width, d]`` rows, left-padded."""
    rows = [torch.cat([t[:, :, :prefix], t[:, :, a:a + n - prefix]], dim=2) for a, n in zip(starts, lengths)]
    return torch.cat([_pad_left(r, width - int(r.shape[2])) for r in rows], dim=0)


def take_for_prefill(lengths: list[int], room: int, budget: int) -> int:
    """How many of the waiting prompts (``lengths``, in arrival order) join in this turn's prefill: at
    most ``room``, and while their tokens fit ``budget`` (the first one always, however long)."""
    n, total = 0, 0
    while n < min(room, len(lengths)) and (n == 0 or total + lengths[n] <= budget):
        total += lengths[n]
        n += 1
    return n


def check_batchable(engine: CollaborativeEngine, max_batch: int) -> None:
    """Batching needs the eager decode over a ``DynamicCache`` of full-attention layers."""
    if max_batch < 1:
        raise HaqmoeError(f"--max-batch must be at least 1 (got {max_batch})")
    if max_batch == 1:
        return
    if engine._decode is not None:
        raise HaqmoeError("--compile decodes one request over a static KV cache: use --max-batch 1 with it")
    if "sliding_attention" in (getattr(engine.model.config, "layer_types", None) or ()):
        raise HaqmoeError(f"{engine.lm.name} has sliding-window attention layers, which batched decoding does not "
                          "support yet: use --max-batch 1")


class BatchScheduler:
    """Runs requests on ``engine`` in a continuously refilled batch of at most ``max_batch``."""

    def __init__(self, engine: CollaborativeEngine, max_batch: int = 8, prefill_tokens: int = PREFILL_TOKENS,
                 reuse_prefix: bool = False, executor: Executor | None = None):
        """``executor``: a one-thread executor to run the loop on, the thread that loaded the engine's
        model (serve/app.py says why); default: a thread of its own."""
        check_batchable(engine, max_batch)
        self.engine, self.max_batch = engine, max_batch
        self.prefill_tokens = prefill_tokens  # prompt tokens prefilled together between two decode steps
        self.reuse_min = REUSE_MIN if reuse_prefix else 0  # shortest shared prefix taken from the last prompt
        self._prefix: tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]] | None = None
        self.model = engine.model
        self.device = engine.device
        self.context = context_of(self.model.config)
        self.eos = engine.eos_ids()
        self.stats = BatchStats()
        self._waiting: collections.deque[BatchRequest] = collections.deque()
        self._rows: list[_Row] = []
        self._cache = None  # DynamicCache [B, heads, T, d] per layer, left-padded
        self._mask: torch.Tensor | None = None  # [B, T]: 1 where a row's cache position is real
        self._cv = threading.Condition()
        self._closed = False
        self._attention = self.model.config._attn_implementation
        if self._attention == "sdpa" and max_batch > 1:  # SDPA per request: the batch's answers are the solo ones
            self.model.set_attn_implementation(ROW_ATTENTION)
        self._loop_ident: int | None = None  # the thread running _loop
        self._thread: threading.Thread | None = None
        if executor is None:
            self._thread = threading.Thread(target=self._loop, name="haqmoe-batch", daemon=True)
            self._thread.start()
        else:
            self._done = executor.submit(self._loop)

    # -------------------------------------------------------------- public
    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._rows)

    def submit(self, req: BatchRequest) -> None:
        with self._cv:
            if self._closed:
                raise HaqmoeError("the batch scheduler is closed")
            self._waiting.append(req)
            self._cv.notify()

    def close(self, timeout: float | None = 10.0) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        if threading.get_ident() != self._loop_ident:
            if self._thread is not None:
                self._thread.join(timeout)
            else:
                wait_for([self._done], timeout)
        if self.model.config._attn_implementation == ROW_ATTENTION:
            self.model.set_attn_implementation(self._attention)

    # -------------------------------------------------------------- the loop
    def _loop(self) -> None:
        self._loop_ident = threading.get_ident()
        while True:
            with self._cv:
                while not self._closed and not self._waiting and not self._rows:
                    self._cv.wait()
                if self._closed:
                    break
                lengths = [int(r.ids.shape[1]) for r in self._waiting]
                n = take_for_prefill(lengths, self.max_batch - len(self._rows), self.prefill_tokens)
                take = [self._waiting.popleft() for _ in range(n)]
            try:
                with torch.inference_mode():
                    if take:
                        self._admit(take)
                    if self._rows:
                        self._decode_step()
            except BaseException as exc:  # a failed batched forward: every running request gets the error
                rows, self._rows, self._cache, self._mask = self._rows, [], None, None
                for row in rows:
                    self._safe_emit(row.req, ERROR, exc)
                self.stats.retired += len(rows)
        for req in list(self._waiting) + [r.req for r in self._rows]:
            self._safe_emit(req, ERROR, HaqmoeError("the server is shutting down"))

    @staticmethod
    def _safe_emit(req: BatchRequest, kind: str, payload) -> None:
        try:
            req.emit(kind, payload)
        except Exception:  # a listener that is gone (closed event loop) must not stop the batch
            pass

    def _start(self, req: BatchRequest) -> _Row | None:
        """The request's row, or None when it does not start (cancelled or expired while waiting, or too
        long for the model's context: told so, the others go on)."""
        if req.should_stop():
            self._safe_emit(req, DONE, None)
            return None
        self._safe_emit(req, ADMITTED, None)
        n, s = int(req.ids.shape[1]), req.sampling
        if self.context and n + s.max_new_tokens > self.context:
            self.stats.retired += 1
            self._safe_emit(req, ERROR, HaqmoeError(
                f"prompt ({n} tokens) + max tokens ({s.max_new_tokens}) exceeds the model's context of "
                f"{self.context} tokens"))
            return None
        return _Row(req, Generation(prompt_tokens=n), torch.Generator().manual_seed(s.seed), TextStream(s.stop),
                    self.eos, kv_len=n)

    def _admit(self, reqs: list[BatchRequest]) -> None:
        """Prefill ``reqs`` together, stream each one's first token and join the unfinished to the batch.
        A failed prefill fails these requests only: the running batch goes on."""
        rows = [row for row in map(self._start, reqs) if row is not None]
        if not rows:
            return
        try:
            t0 = time.perf_counter()
            self.engine.telemetry.step += 1
            logits, cache, prefix = self._prefill([r.req.ids for r in rows])
            self.engine._sync()
            ms = 1e3 * (time.perf_counter() - t0)
            self.stats.prefills += 1
            self.stats.admitted += len(rows)
            joining = []
            for i, row in enumerate(rows):
                row.gen.prefill_ms = ms
                if self._take_token(row, logits[i]):
                    self.stats.retired += 1
                    self._safe_emit(row.req, DONE, row.gen)
                else:
                    joining.append(i)
            self.stats.prefill_s += time.perf_counter() - t0
        except Exception as exc:
            self.stats.retired += len(rows)
            for row in rows:
                self._safe_emit(row.req, ERROR, exc)
            return
        if joining:
            lengths = [r.kv_len for r in rows]
            self._join([rows[i] for i in joining], cache, self._as_rows(cache, lengths, joining, prefix))

    def _prefill(self, prompts: list[torch.Tensor]) -> tuple[torch.Tensor, object, int]:
        """One forward over the prompts ([1, n] ids each): (each one's last-position logits [k, vocab],
        the KV cache, the prefix length p taken from the remembered prompt). A lone prompt without a
        reusable prefix: ``CollaborativeEngine.stream``'s call. Otherwise the prompts after their first
        p tokens are packed into one sequence, each with its own positions, over a cache holding the
        prefix, under transformers' causal mask narrowed so that no prompt sees another's tokens; the
        cache then holds the prefix and the packed rest (``_as_rows``)."""
        lengths = [int(x.shape[1]) for x in prompts]
        p = self._reusable_prefix(prompts)
        if len(prompts) == 1 and p == 0:
            out = self.model(input_ids=prompts[0].to(self.device), use_cache=True, logits_to_keep=1)
            self._remember(prompts[0], out.past_key_values)
            return out.logits[:, -1], out.past_key_values, 0
        past = self._prefix_cache(p) if p else None
        ids = torch.cat([x[0, p:] for x in prompts]).unsqueeze(0).to(self.device)
        pos = torch.cat([torch.arange(p, n) for n in lengths]).unsqueeze(0).to(self.device)
        owner = torch.cat([torch.full((p,), -1)] + [torch.full((n - p,), i) for i, n in enumerate(lengths)])
        owner = owner.to(self.device)  # by cache position: the prompt it belongs to (-1: the shared prefix)

        def own_prompt(batch_idx, head_idx, q_idx, kv_idx):
            return (owner[kv_idx] < 0) | (owner[kv_idx] == owner[q_idx])

        shape = torch.empty(1, ids.shape[1], 0, dtype=self.model.dtype, device=self.device)  # sizes and dtype only
        # Without a cache transformers finds the prompts from the position resets itself (and then hands mask
        # functions positions, not indices); over a cache it does not: the narrowing is ours.
        mask = create_causal_mask(config=self.model.config, inputs_embeds=shape, attention_mask=None,
                                  past_key_values=past, position_ids=pos,
                                  and_mask_function=own_prompt if past is not None else None)
        if mask is None:  # an attention implementation that takes packing from position ids alone
            raise HaqmoeError(f"{self.engine.lm.name}'s attention implementation takes no packed-sequence mask: "
                              "use --max-batch 1")
        last = torch.tensor([n - p for n in lengths], device=self.device).cumsum(0) - 1  # each prompt's last token
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True,
                         logits_to_keep=last)
        self.stats.reused_tokens += p * len(prompts)
        self._remember(prompts[0], out.past_key_values)  # the first prompt directly follows the prefix
        return out.logits[0], out.past_key_values, p

    def _reusable_prefix(self, prompts: list[torch.Tensor]) -> int:
        """Tokens every prompt shares with the remembered one (a chat template's system prompt, say), when
        at least ``reuse_min`` (0: none); each prompt keeps one token of its own to compute."""
        if self._prefix is None or not self.reuse_min:
            return 0
        known, p = self._prefix[0], min(int(x.shape[1]) - 1 for x in prompts)
        for x in prompts:
            ids = x[0, :min(p, len(known))]
            diff = (ids != known[:len(ids)]).nonzero()
            p = min(p, len(ids) if len(diff) == 0 else int(diff[0]))
        return p if p >= self.reuse_min else 0

    def _remember(self, prompt: torch.Tensor, cache) -> None:
        """Keep a prompt's ids and keys and values (the first ``n`` positions of ``cache``) for
        ``_reusable_prefix``."""
        if self.reuse_min:
            n = int(prompt.shape[1])
            self._prefix = (prompt[0].to(self.device), [(l.keys[:, :, :n], l.values[:, :, :n]) for l in cache.layers])

    def _prefix_cache(self, p: int) -> DynamicCache:
        """A cache holding the remembered prompt's first ``p`` positions (the tensors are shared, not copied:
        the forward appends by concatenation)."""
        cache = DynamicCache(config=self.model.config)
        for i, (keys, values) in enumerate(self._prefix[1]):
            cache.update(keys[:, :, :p], values[:, :, :p], i)
        return cache

    def _as_rows(self, cache, lengths: list[int], picked: list[int], prefix: int = 0) -> torch.Tensor:
        """Turn a prefill's cache (the shared ``prefix`` then the packed rest, when it held several prompts
        of ``lengths``) into batch rows of the prompts ``picked``, in place: ``[k, heads, width, d]``,
        left-padded. Returns their mask [k, width]."""
        keep = [lengths[i] for i in picked]
        width = max(keep)
        if len(lengths) > 1:
            starts = [prefix + sum(lengths[:i]) - i * prefix for i in picked]
            for layer in cache.layers:
                layer.keys = _unpack(layer.keys, starts, keep, width, prefix)
                layer.values = _unpack(layer.values, starts, keep, width, prefix)
        return torch.tensor([[0] * (width - n) + [1] * n for n in keep], dtype=torch.long, device=self.device)

    def _take_token(self, row: _Row, logits: torch.Tensor) -> bool:
        """Sample, stream and record one token of ``row``; True when the request is finished (the same
        rules, in the same order, as ``CollaborativeEngine.stream``)."""
        s, gen = row.req.sampling, row.gen
        tok = self.engine._sample(logits, s, row.rng)
        gen.tokens.append(tok)
        ended = tok in row.eos
        last = ended or len(gen.tokens) == s.max_new_tokens
        tokenizer = self.engine.tokenizer
        decoded = tokenizer.decode(gen.tokens, skip_special_tokens=True) if tokenizer else ""
        delta, stopped = row.shown.push(decoded, final=last)
        gen.text = row.shown.text
        if ended or stopped:
            gen.finish_reason = "stop"
        self._safe_emit(row.req, TOKEN, (delta, gen))
        return ended or stopped or last or row.req.should_stop()

    def _join(self, rows: list[_Row], cache, mask: torch.Tensor) -> None:
        """Add prefilled rows (their KV cache in row form, ``mask`` [k, width]) to the batch's, left-padding
        whichever is shorter."""
        if self._cache is None:
            self._cache, self._mask, self._rows = cache, mask, rows
            return
        have, n = int(self._mask.shape[1]), int(mask.shape[1])
        width = max(have, n)
        if len(self._cache.layers) != len(cache.layers):
            raise HaqmoeError("a request's KV cache does not match the batch's (different layer count)")
        merged = [(torch.cat([_pad_left(mine.keys, width - have), _pad_left(new.keys, width - n)], dim=0),
                   torch.cat([_pad_left(mine.values, width - have), _pad_left(new.values, width - n)], dim=0))
                  for mine, new in zip(self._cache.layers, cache.layers)]  # all built before any is replaced
        for mine, (keys, values) in zip(self._cache.layers, merged):
            mine.keys, mine.values = keys, values
        self._mask = torch.cat([torch.nn.functional.pad(self._mask, (width - have, 0)),
                                torch.nn.functional.pad(mask, (width - n, 0))], dim=0)
        self._rows = self._rows + rows

    def _decode_step(self) -> None:
        """One forward for every running request; then sample, stream, retire."""
        rows = self._rows
        leave = [i for i, r in enumerate(rows) if r.req.should_stop()]  # left since their last token
        if leave:
            self._retire(set(leave))
            rows = self._rows
            if not rows:
                return
        b = len(rows)
        t = time.perf_counter()
        self.engine.telemetry.step += 1
        ids = torch.tensor([[r.last] for r in rows], device=self.device)
        if b == 1 and bool(self._mask.all()):  # one request, no padding: exactly the single-request call
            out = self.model(input_ids=ids, past_key_values=self._cache, use_cache=True)
        else:
            self._mask = torch.cat([self._mask, torch.ones(b, 1, dtype=torch.long, device=self.device)], dim=1)
            pos = torch.tensor([[r.kv_len] for r in rows], device=self.device)
            out = self.model(input_ids=ids, attention_mask=self._mask, position_ids=pos,
                             past_key_values=self._cache, use_cache=True)
        if self._mask.shape[1] < self._cache.get_seq_length():  # the single-request call grew the cache
            self._mask = torch.cat([self._mask, torch.ones(b, 1, dtype=torch.long, device=self.device)], dim=1)
        logits = out.logits[:, -1]
        self.engine._sync()
        ms = 1e3 * (time.perf_counter() - t)
        self.stats.steps += 1
        self.stats.decode_tokens += b
        self.stats.last_batch = b
        self.stats.max_seen = max(self.stats.max_seen, b)
        self.stats.batch_sizes[b] += 1
        done = set()
        for i, row in enumerate(rows):
            row.kv_len += 1
            row.gen.token_ms.append(ms)
            if self._take_token(row, logits[i]):
                done.add(i)
        self.stats.decode_s += time.perf_counter() - t
        if done:
            self._retire(done)

    def _retire(self, gone: set[int]) -> None:
        """Finish the rows ``gone`` and drop them from the cache; cut padding nobody needs any more."""
        for i in sorted(gone):
            self._safe_emit(self._rows[i].req, DONE, self._rows[i].gen)
        self.stats.retired += len(gone)
        keep = [i for i in range(len(self._rows)) if i not in gone]
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        index = torch.tensor(keep, device=self.device)
        self._mask = self._mask[index]
        cut = int((self._mask.shape[1] - self._mask.sum(dim=1)).min())  # leading columns all rows pad
        self._mask = self._mask[:, cut:]
        for layer in self._cache.layers:
            layer.keys = layer.keys[index, :, cut:]
            layer.values = layer.values[index, :, cut:]
