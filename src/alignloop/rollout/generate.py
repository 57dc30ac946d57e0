"""The generation engine: batched sampling with a KV cache, and teacher-forced log-probs.

Evaluation, RL rollouts and the reference/old log-probs of RL all go through two calls, so another
engine can replace them without touching their callers (an OpenAI-compatible server such as vLLM:
:class:`alignloop.rollout.remote.ServerEngine`, ``rollout.engine: openai``):

* :func:`generate` ``(model, tokenizer, prompts, sampling) -> Generation``: completions, the
  log-prob of every sampled token, and whether a stop token ended each one.
* :func:`alignloop.rollout.scoring.token_logprobs` ``(model, prompt_ids, completion_ids) ->
  list[list[float]]``: ``log π(y_t | x, y_<t)`` at temperature 1 for completions that already
  exist (teacher-forced scoring lives in :mod:`alignloop.rollout.scoring`).

The decode loop is our own, not ``model.generate``: prompts are sorted by length into batches,
left-padded, prefilled once into a KV cache (:class:`GrowingLayer`), then decoded one token per
step. Positions count real tokens only (``attention_mask.cumsum - 1``, as HF does for left
padding), so a prompt gets the same positions whatever it is batched with. Samples of one prompt
are prefilled once; in the decode loop the weights are packed for the CPU's kernels
(:mod:`alignloop.rollout.packed`) and attention reads the prompt's keys and values once for all
its samples (:mod:`alignloop.rollout.attention`).

Sampling is seeded per row, not per batch: see :func:`generate`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from alignloop.config import SamplingConfig
from alignloop.data.tokenize import require_chat_template
from alignloop.errors import DataError
from alignloop.models.prefix import cache_argument
from alignloop.rollout.attention import SharedPrompt, decode_attention
from alignloop.rollout.packed import packed_linears
from alignloop.runs import Progress

Message = dict[str, Any]
Prompt = str | list[Message]

# Row i samples with torch.Generator(seed * SEED_STRIDE + sample_ids[i]): distinct for every
# (seed, id) pair with 0 ≤ id < SEED_STRIDE, a prime so that nearby seeds do not share streams.
SEED_STRIDE = 1_000_003


# The sampling settings are a config section, so a stage's YAML sets them (one home: config.py).
Sampling = SamplingConfig


@dataclass
class Generation:
    """What :func:`generate` returns, one entry per prompt in input order."""

    prompt_ids: list[list[int]]  # the encoded prompt, unpadded
    completion_ids: list[list[int]]  # sampled tokens, through the stop token when one was produced
    completions: list[str]  # decoded completion, stop token and special tokens stripped
    logprobs: list[list[float]]  # log-prob of each completion token under the distribution it was drawn from
    finished: list[bool]  # True: a stop token ended it; False: it hit max_new_tokens
    # False: completion_ids were re-tokenised from a server's text (not necessarily the ids it
    # sampled) and logprobs are empty, so π_old needs a forward (rollout/remote.py)
    exact_logprobs: bool = True


def encode_prompts(tokenizer: Any, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Token ids of each prompt: a string with the tokenizer's special tokens (BOS where it adds
    one), a list of chat messages through the chat template with the assistant header appended."""
    encoded = []
    for prompt in prompts:
        if isinstance(prompt, str):
            encoded.append(list(tokenizer(prompt, add_special_tokens=True)["input_ids"]))
        else:
            require_chat_template(tokenizer)
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
            encoded.append(list(ids))
    return encoded


