"""One completion request apart from HTTP: the prompt, the server's limits, the sampling set-up,
the choices queued on the model's running batch, their text as it arrives, and the stored row.

Routes turn it into OpenAI's JSON body or SSE chunks (:mod:`alignloop.serve.openai_api`); a
client's mistake is an :class:`~alignloop.serve.errors.ApiError` raised before anything is queued.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi.concurrency import run_in_threadpool

from alignloop.config import ServeConfig
from alignloop.feedback.store import CompletionRecord, FeedbackStore, User
from alignloop.rollout.generate import RowSampling
from alignloop.serve.dependencies import Serving
from alignloop.serve.engine import ServedModel, TextStream
from alignloop.serve.errors import ApiError
from alignloop.serve.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields


@dataclass
class Prompt:
    """What the model is asked, as the store records it."""

    endpoint: str  # "chat" or "completion"
    ids: list[int]  # the tokens the model sees
    rendered: str  # the text the model sees (after the chat template)
    messages: list[dict] | None  # chat: the messages, "developer" stored as "system"
    text: str | None  # completion: the prompt as sent
    conversation_id: str | None


def prompt_char_limit(config: ServeConfig, served: ServedModel) -> int | None:
    """The most characters a prompt may have before it is templated and tokenised (None: no cap)."""
    if config.max_prompt_chars is not None:
        return config.max_prompt_chars
    tokens = config.max_prompt_tokens or served.context
    return None if tokens is None else tokens * CHARS_PER_TOKEN_CAP


# The default character cap per token of room: no tokenizer in common use packs more characters
# into a token on average, so a prompt over it would be refused after tokenising anyway; here it
# is refused before, at no cost (an 800 KB chat body no longer occupies the server).
CHARS_PER_TOKEN_CAP = 32


def check_prompt_chars(config: ServeConfig, served: ServedModel, chars: int, field: str) -> None:
    """Refuse (422) a prompt of ``chars`` characters over :func:`prompt_char_limit`."""
    limit = prompt_char_limit(config, served)
    if limit is not None and chars > limit:
        raise ApiError(422, f"the {field} is {chars} characters; this server takes at most {limit} for model {served.name!r} "
                       "(max_prompt_chars)", param=field)


def chat_prompt(config: ServeConfig, served: ServedModel, body: ChatCompletionRequest) -> Prompt:
    """The messages through the model's chat template, with the assistant header appended.
    Blocking work (the template, the tokenizer): call it in a worker thread."""
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    if getattr(served.tokenizer, "chat_template", None) is None:
        raise ApiError(400, f"model {served.name!r} has no chat template; use /v1/completions with a plain prompt", param="messages")
    check_prompt_chars(config, served, sum(len(m["content"]) for m in messages), "messages")
    try:
        rendered = served.render_chat(messages)
    except Exception as e:  # a template may refuse some role orders (e.g. two user turns in a row)
        raise ApiError(422, f"the chat template rejects these messages: {e}", param="messages") from None
    return Prompt("chat", served.encode(rendered, add_special_tokens=False), rendered, messages, None, body.conversation_id)


def text_prompt(config: ServeConfig, served: ServedModel, body: CompletionRequest) -> Prompt:
    """A plain prompt, with the tokenizer's special tokens (BOS) as a bare ``encode`` adds them,
    or token ids taken as they are (stored as their decoded text). Blocking work (the
    tokenizer): call it in a worker thread."""
    if isinstance(body.prompt, list):
        vocab = len(served.tokenizer)
        bad = next((i for i in body.prompt if i >= vocab), None)
        if bad is not None:
            raise ApiError(422, f"the prompt's token id {bad} is outside model {served.name!r}'s vocabulary of {vocab}", param="prompt")
        text = served.tokenizer.decode(body.prompt)
        return Prompt("completion", list(body.prompt), text, None, text, None)
    check_prompt_chars(config, served, len(body.prompt), "prompt")
    return Prompt("completion", served.encode(body.prompt, add_special_tokens=True), body.prompt, None, body.prompt, None)


def requested_max_tokens(config: ServeConfig, body: SamplingFields) -> int:
    """The request's max_tokens (or the server's default) after checking it and ``n`` against the
    server's caps; an ApiError (422) names the field."""
    max_tokens = body.max_completion_tokens or body.max_tokens or config.default_max_tokens
    if max_tokens > config.max_tokens_limit:
        raise ApiError(422, f"max_tokens is {max_tokens}; this server allows at most {config.max_tokens_limit}", param="max_tokens")
    if body.n > config.max_n:
        raise ApiError(422, f"n is {body.n}; this server allows at most {config.max_n}", param="n")
    return max_tokens


def max_new_tokens(config: ServeConfig, served: ServedModel, body: SamplingFields, prompt: Prompt) -> int:
    """The request's max_tokens (or the server's default), after checking it, ``n`` and the prompt's
    length against the server's caps and the model's context; an ApiError (422) names the field."""
    prompt_field = "messages" if prompt.endpoint == "chat" else "prompt"
    max_tokens = requested_max_tokens(config, body)
    if not prompt.ids:
        raise ApiError(422, "the prompt encodes to no tokens", param=prompt_field)
    limit = config.max_prompt_tokens
    if served.context is not None:
        room = served.context - max_tokens
        if room < 1:
            raise ApiError(422, f"max_tokens {max_tokens} leaves no room for a prompt in the model's context of {served.context}", param="max_tokens")
        limit = room if limit is None else min(limit, room)
    if limit is not None and len(prompt.ids) > limit:
        raise ApiError(422, f"the prompt is {len(prompt.ids)} tokens (after the chat template); this server takes at most {limit} "
                       f"with max_tokens={max_tokens}", param=prompt_field)
    return max_tokens


