"""Continuous batching: requests join and leave one running batch between decode steps.

:func:`~alignloop.rollout.generate.generate` decodes a fixed set of prompts to the end; a server
cannot wait for that, because a request that arrives while a batch decodes would wait for its
slowest row. Here every :meth:`ContinuousBatcher.step` first prefills whatever has arrived
(so a new request's first token comes after one prefill, not after the running batch), merges
it into the running batch, and then decodes one token for every running row. A row leaves as
soon as it stops (stop token, its own ``max_new_tokens``, or its caller cancels it: a stop
string was seen or the client went away), so its slot is free at the next step.

The running batch keeps one KV cache (transformers' ``DynamicCache`` with the engine's
:class:`~alignloop.rollout.generate.GrowingLayer` layers) whose rows have different
prompt lengths: shorter rows are left-padded in the cache and masked out of attention, and every
row carries its own position (the count of its real tokens), as :func:`generate` does for left
padding. The cache has room for ``max_batch`` rows: a joining row is written into a spare row,
and a leaving row's place is taken by a row from the end, so the rows that stay are not copied.
When rows leave, columns that are padding in every remaining row are cut, so attention reads a
window as wide as the longest live row. Sampling is per row (:class:`TokenSampler`): each request
has its own temperature, top-p, top-k and seed, and the same seed gives the same tokens however
the request is batched with others (each row draws from its own random stream, see :func:`generate`).

Rows belong to an ``owner`` (a server passes the user). Admission is fair between owners: the
waiting submission of the owner with the fewest running rows goes first, and when the batch is
full, a waiting owner who holds fewer rows than another takes the place of that owner's newest
rows (**preemption by recompute**, as vLLM does): a preempted row leaves the batch with its
tokens and its random stream, waits at the head of its owner's queue, and rejoins later by
prefilling its prompt and the tokens it had generated, then goes on sampling from the same
stream. So one owner's burst cannot hold a newcomer's first token back by more than a step,
and rows are never lost or restarted (what a preempted row costs is the recomputation).

One thread owns a batcher and calls :meth:`step`; :meth:`submit` and :meth:`cancel` may be called
from any thread. Callbacks run on the stepping thread and must be quick (hand the token to
another thread or event loop; do not decode there).
"""

from __future__ import annotations

import itertools
import random
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from alignloop.models.prefix import cache_argument
from alignloop.rollout.attention import decode_attention
from alignloop.rollout.generate import GrowingLayer, RowSampling, TokenSampler, decode_attention_mask, left_padded, pad_left


@dataclass(eq=False)
class DecodeRequest:
    """One completion to produce. ``on_token(token_id, logprob)`` receives every generated token
    (a stop token is not passed on); ``on_finish(reason)`` is called once, with ``"stop"`` (a stop
    token), ``"length"`` (``max_new_tokens`` reached) or ``"cancelled"``, or ``"error: …"``
    when the forward failed."""

    prompt_ids: list[int]
    sampling: RowSampling
    max_new_tokens: int
    on_token: Callable[[int, float], None]
    on_finish: Callable[[str], None]
    generated: int = 0
    cancelled: bool = field(default=False, repr=False)
    owner: Hashable = None  # whose row: admission is fair between owners
    tokens: list[int] = field(default_factory=list, repr=False)  # generated so far: a preempted row resumes from them
    stream: random.Random | None = field(default=None, repr=False)  # a preempted row's random stream, carried over
    preemptions: int = 0
    stop_token: tuple[int, float] | None = field(default=None, repr=False)  # (id, log-prob) of the stop token that ended it


@dataclass(eq=False)
class _Waiting:
    """A submission's rows waiting to join, in arrival order (``seq``) within their owner."""

    rows: list[DecodeRequest]
    owner: Hashable
    seq: int