def default_stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The model's ``generation_config.eos_token_id`` (an id or a list) and the tokenizer's EOS."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(i for i in ids if i is not None))


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    sampling: Sampling,
    batch_size: int | None = None,
    sample_ids: Sequence[int] | None = None,
    progress: bool = False,
    stop_token_ids: Sequence[int] | None = None,
) -> Generation:
    """Complete every prompt (a string or a list of chat messages, see :func:`encode_prompts`).

    ``batch_size`` (default ``sampling.batch_size``) prompts are decoded together. Generation
    stops at any of ``stop_token_ids`` (default: :func:`default_stop_token_ids`, or none when
    ``sampling.stop_at_eos`` is false; ``()`` always produces ``max_new_tokens``). The model is put in eval mode for the call and
    restored afterwards.

    Seeding: row i owns a stream ``random.Random(seed * 1_000_003 + sample_ids[i])``
    (``sample_ids`` defaults to ``range(len(prompts))``). At decode step t it draws one number
    u ∈ (0, 1] and the token is the inverse-CDF sample: the first v whose cumulative probability
    under ``softmax(scores)`` reaches u (``scores = filtered logits / temperature``, tokens in id
    order). Step t of a row always consumes the t-th number of its own stream, whatever the batch
    size, the order or the other prompts. So the same (seed, sample id) gives the same completion
    in any batching, and two models with the same vocabulary see the same random numbers: where
    their distributions are equal they sample the same token, and where they are close they mostly
    agree (they differ only when u falls between their two cumulative sums). Greedy decoding
    (temperature 0) draws nothing. The streams are Python's Mersenne Twister, so they are the
    same on every device and platform.

    ``logprobs`` are those of the distribution each token was drawn from (after temperature,
    top-k, top-p); for greedy decoding, the temperature-1 distribution, as ``token_logprobs``
    computes it.
    """
    n = len(prompts)
    step = sampling.batch_size if batch_size is None else batch_size  # prompts decoded together
    sample_ids = list(range(n)) if sample_ids is None else list(sample_ids)
    if len(sample_ids) != n:
        raise ValueError(f"sample_ids has {len(sample_ids)} ids for {n} prompts")
    prompt_ids = encode_prompts(tokenizer, prompts)
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise DataError(f"prompt {i} encodes to no tokens; a prompt needs at least one to condition on")
    if stop_token_ids is None:
        stop_token_ids = default_stop_token_ids(model, tokenizer) if sampling.stop_at_eos else []
    stops = list(stop_token_ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)

    completion_ids: list[list[int]] = [[] for _ in range(n)]
    logprobs: list[list[float]] = [[] for _ in range(n)]
    finished = [False] * n
    # Longest first: any OOM comes early. Equal prompts (an RL group's samples) stay next to each
    # other, so a batch holds them as runs of rows that decode attention can share a prompt over.
    first = {}
    for i, ids in enumerate(prompt_ids):
        first.setdefault(tuple(ids), i)
    order = sorted(range(n), key=lambda i: (-len(prompt_ids[i]), first[tuple(prompt_ids[i])]))

    # A bar on a terminal, whole log lines with an ETA in a log file (no carriage returns).
    bar = Progress(n, 0, "generate", enabled=progress, shown=(), unit="prompt")
    with eval_mode(model), torch.inference_mode():
        for start in range(0, n, step):
            rows = order[start : start + step]
            batch = _decode_batch(
                model,
                [prompt_ids[i] for i in rows],
                [sample_ids[i] for i in rows],
                sampling,
                stops,
                pad_id,
            )
            for i, (ids, logps, done) in zip(rows, batch):
                completion_ids[i], logprobs[i], finished[i] = ids, logps, done
            bar.update(start + len(rows))
    bar.close()
    texts = tokenizer.batch_decode(
        [ids[:-1] if done else ids for ids, done in zip(completion_ids, finished)], skip_special_tokens=True
    )
    return Generation(prompt_ids, completion_ids, texts, logprobs, finished)


