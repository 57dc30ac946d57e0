"""Teacher-forced scoring: the log-probs a model gives completions that already exist.

* :class:`Batch` and :func:`score_tokens`: prompt + completion rows as tensors and the forward
  that scores them, with gradient when the caller trains (RL's π, π_old, π_ref; PPO's values).
* :func:`token_logprobs` ``(model, prompt_ids, completion_ids) -> list[list[float]]``:
  ``log π(y_t | x, y_<t)`` at temperature 1, no gradient, in batches (evaluation's KL).

With ``share_prefixes``, rows that share a prompt (several samples of one prompt) run it once
(:mod:`alignloop.models.prefix`); the numbers are those of a plain forward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from alignloop.data.batching import eval_batches, to_device
from alignloop.data.tokenize import Example
from alignloop.errors import DataError
from alignloop.losses import completion_nll, entropy_from_logits
from alignloop.models.prefix import plan_for, shared_prefix_forward, shared_prompt_order
from alignloop.rollout.generate import eval_mode


@dataclass
class Batch:
    """Prompt + completion token rows, right-padded, and where each completion token sits.

    ``positions[i, t]`` is the index whose logits predict completion token t of row i (its prompt
    length + t − 1); ``mask[i, t]`` is 1 for real completion tokens. Completions are left-aligned
    in the (N, T) tensors the losses take.
    """

    input_ids: torch.Tensor  # (N, L)
    attention_mask: torch.Tensor  # (N, L)
    targets: torch.Tensor  # (N, T) completion tokens (0 on padding)
    positions: torch.Tensor  # (N, T)
    mask: torch.Tensor  # (N, T) float

    @classmethod
    def build(cls, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], pad_id: int,
              device: torch.device) -> "Batch":
        n = len(prompt_ids)
        width = max(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids))
        steps = max(1, max(len(c) for c in completion_ids))
        input_ids = torch.full((n, width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        targets = torch.zeros((n, steps), dtype=torch.long)
        positions = torch.zeros((n, steps), dtype=torch.long)
        mask = torch.zeros((n, steps))
        for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
            seq = list(p) + list(c)
            input_ids[i, : len(seq)] = torch.tensor(seq)
            attention_mask[i, : len(seq)] = 1
            if c:
                targets[i, : len(c)] = torch.tensor(c)
                mask[i, : len(c)] = 1
            positions[i] = (len(p) - 1 + torch.arange(steps)).clamp(max=width - 1)
        return cls(*(t.to(device) for t in (input_ids, attention_mask, targets, positions, mask)))

    def rows(self, index: torch.Tensor) -> "Batch":
        return Batch(*(t[index] for t in (self.input_ids, self.attention_mask, self.targets, self.positions, self.mask)))


def score_tokens(model: Any, batch: Batch, temperature: float, value_head: torch.nn.Module | None = None,
                 with_entropy: bool = False, share_prefixes: bool = True,
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """log π(y_t | x, y_<t) (N, T) of the batch's completion tokens at ``temperature``; with a
    value head, V_t (N, T) read at the same positions; with ``with_entropy``, the entropy of each
    of those next-token distributions (no gradient).

    Only logits from the earliest completion position on are computed: the prompt's logits are
    never needed. With ``share_prefixes``, a prompt sampled several times (a group) runs once
    (:mod:`alignloop.models.prefix`).
    """
    lengths = batch.attention_mask.sum(1).tolist()
    rows = [ids[:n] for ids, n in zip(batch.input_ids.tolist(), lengths)]
    prompt_lengths = (batch.positions[:, 0] + 1).tolist()
    plan = plan_for(model, rows, prompt_lengths, 0, share_prefixes)  # pad id 0: padding is masked, never read
    want_hidden = value_head is not None
    if plan is None:
        first = int(batch.positions.min())
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                    logits_to_keep=batch.input_ids.size(1) - first, output_hidden_states=want_hidden)
        all_logits, hidden = out.logits, (out.hidden_states[-1] if want_hidden else None)
        index, hidden_index = batch.positions - first, batch.positions
    else:  # column j of the shared forward is position starts − 1 + j
        out = shared_prefix_forward(model, plan.to(batch.input_ids.device), output_hidden_states=want_hidden)
        all_logits, hidden = out.logits, out.hidden
        index = (batch.positions - plan.starts.to(batch.positions.device)[:, None] + 1).clamp(max=all_logits.size(1) - 1)
        hidden_index = index
    logits = all_logits.gather(1, index[:, :, None].expand(-1, -1, all_logits.size(-1))).float()  # (N, T, V)
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logprobs = logits.gather(-1, batch.targets[:, :, None]).squeeze(-1) - logits.logsumexp(-1)
    values = None
    if value_head is not None:
        picked = hidden.gather(1, hidden_index[:, :, None].expand(-1, -1, hidden.size(-1)))
        values = value_head(picked.float()).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = entropy_from_logits(logits.detach())
    return logprobs, values, entropy


def token_logprobs(model: Any, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                   batch_size: int = 16, share_prefixes: bool = True) -> list[list[float]]:
    """Teacher-forced ``log π(y_t | x, y_<t)`` at temperature 1 for each completion token.

    Batches of similar length, the samples of one prompt together (:func:`shared_prompt_order`),
    run without gradient in eval mode on the model's device through :func:`score_tokens`.
    Results are in input order; an empty completion gives ``[]``.
    """
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise DataError(f"prompt {i} has no tokens; the first completion token needs one to condition on")
    device = next(model.parameters()).device
    result: list[list[float]] = [[] for _ in prompt_ids]
    kept = [i for i in range(len(prompt_ids)) if completion_ids[i]]
    order = [kept[k] for k in shared_prompt_order([tuple(prompt_ids[i]) for i in kept],
                                                  [len(prompt_ids[i]) + len(completion_ids[i]) for i in kept])]
    with eval_mode(model), torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = Batch.build([prompt_ids[i] for i in rows], [completion_ids[i] for i in rows], 0, device)
            logps = score_tokens(model, batch, 1.0, share_prefixes=share_prefixes)[0].cpu().tolist()
            for r, i in enumerate(rows):
                result[i] = logps[r][: len(completion_ids[i])]
    return result


@torch.no_grad()
def heldout_loss(model: Any, examples: list[Example], batch_size: int, pad_id: int, limit: int | None) -> dict[str, float]:
    """Token-mean NLL and perplexity of ``model`` on held-out ``examples`` (loss tokens only)."""
    model.eval()
    device = next(model.parameters()).device
    nll_sum, tokens = 0.0, 0
    for batch in eval_batches(examples, batch_size, pad_id, limit):
        batch = to_device(batch, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        _, stats = completion_nll(logits, batch["labels"], num_tokens=1.0)
        nll_sum += stats["nll_sum"]
        tokens += stats["tokens"]
    model.train()
    loss = nll_sum / max(tokens, 1)
    return {"eval/loss": loss, "eval/ppl": math.exp(min(loss, 50.0))}