class ContinuousBatcher:
    """A running batch of :class:`DecodeRequest` rows on one causal LM (put in eval mode: the
    batcher owns it while serving); see the module docstring."""

    def __init__(self, model: Any, stop_token_ids: Sequence[int], pad_id: int, max_batch: int = 32, preempt: bool = True) -> None:
        self.model, self.max_batch, self.pad_id, self.preempt = model, max_batch, pad_id, preempt
        # Eval mode once, not per step: toggling walks every module (2% of a step at 5M).
        model.eval()
        self.device = next(model.parameters()).device
        self.stop_ids = torch.tensor(list(stop_token_ids), dtype=torch.long, device=self.device)
        self.cache_kw = cache_argument(model)
        self._pending: list[_Waiting] = []  # submissions waiting; rows of one submission join together
        self._arrivals = itertools.count()
        self.preempted = 0  # rows preempted so far (each resumed later by recompute)
        self.tokens_generated = 0  # tokens handed to rows so far
        self.rows_cancelled = 0  # rows that ended because their caller cancelled them
        self._lock = threading.Condition()
        self.rows: list[DecodeRequest] = []
        self.cache: Any = None
        self.mask = self.position = self.last = None  # (R, S) bool, (R,), (R,)
        self.sampler: TokenSampler | None = None

    # --- any thread --------------------------------------------------------------------------
    def submit(self, requests: Sequence[DecodeRequest]) -> None:
        """Queue requests (one submission: they join together, under their first row's owner);
        they join at the next step their owner's turn allows. Rows with identical prompts share one prefill."""
        requests = list(requests)
        with self._lock:
            self._pending.append(_Waiting(requests, requests[0].owner if requests else None, next(self._arrivals)))
            self._lock.notify()

    def queued_rows(self, owner: Hashable) -> int:
        """Rows of ``owner`` waiting to join (not cancelled)."""
        with self._lock:
            return sum(1 for w in self._pending if w.owner == owner for r in w.rows if not r.cancelled)

    def cancel(self, request: DecodeRequest) -> None:
        """Stop a request at the next step (its ``on_finish`` gets ``"cancelled"``)."""
        request.cancelled = True

    def wait_for_work(self, timeout: float | None = None) -> bool:
        """Block until something is running or queued (or ``timeout``); True if there is work."""
        with self._lock:
            if not self.rows and not self._pending:
                self._lock.wait(timeout)
            return bool(self.rows or self._pending)

    @property
    def load(self) -> int:
        """Rows running plus rows queued."""
        with self._lock:
            return len(self.rows) + sum(len(w.rows) for w in self._pending)

    # --- the stepping thread -----------------------------------------------------------------
    def step(self, after_admit: Callable[[], None] | None = None) -> None:
        """Admit what fits (prefill, first tokens), call ``after_admit`` (a server hands the first
        tokens on here, one decode step sooner), then decode one token for every running row."""
        with torch.inference_mode():
            try:
                self._admit()
                if after_admit is not None:
                    after_admit()
                if self.rows:
                    self._decode()
            except Exception as e:  # a failed forward ends every row it touched, not the server
                for request in self.rows + [r for w in self._take_all() for r in w.rows]:
                    request.on_finish(f"error: {type(e).__name__}: {e}")
                self._reset()
                raise

    def _take_all(self) -> list[_Waiting]:
        with self._lock:
            taken, self._pending = self._pending, []
        return taken

    def _choose(self) -> list[DecodeRequest]:
        """Take the submissions that join at this step, fairly between owners (see the module
        docstring); preempts rows to make room where that is fair."""
        with self._lock:
            for waiting in self._pending:  # cancelled rows (their client left) never join
                waiting.rows = [r for r in waiting.rows if not self._finish_if_cancelled(r)]
            self._pending = [w for w in self._pending if w.rows]
            load: dict[Hashable, int] = {}
            for r in self.rows:
                load[r.owner] = load.get(r.owner, 0) + 1
            admitted: list[DecodeRequest] = []
            while self._pending:
                # The waiting owner with the fewest rows in the batch, then the earliest submission.
                waiting = min(self._pending, key=lambda w: (load.get(w.owner, 0), w.seq))
                free = self.max_batch - len(self.rows) - len(admitted)
                need = len(waiting.rows) - free
                if need > 0 and (self.rows or admitted):
                    if not (self.preempt and self._preempt_for(waiting, need, load)):
                        break
                self._pending.remove(waiting)
                admitted += waiting.rows
                load[waiting.owner] = load.get(waiting.owner, 0) + len(waiting.rows)
        return admitted

    def _preempt_for(self, waiting: _Waiting, need: int, load: dict[Hashable, int]) -> bool:
        """Make room for ``need`` rows of ``waiting`` by preempting the newest rows of the owner
        with the most rows, if that owner would still hold at least as many as ``waiting``'s
        owner afterwards (so two owners never take turns preempting each other). Runs under the lock."""
        heaviest = max(load, key=lambda owner: load[owner], default=None)
        mine = load.get(waiting.owner, 0)
        if heaviest is None or heaviest == waiting.owner or load[heaviest] - need < mine + len(waiting.rows):
            return False
        theirs = [i for i, r in enumerate(self.rows) if r.owner == heaviest]
        if len(theirs) < need:
            return False
        victims = sorted(theirs, key=lambda i: (self.rows[i].generated, -i))[:need]  # the cheapest to recompute
        for i in victims:
            row = self.rows[i]
            row.stream = self.sampler.streams[i]
            row.preemptions += 1
        resumed = _Waiting([self.rows[i] for i in sorted(victims)], heaviest, -1 - self.preempted)  # ahead of the owner's later submissions
        self.preempted += need
        self._pending.append(resumed)
        keep = [i for i in range(len(self.rows)) if i not in set(victims)]
        load[heaviest] -= need
        if keep:
            self._keep(keep, self.last)
        else:
            self._reset()
        return True

    def _admit(self) -> None:
        admitted = self._choose()
        if not admitted:
            return
        zero = [r for r in admitted if r.max_new_tokens <= 0]
        for r in zero:
            r.on_finish("length")
        admitted = [r for r in admitted if r.max_new_tokens > 0]
        if not admitted:
            return
        # A resumed row prefills its prompt and what it had generated: the next logits are those
        # its next decode step would have given (up to rounding).
        cache, kv, mask, position, logits = self._prefill([r.prompt_ids + r.tokens for r in admitted])
        sampler = TokenSampler([r.sampling for r in admitted], logits.shape[-1], self.device)
        for i, r in enumerate(admitted):
            if r.stream is not None:
                sampler.streams[i], r.stream = r.stream, None
        token, logp = sampler(logits.float(), range(len(admitted)))
        keep = self._deliver(admitted, token, logp)
        if not keep:
            return
        if len(keep) < len(admitted):
            index = torch.tensor(keep, device=self.device)
            kv = [(keys[index], values[index]) for keys, values in kv]
            mask, position, token = mask[index], position[index], token[index]
            sampler.select(keep)
        self._merge([admitted[i] for i in keep], cache, kv, mask, position, token, sampler)

    def _prefill(self, prompts: list[list[int]]) -> tuple[Any, list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded prefill of the distinct prompts: the cache, each layer's (keys, values)
        expanded to one row per request, the (N, L) bool mask, positions and last logits."""
        from transformers import DynamicCache

        unique: dict[tuple[int, ...], int] = {}
        for p in prompts:
            unique.setdefault(tuple(p), len(unique))
        input_ids, mask, positions = left_padded(list(unique), self.pad_id, self.device)
        cache = DynamicCache()
        logits = self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
            logits_to_keep=1, **{self.cache_kw: cache},
        ).logits[:, -1, :]
        source = torch.tensor([unique[tuple(p)] for p in prompts], device=self.device)
        kv = [(layer.keys[source], layer.values[source]) for layer in cache.layers]
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        return cache, kv, mask[source].bool(), lengths, logits[source]

    def _merge(self, rows: list[DecodeRequest], cache: Any, kv: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor,
               position: torch.Tensor, last: torch.Tensor, sampler: TokenSampler) -> None:
        """Add prefilled rows to the running batch: written into the running cache's spare rows
        (the first rows start it, with room for ``max_batch`` rows)."""
        if not self.rows:
            spare = max(self.max_batch - len(rows), 0)
            cache.layers = [GrowingLayer(keys, values, spare_rows=spare) for keys, values in kv]
            self.rows, self.cache, self.mask, self.position, self.last, self.sampler = rows, cache, mask, position, last, sampler
            return
        # Every layer holds the same rows and widths, so each grows by the same columns.
        grown = [layer.append_rows(keys, values) for layer, (keys, values) in zip(self.cache.layers, kv)][0]
        width = self.mask.shape[1] + grown
        self.mask = torch.cat([pad_left(self.mask, width, 1), pad_left(mask, width, 1)])
        self.position = torch.cat([self.position, position])
        self.last = torch.cat([self.last, last])
        self.sampler.extend(sampler)
        self.rows = self.rows + rows

    def _decode(self) -> None:
        rows = len(self.rows)
        width = self.mask.shape[1]
        self.mask = torch.cat([self.mask, torch.ones((rows, 1), dtype=torch.bool, device=self.device)], dim=1)
        mask = decode_attention_mask(self.model, self.mask)
        with decode_attention(self.model):  # one query a row as plain products (rollout/attention.py)
            logits = self.model(
                input_ids=self.last[:, None], attention_mask=mask, position_ids=self.position[:, None],
                cache_position=torch.tensor([width], device=self.device), use_cache=True, logits_to_keep=1,
                **{self.cache_kw: self.cache},
            ).logits[:, -1, :]
        self.position = self.position + 1
        token, logp = self.sampler(logits.float(), range(rows))
        keep = self._deliver(self.rows, token, logp)
        if len(keep) == rows:
            self.last = token
            return
        if not keep:
            self._reset()
            return
        self._keep(keep, token)

    def _keep(self, keep: list[int], last: torch.Tensor) -> None:
        """Only rows ``keep`` (ascending) go on, ``last`` their next input tokens (all rows').
        Rows from the end move into the places of rows that left; the others stay where they
        are, so the cache copies only the rows that move."""
        order = _fill_from_end(len(self.rows), keep)
        index = torch.tensor(order, device=self.device)
        self.rows = [self.rows[i] for i in order]
        self.mask, self.position, self.last = self.mask[index], self.position[index], last[index]
        self.sampler.select(order)
        # Columns that are padding in every remaining row carry nothing: cut them.
        first = int(self.mask.any(dim=0).int().argmax())
        for layer in self.cache.layers:
            layer.keep_rows(order)
            layer.trim_left(first)
        self.mask = self.mask[:, first:]

    def _deliver(self, rows: list[DecodeRequest], token: torch.Tensor, logp: torch.Tensor) -> list[int]:
        """Hand each row its token; the indices of rows that go on."""
        stopped = torch.isin(token, self.stop_ids).tolist() if len(self.stop_ids) else [False] * len(rows)
        tokens, logps = token.tolist(), logp.tolist()
        keep = []
        for i, request in enumerate(rows):
            if self._finish_if_cancelled(request):
                continue
            if stopped[i]:
                request.stop_token = (tokens[i], logps[i])  # not a token of the text, but sampled: RL scores it
                request.on_finish("stop")
                continue
            request.generated += 1
            self.tokens_generated += 1
            request.tokens.append(tokens[i])
            request.on_token(tokens[i], logps[i])
            if request.generated >= request.max_new_tokens:
                request.on_finish("length")
            elif not self._finish_if_cancelled(request):
                keep.append(i)
        return keep

    def _finish_if_cancelled(self, request: DecodeRequest) -> bool:
        if request.cancelled:
            self.rows_cancelled += 1
            request.on_finish("cancelled")
        return request.cancelled

    def stats(self) -> dict[str, int]:
        """Rows running and waiting, and the counters (for an operator's dashboard and tests)."""
        with self._lock:
            queued = sum(len(w.rows) for w in self._pending)
        return {"rows_running": len(self.rows), "rows_queued": queued, "tokens_generated": self.tokens_generated,
                "rows_preempted": self.preempted, "rows_cancelled": self.rows_cancelled}

    def _reset(self) -> None:
        self.rows, self.cache, self.mask, self.position, self.last, self.sampler = [], None, None, None, None, None


def _fill_from_end(count: int, keep: Sequence[int]) -> list[int]:
    """The new order of ``count`` rows of which ``keep`` (ascending) stay: each place below
    ``len(keep)`` freed by a row that left takes a kept row from beyond it; the rest keep their
    places. ``_fill_from_end(5, [0, 2, 3, 4]) == [0, 4, 2, 3]``."""
    n, kept = len(keep), set(keep)
    order = list(range(n))
    holes = [i for i in range(n) if i not in kept]
    movers = [i for i in keep if i >= n]
    for hole, mover in zip(holes, movers):
        order[hole] = mover
    return order
