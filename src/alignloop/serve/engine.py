"""A served model: weights, tokenizer, version hash and one decode thread running a
:class:`~alignloop.rollout.continuous.ContinuousBatcher`.

Requests from every client of a model share that model's running batch. The bridge to the
event loop is a :class:`Submission` per request: the decode thread appends ``(choice, token,
None)`` and ``(choice, None, reason)`` events to it and never waits for the event loop; a
:class:`Waker` wakes the loop for every submission with new events, once per step or once every
``stream_interval`` steps (a request's first token and its end go out at once); the request's
handler detokenises (:class:`TextStream`), applies stop strings and streams.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import torch

from alignloop.config import ModelConfig, ServeConfig
from alignloop.errors import ConfigError, ModelError
from alignloop.models.load import context_length, disable_dropout, inference_device, load_causal_lm, load_tokenizer, model_family
from alignloop.rollout.continuous import ContinuousBatcher, DecodeRequest
from alignloop.rollout.generate import RowSampling, default_stop_token_ids

log = logging.getLogger("alignloop")


def model_version(model: torch.nn.Module) -> str:
    """A content hash of the weights (adapters included, as they are part of the module): the
    SHA-256 of every tensor's name, dtype, shape and bytes in name order, first 16 hex digits.
    Two folders with the same weights get the same version; one changed weight changes it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def parse_model_spec(spec: str) -> tuple[str, str]:
    """``NAME=PATH`` or ``PATH`` → (name, path). The name of ``runs/X/final`` is ``X``."""
    name, sep, path = spec.partition("=")
    if sep:
        if not name or not path:
            raise ConfigError(f"models: {spec!r} should be PATH or NAME=PATH")
        return name, path
    parts = Path(spec.rstrip("/")).parts
    if len(parts) >= 2 and parts[-1] == "final":
        return parts[-2], spec
    return (parts[-1] if parts else spec), spec


def require_chat_model(name: str, path: str) -> None:
    """Refuse a folder that holds no causal LM: loaded as one, it would answer from a random new
    head (and hash to a new version at every start, as the head is drawn anew)."""
    family, architectures = model_family(path, f"model {name!r} at")
    if family == "causal_lm":
        return
    what = {"classifier": "a classifier (labels), not a chat model: serve it with --classifier",
            "reward": "a reward model (one score per text), not a chat model: it scores answers for evaluate and RL, "
                      "and is not served"}.get(family, f"neither a chat model (a causal LM) nor a classifier: its config names {architectures}")
    raise ModelError(f"model {name!r} at {path!r}: {what}")


