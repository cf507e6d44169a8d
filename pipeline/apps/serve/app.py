"""The OpenAI-compatible HTTP API (FastAPI) over one ``Engine``.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with
``stream=true`` as server-sent events, ending in ``data: [DONE]``), ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus) and the chat page at ``/``. With an API key
(``serve.api_key`` or ``$PIPELINE_SERVE_API_KEY``) every ``/v1`` request needs
``Authorization: Bearer <key>``, else 401. Errors use OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``, so the official client raises its
usual exceptions (BadRequestError, NotFoundError, ...).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.apps.serve.chat_page import PAGE
from pipeline.apps.serve.engine import DONE, Job, QueueFull
from pipeline.apps.serve.metrics import CONTENT_TYPE, ServeMetrics
from pipeline.tokenize.special import render_chat


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def _error(status: int, message: str, type_: str, param=None, code=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status_code=status)


# ------------------------------------------------------------------ request bodies


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown OpenAI fields (user, n=1, ...) are accepted and ignored

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None  # {"include_usage": true}: a last chunk with the token counts
    n: int = Field(default=1, ge=1, le=1)

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(_Sampling):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("exactly one prompt per request")
            return v[0]
        return v


# ------------------------------------------------------------------ the app


API_KEY_ENV = "PIPELINE_SERVE_API_KEY"


def create_app(engine, sc, seed: int = 0, metrics: ServeMetrics | None = None) -> FastAPI:
    """``engine``: an ``Engine`` or ``BatchEngine``; ``sc`` the ``serve`` config group
    (model_name, defaults, limits, api_key)."""
    app = FastAPI(title="pipeline model server", docs_url=None, redoc_url=None)
    metrics = metrics or getattr(engine, "metrics", None) or ServeMetrics()
    api_key = str(sc.get("api_key") or os.environ.get(API_KEY_ENV) or "")
    model_name = str(sc.model_name)
    created = int(time.time())
    max_body = int(sc.max_body_bytes)
    default_max = int(sc.default_max_tokens)
    default_temp = float(sc.temperature)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return _error(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: {e.get('msg')}"
                        for e in errs[:5])
        return _error(400, f"invalid request: {msg}", "invalid_request_error", loc or None, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            token = given[7:] if given[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), api_key.encode()):
                return _error(401, "Incorrect API key provided: send it as `Authorization: Bearer <key>`",
                              "invalid_request_error", code="invalid_api_key")
        return await call_next(request)

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):
        if request.method == "POST":
            length = request.headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > max_body):
                return _error(413, f"request body of {length} bytes exceeds the limit of {max_body} bytes "
                                   f"(serve.max_body_bytes)", "invalid_request_error", code="request_too_large")
            if length is None:  # chunked upload: count as it arrives
                body = b""
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > max_body:
                        return _error(413, f"request body exceeds the limit of {max_body} bytes",
                                      "invalid_request_error", code="request_too_large")
                request._body = body
        return await call_next(request)

    # -------------------------------------------------------------- helpers

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{model_name}'",
                           "invalid_request_error", "model", "model_not_found")

    def make_job(req: _Sampling, ids: list[int], max_tokens: int | None) -> Job:
        block = engine.block_size
        want = default_max if max_tokens is None else int(max_tokens)
        if want > block - 1:
            raise APIError(400, f"max_tokens={want} is beyond this model's context of {block} tokens "
                                f"(at most {block - 1})", param="max_tokens", code="context_length_exceeded")
        if max_tokens is None:
            want = min(want, max(1, block - len(ids)))
        if len(ids) + want > block:
            raise APIError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({want}) exceed this model's "
                                f"context of {block} tokens", param="messages", code="context_length_exceeded")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return Job(ids=ids, max_tokens=want, temperature=default_temp if req.temperature is None else req.temperature,
                   top_p=req.top_p, top_k=req.top_k, seed=seed if req.seed is None else int(req.seed), stop=stop,
                   loop=asyncio.get_running_loop())

    def submit(job: Job) -> Job:
        try:
            return engine.submit(job)
        except QueueFull as e:
            raise APIError(429, f"server busy: {e}; retry later", "rate_limit_error", code="queue_full") from None

    async def collect(job: Job, request: Request) -> str:
        pieces = []
        while True:
            try:
                item = await asyncio.wait_for(job.out.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancelled.set()
                    raise APIError(499, "client closed the request") from None
                continue
            if item is DONE:
                return "".join(pieces)
            if isinstance(item, Exception):
                raise item
            pieces.append(item)

    def chat_ids(req: ChatRequest, max_tokens: int | None) -> list[int]:
        """The conversation in the training template; the oldest turns (after a system message)
        are dropped until it fits with room for the answer, as `generate --chat` does."""
        msgs = [m.model_dump() for m in req.messages]
        room = engine.block_size - (default_max if max_tokens is None else int(max_tokens))
        ids = engine.encode(render_chat(msgs, add_generation_prompt=True))
        head = 1 if msgs[0]["role"] == "system" else 0
        while len(ids) > room and len(msgs) - head > 1:
            del msgs[head]
            ids = engine.encode(render_chat(msgs, add_generation_prompt=True))
        return ids

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"

    # -------------------------------------------------------------- routes

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.replace("__MODEL__", model_name))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "block_size": engine.block_size, **engine.status()}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "pipeline"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        check_model(req.model)
        max_tokens = req.max_completion_tokens or req.max_tokens
        job = submit(make_job(req, chat_ids(req, max_tokens), max_tokens))
        rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if not req.stream:
            text = await collect(job, request)
            return {"id": rid, "object": "chat.completion", "created": now, "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": job.finish_reason, "logprobs": None}],
                    "usage": _usage(job)}

        def chunk(delta: dict, finish=None) -> str:
            return sse({"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]})

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                async for piece in _pieces(job):
                    yield chunk({"content": piece})
                yield chunk({}, job.finish_reason)
                if req.include_usage():
                    yield sse({"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                               "choices": [], "usage": _usage(job)})
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled.set()  # a client that went away frees the worker at the next token

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        ids = engine.encode(req.prompt)
        job = submit(make_job(req, ids, req.max_tokens))
        rid, now = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if not req.stream:
            text = await collect(job, request)
            return {"id": rid, "object": "text_completion", "created": now, "model": model_name,
                    "choices": [{"index": 0, "text": text, "finish_reason": job.finish_reason, "logprobs": None}],
                    "usage": _usage(job)}

        def chunk(text: str, finish=None) -> str:
            return sse({"id": rid, "object": "text_completion", "created": now, "model": model_name,
                        "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]})

        async def events():
            try:
                async for piece in _pieces(job):
                    yield chunk(piece)
                yield chunk("", job.finish_reason)
                if req.include_usage():
                    yield sse({"id": rid, "object": "text_completion", "created": now, "model": model_name,
                               "choices": [], "usage": _usage(job)})
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled.set()

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def _usage(job: Job) -> dict:
    return {"prompt_tokens": len(job.ids), "completion_tokens": job.completion_tokens,
            "total_tokens": len(job.ids) + job.completion_tokens}


async def _pieces(job: Job):
    """The job's text as it comes; pieces that are already waiting go out as one event (a slow
    reader gets fewer, larger chunks instead of falling behind)."""
    while True:
        item = await job.out.get()
        text = []
        while isinstance(item, str):
            text.append(item)
            if job.out.empty():
                break
            item = job.out.get_nowait()
        if text:
            yield "".join(text)
        if item is DONE:
            return
        if isinstance(item, Exception):
            raise item
