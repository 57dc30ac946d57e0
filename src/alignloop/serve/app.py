"""The FastAPI app: OpenAI-compatible completions, the feedback API, auth, limits and the page.

Every completion is written to the feedback store (model name and version, sampling settings,
the rendered prompt, the tokens, latency) before the response that carries its id is finished,
so feedback can always attach to it; every feedback write is answered only after its commit.

Errors are OpenAI-shaped, ``{"error": {"message", "type", "param"}}``, with a 4xx status that
says whose fault it is and ``param`` naming the field; a 5xx means a bug or a failed forward.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from alignloop.config import ServeConfig
from alignloop.errors import AlignloopError
from alignloop.feedback.store import (
    CompletionRecord,
    FeedbackInput,
    FeedbackStore,
    IdempotencyConflict,
    Invalid,
    NotFound,
    StoreError,
    User,
)
from alignloop.rollout.generate import RowSampling
from alignloop.serve.engine import ServedModel, TextStream
from alignloop.serve.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DeployIn,
    DeployOut,
    ErrorBody,
    FeedbackBatchError,
    FeedbackBatchIn,
    FeedbackBatchOut,
    FeedbackBatchResult,
    FeedbackIn,
    FeedbackKind,
    FeedbackList,
    FeedbackOut,
    Me,
    ModelCard,
    ModelList,
    SamplingFields,
)

log = logging.getLogger("alignloop")
STATIC = Path(__file__).parent / "static"
ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 413, 422, 429)}


class ApiError(Exception):
    """An error the client caused, answered as ``status`` with an OpenAI-shaped body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type, param, headers


def error_body(message: str, type: str, param: str | None = None) -> dict:
    """OpenAI's error shape, for responses and for an error inside a stream."""
    return {"error": {"message": message, "type": type, "param": param, "code": None}}


def error_response(status: int, message: str, type: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param), status, headers=headers)


