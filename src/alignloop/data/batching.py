"""Deterministic batches: the data order is a pure function of (seed, batch number).

Because a batch is computed from its number rather than drawn from a stateful iterator, the data
position of a run is just the count of batches consumed, and resuming from a checkpoint
reproduces the uninterrupted order exactly.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from alignloop.data.tokenize import Example
from alignloop.errors import DataError

IGNORE_INDEX = -100  # label of a token that carries no loss (PyTorch's cross_entropy default)


class ShuffledBatches:
    """Epoch-wise shuffled batches of ``batch_size`` examples; the last partial batch of an epoch
    is dropped so every batch has the same size. Epoch ``e`` uses ``torch.randperm`` seeded with
    ``seed + e``. With several processes, process ``rank`` takes its slice of each global batch.

    With ``lengths``, batches hold examples of similar length (less padding, the same examples
    per epoch): the epoch's permutation is cut into windows of ``BUCKET_WINDOW`` global batches,
    each window is sorted by length and cut into batches, and the batches of the epoch are then
    shuffled (seeded), so long and short batches stay mixed over the epoch.

    With ``groups`` (one key per example, e.g. its prompt), batches hold examples of the same group
    where possible: each epoch the groups are taken in a seeded random order, each group's members
    in a seeded random order, the sequence is cut into batches, and the batches are shuffled. With
    ``sides`` too (the keys of what each example scores, e.g. its chosen and rejected response),
    a group's members are ordered by :func:`pack_shared_sides` so that a batch covers few distinct
    sides: a step scores each distinct response once (:func:`alignloop.train.reward.collate_examples`).
    Every epoch still holds each example once. ``groups`` takes precedence over ``lengths``.
    """

    BUCKET_WINDOW = 64

    def __init__(self, num_examples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 lengths: Sequence[int] | None = None, groups: Sequence[Any] | None = None,
                 sides: Sequence[tuple] | None = None):
        self.global_batch = batch_size * world_size
        if num_examples < self.global_batch:
            raise DataError(
                f"{num_examples} training examples, fewer than one batch ({batch_size} per process × "
                f"{world_size} processes); lower train.batch_size or add data"
            )
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.rank = rank
        self.lengths = torch.tensor(lengths) if lengths is not None else None
        self.groups = None
        if groups is not None:
            ids: dict[Any, int] = {}
            self.groups = torch.tensor([ids.setdefault(g, len(ids)) for g in groups])
        self.sides = sides
        self.batches_per_epoch = num_examples // self.global_batch
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def indices(self, batch_number: int) -> list[int]:
        """Example indices of this process's share of global batch ``batch_number``."""
        epoch, k = divmod(batch_number, self.batches_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.num_examples, generator=generator)
            if self.groups is not None:
                self._order = self._grouped(self._order, generator)
            elif self.lengths is not None:
                self._order = self._bucketed(self._order, generator)
        start = k * self.global_batch + self.rank * self.batch_size
        return self._order[start : start + self.batch_size].tolist()

    def _grouped(self, order: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        group_rank = torch.randperm(int(self.groups.max()) + 1, generator=generator)[self.groups[order]]
        by_group = order[torch.argsort(group_rank, stable=True)]  # groups in random order, members as permuted
        if self.sides is not None:
            runs = torch.unique_consecutive(self.groups[by_group], return_counts=True)[1].tolist()
            members = [chunk.tolist() for chunk in by_group.split(runs)]
            by_group = torch.tensor(pack_shared_sides(members, self.sides, self.batch_size))
        used = by_group[: self.batches_per_epoch * self.global_batch].view(self.batches_per_epoch, self.global_batch)
        return used[torch.randperm(self.batches_per_epoch, generator=generator)].reshape(-1)

    def _bucketed(self, order: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        used = order[: self.batches_per_epoch * self.global_batch]
        window = self.BUCKET_WINDOW * self.global_batch
        chunks = []
        for start in range(0, len(used), window):
            chunk = used[start : start + window]
            chunks.append(chunk[torch.argsort(self.lengths[chunk], stable=True)])
        batches = torch.cat(chunks).view(self.batches_per_epoch, self.global_batch)
        return batches[torch.randperm(self.batches_per_epoch, generator=generator)].reshape(-1)


def pack_shared_sides(groups: Sequence[Sequence[int]], sides: Sequence[tuple], size: int) -> list[int]:
    """The examples of ``groups`` (lists of indices, in the order given) reordered so that each
    run of ``size`` consecutive examples (a batch) covers few distinct sides.

    Greedy, within each group: a batch starts from the group's next unused example; it then takes
    an unused example whose sides it already covers, else one that adds a single new side (the side
    with the most unused links into the batch), else the next unused example. On a group whose
    pairs compare n responses with one another, a batch of B pairs covers about √(2B) + 1
    responses instead of up to 2B. Order of the given lists breaks every tie, so the result is a
    function of it. A batch that runs past the end of a group continues with the next group.
    """
    out: list[int] = []
    for members in groups:
        position = {e: i for i, e in enumerate(members)}
        unused = dict.fromkeys(members)  # an ordered set
        by_side: dict[Any, list[int]] = {}
        for e in members:
            for side in dict.fromkeys(sides[e]):
                by_side.setdefault(side, []).append(e)
        covered: set = set()
        while unused:
            if len(out) % size == 0:
                covered = set()
            pick, links = None, {}
            for side in covered:
                for e in by_side[side]:
                    if e not in unused:
                        continue
                    new = [s for s in sides[e] if s not in covered]
                    if not new:
                        pick = e if pick is None or position[e] < position[pick] else pick
                    elif len(new) == 1:
                        first = links.get(new[0], (0, e))[1]
                        links[new[0]] = (links.get(new[0], (0, e))[0] + 1, min(first, e, key=position.__getitem__))
            if pick is None and links:
                pick = max(links.values(), key=lambda v: (v[0], -position[v[1]]))[1]
            if pick is None:
                pick = next(iter(unused))
            del unused[pick]
            covered.update(sides[pick])
            out.append(pick)
    return out


def collate(examples: Sequence[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example. ``labels`` are the input ids where the loss mask is 1
    and IGNORE_INDEX elsewhere (prompt, template scaffolding, padding)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids = torch.tensor(e.input_ids, dtype=torch.long)
        input_ids[i, :n] = ids
        attention_mask[i, :n] = 1
        labels[i, :n] = torch.where(torch.tensor(e.loss_mask, dtype=torch.bool), ids, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def eval_batches(examples: Sequence[Example], batch_size: int, pad_token_id: int, limit: int | None):
    """Held-out examples in file order, ``limit`` batches at most."""
    count = 0
    for start in range(0, len(examples), batch_size):
        if limit is not None and count >= limit:
            return
        yield collate(examples[start : start + batch_size], pad_token_id)
        count += 1


def split_holdout(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded random ``fraction`` of ``items`` held out (at least one when fraction > 0); the
    rest, in original order, for training."""
    if fraction <= 0 or len(items) < 2:
        return list(items), []
    n_held = max(1, round(len(items) * fraction))
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:n_held])
    return [x for i, x in enumerate(items) if i not in held], [items[i] for i in sorted(held)]


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