class ServedModel:
    """One model behind the API: ``name`` (what requests ask for), ``version`` (the content hash
    stored with every completion) and the decode thread."""

    def __init__(self, name: str, path: str, device: str | None = None, dtype: str = "float32", max_batch: int = 32,
                 stream_interval: int = 2) -> None:
        cfg = ModelConfig(name_or_path=path, dtype=dtype)
        self.name, self.path = name, path
        require_chat_model(name, path)
        self.tokenizer = load_tokenizer(cfg)
        self.model = load_causal_lm(cfg, self.tokenizer, seed=0).to(inference_device(device))  # the batcher puts it in eval mode
        disable_dropout(self.model)
        self.version = model_version(self.model)
        self.context = context_length(self.model)
        self.stop_ids = default_stop_token_ids(self.model, self.tokenizer)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.batcher = ContinuousBatcher(self.model, self.stop_ids, pad, max_batch=max_batch)
        self.waker = Waker()
        self.stream_interval = stream_interval
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the decode thread (again, after :meth:`stop`)."""
        if self._thread is None or not self._thread.is_alive():
            self._stopping.clear()
            self._thread = threading.Thread(target=self._run, name=f"decode-{self.name}", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def queued_rows(self, owner: Any) -> int:
        """``owner``'s rows waiting to join the batch (what ``max_queued_rows_per_user`` counts)."""
        return self.batcher.queued_rows(owner)

    def stats(self) -> dict:
        """The batch's counters (``/admin/stats``)."""
        return self.batcher.stats()

    def drain_and_stop(self, timeout: float = 600.0) -> None:
        """Stop once every request already submitted has finished (a redeployed model serves out
        its running streams while new requests go to its successor)."""
        deadline = time.monotonic() + timeout
        while self.batcher.load and time.monotonic() < deadline:
            time.sleep(0.05)
        self.stop()

    def _run(self) -> None:
        steps = 0
        while not self._stopping.is_set():
            if not self.batcher.wait_for_work(timeout=0.2):
                continue
            try:
                self.batcher.step(after_admit=self.waker.wake_urgent)  # first tokens out before the decode step
            except Exception:  # every affected request got on_finish("error: …"); keep serving
                log.exception("decode step failed on model %s", self.name)
            finally:
                steps += 1
                self.waker.wake(force=steps % self.stream_interval == 0 or not self.batcher.rows)

    @classmethod
    def from_config(cls, name: str, path: str, config: ServeConfig) -> ServedModel:
        """``path`` served as ``name`` with the server's device, dtype, batch and stream settings."""
        return cls(name, path, device=config.device, dtype=config.dtype, max_batch=config.max_batch,
                   stream_interval=config.stream_interval)

    def render_chat(self, messages: Sequence[dict]) -> str:
        """The prompt text the model sees: the chat template with the assistant header appended."""
        return self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def submit(self, prompt_ids: list[int], rows: Sequence[RowSampling], max_new_tokens: int, owner: Any = None) -> "Submission":
        """Queue one request's rows (its ``n`` choices) on the running batch, as ``owner``'s (the
        user: admission is fair between owners)."""
        return Submission(self.batcher, self.waker, prompt_ids, rows, max_new_tokens, owner)


class Waker:
    """Submissions with new events, woken together: one ``call_soon_threadsafe`` per event loop
    per wake instead of one per row. Every wake is an SSE chunk per stream and a task switch per
    stream on the event loop, which shares the CPU with decoding; :meth:`wake` without ``force``
    therefore only wakes when an urgent event (a request's first token, or an end) is waiting."""

    def __init__(self) -> None:
        self._due: list[Submission] = []
        self._urgent = False
        self._lock = threading.Lock()

    def add(self, submission: "Submission", urgent: bool) -> None:
        with self._lock:
            if not submission._due:
                submission._due = True
                self._due.append(submission)
            self._urgent = self._urgent or urgent

    def wake_urgent(self) -> None:
        self.wake(force=False)

    def wake(self, force: bool = True) -> None:
        with self._lock:
            if not self._due or not (force or self._urgent):
                return
            due, self._due, self._urgent = self._due, [], False
            for submission in due:
                submission._due = False
        by_loop: dict[Any, list[asyncio.Event]] = {}
        for submission in due:
            by_loop.setdefault(submission.loop, []).append(submission._ready)
        for loop, events in by_loop.items():
            loop.call_soon_threadsafe(_set_all, events)


def _set_all(events: list[asyncio.Event]) -> None:
    for event in events:
        event.set()