class RateLimiter:
    """A token bucket per user: ``burst`` requests at once, refilled at ``per_minute``/60 a second.
    In memory, per server process."""

    def __init__(self, per_minute: float, burst: int) -> None:
        self.rate, self.burst = per_minute / 60.0, burst
        self.buckets: dict[int, tuple[float, float]] = {}
        self.lock = threading.Lock()

    def retry_after(self, user_id: int) -> float | None:
        """None if the request may go ahead (and take a token), else the seconds until it may."""
        if self.rate <= 0:
            return None
        now = time.monotonic()
        with self.lock:
            tokens, last = self.buckets.get(user_id, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self.buckets[user_id] = (tokens, now)
                return (1.0 - tokens) / self.rate
            self.buckets[user_id] = (tokens - 1.0, now)
            return None


class BodySizeLimit:
    """ASGI middleware: 413 for a body over ``limit`` bytes, by its Content-Length or, for a
    chunked body, as soon as the bytes read pass it."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._too_large(scope, receive, send)
        seen = 0

        async def counting_receive() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, counting_receive, send)
        except _BodyTooLarge:
            await self._too_large(scope, receive, send)

    async def _too_large(self, scope: dict, receive: Any, send: Any) -> None:
        response = error_response(413, f"request body is over the server's limit of {self.limit} bytes", "invalid_request_error")
        await response(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


class Serving:
    """What the routes share: the config, the store, the models, the key cache and the limiter."""

    def __init__(self, config: ServeConfig, store: FeedbackStore, models: Sequence[ServedModel]) -> None:
        self.config, self.store = config, store
        self.models = {m.name: m for m in models}
        for m in models:  # every completion row points at its model version
            store.register_model(m.name, m.version, m.path)
        self.started = int(time.time())
        self.limiter = RateLimiter(config.rate_limit_per_minute, config.rate_burst)
        self.anonymous: User | None = None if config.auth else store.ensure_user("anonymous", admin=True)
        self._keys: dict[str, tuple[User, float]] = {}  # key → (user, when looked up): one DB read per key a minute

    def deploy(self, name: str, path: str) -> tuple[ServedModel, str | None]:
        """Load ``path`` and serve it as ``name`` from the next request on, without dropping any:
        requests already running finish on the old weights (their rows stay in the old batcher,
        whose thread stops once they are done). Marks the new version deployed in the registry.
        Returns the new model and the version it replaced."""
        config = self.config
        new = ServedModel.from_config(name, path, config)
        self.store.register_model(name, new.version, path)
        new.start()
        old = self.models.get(name)
        self.models = {**self.models, name: new}  # one assignment: a request sees the old dict or the new
        self.store.deploy(new.version)
        if old is not None and old is not new:
            threading.Thread(target=old.drain_and_stop, name=f"drain-{name}", daemon=True).start()
        return new, None if old is None else old.version

    def cached_user(self, key: str) -> User | None:
        cached = self._keys.get(key)
        return cached[0] if cached and time.monotonic() - cached[1] < 60 else None

    def user_for(self, key: str) -> User | None:
        user = self.store.user_by_key(key)
        if user is not None:
            self._keys[key] = (user, time.monotonic())
        return user

    def model(self, name: str) -> ServedModel:
        if name not in self.models:
            raise ApiError(404, f"model {name!r} is not served here; GET /v1/models lists {sorted(self.models)}",
                           "not_found_error", "model")
        return self.models[name]


def serving(request: Request) -> Serving:
    return request.app.state.serving


async def current_user(request: Request, authorization: Optional[str] = Header(None, include_in_schema=False)) -> User:
    """The user behind the request's ``Authorization: Bearer KEY``, after the rate limit. Async:
    a cached key costs no thread hop; an unseen one is looked up in a worker thread."""
    state = serving(request)
    if state.anonymous is not None:
        user = state.anonymous
    else:
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(401, "no API key: send `Authorization: Bearer KEY` (an admin creates one with `alignloop users add NAME`)",
                           "authentication_error")
        user = state.cached_user(key.strip())
        if user is None:
            user = await run_in_threadpool(state.user_for, key.strip())
        if user is None:
            raise ApiError(401, "the API key is not valid", "authentication_error")
    wait = state.limiter.retry_after(user.id)
    if wait is not None:
        raise ApiError(429, f"rate limit: at most {state.config.rate_limit_per_minute:g} requests a minute per user; retry in {wait:.1f} s",
                       "rate_limit_error", headers={"Retry-After": str(max(1, math.ceil(wait)))})
    return user


def create_app(config: ServeConfig, store: FeedbackStore, models: Sequence[ServedModel]) -> FastAPI:
    """The app; its lifespan starts the models' decode threads and stops them (and closes the
    store) on shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for m in models:
            m.start()
        try:
            yield
        finally:
            for m in {*models, *app.state.serving.models.values()}:  # redeployed ones too
                m.stop()
            store.close()

    app = FastAPI(title="alignloop", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible completions with feedback capture (thumbs, ratings, comparisons, corrections).")
    app.state.serving = Serving(config, store, models)
    _add_error_handlers(app)
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["*"],
                           allow_headers=["Authorization", "Content-Type", "Idempotency-Key"])
    app.add_middleware(BodySizeLimit, limit=config.max_body_bytes)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/me", response_model=Me, responses=ERRORS)
    def me(request: Request, user: User = Depends(current_user)) -> Me:
        return Me(id=user.id, name=user.name, admin=user.admin, auth=serving(request).anonymous is None)

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS)
    def list_models(request: Request, user: User = Depends(current_user)) -> ModelList:
        state = serving(request)
        return ModelList(data=[ModelCard(id=m.name, created=state.started, version=m.version) for m in state.models.values()])

    @app.post("/v1/chat/completions", responses=ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request, user: User = Depends(current_user)) -> Response:
        served = serving(request).model(body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        if getattr(served.tokenizer, "chat_template", None) is None:
            raise ApiError(400, f"model {served.name!r} has no chat template; use /v1/completions with a plain prompt", param="messages")
        try:
            rendered = served.render_chat(messages)
        except Exception as e:  # a template may refuse some role orders (e.g. two user turns in a row)
            raise ApiError(422, f"the chat template rejects these messages: {e}", param="messages") from None
        prompt_ids = served.encode(rendered, add_special_tokens=False)
        return await _complete(request, served, user, body, "chat", prompt_ids, rendered, messages, None, body.conversation_id)

    @app.post("/v1/completions", responses=ERRORS)
    async def completions(body: CompletionRequest, request: Request, user: User = Depends(current_user)) -> Response:
        served = serving(request).model(body.model)
        prompt_ids = served.encode(body.prompt, add_special_tokens=True)
        return await _complete(request, served, user, body, "completion", prompt_ids, body.prompt, None, body.prompt, None)

    @app.post("/v1/feedback", response_model=FeedbackOut, status_code=201, responses=ERRORS)
    def post_feedback(body: FeedbackIn, request: Request, user: User = Depends(current_user),
                      idempotency_key: Optional[str] = Header(None, max_length=200)) -> JSONResponse:
        record, outcome = serving(request).store.put_feedback(user.id, FeedbackInput(**body.model_dump()), idempotency_key)
        out = _feedback_out(record, outcome)
        return JSONResponse(json.loads(out.model_dump_json()), status_code=201 if outcome == "created" else 200)

    @app.post("/v1/feedback/batch", response_model=FeedbackBatchOut, responses=ERRORS)
    def post_feedback_batch(body: FeedbackBatchIn, request: Request, user: User = Depends(current_user)) -> FeedbackBatchOut:
        items = [(FeedbackInput(**item.model_dump(exclude={"idempotency_key"})), item.idempotency_key) for item in body.items]
        results = []
        for answer in serving(request).store.put_feedback_many(user.id, items):
            if isinstance(answer, StoreError):
                status, kind, param = store_error_status(answer)
                results.append(FeedbackBatchResult(status=status, error=FeedbackBatchError(message=str(answer), type=kind, param=param)))
            else:
                record, outcome = answer
                results.append(FeedbackBatchResult(status=201 if outcome == "created" else 200, feedback=_feedback_out(record, outcome)))
        return FeedbackBatchOut(data=results)

    @app.get("/v1/feedback", response_model=FeedbackList, responses=ERRORS)
    def list_feedback(request: Request, user: User = Depends(current_user), kind: Optional[FeedbackKind] = None,
                      limit: int = Query(100, ge=1, le=1000)) -> FeedbackList:
        records = serving(request).store.list_feedback(user.id, kind=kind, limit=limit)
        return FeedbackList(data=[_feedback_out(r) for r in records])

    @app.get("/v1/feedback/{feedback_id}", response_model=FeedbackOut, responses=ERRORS)
    def get_feedback(feedback_id: int, request: Request, user: User = Depends(current_user)) -> FeedbackOut:
        record = serving(request).store.get_feedback(user.id, feedback_id)
        if record is None:
            raise ApiError(404, f"no feedback {feedback_id} of yours", "not_found_error", "feedback_id")
        return _feedback_out(record)

    @app.delete("/v1/feedback/{feedback_id}", status_code=204, responses=ERRORS)
    def delete_feedback(feedback_id: int, request: Request, user: User = Depends(current_user)) -> Response:
        if not serving(request).store.delete_feedback(user.id, feedback_id):
            raise ApiError(404, f"no feedback {feedback_id} of yours", "not_found_error", "feedback_id")
        return Response(status_code=204)

    @app.get("/admin/export", responses=ERRORS)
    def export(request: Request, kind: str = Query(..., pattern="^(pairs|kto|sft|ratings)$"),
               user: User = Depends(current_user)) -> Response:
        if not user.admin:
            raise ApiError(403, "export is for admins (`alignloop users add NAME --admin`)", "permission_error")
        records, skipped = serving(request).store.export(kind)
        lines = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records)
        return Response(lines, media_type="application/x-ndjson", headers={"X-Skipped": json.dumps(skipped)})

    @app.post("/admin/deploy", response_model=DeployOut, responses=ERRORS)
    def deploy(body: DeployIn, request: Request, user: User = Depends(current_user)) -> DeployOut:
        """Serve the model at ``path`` as ``name`` from the next request on (promotion or rollback);
        streams already running finish on the weights they started with."""
        if not user.admin:
            raise ApiError(403, "deploying is for admins (`alignloop users add NAME --admin`)", "permission_error")
        new, previous = serving(request).deploy(body.name, body.path)
        log.info("serve: %s now serves version %s (was %s)", body.name, new.version, previous)
        return DeployOut(name=body.name, version=new.version, previous_version=previous)

    if STATIC.is_dir():
        from fastapi.staticfiles import StaticFiles

        app.mount("/", StaticFiles(directory=STATIC, html=True), name="page")
    return app


