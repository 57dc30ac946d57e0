"""The OpenAI-compatible routes: models, chat and text completions (whole or streamed as SSE),
who am I, and the health check.

Every completion is written to the feedback store (model name and version, sampling settings,
the rendered prompt, the tokens, latency) before the response that carries its id is finished,
so feedback can always attach to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse

from alignloop.feedback.store import FeedbackStore, User
from alignloop.serve.completion import Completion, chat_prompt, text_prompt
from alignloop.serve.dependencies import Serving, current_user, get_serving, get_store
from alignloop.serve.errors import ERRORS, ApiError, error_body
from alignloop.serve.forwarded import UpstreamCompletion
from alignloop.serve.schemas import ChatCompletionRequest, CompletionRequest, Me, ModelCard, ModelList, SamplingFields
from alignloop.serve.upstream import UpstreamModel

router = APIRouter()


@router.get("/health")
def health() -> dict:
    return {"status": "ok"}


@router.get("/v1/me", response_model=Me, responses=ERRORS)
def me(user: User = Depends(current_user), serving: Serving = Depends(get_serving)) -> Me:
    return Me(id=user.id, name=user.name, admin=user.admin, auth=serving.anonymous is None)


@router.get("/v1/models", response_model=ModelList, response_model_exclude_none=True, responses=ERRORS)
def list_models(user: User = Depends(current_user), serving: Serving = Depends(get_serving)) -> ModelList:
    """The chat models, then the classifiers (with their task and labels)."""
    chat = [ModelCard(id=m.name, created=serving.started, version=m.version) for m in serving.models.values()]
    classifiers = [ModelCard(id=c.name, created=serving.started, version=c.version, task=c.task, labels=c.labels)
                   for c in serving.classifiers.values()]
    return ModelList(data=chat + classifiers)


@router.post("/v1/chat/completions", responses=ERRORS)
async def chat_completions(request: Request, body: ChatCompletionRequest, user: User = Depends(current_user),
                           serving: Serving = Depends(get_serving), store: FeedbackStore = Depends(get_store)) -> Response:
    return await _respond(request, await _start(serving, store, user, body, time.perf_counter()), body)


@router.post("/v1/completions", responses=ERRORS)
async def completions(request: Request, body: CompletionRequest, user: User = Depends(current_user),
                      serving: Serving = Depends(get_serving), store: FeedbackStore = Depends(get_store)) -> Response:
    return await _respond(request, await _start(serving, store, user, body, time.perf_counter()), body)


async def _start(serving: Serving, store: FeedbackStore, user: User, body: ChatCompletionRequest | CompletionRequest,
                 started: float) -> Completion:
    """The request's completion, under way: queued on the local model's batch, or on a gateway
    sent to the upstream (whose refusal is this request's error)."""
    served = serving.model(body.model)
    if isinstance(served, UpstreamModel):
        return await UpstreamCompletion.open(serving, store, served, user, body, started)
    build = chat_prompt if isinstance(body, ChatCompletionRequest) else text_prompt
    prompt = await run_in_threadpool(build, serving.config, served, body)  # the template and tokenizer: off the event loop
    return Completion(serving, store, served, user, body, prompt, started)


async def _respond(request: Request, completion: Completion, body: SamplingFields) -> Response:
    """OpenAI's answer: one JSON body once every choice is stored, or SSE chunks as text arrives.

    A client that goes away takes its rows with it: a stream's generator is cancelled by
    Starlette on the disconnect; a whole-body request races its generation against the
    disconnect and cancels the rows (queued ones never start, running ones leave the batch at
    the next step). Nothing is stored for a completion nobody received."""
    if not body.stream:
        generation = asyncio.ensure_future(_drain(completion))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({generation, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not generation.done():  # the client left (or this handler was cancelled): free the rows
                completion.close()
                generation.cancel()
        if not generation.done() or generation.cancelled():
            with contextlib.suppress(asyncio.CancelledError):
                await generation
            return Response(status_code=499)  # nobody is there to read it (nginx's "client closed request")
        generation.result()  # a failed generation's ApiError
        return JSONResponse(_whole_body(completion, body))
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return StreamingResponse(_sse(completion, include_usage), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _drain(completion: Completion) -> None:
    try:
        async for _ in completion.pieces():  # the text accumulates in the completion's streams
            pass
    finally:
        completion.close()


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body was read already, so the next ASGI message is
    the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _head(completion: Completion) -> dict:
    served = completion.served
    return {"id": completion.request_id, "created": completion.created, "model": served.name, "model_version": served.version}


def _whole_body(completion: Completion, body: SamplingFields) -> dict:
    """``chat.completion`` (each choice's ``message``) or ``text_completion`` (each choice's ``text``,
    and with ``logprobs`` its sampled tokens' log-probs: :func:`_token_logprobs`)."""
    reasons, ids = completion.reasons, completion.ids
    if completion.prompt.endpoint == "chat":
        choices = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reasons[i],
                    "logprobs": None, "completion_id": ids[i]} for i, text in enumerate(completion.texts)]
        return {**_head(completion), "object": "chat.completion", "choices": choices, "usage": completion.usage()}
    with_logprobs = isinstance(body, CompletionRequest) and body.logprobs is not None
    choices = [{"index": i, "text": text, "finish_reason": reasons[i],
                "logprobs": _token_logprobs(completion, i, body.return_tokens_as_token_ids) if with_logprobs else None,
                "completion_id": ids[i]} for i, text in enumerate(completion.texts)]
    return {**_head(completion), "object": "text_completion", "choices": choices, "usage": completion.usage()}


def _token_logprobs(completion: Completion, choice: int, as_ids: bool) -> dict:
    """OpenAI's legacy ``logprobs`` of one choice: each sampled token (its text, or vLLM's
    ``"token_id:ID"``) and its log-prob under the distribution it was drawn from (after
    temperature and top-p, the stop token last). No alternatives: ``top_logprobs`` is null."""
    ids, logprobs = completion.sampled(choice)
    tokenizer = completion.served.tokenizer
    tokens = [f"token_id:{i}" for i in ids] if as_ids else [tokenizer.decode([i]) for i in ids]
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": None, "text_offset": None}


async def _sse(completion: Completion, include_usage: bool) -> AsyncIterator[str]:
    """Chat: a role chunk per choice first. Then a chunk per choice with new text, a final chunk
    per choice with its finish_reason, the usage if asked, and ``[DONE]``. A failed generation
    ends the stream with an error event and ``[DONE]``."""
    chat = completion.prompt.endpoint == "chat"
    head, kind = _head(completion), "chat.completion.chunk" if chat else "text_completion"

    def chunk(choice: int, piece: str | None, reason: str | None = None, role: bool = False) -> str:
        if chat:
            delta: dict = {"role": "assistant", "content": ""} if role else ({} if piece is None else {"content": piece})
            body_choice = {"index": choice, "delta": delta, "finish_reason": reason, "logprobs": None, "completion_id": completion.ids[choice]}
        else:
            body_choice = {"index": choice, "text": piece or "", "finish_reason": reason, "logprobs": None, "completion_id": completion.ids[choice]}
        return "data: " + json.dumps({**head, "object": kind, "choices": [body_choice]}, ensure_ascii=False) + "\n\n"

    try:
        if chat:
            for i in range(len(completion.ids)):
                yield chunk(i, None, role=True)
        try:
            async for pieces in completion.pieces():  # text that arrived together goes out as one chunk per choice
                for choice, piece in pieces.items():
                    yield chunk(choice, piece)
        except ApiError as e:
            yield "data: " + json.dumps(error_body(e.message, e.type)) + "\n\n"
            yield "data: [DONE]\n\n"
            return
        # pieces() ended with the choices stored: once a client sees finish_reason, feedback on the id works.
        for i, reason in enumerate(completion.reasons):
            yield chunk(i, None, reason)
        if include_usage:
            yield "data: " + json.dumps({**head, "object": kind, "choices": [], "usage": completion.usage()}) + "\n\n"
        yield "data: [DONE]\n\n"
    finally:
        completion.close()  # the client went away, or we are done: free the rows
