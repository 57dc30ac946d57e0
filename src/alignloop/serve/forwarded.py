"""A completion forwarded to the upstream (``alignloop serve --upstream URL``): an
:class:`UpstreamCompletion` is a :class:`~alignloop.serve.completion.Completion` whose choices
arrive from the upstream's SSE stream instead of the local batch, with the same pieces, texts,
reasons, usage and stored rows, so the routes that answer in JSON or SSE are the local ones.

The upstream is always asked to stream, also for a whole-body request: the gateway stores the
choices once they end, as it does for its own model, and a client that leaves closes the upstream
connection, which stops the generation there.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx

from alignloop.feedback.store import FeedbackStore, User
from alignloop.serve.completion import Completion, Prompt, check_prompt_chars, requested_max_tokens
from alignloop.serve.dependencies import Serving
from alignloop.serve.errors import ApiError
from alignloop.serve.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from alignloop.serve.upstream import UpstreamModel, unreachable, upstream_message, upstream_refusal

# The gateway has no tokenizer: a prompt's tokens are counted against the user's budget before the
# upstream has read it as characters / 4, the usual rate of BPE vocabularies on English text.
CHARS_PER_TOKEN_ESTIMATE = 4


@dataclass
class ChoiceText:
    """One choice's text as the upstream sends it (what ``Completion`` reads of a
    :class:`~alignloop.serve.engine.TextStream`); the upstream sends no token ids."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)


