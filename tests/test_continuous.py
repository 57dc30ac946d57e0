"""Continuous batching: requests that join a running batch at different steps get the same
tokens as :func:`generate` gives them alone (greedy and seeded sampling), stop where they
should, and leave the batch without disturbing the rows that stay."""

from __future__ import annotations

from typing import Any

import pytest

from alignloop.rollout.continuous import ContinuousBatcher, DecodeRequest
from alignloop.rollout.generate import RowSampling, Sampling, default_stop_token_ids, encode_prompts, generate

PROMPTS = [
    "Hi",
    "How are you doing today, my friend?",
    "What is your favourite food and why do you like it so much?",
    "Tell me",
    "I went to the park yesterday and saw a dog.",
]


@pytest.fixture(scope="module")
def model(tiny_model_dir: Any) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()


class Collector:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.logps: list[float] = []
        self.reason: str | None = None

    def request(self, prompt_ids: list[int], sampling: RowSampling, max_new_tokens: int) -> DecodeRequest:
        return DecodeRequest(prompt_ids, sampling, max_new_tokens, self.on_token, self.on_finish)

    def on_token(self, token: int, logp: float) -> None:
        assert self.reason is None, "a token after the request finished"
        self.tokens.append(token)
        self.logps.append(logp)

    def on_finish(self, reason: str) -> None:
        assert self.reason is None, "finished twice"
        self.reason = reason


def run_staggered(model: Any, tok: Any, sampling: Sampling, joins: list[int], stops: list[int], max_batch: int = 8):
    """Submit prompt i before step joins[i]; step until every request has finished."""
    batcher = ContinuousBatcher(model, stops, tok.pad_token_id, max_batch=max_batch)
    ids = encode_prompts(tok, PROMPTS)
    collectors = [Collector() for _ in PROMPTS]
    step = 0
    while any(c.reason is None for c in collectors):
        for i, join in enumerate(joins):
            if join == step:
                batcher.submit([collectors[i].request(ids[i], RowSampling.from_config(sampling, i), sampling.max_new_tokens)])
        batcher.step()
        step += 1
        assert step < 500
    return collectors


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_staggered_requests_match_generate_alone(model: Any, builtin_tok: Any, temperature: float) -> None:
    sampling = Sampling(max_new_tokens=10, temperature=temperature, seed=4)
    # No stop tokens: every row runs its full length, so rows overlap at many widths.
    expected = generate(model, builtin_tok, PROMPTS, sampling, stop_token_ids=())
    got = run_staggered(model, builtin_tok, sampling, joins=[0, 0, 3, 5, 9], stops=[])
    for c, ids, logps in zip(got, expected.completion_ids, expected.logprobs):
        assert c.reason == "length"
        assert c.tokens == ids
        assert c.logps == pytest.approx(logps, abs=1e-4)


def test_stop_tokens_and_cancel_free_their_rows(model: Any, builtin_tok: Any) -> None:
    sampling = Sampling(max_new_tokens=30, temperature=1.0, seed=1)
    stops = default_stop_token_ids(model, builtin_tok)
    expected = generate(model, builtin_tok, PROMPTS, sampling)
    got = run_staggered(model, builtin_tok, sampling, joins=[0, 1, 2, 3, 4], stops=stops)
    for c, ids, done in zip(got, expected.completion_ids, expected.finished):
        assert c.tokens == (ids[:-1] if done else ids)  # the stop token is not handed on
        assert c.reason == ("stop" if done else "length")

    # A cancelled row leaves at the next step; the others are untouched.
    batcher = ContinuousBatcher(model, [], builtin_tok.pad_token_id)
    ids = encode_prompts(builtin_tok, PROMPTS[:2])
    keep, cancel = Collector(), Collector()
    requests = [keep.request(ids[0], RowSampling(0.0), 8), cancel.request(ids[1], RowSampling(0.0), 8)]
    batcher.submit(requests)
    batcher.step()
    batcher.cancel(requests[1])
    while keep.reason is None:
        batcher.step()
    assert cancel.reason == "cancelled" and len(cancel.tokens) <= 2
    alone = generate(model, builtin_tok, PROMPTS[:1], Sampling(max_new_tokens=8, temperature=0.0), stop_token_ids=())
    assert keep.tokens == alone.completion_ids[0]
    assert batcher.rows == [] and batcher.cache is None


