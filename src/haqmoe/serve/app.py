"""OpenAI-compatible HTTP server over one ``CollaborativeEngine``, with a built-in web page.

One engine, one thread entering it. With ``max_batch`` 1 generations run strictly one after another
(``EngineWorker``: an asyncio lock orders them, a single-thread executor guarantees the engine is
never entered twice). With ``max_batch`` > 1 a ``BatchScheduler`` loop (runtime/batching.py) runs
up to that many requests in one continuously refilled batch (``BatchWorker``) on that thread.
``haqmoe serve`` loads the model on the same thread (``engine_thread``): libgomp, the OpenMP runtime
of torch's CPU kernels, keeps a pool of workers per thread that has run a parallel region, and once
there are more of them than cores it stops letting idle workers spin, so every parallel region then
wakes its workers through the kernel. A model loaded on one thread and run on another left two
pools, and a W8A8 decode step of 8 requests took 110 ms instead of 47 on 2 cores. Each request still
gets its own tokens, sampling and stop rules, and greedy answers equal the one-at-a-time ones. Prompts are tokenized on the event
loop with a private copy of the tokenizer (HF fast tokenizers are not safe to share across
threads), exactly as ``CollaborativeEngine.encode`` does, so ``haqmoe run`` and the server see the
same ids. A client that disconnects, streaming or not, sets the job's stop flag, which the engine
checks after every token.

Access: with ``api_keys`` set, every path but ``/health`` (and ``/metrics`` with ``metrics_open``)
needs ``Authorization: Bearer <key>``; POST bodies must be JSON; cross-origin browser access only
for ``cors_origins`` (see ``auth.Guard``).
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import HaqmoeError
from ..models.base import context_of
from ..runtime.engine import CollaborativeEngine, Generation, SamplingConfig
from .auth import Guard, check_keys, check_origins, send_error
from .metrics import ServerMetrics
from .schemas import ChatRequest, CompletionRequest
from .telemetry import page_response, snapshot


@dataclass
class ServeConfig:
    model_name: str = "haqmoe"
    max_tokens_limit: int = 2048  # hard cap per request (400 above it)
    default_chat_max_tokens: int = 256  # chat requests without max_tokens
    max_waiting: int = 64  # queued requests beyond this get 503
    max_body_bytes: int = 1 << 20  # larger request bodies get 413 before they are parsed
    request_timeout_s: float = 600.0  # queueing + generation; beyond it 504 (or an in-band error when streaming)
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # Bearer keys; none = no auth (loopback use)
    metrics_open: bool = False  # /metrics without a key (a Prometheus scraper that sends none)
    cors_origins: tuple[str, ...] = ()  # browser origins given CORS headers; none = same-origin only
    max_batch: int = 1  # requests decoded together (1: one at a time, the engine's own stream)
    reuse_prefix: bool = False  # batched: take a prompt prefix shared with the last prompt from its cache
    page: bool = True  # the web page at / (static files; the API it calls keeps its keys)

    def __post_init__(self) -> None:
        self.api_keys, self.cors_origins = check_keys(self.api_keys), check_origins(self.cors_origins)


CLIENT_CLOSED = 499  # status counted for a request whose client left before a non-streamed answer


class ApiError(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": None}}, status_code=self.status)


@dataclass
class Job:
    ids: object  # prompt token ids [1, n]
    sampling: SamplingConfig
    cancel: threading.Event = field(default_factory=threading.Event)
    deadline: float = float("inf")  # time.monotonic() after which the engine stops
    expired: bool = False  # the deadline stopped the generation (one that ended by itself is not late)

    def should_stop(self) -> bool:
        self.expired = self.expired or time.monotonic() > self.deadline
        return self.cancel.is_set() or self.expired

    def timed_out(self) -> bool:
        return self.expired


class BodyLimit:
    """ASGI middleware: 413 for bodies over ``limit`` bytes, by Content-Length or by counting chunks,
    so an oversized or endless upload never reaches the JSON parser or memory."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._reject(send)
        seen, over, replied = 0, False, False

        async def counted():  # a chunked body: stop reading at the limit, hand the app an empty end
            nonlocal seen, over
            if over:
                return {"type": "http.disconnect"}
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    over = True
                    return {"type": "http.request", "body": b"", "more_body": False}
            return msg

        async def guarded(msg):  # once over the limit, the app's own answer is replaced by the 413
            nonlocal replied
            if not over:
                return await send(msg)
            if not replied:
                replied = True
                await self._reject(send)

        await self.app(scope, counted, guarded)

    async def _reject(self, send) -> None:
        await send_error(send, 413, f"request body exceeds {self.limit} bytes")