# --- completions -----------------------------------------------------------------------------
async def _complete(request: Request, served: ServedModel, user: User, body: SamplingFields, endpoint: str,
                    prompt_ids: list[int], rendered: str, messages: list[dict] | None, prompt_text: str | None,
                    conversation_id: str | None) -> Response:
    """Check the limits, queue the choices on the model's running batch, and answer (whole or streamed)."""
    state = serving(request)
    config, started = state.config, time.perf_counter()
    prompt_field = "messages" if endpoint == "chat" else "prompt"
    max_tokens = body.max_completion_tokens or body.max_tokens or config.default_max_tokens
    if max_tokens > config.max_tokens_limit:
        raise ApiError(422, f"max_tokens is {max_tokens}; this server allows at most {config.max_tokens_limit}", param="max_tokens")
    if body.n > config.max_n:
        raise ApiError(422, f"n is {body.n}; this server allows at most {config.max_n}", param="n")
    if not prompt_ids:
        raise ApiError(422, "the prompt encodes to no tokens", param=prompt_field)
    limit = config.max_prompt_tokens
    if served.context is not None:
        room = served.context - max_tokens
        if room < 1:
            raise ApiError(422, f"max_tokens {max_tokens} leaves no room for a prompt in the model's context of {served.context}", param="max_tokens")
        limit = room if limit is None else min(limit, room)
    if limit is not None and len(prompt_ids) > limit:
        raise ApiError(422, f"the prompt is {len(prompt_ids)} tokens (after the chat template); this server takes at most {limit} "
                       f"with max_tokens={max_tokens}", param=prompt_field)

    seed = body.seed if body.seed is not None else secrets.randbits(31)  # recorded, so every sample can be redrawn
    rows = [RowSampling(body.temperature, body.top_p, 0, seed, i) for i in range(body.n)]
    chat = endpoint == "chat"
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    ids = [f"{request_id}-{i}" for i in range(body.n)]
    created = int(time.time())
    stop = body.stop_strings()
    sampling = {"temperature": body.temperature, "top_p": body.top_p, "max_tokens": max_tokens, "stop": stop,
                "seed": seed, "n": body.n}
    streams = [TextStream(served.tokenizer, stop) for _ in rows]
    reasons: list[str | None] = [None] * body.n
    first_token: list[float | None] = [None]
    submission = served.submit(prompt_ids, rows, max_tokens)
    head = {"id": request_id, "created": created, "model": served.name, "model_version": served.version}

    def finish(choice: int, reason: str) -> None:
        if reason.startswith("error"):
            raise ApiError(503, f"generation failed: {reason[7:]}", "server_error")
        reasons[choice] = "stop" if reason == "stop" or streams[choice].stopped else "length"

    async def record() -> None:
        latency = (time.perf_counter() - started) * 1000
        ttft = None if first_token[0] is None else (first_token[0] - started) * 1000
        records = [
            CompletionRecord(
                id=ids[i], request_id=request_id, choice_index=i, user_id=user.id, model_name=served.name,
                model_version=served.version, endpoint=endpoint, prompt_messages=messages, prompt_text=prompt_text,
                rendered_prompt=rendered, prompt_tokens=len(prompt_ids), completion_text=streams[i].text,
                completion_token_ids=streams[i].token_ids, finish_reason=reasons[i] or "length", sampling=sampling,
                latency_ms=latency, ttft_ms=ttft, conversation_id=conversation_id,
            )
            for i in range(body.n)
        ]
        await run_in_threadpool(state.store.add_completions, records)

    def usage() -> dict:
        completion_tokens = sum(len(s.token_ids) for s in streams)
        return {"prompt_tokens": len(prompt_ids), "completion_tokens": completion_tokens,
                "total_tokens": len(prompt_ids) + completion_tokens}

    def on_event(choice: int, token: int | None, reason: str | None) -> str:
        """Apply one event; the text it makes safe to show."""
        if token is None:
            finish(choice, reason or "length")
            return streams[choice].flush()
        if first_token[0] is None:
            first_token[0] = time.perf_counter()
        if streams[choice].stopped:
            return ""
        piece = streams[choice].push(token)
        if streams[choice].stopped:
            submission.cancel(choice)
        return piece

    if not body.stream:
        try:
            async for events in submission.batches():
                for choice, token, reason in events:
                    on_event(choice, token, reason)
        finally:
            submission.close()
        await record()
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": streams[i].text}, "finish_reason": reasons[i],
                        "logprobs": None, "completion_id": ids[i]} for i in range(body.n)]
            return JSONResponse({**head, "object": "chat.completion", "choices": choices, "usage": usage()})
        choices = [{"index": i, "text": streams[i].text, "finish_reason": reasons[i], "logprobs": None,
                    "completion_id": ids[i]} for i in range(body.n)]
        return JSONResponse({**head, "object": "text_completion", "choices": choices, "usage": usage()})

    include_usage = body.stream_options is not None and body.stream_options.include_usage
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choice: int, piece: str | None, reason: str | None = None, role: bool = False) -> str:
        if chat:
            delta: dict = {"role": "assistant", "content": ""} if role else ({} if piece is None else {"content": piece})
            body_choice = {"index": choice, "delta": delta, "finish_reason": reason, "logprobs": None, "completion_id": ids[choice]}
        else:
            body_choice = {"index": choice, "text": piece or "", "finish_reason": reason, "logprobs": None, "completion_id": ids[choice]}
        return "data: " + json.dumps({**head, "object": kind, "choices": [body_choice]}, ensure_ascii=False) + "\n\n"

    async def sse() -> AsyncIterator[str]:
        try:
            if chat:
                for i in range(body.n):
                    yield chunk(i, None, role=True)
            try:
                async for events in submission.batches():
                    # Tokens that arrived together go out as one chunk per choice.
                    pieces: dict[int, str] = {}
                    for choice, token, reason in events:
                        pieces[choice] = pieces.get(choice, "") + on_event(choice, token, reason)
                    for choice, piece in pieces.items():
                        if piece:
                            yield chunk(choice, piece)
            except ApiError as e:
                yield "data: " + json.dumps(error_body(e.message, e.type)) + "\n\n"
                yield "data: [DONE]\n\n"
                return
            # Stored before the final chunks: once a client sees finish_reason, feedback on the id works.
            await record()
            for i in range(body.n):
                yield chunk(i, None, reasons[i])
            if include_usage:
                yield "data: " + json.dumps({**head, "object": kind, "choices": [], "usage": usage()}) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            submission.close()  # the client went away, or we are done: free the rows

    return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _feedback_out(record: Any, outcome: str | None = None) -> FeedbackOut:
    fields = asdict(record)  # user_id is not among FeedbackOut's fields: a user's id is not echoed
    return FeedbackOut(**{k: v for k, v in fields.items() if k in FeedbackOut.model_fields}, outcome=outcome)


