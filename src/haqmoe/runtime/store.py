"""Expert store: host copies of every routed expert, plus the GPU slot buffers the cache fills.

(The CPU tier needs no store: an expert runs through its own experts module, in whatever
precision the model was loaded — float, fake-quant, dequant-once or real int8 — restricted to
the tokens routed to it, so CPU results are exactly the plain model's. The one exception is the
CPU part of a split miss, a range of gate/up rows, computed here from the host copy.)

GPU tier: preallocated slot buffers (no allocation per transfer) hold experts in their transfer
format — int8 weights + scales/zero points (+ int32 column sums) for quantized models (4x fewer
bytes than fp32 over PCIe), float weights otherwise. The host side is the model's own tensors, not
a copy: one host copy of every expert, which the CPU tier computes from too (a CPU tier converted
to the int8 GEMM is read through views of its packed weights). When CUDA is present
that memory is page-locked in place (``cudaHostRegister``, exactly its size: ``pin_memory()`` would
copy it into the caching host allocator, which rounds each block up to a power of two) so the
host-to-device copies run asynchronously on a side stream. Quantized slots run either on the
int8 GEMM (exec/int8.py) or dequantized per call (fake-quant arithmetic). An emulated GPU tier
computes as the CPU tier beside it does (the engine's choice), so residency never changes an answer;
on CUDA the engine measures both at start-up and keeps the faster (eager int8 is launch-bound: it
wins at Mixtral's shape, loses on small models). Decode (one token) on CUDA then replays one CUDA
graph per slot instead of launching ~80 small kernels per expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..costs.curves import SPLIT_STEPS
from ..costs.shapes import LOW_BITS, LOW_GROUP, int4_bytes
from ..exec.int8 import Int8Experts, QuantAct, cpu_kernel, quantize_tokens, w8a8_linear, weight_terms
from ..models.adapters import FusedExperts, expert_glu
from ..quant.modules import QuantExperts
from ..quant.quantizer import QuantSpec, compute_qparams, dequantize, fake_quant, quantize

_PARTS = ("gate", "up", "down")


def _is_quant(experts: nn.Module) -> bool:
    return isinstance(experts, (QuantExperts, Int8Experts))


def _specs(experts: nn.Module) -> tuple[QuantSpec | None, QuantSpec | None]:
    """(weight spec, activation spec) of quantized experts; (None, None) for float ones."""
    if isinstance(experts, Int8Experts):
        return experts.w_spec, experts.a_spec
    if isinstance(experts, QuantExperts):
        return experts.gate[0].w_spec, experts.gate[0].a_spec
    return None, None


def _int8_host(experts: Int8Experts, e: int, int8_terms: bool) -> dict[str, torch.Tensor]:
    """``_host_tensors`` of a CPU tier converted to the int8 GEMM: VIEWS of its packed weights (gate
    and up are the two row halves of the fused gate/up weight), so the CPU tier and the GPU tier's
    transfers read one host copy. Only the per-channel float zero points are small new tensors.
    Widths that ``pack_weight`` had to pad make the views strided, and the store then copies them."""
    hid, inter = experts.hidden_dim, experts.intermediate_dim
    gate_up, down = experts.packed("gate_up", e), experts.packed("down", e)
    out = {}
    for part, (w, scale, zero, colsum), rows, k in (("gate", gate_up, slice(0, inter), hid),
                                                    ("up", gate_up, slice(inter, 2 * inter), hid),
                                                    ("down", down, slice(0, hid), inter)):
        n = rows.stop - rows.start
        zi = zero[rows] if zero is not None else torch.zeros(n, dtype=torch.int32, device=w.device)
        out[f"{part}.q"], out[f"{part}.s"] = w[rows, :k], scale[rows].reshape(-1, 1)
        out[f"{part}.z"] = zi.reshape(-1, 1).to(torch.float32)
        if int8_terms:
            out[f"{part}.c"], out[f"{part}.zi"] = colsum[rows], zi
    if experts.gate_up_bias is not None:
        out["gate.b"], out["up.b"] = experts.gate_up_bias[e].split(inter)
        out["down.b"] = experts.down_bias[e]
    return out


def _host_tensors(experts: nn.Module, e: int, int8_terms: bool) -> dict[str, torch.Tensor]:
    """One expert's weights in transfer format (what a slot holds). For the int8 GEMM also the
    weight's column sums and integer zero points, derived once here instead of on every call.
    Biased experts (gpt-oss) add ``gate.b``, ``up.b`` and ``down.b`` (float). Float experts are in
    nn.Linear layout: a transposed fused layout (gpt-oss) gets its own host copy here."""
    if isinstance(experts, Int8Experts):
        return _int8_host(experts, e, int8_terms)
    if isinstance(experts, QuantExperts):
        out = {}
        for part in _PARTS:
            lin = getattr(experts, part)[e]
            out[f"{part}.q"], out[f"{part}.s"], out[f"{part}.z"] = lin.qweight, lin.w_scale, lin.w_zero
            if int8_terms:
                out[f"{part}.c"], out[f"{part}.zi"] = weight_terms(lin.qweight, lin.w_zero)
            if lin.bias is not None:
                out[f"{part}.b"] = lin.bias
        return out
    w = FusedExperts.get(experts, e)
    out = {"gate": w.gate.detach(), "up": w.up.detach(), "down": w.down.detach()}
    if w.gate_bias is not None:
        out.update({"gate.b": w.gate_bias.detach(), "up.b": w.up_bias.detach(), "down.b": w.down_bias.detach()})
    return out


_ALREADY_REGISTERED = 712  # cudaErrorHostMemoryAlreadyRegistered: another view of the storage pinned it


def pin_in_place(t: torch.Tensor) -> torch.Tensor:
    """``t`` page-locked where it lies (its storage registered with CUDA, exactly its size), so the
    store and the CPU tier share it; a copy into pinned memory only where registering fails. Views
    of one storage (an int8 CPU tier's gate and up rows) register it once."""
    t = t.contiguous()
    if t.is_pinned():
        return t
    storage = t.untyped_storage()
    status = torch.cuda.cudart().cudaHostRegister(storage.data_ptr(), storage.nbytes(), 0)
    if int(getattr(status, "value", status)) not in (0, _ALREADY_REGISTERED):
        return t.pin_memory()
    return t


def expert_transfer_bytes(experts: nn.Module) -> int:
    """Bytes one expert takes in a GPU slot (its transfer format, int8 GEMM terms included)."""
    return sum(t.numel() * t.element_size() for t in _host_tensors(experts, 0, _is_quant(experts)).values())


def _rows_from(key: str, rows: int) -> slice:
    """What a split copies and the GPU computes of one tensor: gate/up rows from ``rows`` on, all of down."""
    return slice(None) if key.startswith("down") else slice(rows, None)


@dataclass
class StoreConfig:
    device: str = "cpu"  # where GPU-tier slots live ("cuda", or "cpu" to exercise the path without a GPU)
    num_slots: int = 0
    pin_memory: bool = True
    int8_gemm: bool | None = None  # quantized slots on the int8 GEMM (None: on CUDA only, where the
    # engine then keeps whichever of int8 and per-call dequantization runs faster)
    split_slots: int = 0  # scratch slots for split misses (decision ``split``), outside the cache


class ExpertStore:
    def __init__(self, experts_by_layer: list[nn.Module], cfg: StoreConfig):
        self.layers = experts_by_layer
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        first = experts_by_layer[0]
        self.quantized = _is_quant(first)
        self.glu = expert_glu(first)
        self.w_spec, self.a_spec = _specs(first)
        gemm = cfg.int8_gemm if cfg.int8_gemm is not None else self.device.type == "cuda"
        # W8A8 per channel with dynamic 8-bit activations runs on the int8 GEMM: always for the CPU part
        # of a split (dequantizing rows per call would cost the CPU 4x the bytes), by choice on the slots
        self.int8_capable = bool(self.quantized and self.a_spec is not None and self.a_spec.dynamic
                                 and self.a_spec.bits == 8 and self.w_spec.granularity == "channel")
        self.int8_gemm = bool(gemm and self.int8_capable)
        pin = cfg.pin_memory and self.device.type == "cuda"
        self.host = [[{k: (pin_in_place(v) if pin else v.contiguous())
                       for k, v in _host_tensors(m, e, self.int8_capable).items()}
                      for e in range(FusedExperts.count(m))] for m in experts_by_layer]
        template = self.host[0][0]
        self.bias = "gate.b" in template
        self.intermediate = int(template["gate.q" if self.quantized else "gate"].shape[0])
        self.slots = {k: torch.empty((cfg.num_slots + cfg.split_slots, *v.shape), dtype=v.dtype, device=self.device)
                      for k, v in template.items()}
        self.expert_bytes = sum(v.numel() * v.element_size() for v in template.values())
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._pending: list = []  # CUDA events of copies not known to be done (copies_in_flight)
        self._graphs: dict[int, tuple] = {}  # slot -> (graph, static input, static output), one token
        self._split_graphs: dict[tuple[int, int], tuple] = {}  # (split slot, rows) -> (graph, x, h_cpu, output)
        self._graphs_int8: bool | None = None  # the precision the graphs were recorded in

    # --------------------------------------------------------------------- GPU tier
    def load_slot(self, slot: int, layer: int, e: int, rows_from: int = 0):
        """Copy an expert into a slot (async on the side stream when on CUDA); returns an event or None.
        ``rows_from`` > 0: only what the GPU part of a split needs (gate/up rows from there on, down)."""
        src = self.host[layer][e]
        parts = [(buf[slot], src[k], _rows_from(k, rows_from)) for k, buf in self.slots.items()]
        if self.stream is None:
            for dst, t, rows in parts:
                dst[rows].copy_(t[rows])
            return None
        with torch.cuda.stream(self.stream):
            for dst, t, rows in parts:
                dst[rows].copy_(t[rows], non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        if len(self._pending) >= 32:
            self.copies_in_flight()  # drop finished events so the list stays short
        self._pending.append(event)
        return event

    def copied_bytes(self, rows_from: int) -> int:
        """Bytes ``load_slot(..., rows_from)`` copies."""
        return sum(t[_rows_from(k, rows_from)].numel() * t.element_size() for k, t in self.host[0][0].items())

    def split_rows(self, k: int) -> int:
        """Gate/up rows the CPU computes in a split at k / SPLIT_STEPS."""
        return self.intermediate * k // SPLIT_STEPS

    def split_slot(self, i: int) -> int:
        """The i-th scratch slot of split misses (after the cache's slots)."""
        if not 0 <= i < self.cfg.split_slots:
            raise IndexError(f"split slot {i} of {self.cfg.split_slots}")
        return self.cfg.num_slots + i

    def copies_in_flight(self) -> int:
        """Host-to-device copies queued and not finished yet (0 without CUDA: copies are synchronous)."""
        self._pending = [ev for ev in self._pending if not ev.query()]
        return len(self._pending)

    def _weight(self, get, part: str, dtype: torch.dtype) -> torch.Tensor:
        if not self.quantized:
            return get(part)
        q, s, z = (get(f"{part}.{t}") for t in "qsz")
        if dtype != torch.float32 and self.w_spec.granularity == "channel":
            # 16-bit GPU tier: three elementwise kernels in the model dtype instead of an fp32 round trip
            return q.to(dtype).sub_(z.to(dtype)).mul_(s.to(dtype))
        return dequantize(q, s, z, self.w_spec, dtype)

    def _lin(self, x: torch.Tensor, get, part: str, int8: bool, act: QuantAct | None = None) -> torch.Tensor:
        """``get(key)``: the tensors to use (a slot's, or host rows). ``act``: ``x`` already quantized
        (int8 GEMM only), so gate and up quantize their input once."""
        b = get(f"{part}.b") if self.bias else None
        if int8:  # W8A8 on the int8 GEMM, float32 out
            q, s, zi, c = (get(f"{part}.{t}") for t in ("q", "s", "zi", "c"))
            y = w8a8_linear(x, q, s.reshape(-1), None if self.w_spec.symmetric else zi, c, q.shape[1],
                            self.a_spec, act=act)
            return y if b is None else y + b.float()
        w = self._weight(get, part, x.dtype)
        if self.a_spec is not None:
            x = fake_quant(x, self.a_spec)
        return nn.functional.linear(x.to(w.dtype), w, None if b is None else b.to(w.dtype))

    def _gate_up(self, x: torch.Tensor, get, int8: bool) -> torch.Tensor:
        act = None  # the fused CPU kernel quantizes inside; else gate and up share one quantization
        if int8 and cpu_kernel(x.device, x.shape[-1]) is None:
            act = quantize_tokens(x, self.a_spec, need_rowsum=not self.w_spec.symmetric)
        return self.glu(self._lin(x, get, "gate", int8, act), self._lin(x, get, "up", int8, act))

    def _slot(self, slot: int):
        return lambda key: self.slots[key][slot]

    def _forward(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        get = self._slot(slot)
        return self._lin(self._gate_up(x, get, self.int8_gemm), get, "down", self.int8_gemm).to(x.dtype)

    # --------------------------------------------------------- low-precision copies (miss levers)
    def build_low(self, bits: int = LOW_BITS, group: int = LOW_GROUP) -> None:
        """A second host copy of every expert in ``bits``-bit integers with a scale and zero point per
        group of ``group`` input columns (asymmetric; the largest of group, group/2, ... that divides a
        matrix's input width), quantized from the weights as the store holds them (float, or int8
        dequantized). A ``low`` miss runs on the CPU from it, dequantized per call (docs/design.md, Miss
        levers). Stored one integer per byte here; ``low_bytes`` counts two per byte (a packed kernel's)."""
        self.low: list[list[dict[str, torch.Tensor]]] = []
        self.low_specs: dict[str, QuantSpec] = {}
        self.low_bytes = 0
        for layer in self.host:
            out = []
            for src in layer:
                d = {}
                for part in _PARTS:
                    w = self._weight(lambda key: src[key], part, torch.float32)
                    g = group
                    while w.shape[1] % g:
                        g //= 2
                    spec = self.low_specs.setdefault(part, QuantSpec(bits, False, "group", g))
                    s, z = compute_qparams(w, spec)
                    d[f"{part}.q"], d[f"{part}.s"], d[f"{part}.z"] = quantize(w, s, z, spec), s, z
                    if self.bias:
                        d[f"{part}.b"] = src[f"{part}.b"]
                out.append(d)
            self.low.append(out)
        first = self.low[0][0]
        self.low_bytes = sum(int4_bytes(first[f"{p}.q"].numel(), self.low_specs[p].group_size) for p in _PARTS)

    def low_weight(self, layer: int, e: int, part: str, device: torch.device | None = None) -> torch.Tensor:
        """One matrix of the low-precision copy, dequantized (float32) on ``device`` (the integers copied)."""
        d = self.low[layer][e]
        q, s, z = (d[f"{part}.{t}"].to(device or "cpu") for t in "qsz")
        return dequantize(q, s, z, self.low_specs[part])

    def low_forward(self, layer: int, e: int, x: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """Expert ``e`` of ``layer`` for the tokens ``x`` from its low-precision copy, on the CPU or copied to
        ``device`` and dequantized there (activations fake-quantized as the model's, where it quantizes them)."""
        d = self.low[layer][e]
        x = x.to(device or "cpu")

        def lin(h: torch.Tensor, part: str) -> torch.Tensor:
            if self.a_spec is not None:
                h = fake_quant(h, self.a_spec)
            b = d.get(f"{part}.b")
            return nn.functional.linear(h.float(), self.low_weight(layer, e, part, x.device),
                                        None if b is None else b.float().to(x.device))

        return lin(self.glu(lin(x, "gate"), lin(x, "up")), "down").to(x.dtype)

    def cpu_rows(self, layer: int, e: int, x: torch.Tensor, rows: int) -> torch.Tensor:
        """The CPU part of a split: intermediate rows [0, rows) of expert ``e`` for the tokens ``x`` (on
        the CPU), from the host copy."""
        src = self.host[layer][e]
        return self._gate_up(x, lambda key: src[key][:rows], self.int8_capable)

    def split_forward(self, slot: int, x: torch.Tensor, h_cpu: torch.Tensor, rows: int) -> torch.Tensor:
        """The GPU part of a split (``load_slot(..., rows_from=rows)`` filled ``slot``): the remaining
        rows, joined with the CPU's, then the whole down projection (its activations quantized over
        the whole intermediate vector, as unsplit). One token replays the (slot, rows) graph when recorded
        (its output is static, as ``gpu_forward``'s)."""
        if x.is_cuda:  # from pinned memory the copy is queued, not waited for (the CPU tier goes on)
            h_cpu = h_cpu.pin_memory()
        graph = self._split_graphs.get((slot, rows)) if x.shape[0] == 1 and self._graphs_int8 == self.int8_gemm \
            else None
        if graph is None or x.dtype != graph[1].dtype:
            return self._split_tail(slot, x, h_cpu.to(x.device, non_blocking=True), rows)
        g, x_in, h_in, y_out = graph
        x_in.copy_(x)
        h_in.copy_(h_cpu, non_blocking=True)
        g.replay()
        return y_out

    def _split_tail(self, slot: int, x: torch.Tensor, h_cpu: torch.Tensor, rows: int) -> torch.Tensor:
        get = self._slot(slot)
        h_gpu = self._gate_up(x, lambda key: get(key)[_rows_from(key, rows)], self.int8_gemm)
        h = torch.cat([h_cpu.to(h_gpu.dtype), h_gpu], dim=1)
        return self._lin(h, get, "down", self.int8_gemm).to(x.dtype)

    def gpu_forward(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        """One expert on its slot. A one-token call replays the slot's graph when recorded: the result
        is the graph's static output, valid until that slot runs again (callers consume it at once)."""
        graph = self._graphs.get(slot) if x.shape[0] == 1 and self._graphs_int8 == self.int8_gemm else None
        if graph is None or x.dtype != graph[1].dtype:
            return self._forward(slot, x)
        g, x_in, y_out = graph
        x_in.copy_(x)
        g.replay()
        return y_out

    def capture_decode_graphs(self, hidden: int, dtype: torch.dtype) -> None:
        """CUDA only: record each slot's one-token expert as a CUDA graph (same kernels, so the same
        numbers), and each split slot's GPU part at every split point. Slots are fixed buffers, so a graph
        stays valid whatever expert a copy puts in its slot. The graphs share one memory pool: replays are
        serialized on the compute stream and each graph's output stays allocated, so only intermediates are
        shared."""
        if self.device.type != "cuda" or self.cfg.num_slots == 0:
            return
        x = torch.zeros(1, hidden, device=self.device, dtype=dtype)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside capture: cuBLAS handles and workspaces
            for _ in range(2):
                self._forward(0, x)
            splits = [self.split_rows(k) for k in range(1, SPLIT_STEPS)] if self.cfg.split_slots else []
            for rows in splits:
                self._split_tail(0, x, torch.zeros(1, rows, device=self.device), rows)
        torch.cuda.current_stream().wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        graphs, split_graphs = {}, {}
        for slot in range(self.cfg.num_slots):
            g, x_in = torch.cuda.CUDAGraph(), torch.zeros_like(x)
            with torch.cuda.graph(g, pool=pool):
                y_out = self._forward(slot, x_in)
            graphs[slot] = (g, x_in, y_out)
        for slot in range(self.cfg.num_slots, self.cfg.num_slots + self.cfg.split_slots):
            for rows in splits:  # the CPU's rows arrive as float32 (the int8 GEMM's output)
                g, x_in, h_in = torch.cuda.CUDAGraph(), torch.zeros_like(x), torch.zeros(1, rows, device=self.device)
                with torch.cuda.graph(g, pool=pool):
                    y_out = self._split_tail(slot, x_in, h_in, rows)
                split_graphs[(slot, rows)] = (g, x_in, h_in, y_out)
        self._graphs, self._split_graphs, self._graphs_int8 = graphs, split_graphs, self.int8_gemm