class UpstreamCompletion(Completion):
    """The ``n`` choices of one request, generated upstream, one upstream request each.
    :meth:`open` checks the request against the gateway's limits, charges the user and sends it;
    the upstream's answer status is known before the gateway answers, so an upstream that is down
    or refuses is the gateway's 503/502/4xx, never a 200 stream that fails."""

    def __init__(self, serving: Serving, store: FeedbackStore, served: UpstreamModel, user: User, body: SamplingFields,
                 started: float | None = None) -> None:
        self.started = time.perf_counter() if started is None else started
        config = serving.config
        if isinstance(body, CompletionRequest):
            if not isinstance(body.prompt, str):
                raise ApiError(422, "field 'prompt': token ids need the model's tokenizer, which the gateway does not have; "
                               "send the prompt as text (or send token ids to the upstream directly)", param="prompt")
            if body.logprobs is not None or body.return_tokens_as_token_ids:
                raise ApiError(422, "field 'logprobs': the gateway does not forward log-probs; ask the upstream directly",
                               param="logprobs")
        max_tokens = requested_max_tokens(config, body)
        if isinstance(body, ChatCompletionRequest):
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
            chars = sum(len(m["content"]) for m in messages)
            check_prompt_chars(config, served, chars, "messages")
            # What the upstream was sent; two answers to the same messages are siblings (pairs).
            rendered = json.dumps(messages, ensure_ascii=False)
            prompt = Prompt("chat", [], rendered, messages, None, body.conversation_id)
        else:
            chars = len(body.prompt)
            check_prompt_chars(config, served, chars, "prompt")
            prompt = Prompt("completion", [], body.prompt, None, body.prompt, None)
        serving.charge_completion(user, served, body.n, body.n * max_tokens + math.ceil(chars / CHARS_PER_TOKEN_ESTIMATE))
        self.store, self.served, self.user, self.prompt = store, served, user, prompt
        seed = body.seed if body.seed is not None else secrets.randbits(31)  # recorded and sent: redrawn where the upstream honours it
        self.request_id = f"{'chatcmpl' if prompt.endpoint == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.ids = [f"{self.request_id}-{i}" for i in range(body.n)]
        self.created = int(time.time())
        stop = body.stop_strings()
        self.sampling = {"temperature": body.temperature, "top_p": body.top_p, "max_tokens": max_tokens, "stop": stop,
                         "seed": seed, "n": body.n}
        self.streams = [ChoiceText() for _ in range(body.n)]
        self.reasons: list[str | None] = [None] * body.n
        self.first_token: float | None = None
        self.upstream_usage: dict[int, dict] = {}  # choice → the upstream's token counts
        self._route = "/chat/completions" if prompt.endpoint == "chat" else "/completions"
        common = {"model": served.path, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": max_tokens,
                  "temperature": body.temperature, "top_p": body.top_p,
                  **({"messages": messages} if prompt.endpoint == "chat" else {"prompt": body.prompt}), **({"stop": stop} if stop else {})}
        self._requests = [{**common, "seed": (seed + i) % 2**63} for i in range(body.n)]  # choice i: seed + i
        self._responses: list[httpx.Response] = []
        self._counted = 0

    @classmethod
    async def open(cls, serving: Serving, store: FeedbackStore, served: UpstreamModel, user: User, body: SamplingFields,
                   started: float | None = None) -> UpstreamCompletion:
        completion = cls(serving, store, served, user, body, started)
        await completion._send()
        return completion

    async def _send(self) -> None:
        """One upstream request per choice, sent together (seeds ``seed + i``): not every upstream
        honours ``n`` (``transformers serve`` ignores it), and the chat page's comparisons and
        the simulated users' pairs need both answers. All are answered before the gateway
        answers; one refusal closes the others and is the request's error."""
        self._count(len(self.ids))
        opened = await asyncio.gather(*(self._open(body) for body in self._requests), return_exceptions=True)
        self._responses = [r for r in opened if isinstance(r, httpx.Response)]
        failure = next((r for r in opened if isinstance(r, BaseException)), None)
        if failure is not None:
            await self._finish()
            raise failure

    async def _open(self, body: dict) -> httpx.Response:
        upstream = self.served.upstream
        assert upstream.client is not None, "the app's lifespan opens the upstream's client"
        try:
            response = await upstream.client.send(upstream.client.build_request("POST", self._route, json=body), stream=True)
        except httpx.HTTPError as e:
            raise unreachable(upstream.url, e) from None
        if response.status_code >= 400:
            text = (await response.aread()).decode("utf-8", "replace")
            await response.aclose()
            raise upstream_refusal(upstream.url, response.status_code, text, response.headers)
        return response

    def _count(self, rows: int) -> None:
        """Rows of this request in flight for its user (``max_queued_rows_per_user``)."""
        self._counted += rows
        self.served.rows_in_flight[self.user.id] += rows
        if self.served.rows_in_flight[self.user.id] <= 0:
            del self.served.rows_in_flight[self.user.id]

    async def pieces(self) -> AsyncIterator[dict[int, str]]:
        """Per upstream chunk, choice → its new text; when every stream has ended every choice is
        stored (with the upstream's finish reasons and token counts). An upstream that breaks off
        raises ApiError (502) and stores nothing."""
        try:
            async for i, event in self._merged():
                if event.get("usage"):
                    self.upstream_usage[i] = event["usage"]
                shown: dict[int, str] = {}
                for choice in event.get("choices") or ():
                    piece = choice.get("text") if self.prompt.endpoint == "completion" else (choice.get("delta") or {}).get("content")
                    if piece:
                        if self.first_token is None:
                            self.first_token = time.perf_counter()
                        self.streams[i].text += piece.replace("\x00", "\ufffd")  # the store holds no NUL (as TextStream)
                        shown[i] = shown.get(i, "") + piece
                    if choice.get("finish_reason"):
                        self.reasons[i] = "stop" if choice["finish_reason"] == "stop" else "length"
                if shown:
                    yield shown
        finally:
            await self._finish()
        await self._record()

    async def _merged(self) -> AsyncIterator[tuple[int, dict]]:
        """(choice, event) from every choice's stream, in the order they arrive."""
        if len(self._responses) == 1:
            async for event in self._events(self._responses[0]):
                yield 0, event
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, response: httpx.Response) -> None:
            try:
                async for event in self._events(response):
                    await queue.put((i, event, None))
                await queue.put((i, None, None))
            except Exception as e:  # handed to the reader, which raises it
                await queue.put((i, None, e))

        tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(self._responses)]
        try:
            running = len(tasks)
            while running:
                i, event, error = await queue.get()
                if error is not None:
                    raise error
                if event is None:
                    running -= 1
                else:
                    yield i, event
        finally:
            for task in tasks:
                task.cancel()

    async def _events(self, response: httpx.Response) -> AsyncIterator[dict]:
        """The upstream's SSE events as JSON, up to ``[DONE]`` or the end of the stream; an error
        event, or a stream that breaks off, is an ApiError (502)."""
        url = self.served.upstream.url
        try:
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments, "event:" lines
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                try:
                    event = json.loads(data)
                except ValueError:
                    raise ApiError(502, f"the upstream at {url} sent an event that is not JSON: {data[:200]!r}", "server_error") from None
                if isinstance(event, dict) and event.get("error"):
                    raise ApiError(502, f"the upstream failed mid-answer: {upstream_message(data)}", "server_error")
                if isinstance(event, dict):
                    yield event
        except httpx.HTTPError as e:
            raise ApiError(502, f"the upstream at {url} broke off the answer ({type(e).__name__}: {e})", "server_error") from None

    async def _finish(self) -> None:
        self._count(-self._counted)
        responses, self._responses = self._responses, []
        for response in responses:
            await response.aclose()

    def close(self) -> None:
        """The client went away (or the answer is done): close the upstream streams, which stops
        the generation there. Closing is async; it is scheduled on the running loop."""
        responses, self._responses = self._responses, []
        self._count(-self._counted)
        for response in responses:
            if not response.is_closed:
                asyncio.get_running_loop().create_task(response.aclose())

    def usage(self) -> dict:
        """The upstream's token counts (``stream_options.include_usage``) over the choices, else
        zero: the gateway has no tokenizer to count them."""
        counts = list(self.upstream_usage.values())
        prompt_tokens = int(counts[0].get("prompt_tokens") or 0) if counts else 0  # the same prompt for every choice: once
        completion_tokens = sum(int(u.get("completion_tokens") or 0) for u in counts)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}