# --- errors ----------------------------------------------------------------------------------
def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.message, e.type, e.param, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
        if first.get("type") == "json_invalid":
            detail = (first.get("ctx") or {}).get("error") or first.get("msg")
            return error_response(400, f"the body is not valid JSON: {detail}", "invalid_request_error", "body")
        param = _field_name(first.get("loc", ()))
        message = "; ".join(f"{_field_name(err.get('loc', ())) or 'body'}: {err.get('msg')}" for err in errors[:5])
        return error_response(422, message, "invalid_request_error", param or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500 else "server_error",
                              headers=getattr(e, "headers", None))

    @app.exception_handler(StoreError)
    async def store_error(request: Request, e: StoreError) -> JSONResponse:
        status, kind, param = store_error_status(e)
        if isinstance(e, IdempotencyConflict):
            param = "Idempotency-Key"  # the header of POST /v1/feedback
        return error_response(status, str(e), kind, param)

    @app.exception_handler(AlignloopError)
    async def alignloop_error(request: Request, e: AlignloopError) -> JSONResponse:
        return error_response(400, str(e), "invalid_request_error")


def store_error_status(e: StoreError) -> tuple[int, str, str | None]:
    """HTTP status, error type and field of a store's refusal."""
    param = getattr(e, "field", None)
    if isinstance(e, NotFound):
        return 404, "not_found_error", param
    if isinstance(e, Invalid):
        return 422, "invalid_request_error", param
    if isinstance(e, IdempotencyConflict):
        return 409, "conflict_error", param
    return 503, "server_error", param


def _field_name(loc: Sequence[Any]) -> str:
    """``("body", "messages", 0, "role")`` → ``messages[0].role``."""
    name = ""
    for part in loc:
        if part in ("body", "query", "path", "header") and not name:
            continue
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name