class EngineWorker:
    """Runs jobs on the engine one at a time and relays tokens to the event loop."""

    def __init__(self, engine: CollaborativeEngine, metrics: ServerMetrics, max_waiting: int,
                 executor: ThreadPoolExecutor | None = None):
        self.engine, self.metrics, self.max_waiting = engine, metrics, max_waiting
        self.own_pool = executor is None
        self.pool = executor or engine_thread()
        self.lock = asyncio.Lock()

    def admit(self) -> None:
        """Refuse early (503) when the queue is full, before any response headers are sent."""
        if self.metrics.waiting >= self.max_waiting:
            raise ApiError(503, "server busy: too many queued requests", kind="server_error")

    async def run(self, job: Job) -> AsyncIterator[tuple[str, Generation]]:
        """Tokens of ``job``; use under ``contextlib.aclosing`` so an abandoned stream frees the engine."""
        self.metrics.waiting += 1
        try:
            await asyncio.wait_for(self.lock.acquire(), max(0.0, job.deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise ApiError(504, "request timed out while queued", kind="timeout_error") from None
        finally:
            self.metrics.waiting -= 1
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def work() -> None:
            try:
                for delta, gen in self.engine.stream(job.ids, job.sampling, should_stop=job.should_stop):
                    loop.call_soon_threadsafe(queue.put_nowait, (delta, gen, None))
                loop.call_soon_threadsafe(queue.put_nowait, (None, None, None))
            except BaseException as exc:  # relayed to the request, never lost in the thread
                loop.call_soon_threadsafe(queue.put_nowait, (None, None, exc))

        self.metrics.running += 1
        future = loop.run_in_executor(self.pool, work)
        try:
            while True:
                delta, gen, exc = await queue.get()
                if exc is not None:
                    raise exc
                if delta is None:
                    return
                self.metrics.token()
                yield delta, gen
        finally:
            job.cancel.set()  # no-op when finished; stops the engine after this token when abandoned
            self.metrics.running -= 1
            self.lock.release()
            future.add_done_callback(lambda f: f.exception())  # executor order keeps the engine exclusive

    def close(self) -> None:
        if self.own_pool:
            self.pool.shutdown(wait=False, cancel_futures=True)

    def telemetry(self) -> dict:
        m = self.metrics  # one request at a time: the requests' own decode steps are the engine's
        return {"max_batch": 1, "waiting": m.waiting, "running": m.running, "batch": m.running,
                "decode_steps": m.decode_tokens, "batched_tokens": m.decode_tokens, "decode_s": m.decode_s}


class BatchWorker:
    """Hands jobs to a ``BatchScheduler`` and relays each one's tokens to the event loop; the same
    interface as ``EngineWorker``. ``metrics.waiting``/``running`` are only touched on the event loop."""

    def __init__(self, engine: CollaborativeEngine, metrics: ServerMetrics, max_waiting: int, max_batch: int,
                 reuse_prefix: bool = False, executor: ThreadPoolExecutor | None = None):
        from ..runtime.batching import BatchScheduler

        self.metrics, self.max_waiting, self.max_batch = metrics, max_waiting, max_batch
        self.scheduler = BatchScheduler(engine, max_batch, reuse_prefix=reuse_prefix, executor=executor)

    def admit(self) -> None:
        if self.metrics.waiting >= self.max_waiting:
            raise ApiError(503, "server busy: too many queued requests", kind="server_error")

    async def run(self, job: Job) -> AsyncIterator[tuple[str, Generation]]:
        """Tokens of ``job``; use under ``contextlib.aclosing``: leaving early cancels the request,
        which leaves the batch before its next decode step."""
        from ..runtime.batching import ADMITTED, DONE, ERROR, BatchRequest

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(kind: str, payload) -> None:  # scheduler thread -> event loop
            loop.call_soon_threadsafe(queue.put_nowait, (kind, payload))

        self.metrics.waiting += 1
        state = "waiting"
        try:
            self.scheduler.submit(BatchRequest(job.ids, job.sampling, emit, job.should_stop))
            while True:
                if state == "waiting":
                    try:
                        kind, payload = await asyncio.wait_for(queue.get(),
                                                               max(0.0, job.deadline - time.monotonic()))
                    except asyncio.TimeoutError:
                        raise ApiError(504, "request timed out while queued", kind="timeout_error") from None
                else:
                    kind, payload = await queue.get()
                if kind == ADMITTED:
                    self.metrics.waiting -= 1
                    self.metrics.running += 1
                    state = "running"
                elif kind == ERROR:
                    raise payload
                elif kind == DONE:
                    return
                else:
                    self.metrics.token()
                    yield payload
        finally:
            job.cancel.set()  # no-op when finished; otherwise the scheduler drops it at its next step
            if state == "waiting":
                self.metrics.waiting -= 1
            else:
                self.metrics.running -= 1

    def close(self) -> None:
        self.scheduler.close(timeout=5.0)

    def telemetry(self) -> dict:
        st = self.scheduler.stats
        return {"max_batch": self.max_batch, "waiting": self.metrics.waiting, "running": self.metrics.running,
                "batch": self.scheduler.running, "decode_steps": st.steps, "batched_tokens": st.decode_tokens,
                "mean_batch": st.decode_tokens / st.steps if st.steps else 0.0, "max_batch_seen": st.max_seen,
                "decode_s": st.decode_s, "prefill_s": st.prefill_s, "prefills": st.prefills,
                "reuse_prefix": bool(self.scheduler.reuse_min), "reused_prompt_tokens": st.reused_tokens}


class Encoder:
    """Tokenizes requests like ``CollaborativeEngine.encode``, with a tokenizer copy of its own."""

    def __init__(self, engine: CollaborativeEngine):
        self.proxy = SimpleNamespace(tokenizer=copy.deepcopy(engine.tokenizer), model=engine.model)
        self.context = context_of(engine.model.config)

    def __call__(self, prompt: str | list[dict]):
        try:
            return CollaborativeEngine.encode(self.proxy, prompt)
        except (HaqmoeError, UnicodeError, ValueError, TypeError) as exc:  # e.g. a lone surrogate in the text
            raise ApiError(400, str(exc), "messages" if isinstance(prompt, list) else "prompt") from exc


def _sampling(req, max_tokens: int) -> SamplingConfig:
    seed = req.seed if req.seed is not None else random.randrange(2**31)
    return SamplingConfig(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=seed,
                          stop=tuple(req.stop or ()))


def _check_budget(cfg: ServeConfig, context: int, prompt_tokens: int, max_tokens: int | None,
                  default: int) -> int:
    """The number of tokens to generate, or a 400 when the request cannot fit the model's context."""
    if max_tokens is not None and max_tokens > cfg.max_tokens_limit:
        raise ApiError(400, f"max_tokens {max_tokens} exceeds this server's limit of {cfg.max_tokens_limit}",
                       "max_tokens")
    room = context - prompt_tokens if context else cfg.max_tokens_limit
    if max_tokens is None:
        return max(1, min(default, room, cfg.max_tokens_limit))
    if max_tokens > room:
        raise ApiError(400, f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                            f"context of {context} tokens", "max_tokens")
    return max_tokens


def validation_error(errors: list[dict]) -> ApiError:
    """The 400 for a body FastAPI could not parse or validate, named by the field at fault.

    A body that is not JSON at all has no field: pydantic puts the character offset of the syntax
    error where a field path goes, which would read as a parameter named "40"."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        where = [x for x in first.get("loc", ()) if isinstance(x, int)]
        detail = (first.get("ctx") or {}).get("error") or "JSON decode error"
        return ApiError(400, f"request body is not valid JSON: {detail}"
                             + (f" (at character {where[0]})" if where else ""))
    loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    msg = f"{loc}: {first.get('msg', 'invalid request')}" if loc else first.get("msg", "invalid request")
    return ApiError(400, msg, loc or None)


def _sse(payload: dict | str) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


def engine_thread() -> ThreadPoolExecutor:
    """The one thread a served engine runs on (load the model on it too: see the module's docstring)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="haqmoe-engine")


def create_app(engine: CollaborativeEngine, cfg: ServeConfig = ServeConfig(),
               executor: ThreadPoolExecutor | None = None) -> FastAPI:
    """The FastAPI app; the engine is shared by every request through one worker, which runs it on
    ``executor`` (an ``engine_thread``, the one that loaded the model; default: a new one)."""
    metrics = ServerMetrics()
    encode = Encoder(engine)
    if cfg.max_batch > 1:  # refused at start-up, not at the first request
        from ..runtime.batching import check_batchable

        check_batchable(engine, cfg.max_batch)
    state: dict = {}

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        if "worker" in state:
            state["worker"].close()

    app = FastAPI(title="haqmoe", version="1", lifespan=lifespan)
    # The last added runs first: CORS answers preflights (browsers send them without credentials) and
    # labels every answer, 401s included; then the key, before any body is read; then the size limit.
    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes)
    app.add_middleware(Guard, cfg=cfg, metrics=metrics)
    if cfg.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)

    def worker() -> EngineWorker:  # created lazily inside the server's event loop
        if "worker" not in state:
            state["worker"] = (BatchWorker(engine, metrics, cfg.max_waiting, cfg.max_batch, cfg.reuse_prefix, executor)
                               if cfg.max_batch > 1 else EngineWorker(engine, metrics, cfg.max_waiting, executor))
        return state["worker"]

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        metrics.count_request(request.url.path, exc.status)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        metrics.count_request(request.url.path, 400)
        return validation_error(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):  # e.g. a body that is not UTF-8
        metrics.count_request(request.url.path, exc.status_code)
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return ApiError(exc.status_code, str(exc.detail), None, kind).response()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": cfg.model_name}

    @app.get("/v1/haqmoe/telemetry")
    async def telemetry():
        """The web page's live panel: server load, per-layer x expert residency and hit rates, memory."""
        return snapshot(engine, metrics, worker().telemetry(), cfg.model_name)

    if cfg.page:
        @app.get("/", include_in_schema=False)
        async def page():
            return page_response("index.html")

        @app.get("/ui/{name}", include_in_schema=False)
        async def page_file(name: str):
            return page_response(name)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": 0,
                                            "owned_by": "haqmoe"}]}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(engine), media_type="text/plain; version=0.0.4")

    def check_model(name: str | None) -> None:
        if name not in (None, "", cfg.model_name):
            raise ApiError(404, f"model '{name}' is not served here (serving '{cfg.model_name}')", "model",
                           "not_found_error")

    def client_gone(endpoint: str) -> JSONResponse:
        """A non-streaming client that hung up before its answer: counted cancelled and as status 499
        (the usual "client closed request"), not 200; the response goes nowhere."""
        metrics.cancelled += 1
        metrics.count_request(endpoint, CLIENT_CLOSED)
        return ApiError(CLIENT_CLOSED, "client closed the connection before the answer").response()

    async def respond(request: Request, endpoint: str, req, prompt, max_tokens: int | None, default: int,
                      chat: bool):
        check_model(req.model)
        ids = encode(prompt)
        n = _check_budget(cfg, encode.context, int(ids.shape[1]), max_tokens, default)
        job = Job(ids, _sampling(req, n), deadline=time.monotonic() + cfg.request_timeout_s)
        worker().admit()
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        t0 = time.perf_counter()

        def account(gen: Generation | None, ttft: float | None) -> None:
            if gen is not None:
                metrics.finished(gen.prompt_tokens, len(gen.tokens), time.perf_counter() - t0, ttft,
                                 [t / 1e3 for t in gen.token_ms])

        def usage(gen: Generation) -> dict:
            return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": len(gen.tokens),
                    "total_tokens": gen.prompt_tokens + len(gen.tokens)}

        if not req.stream:
            gen, ttft, dropped = None, None, False
            async with aclosing(worker().run(job)) as tokens:
                async for _, gen in tokens:
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                    if await request.is_disconnected():  # nobody will read the answer: free the engine now
                        dropped = True
                        break
            account(gen, ttft)
            if dropped:
                return client_gone(endpoint)
            if job.timed_out():
                raise ApiError(504, f"request timed out after {cfg.request_timeout_s:g} s", kind="timeout_error")
            metrics.count_request(endpoint, 200)
            choice = ({"index": 0, "message": {"role": "assistant", "content": gen.text},
                       "finish_reason": gen.finish_reason, "logprobs": None} if chat else
                      {"index": 0, "text": gen.text, "finish_reason": gen.finish_reason, "logprobs": None})
            return {"id": rid, "object": obj, "created": created, "model": cfg.model_name,
                    "choices": [choice], "usage": usage(gen)}

        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, finish: str | None, first: bool = False) -> dict:
            if chat:
                d = {"role": "assistant", "content": ""} if first else ({} if delta is None else {"content": delta})
                choice = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            return {"id": rid, "object": chunk_obj, "created": created, "model": cfg.model_name,
                    "choices": [choice]}

        async def events():
            gen, ttft, done, dropped, failed = None, None, False, False, False
            try:
                if chat:
                    yield _sse(chunk(None, None, first=True))
                async with aclosing(worker().run(job)) as tokens:
                    async for delta, gen in tokens:
                        ttft = ttft if ttft is not None else time.perf_counter() - t0
                        if delta:
                            yield _sse(chunk(delta, None))
                        if await request.is_disconnected():
                            dropped = True
                            break
                if job.timed_out() and not dropped:
                    raise TimeoutError(f"request timed out after {cfg.request_timeout_s:g} s")
                done = gen is not None and not dropped
                if done:
                    yield _sse(chunk(None, gen.finish_reason))
                    if req.include_usage():
                        yield _sse({"id": rid, "object": chunk_obj, "created": created, "model": cfg.model_name,
                                    "choices": [], "usage": usage(gen)})
                    yield _sse("[DONE]")
            except Exception as exc:  # headers are sent: report in-band, as OpenAI does
                failed = True
                yield _sse({"error": {"message": f"{type(exc).__name__}: {exc}", "type": "server_error"}})
            finally:
                if failed:
                    metrics.failed += 1
                elif not done:  # the client went away (seen here, or the stream was closed under us)
                    metrics.cancelled += 1
                account(gen, ttft)

        metrics.count_request(endpoint, 200)
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await respond(request, "/v1/completions", req, req.prompt, req.max_tokens, req.max_tokens or 16,
                             chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        if engine.tokenizer is None or not getattr(engine.tokenizer, "chat_template", None):
            raise ApiError(400, "this model has no chat template: use /v1/completions", "messages")
        msgs = [m.as_template() for m in req.messages]
        return await respond(request, "/v1/chat/completions", req, msgs,
                             req.max_completion_tokens or req.max_tokens, cfg.default_chat_max_tokens, chat=True)

    return app