class Submission:
    """The rows of one request in a model's running batch, seen from the event loop.

    The decode thread appends events to a list and marks the submission for the next wake, so a
    loop that falls behind (or a ``stream_interval`` above 1) takes several tokens in one go (one
    SSE chunk, one wakeup) instead of paying per token. ``batches()`` yields lists of ``(choice, token_id, None)`` per
    generated token and ``(choice, None, reason)`` when a choice ends; ``cancel(choice)`` stops one
    row (a stop string was seen), ``close()`` every row still running (the client went away).
    """

    def __init__(self, batcher: ContinuousBatcher, waker: "Waker", prompt_ids: list[int], rows: Sequence[RowSampling],
                 max_new_tokens: int, owner: Any = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.batcher, self.waker = batcher, waker
        self._pending: list[tuple[int, int | None, str | None]] = []
        self._lock = threading.Lock()
        self._due = False  # in the waker's list (the waker's lock guards it)
        self._started = False  # a token was handed on: the next ones may wait for the interval
        self._ready = asyncio.Event()
        # Per choice, the log-prob of each token handed on, in order (appended before its event is
        # queued, so a handler that has seen k tokens of a choice finds at least k log-probs).
        self.logprobs: list[list[float]] = [[] for _ in rows]
        self.requests = [
            DecodeRequest(
                prompt_ids, sampling, max_new_tokens,
                on_token=lambda token, logp, i=i: self._token(i, token, logp),
                on_finish=lambda reason, i=i: self._put((i, None, reason)), owner=owner,
            )
            for i, sampling in enumerate(rows)
        ]
        batcher.submit(self.requests)

    def _token(self, choice: int, token: int, logprob: float) -> None:
        self.logprobs[choice].append(logprob)
        self._put((choice, token, None))

    def _put(self, event: tuple[int, int | None, str | None]) -> None:
        """On the decode thread: queue the event and mark the submission for the next wake, which
        :meth:`ServedModel._run` makes for all at once. A first token or an end is urgent."""
        with self._lock:
            self._pending.append(event)
        urgent = event[1] is None or not self._started
        self._started = True
        self.waker.add(self, urgent)

    async def batches(self) -> AsyncIterator[list[tuple[int, int | None, str | None]]]:
        open_rows = len(self.requests)
        while open_rows:
            await self._ready.wait()
            with self._lock:
                events, self._pending = self._pending, []
                self._ready.clear()
            open_rows -= sum(1 for _, token, _ in events if token is None)
            if events:
                yield events

    def cancel(self, choice: int) -> None:
        self.batcher.cancel(self.requests[choice])

    def close(self) -> None:
        for request in self.requests:
            self.batcher.cancel(request)


class TextStream:
    """Incremental detokenisation of one choice with stop strings.

    ``push(token)`` returns the new text that is safe to show: characters that might still turn
    into the start of a stop string, and an incomplete UTF-8 sequence, are held back until the
    next token settles them. ``stopped`` turns true when a stop string appears; the text is cut
    before it.

    A fast tokenizer decodes each token once, through ``tokenizers``' ``DecodeStream`` (it holds
    back an incomplete UTF-8 sequence itself); re-decoding the whole completion at every token
    took a fifth of the event loop's time with 32 streams. :meth:`flush` settles the text against
    one full decode, so what is stored is what ``tokenizer.decode`` gives. Other tokenizers, and
    those that clean up spaces after decoding (a rule that looks at neighbouring tokens), decode
    the whole completion at every token.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str]) -> None:
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.token_ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._stream = None
        if self._backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
            from tokenizers.decoders import DecodeStream

            self._stream = DecodeStream(skip_special_tokens=True)

    @property
    def incremental(self) -> bool:
        """Each token costs one DecodeStream step, not a decode of the whole text."""
        return self._stream is not None

    def push(self, token_id: int) -> str:
        if self.stopped:  # the row may decode a token or two more before its cancel lands
            return ""
        self.token_ids.append(token_id)
        if self._stream is not None:
            text = self.text + _storable(self._stream.step(self._backend, token_id) or "")
        else:
            text = _storable(self.tokenizer.decode(self.token_ids, skip_special_tokens=True))
        for s in self.stop:
            at = text.find(s, max(0, self.sent - len(s)))
            if at >= 0:
                text, self.stopped = text[:at], True
        self.text = text
        if self.stopped:
            return self.flush()
        hold = max((len(s) - 1 for s in self.stop), default=0)
        safe = len(text) - hold
        if text.endswith("\ufffd"):
            safe = min(safe, len(text) - 1)
        return self._send_to(safe)

    def flush(self) -> str:
        """Everything not yet sent (the choice has ended)."""
        if self._stream is not None and not self.stopped:
            # A completion that ends inside a UTF-8 sequence: the stream still holds those bytes.
            full = _storable(self.tokenizer.decode(self.token_ids, skip_special_tokens=True))
            if full.startswith(self.text[:self.sent]):
                self.text = full
        return self._send_to(len(self.text))

    def _send_to(self, end: int) -> str:
        if end <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:end], end
        return piece


def _storable(text: str) -> str:
    """A model can emit a NUL byte (a byte-level token); the store refuses NUL (PostgreSQL cannot
    hold it), so it is shown and stored as U+FFFD, the same on both back-ends."""
    return text.replace("\x00", "\ufffd") if "\x00" in text else text