def test_max_batch_queues_the_rest(model: Any, builtin_tok: Any) -> None:
    sampling = Sampling(max_new_tokens=4, temperature=0.0)
    batcher = ContinuousBatcher(model, [], builtin_tok.pad_token_id, max_batch=2)
    ids = encode_prompts(builtin_tok, PROMPTS)
    collectors = [Collector() for _ in PROMPTS]
    batcher.submit([c.request(i, RowSampling(0.0), 4) for c, i in zip(collectors[:1], ids)])
    for c, i in zip(collectors[1:], ids[1:]):
        batcher.submit([c.request(i, RowSampling(0.0), 4)])
    widths = []
    while any(c.reason is None for c in collectors):
        batcher.step()
        widths.append(len(batcher.rows))
    assert max(widths) == 2
    expected = generate(model, builtin_tok, PROMPTS, sampling, stop_token_ids=())
    assert [c.tokens for c in collectors] == expected.completion_ids


def test_rows_of_many_lengths_joining_and_leaving_match_generate_alone(model: Any, builtin_tok: Any) -> None:
    """Rows leave at different steps (their own max_new_tokens), later ones take their places
    (rows move from the end), and prompts longer than the running window widen it: each row
    still gets the tokens and log-probs it gets alone."""
    import random

    rng = random.Random(0)
    prompts = [" ".join(PROMPTS[i % len(PROMPTS)] for i in range(k, k + 1 + k % 3)) for k in range(12)]
    lengths = [rng.randint(2, 12) for _ in prompts]
    joins = sorted(rng.randint(0, 20) for _ in prompts)
    ids = encode_prompts(builtin_tok, prompts)
    batcher = ContinuousBatcher(model, [], builtin_tok.pad_token_id, max_batch=4)
    collectors = [Collector() for _ in prompts]
    step = 0
    while any(c.reason is None for c in collectors):
        for i, join in enumerate(joins):
            if join == step:
                batcher.submit([collectors[i].request(ids[i], RowSampling(1.0, 1.0, 0, 9, i), lengths[i])])
        batcher.step()
        step += 1
        assert step < 500
    for i, c in enumerate(collectors):
        alone = generate(model, builtin_tok, [prompts[i]], Sampling(max_new_tokens=lengths[i], temperature=1.0, seed=9),
                         sample_ids=[i], stop_token_ids=())
        assert c.tokens == alone.completion_ids[0], i
        assert c.logps == pytest.approx(alone.logprobs[0], abs=1e-4)