def _decode_batch(
    model: Any,
    prompts: list[list[int]],
    sample_ids: list[int],
    sampling: Sampling,
    stops: list[int],
    pad_id: int,
) -> list[tuple[list[int], list[float], bool]]:
    """One left-padded batch through prefill and the decode loop: (ids, logprobs, finished) per row."""
    device = next(model.parameters()).device
    rows, width, steps = len(prompts), max(len(p) for p in prompts), sampling.max_new_tokens
    if steps == 0:
        return [([], [], False) for _ in prompts]
    lengths = [len(p) for p in prompts]
    input_ids, prompt_mask, positions = left_padded(prompts, pad_id, device)
    # The mask covers the prompt and every token still to come; step t passes its first width + t + 1
    # columns. A finished row keeps attending to the pads it is fed, which changes only its own
    # later outputs, and those are cut.
    attention_mask = torch.cat([prompt_mask, prompt_mask.new_ones((rows, steps))], dim=1)
    decode_mask = decode_attention_mask(model, attention_mask)  # sliced to each step's columns
    next_position = torch.tensor(lengths, device=device)[:, None]  # (B, 1) position of the first new token
    stop_ids = torch.tensor(stops, dtype=torch.long, device=device)

    cache = DynamicCache(config=model.config)
    cache_kw = {cache_argument(model): cache}
    # Samples of the same prompt (an RL group) share one prefill: the prompt is run once and its
    # keys/values are copied to each sample's row. At 128-token prompts × 4 samples the prefill
    # is a quarter of what it would be. Each row's copy lands in a GrowingLayer with room for
    # every token still to come, so no decode step reallocates or concatenates.
    first_row: dict[tuple[int, ...], int] = {}  # prompt → the first row that holds it
    for r, p in enumerate(prompts):
        first_row.setdefault(tuple(p), r)
    unique_rows = list(first_row.values())
    source = torch.tensor([unique_rows.index(first_row[tuple(p)]) for p in prompts], device=device)
    growable = all(type(layer) is DynamicLayer for layer in cache.layers)  # not sliding-window or linear-attention layers
    prefill = torch.tensor(unique_rows, device=device) if growable else torch.arange(rows, device=device)
    logits = model(
        input_ids=input_ids[prefill],
        attention_mask=attention_mask[prefill, :width],
        position_ids=positions[prefill],
        use_cache=True,
        logits_to_keep=1,
        **cache_kw,
    ).logits[:, -1, :]
    prompt_keys, prompt_values = [], []  # (U, H_kv, width, D) a layer: the distinct prompts' alone
    if growable:
        prompt_keys, prompt_values = [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]
        cache.layers = [GrowingLayer(keys[source], values[source], room=steps) for keys, values in zip(prompt_keys, prompt_values)]
        logits = logits[source]
    sampler = TokenSampler([RowSampling.from_config(sampling, i) for i in sample_ids], logits.shape[-1], device)

    tokens = torch.full((rows, steps), pad_id, dtype=torch.long, device=device)  # (B, T) sampled ids
    logps = torch.zeros((rows, steps), dtype=torch.float32, device=device)  # (B, T) their log-probs
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    n_tokens = torch.full((rows,), steps, dtype=torch.long, device=device)  # (B,) completion lengths
    live = list(range(rows))  # rows still generating, for the per-row random draws
    # Rows of equal prompts in equal runs (an RL group's samples): decode attention reads their
    # prompt's keys and values once per run (rollout/attention.py).
    samples = rows // len(unique_rows)
    shared = growable and samples > 1 and bool((source == torch.arange(rows, device=device) // samples).all())
    # Each decode step multiplies `rows` rows by every weight: pack the weights once for the loop.
    with packed_linears(model, rows), decode_attention(model) as switched:
        if switched and shared:
            cache_kw["shared_prompt"] = SharedPrompt(samples, width, prompt_keys, prompt_values)
        for t in range(steps):
            token, logp = sampler(logits.float(), live)
            token = token.masked_fill(done, pad_id)
            tokens[:, t], logps[:, t] = token, logp
            if len(stops):
                stopped = torch.isin(token, stop_ids) & ~done
                n_tokens.masked_fill_(stopped, t + 1)
                done |= stopped
                if stopped.any():
                    live = done.logical_not().nonzero().flatten().tolist()
                    if not live:
                        break
            if t + 1 == steps:
                break
            logits = model(
                input_ids=token[:, None],
                attention_mask=decode_mask[..., : width + t + 1],
                position_ids=next_position + t,
                cache_position=torch.tensor([width + t], device=device),
                use_cache=True,
                logits_to_keep=1,
                **cache_kw,
            ).logits[:, -1, :]

    tokens_cpu, logps_cpu = tokens.cpu().tolist(), logps.cpu().tolist()
    return [
        (tokens_cpu[r][:k], logps_cpu[r][:k], finished)
        for r, (k, finished) in enumerate(zip(n_tokens.tolist(), done.tolist()))
    ]


class GrowingLayer(DynamicLayer):
    """The engine's KV-cache layer: a ``DynamicLayer`` that appends into spare room instead of
    concatenating. The stock layer copies its whole cache at every decode step (on CPU 59% of
    decode time at 40M, 128+128 tokens; 12% of a serving step at 5M, 32 rows), and a
    ``StaticCache`` hands attention all of its slots, written or not, which a decode step then
    reads (memory-bound work on empty slots).

    The buffer is (rows + spare rows, heads, left room + length + room, dim); ``keys``/``values``
    are views of its live window ``[:rows, :, start:end]``, so attention and the mask see exactly
    the positions so far. Rows are left-padded (a row's tokens end at ``end``). Besides
    :meth:`update` (a decode step appends at ``end``), the serving batcher changes the window in
    place, without copying the rows that stay: :meth:`keep_rows` (rows leave), :meth:`trim_left`
    (columns that are padding in every row go) and :meth:`append_rows` (rows join, written into
    spare rows, the window widened to the left when a new prompt is longer). Only when the buffer
    has no room left is the window copied, once, into a fresh buffer (:meth:`set`): at serving
    scale, copying every row at every join and leave took 13% of the decode thread.
    :func:`generate` gives it room for the whole completion and no spare rows.

    Columns a row does not use inside the window are padding: the caller masks them out, and they
    hold zeros or another row's finite old keys, never uninitialised memory (a NaN there would
    survive the mask as 0 · NaN)."""

    SPARE = 64  # decode steps between reallocations when the final length is unknown

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int = SPARE, spare_rows: int = 0,
                 left_room: int = 0) -> None:
        super().__init__()
        self.room, self.spare_rows, self.left_room = room, spare_rows, left_room
        self.set(keys, values)

    def set(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Make (R, H, L, D) ``keys``/``values`` the contents: one copy into a fresh buffer."""
        self._fresh(keys, values, keys.shape[0] + self.spare_rows)

    def _fresh(self, keys: torch.Tensor, values: torch.Tensor, row_capacity: int) -> None:
        rows, heads, length, _ = keys.shape
        shape = (row_capacity, heads, self.left_room + length + self.room)
        self._keys = keys.new_zeros(shape + keys.shape[-1:])
        self._values = values.new_zeros(shape + values.shape[-1:])
        self.rows, self.start, self.end = rows, self.left_room, self.left_room + length
        self._keys[:rows, :, self.start:self.end], self._values[:rows, :, self.start:self.end] = keys, values
        self.device, self.is_initialized = keys.device, True
        self._window()

    def _window(self) -> None:
        self.keys = self._keys[:self.rows, :, self.start:self.end]
        self.values = self._values[:self.rows, :, self.start:self.end]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        new = key_states.shape[-2]
        if self.end + new > self._keys.shape[2]:
            self.room = max(self.room, new)
            self._fresh(self.keys, self.values, self._keys.shape[0])
        self._keys[:self.rows, :, self.end:self.end + new] = key_states
        self._values[:self.rows, :, self.end:self.end + new] = value_states
        self.end += new
        self._window()
        return self.keys, self.values

    def keep_rows(self, order: Sequence[int]) -> None:
        """Keep rows ``order`` (old indices), in that order. A row that stays in place is not
        touched; a row that moves to a freed place below ``len(order)`` is copied there (the
        serving batcher moves rows from the end into the places of rows that left)."""
        n, window = len(order), slice(self.start, self.end)
        if any(i != j and i < n for j, i in enumerate(order)):  # a move onto a kept row's place: gather
            index = torch.tensor(list(order), device=self._keys.device)
            self._keys[:n, :, window], self._values[:n, :, window] = self._keys[index, :, window], self._values[index, :, window]
        else:
            for j, i in enumerate(order):
                if i != j:
                    self._keys[j, :, window], self._values[j, :, window] = self._keys[i, :, window], self._values[i, :, window]
        self.rows = n
        self._window()

    def trim_left(self, columns: int) -> None:
        """Drop the window's first ``columns`` positions (padding in every row)."""
        self.start += columns
        self._window()

    def append_rows(self, keys: torch.Tensor, values: torch.Tensor) -> int:
        """Add (N, H, L, D) rows after the live ones, right-aligned with them (their last
        position at ``end``). Returns how many columns the window grew by on the left (a new
        row's prompt longer than the window): those columns are padding for the old rows."""
        n, length = keys.shape[0], keys.shape[2]
        width = self.end - self.start
        grow = max(0, length - width)
        if self.rows + n > self._keys.shape[0] or self.start < grow:
            self.left_room = max(self.left_room, length)
            self._fresh(pad_left(self.keys, width + grow), pad_left(self.values, width + grow),
                        max(self._keys.shape[0], self.rows + n))
        else:
            self.start -= grow
            self._keys[:self.rows, :, self.start:self.start + grow] = 0
            self._values[:self.rows, :, self.start:self.start + grow] = 0
        rows = slice(self.rows, self.rows + n)
        self._keys[rows, :, self.start:self.end - length] = 0
        self._values[rows, :, self.start:self.end - length] = 0
        self._keys[rows, :, self.end - length:self.end] = keys
        self._values[rows, :, self.end - length:self.end] = values
        self.rows += n
        self._window()
        return grow


def pad_left(tensor: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """Zeros before ``tensor`` along ``dim`` up to ``width`` (masked-out cache slots or mask zeros)."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def decode_attention_mask(model: Any, mask: torch.Tensor) -> torch.Tensor:
    """The attention mask a decode step (one query a row) passes for the (B, S) padding ``mask``.
    Under SDPA it is the padding mask itself as a (B, 1, 1, S) boolean view (the one query sees
    every real key before it), which transformers uses as-is instead of building a 4D mask every
    step (3% of a 32-row serving step at 5M). Other attention implementations want other formats
    and get ``mask``. Either slices along its last dimension like ``mask``."""
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        return mask.bool()[:, None, None, :]
    return mask


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, W) input ids left-padded with ``pad_id``, their attention mask, and positions that
    count real tokens only (``mask.cumsum - 1``, as HF does for left padding), so a prompt gets
    the same positions whatever it is batched with."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, ids in enumerate(prompts):
        input_ids[r, width - len(ids) :] = torch.tensor(ids)
        mask[r, width - len(ids) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids.to(device), mask.to(device), positions.to(device)


@dataclass(frozen=True)
class RowSampling:
    """How one row samples: its own temperature, top-p, top-k and random stream. A served batch
    mixes requests with different settings; a rollout gives every row the same ones."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    sample_id: int = 0  # the row's stream is seed * SEED_STRIDE + sample_id

    @classmethod
    def from_config(cls, sampling: Sampling, sample_id: int) -> "RowSampling":
        return cls(sampling.temperature, sampling.top_p, sampling.top_k, sampling.seed, sample_id)


class TokenSampler:
    """Picks the next token of every row from (B, V) logits; see :func:`generate` for the scheme.

    Parameters are per row (tensors of shape (B, 1)), so rows with different settings share one
    forward; :meth:`select` and :meth:`extend` let rows leave and join between steps (continuous
    batching) without disturbing any row's random stream. With the same settings in every row the
    arithmetic is the same as with one scalar setting, so results do not depend on the batch.

    Why inverse-CDF and not Gumbel-max (``argmax(scores + Gumbel noise)``): both draw from
    ``softmax(scores)`` and both couple two models through shared random numbers, but Gumbel-max
    needs V random numbers per row and step, drawn row by row from each row's generator (over half
    of the sampling time of a 32-row serving step at V = 4,096, and it grows with V), where the
    inverse CDF needs one per row and a batched ``cumsum`` and ``searchsorted``.
    """

    def __init__(self, rows: Sequence[RowSampling], vocab: int, device: torch.device) -> None:
        self.rows, self.vocab, self.device = list(rows), vocab, device
        self.streams = [
            random.Random((r.seed * SEED_STRIDE + r.sample_id) % 2**63) if r.temperature > 0 else None
            for r in self.rows
        ]
        self._tensors()

    def _tensors(self) -> None:
        rows, device = self.rows, self.device
        self.greedy = torch.tensor([r.temperature == 0 for r in rows], dtype=torch.bool, device=device)
        self.temperature = torch.tensor([r.temperature or 1.0 for r in rows], device=device)[:, None]
        self.top_k = torch.tensor([min(r.top_k, self.vocab) for r in rows], dtype=torch.long, device=device)
        self.top_p = torch.tensor([r.top_p for r in rows], device=device)[:, None]
        # Decided once per batch change, from the settings, not per step: each check on the
        # tensors would be a tensor op and a sync.
        self.all_greedy = all(r.temperature == 0 for r in rows)
        self.any_greedy = any(r.temperature == 0 for r in rows)
        self.scaled = any(r.temperature not in (0, 1) for r in rows)
        self.any_top_k, self.any_top_p = any(r.top_k > 0 for r in rows), any(r.top_p < 1 for r in rows)

    def select(self, keep: Sequence[int]) -> None:
        """Keep only rows ``keep`` (in that order)."""
        self.rows = [self.rows[i] for i in keep]
        self.streams = [self.streams[i] for i in keep]
        self._tensors()

    def extend(self, other: "TokenSampler") -> None:
        """Append ``other``'s rows after these."""
        self.rows += other.rows
        self.streams += other.streams
        self._tensors()

    def __call__(self, logits: torch.Tensor, live: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) token ids and (B,) their log-probs; rows not in ``live`` get a token that is discarded."""
        scores = self._filter(logits / self.temperature if self.scaled else logits)
        if self.any_greedy:
            # Greedy rows report the temperature-1 distribution: their scores are the logits, unfiltered.
            scores = torch.where(self.greedy[:, None], logits, scores)
        probs = scores.softmax(-1)
        if self.all_greedy:
            token = logits.argmax(-1)
        else:
            # u ∈ (0, 1]: the first token whose cumulative sum reaches u·total has probability > 0,
            # and u·total never exceeds the last cumulative sum, so the index is always in range.
            live_rows = set(live)
            u = [1.0 - s.random() if s is not None and r in live_rows else 1.0 for r, s in enumerate(self.streams)]
            cdf = probs.cumsum(-1)
            threshold = torch.tensor(u, dtype=cdf.dtype, device=cdf.device)[:, None] * cdf[:, -1:]
            token = torch.searchsorted(cdf, threshold).squeeze(-1).clamp_(max=probs.shape[-1] - 1)
            if self.any_greedy:
                token = torch.where(self.greedy, logits.argmax(-1), token)
        return token, probs.gather(-1, token[:, None]).squeeze(-1).log()

    def _filter(self, scores: torch.Tensor) -> torch.Tensor:
        """Top-k, then top-p (nucleus), in HF's order: excluded tokens get -inf."""
        if self.any_top_k:
            kth = scores.topk(int(self.top_k.max()), dim=-1).values.gather(-1, (self.top_k.clamp(min=1) - 1)[:, None])
            kth = kth.masked_fill((self.top_k == 0)[:, None], -math.inf)
            scores = scores.masked_fill(scores < kth, -math.inf)
        if self.any_top_p:
            sorted_scores, order = scores.sort(dim=-1, descending=True)
            probs = sorted_scores.softmax(-1)
            # Drop a token when the tokens ranked above it already hold top_p of the mass: the
            # most likely token always stays. Rows with top_p = 1 drop nothing.
            drop_sorted = (probs.cumsum(-1) - probs >= self.top_p) & (self.top_p < 1)
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            scores = scores.masked_fill(drop, -math.inf)
        return scores


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Eval mode (no dropout) for the block, then the model's previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