class Completion:
    """The ``n`` choices of one request on ``served``'s running batch, queued on construction once
    the request is within the server's limits (else an ApiError, and nothing is queued).

    :meth:`pieces` yields the new text as it arrives and, at its end, stores every choice; then
    ``texts``, ``reasons`` and :meth:`usage` say what was generated. Whoever answers the request
    calls :meth:`close` when done, or when the client goes away.
    """

    def __init__(self, serving: Serving, store: FeedbackStore, served: ServedModel, user: User, body: SamplingFields,
                 prompt: Prompt, started: float | None = None) -> None:
        self.started = time.perf_counter() if started is None else started
        max_tokens = max_new_tokens(serving.config, served, body, prompt)
        serving.charge_completion(user, served, body.n, body.n * max_tokens + len(prompt.ids))
        self.store, self.served, self.user, self.prompt = store, served, user, prompt
        seed = body.seed if body.seed is not None else secrets.randbits(31)  # recorded, so every sample can be redrawn
        rows = [RowSampling(body.temperature, body.top_p, 0, seed, i) for i in range(body.n)]
        self.request_id = f"{'chatcmpl' if prompt.endpoint == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.ids = [f"{self.request_id}-{i}" for i in range(body.n)]  # one completion id per choice
        self.created = int(time.time())
        stop = body.stop_strings()
        self.sampling = {"temperature": body.temperature, "top_p": body.top_p, "max_tokens": max_tokens, "stop": stop,
                         "seed": seed, "n": body.n}
        self.streams = [TextStream(served.tokenizer, stop) for _ in rows]
        self.reasons: list[str | None] = [None] * body.n
        self.first_token: float | None = None
        self.submission = served.submit(prompt.ids, rows, max_tokens, owner=user.id)
        # Detokenising a token is a step of tokenizers' DecodeStream (microseconds) on the event
        # loop; a tokenizer without one re-decodes the whole text per token, in a worker thread.
        self._incremental = all(stream.incremental for stream in self.streams)

    @property
    def texts(self) -> list[str]:
        return [s.text for s in self.streams]

    async def pieces(self) -> AsyncIterator[dict[int, str]]:
        """Per batch of tokens that arrived together, choice → the text it made safe to show (only
        choices with some). When it ends every choice is stored, so feedback on its id works; a
        failed forward raises ApiError (503) and stores nothing."""
        async for events in self.submission.batches():
            # A choice's end decodes its whole text once (flush): that, and slow tokenizers, off the loop.
            slow = not self._incremental or any(token is None for _, token, _ in events)
            shown = await run_in_threadpool(self._apply_all, events) if slow else self._apply_all(events)
            if shown:
                yield shown
        await self._record()

    def _apply_all(self, events: list[tuple[int, int | None, str | None]]) -> dict[int, str]:
        arrived: dict[int, str] = {}
        for choice, token, reason in events:
            arrived[choice] = arrived.get(choice, "") + self._apply(choice, token, reason)
        return {choice: text for choice, text in arrived.items() if text}

    def sampled(self, choice: int) -> tuple[list[int], list[float]]:
        """The tokens ``choice`` sampled and their log-probs under the distribution each was drawn
        from: the tokens of its text, then the stop token that ended it (as vLLM returns it; the
        text leaves it out). Read once the choice has ended."""
        ids = list(self.streams[choice].token_ids)
        logprobs = self.submission.logprobs[choice][:len(ids)]
        stop = self.submission.requests[choice].stop_token
        if stop is not None and not self.streams[choice].stopped:  # a stop string cuts before any stop token
            ids.append(stop[0])
            logprobs.append(stop[1])
        return ids, logprobs

    def close(self) -> None:
        """Free the rows still running (the client went away); once every choice ended, nothing to do."""
        self.submission.close()

    def usage(self) -> dict:
        """OpenAI's token counts: the prompt's, and the completions' summed over the choices."""
        completion_tokens = sum(len(s.token_ids) for s in self.streams)
        prompt_tokens = len(self.prompt.ids)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}

    def _apply(self, choice: int, token: int | None, reason: str | None) -> str:
        """Apply one event of the decode thread; the text it makes safe to show."""
        stream = self.streams[choice]
        if token is None:
            reason = reason or "length"
            if reason.startswith("error"):
                raise ApiError(503, f"generation failed: {reason[7:]}", "server_error")
            self.reasons[choice] = "stop" if reason == "stop" or stream.stopped else "length"
            return stream.flush()
        if self.first_token is None:
            self.first_token = time.perf_counter()
        if stream.stopped:
            return ""
        piece = stream.push(token)
        if stream.stopped:
            self.submission.cancel(choice)
        return piece

    async def _record(self) -> None:
        latency = (time.perf_counter() - self.started) * 1000
        ttft = None if self.first_token is None else (self.first_token - self.started) * 1000
        prompt, served = self.prompt, self.served
        records = [
            CompletionRecord(
                id=self.ids[i], request_id=self.request_id, choice_index=i, user_id=self.user.id, model_name=served.name,
                model_version=served.version, endpoint=prompt.endpoint, prompt_messages=prompt.messages, prompt_text=prompt.text,
                rendered_prompt=prompt.rendered, prompt_tokens=self.usage()["prompt_tokens"], completion_text=stream.text,
                completion_token_ids=stream.token_ids, finish_reason=self.reasons[i] or "length", sampling=self.sampling,
                latency_ms=latency, ttft_ms=ttft, conversation_id=prompt.conversation_id,
            )
            for i, stream in enumerate(self.streams)
        ]
        await run_in_threadpool(self.store.add_completions, records)