def test_growing_layer_window_matches_a_plain_left_padded_cache() -> None:
    """Rows join (written into spare rows, the window widened left or the buffer re-laid out),
    decode steps append, rows leave (moved from the end) and padding columns are trimmed: the
    live window always holds each row's keys right-aligned, and padding is finite."""
    import random

    import torch

    from alignloop.rollout.continuous import _fill_from_end
    from alignloop.rollout.generate import GrowingLayer

    rng, gen = random.Random(1), torch.Generator().manual_seed(1)
    reference: list[torch.Tensor] = []  # each row's keys, (H, L_r, D)

    def fresh(n: int, length: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        rows = [torch.randn(2, rng.randint(1, length), 3, generator=gen) for _ in range(n)]
        width = max(r.shape[1] for r in rows)  # a prefill is as wide as its longest prompt
        return torch.stack([pad_left_rows(r, width) for r in rows]), rows

    def pad_left_rows(row: torch.Tensor, width: int) -> torch.Tensor:
        return torch.cat([torch.zeros(2, width - row.shape[1], 3), row], dim=1)

    keys, reference = fresh(3, 5)
    layer = GrowingLayer(keys, keys.clone(), room=4, spare_rows=2)
    for _ in range(60):
        op = rng.choice(["join", "step", "step", "leave"])
        if op == "join":
            new, rows = fresh(rng.randint(1, 3), rng.randint(1, 12))
            layer.append_rows(new, new.clone())
            reference += rows
        elif op == "step":
            column = torch.randn(len(reference), 2, 1, 3, generator=gen)
            layer.update(column, column.clone())
            reference = [torch.cat([r, column[i]], dim=1) for i, r in enumerate(reference)]
        elif len(reference) > 1:
            keep = sorted(rng.sample(range(len(reference)), rng.randint(1, len(reference) - 1)))
            order = _fill_from_end(len(reference), keep)
            assert sorted(order) == keep
            layer.keep_rows(order)
            reference = [reference[i] for i in order]
            width = max(r.shape[1] for r in reference)
            layer.trim_left(layer.keys.shape[2] - width)
        width = max(r.shape[1] for r in reference)
        assert layer.keys.shape == (len(reference), 2, width, 3) and layer.values.shape == layer.keys.shape
        assert torch.isfinite(layer.keys).all()
        for i, r in enumerate(reference):
            assert torch.equal(layer.keys[i, :, width - r.shape[1]:], r)
            assert torch.equal(layer.values[i, :, width - r.shape[1]:], r)
    # Any order works, not only rows moving from the end: reversed, every row swaps.
    order = list(reversed(range(len(reference))))
    layer.keep_rows(order)
    width = layer.keys.shape[2]
    for i, r in enumerate(reference[::-1]):
        assert torch.equal(layer.keys[i, :, width - r.shape[1]:], r)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_newcomer_preempts_the_heaviest_owner_whose_rows_resume_unchanged(model: Any, builtin_tok: Any, temperature: float) -> None:
    """Owner A fills the batch; owner B's request joins at the next step in place of A's newest
    row, which waits, rejoins by recompute when there is room and ends with the same tokens
    (and log-probs) it gets alone, as does every other row."""
    sampling = Sampling(max_new_tokens=12, temperature=temperature, seed=3)
    ids = encode_prompts(builtin_tok, PROMPTS)
    batcher = ContinuousBatcher(model, [], builtin_tok.pad_token_id, max_batch=4)
    collectors = [Collector() for _ in PROMPTS]

    def request(i: int, owner: str) -> DecodeRequest:
        r = collectors[i].request(ids[i], RowSampling.from_config(sampling, i), sampling.max_new_tokens)
        r.owner = owner
        return r

    batcher.submit([request(i, "A") for i in range(4)])
    for _ in range(3):
        batcher.step()
    batcher.submit([request(4, "B")])
    batcher.step()
    assert len(collectors[4].tokens) == 2  # B joined at the next step: its prefill's token, then the decode step's
    assert batcher.preempted == 1 and sorted(r.owner for r in batcher.rows) == ["A", "A", "A", "B"]
    assert batcher.stats()["rows_queued"] == 1
    while any(c.reason is None for c in collectors):
        batcher.step()
    expected = generate(model, builtin_tok, PROMPTS, sampling, stop_token_ids=())
    for c, tokens, logps in zip(collectors, expected.completion_ids, expected.logprobs):
        assert c.reason == "length" and c.tokens == tokens
        assert c.logps == pytest.approx(logps, abs=1e-4)


def test_owners_take_turns_and_no_owner_preempts_a_lighter_one(model: Any, builtin_tok: Any) -> None:
    """Waiting submissions join fewest-rows-owner first; an owner already holding as many rows as
    the heaviest does not preempt it (no ping-pong), it waits for a row to end."""
    ids = encode_prompts(builtin_tok, PROMPTS)
    batcher = ContinuousBatcher(model, [], builtin_tok.pad_token_id, max_batch=4)
    order: list[str] = []

    def request(i: int, owner: str, tokens: int) -> DecodeRequest:
        r = DecodeRequest(ids[i], RowSampling(0.0), tokens, lambda t, lp: None,
                          lambda reason, owner=owner: order.append(owner))
        r.owner = owner
        return r

    batcher.submit([request(0, "A", 6), request(1, "A", 6)])
    batcher.submit([request(2, "B", 6), request(3, "B", 6)])
    batcher.step()
    batcher.submit([request(4, "A", 6)])  # A holds 2 = B's 2: no preemption, it waits
    batcher.submit([request(0, "C", 6)])  # C holds none: preempts one of a heaviest owner's rows
    batcher.step()
    assert batcher.preempted == 1
    assert sorted(r.owner for r in batcher.rows) in (["A", "A", "B", "C"], ["A", "B", "B", "C"])
    assert batcher.stats()["rows_queued"] == 2  # A's third submission and the preempted row
    while batcher.load:
        batcher.step()
    assert sorted(order) == ["A", "A", "A", "B", "B", "C"]
