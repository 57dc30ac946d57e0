"""Decoder classifiers read one position a row: run the last layer's position-wise blocks there only.

A decoder classifier (``LlamaForSequenceClassification`` and its kin: a reward model on the policy
family) scores a row from the last layer's hidden state at one position, the row's last token that
is not the pad id. Everything the last layer computes at the other positions is thrown away,
except the keys and values its attention reads, which come from the layer's *input*. So in the last
layer the blocks that act on each position alone, the MLP and the attention's output projection,
need only run at the read positions:

    h_L[b, t] = r[b, t] + MLP(norm(r[b, t])),   r = h_{L−1} + Attn(h_{L−1})

is needed for t = read(b) only; the other rows of ``MLP`` are left at zero. Every earlier layer is
needed in full (its outputs at all positions are the last layer's keys and values). On the
benchmark's 40M Llama (12 layers, MLP 2.75 × hidden) this removes ~5% of a reward step's matmuls,
forward and backward; the rewards and their gradients are those of the plain forward (tested).

Applies where the last layer has an ``mlp`` and a causal attention (``is_causal``), the shape of
transformers' decoders; otherwise (encoders such as MiniLM, whose pooler reads the first token)
:func:`read_only_at` does nothing. The hidden states of the last layer at positions that are not
read are not the model's: callers take only the classifier's logits.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch


def last_decoder_layer(model: Any) -> Any | None:
    """The last block of a causal decoder (through peft and DDP wrappers), or None."""
    base = getattr(model, "module", model)  # DDP
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    backbone = getattr(base, getattr(base, "base_model_prefix", ""), None)
    layers = getattr(backbone, "layers", None) if backbone is not None else None
    if layers is None and backbone is not None:
        layers = getattr(backbone, "h", None)  # GPT-2
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        return None
    last = layers[-1]
    attention = getattr(last, "self_attn", None) or getattr(last, "attn", None)
    if getattr(last, "mlp", None) is None or getattr(attention, "is_causal", False) is not True:
        return None
    return last


def read_positions(input_ids: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """(B,) where transformers' decoder classifiers read each row: the rightmost token that is not
    ``pad_id`` (column 0 for a row of padding only; the last column without a pad id)."""
    if pad_id is None:
        return torch.full((input_ids.size(0),), input_ids.size(1) - 1, dtype=torch.long, device=input_ids.device)
    columns = torch.arange(input_ids.size(1), device=input_ids.device)
    return (columns * (input_ids != pad_id)).argmax(-1)


class _AtPositions(torch.nn.Module):
    """``block`` applied to the (row, column) positions given only; zeros elsewhere."""

    def __init__(self, block: torch.nn.Module, columns: torch.Tensor | None):
        super().__init__()
        self.block, self.columns = block, columns

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.columns is None:  # no position is read (a shared prefix): nothing to compute
            return x.new_zeros(x.shape[:-1] + (self._width(x),))
        if x.dim() != 3 or x.size(0) != self.columns.size(0):
            return self.block(x)  # not the (B, T, H) layout this was written for: compute it all
        rows = torch.arange(x.size(0), device=x.device)
        y = self.block(x[rows, self.columns])  # (B, H_out)
        out = y.new_zeros(x.shape[:-1] + y.shape[-1:])
        return out.index_put((rows, self.columns), y)

    def _width(self, x: torch.Tensor) -> int:
        weight = getattr(self.block, "weight", None)
        return weight.size(0) if weight is not None else x.size(-1)  # a Linear's out_features; an MLP keeps the width


@contextlib.contextmanager
def read_only_at(model: Any, columns: torch.Tensor | None) -> Iterator[None]:
    """Within the block, ``model``'s last layer computes its MLP and attention output projection
    only at ``columns`` (B,), one per row (``None``: at no position, for a forward whose
    classifier output is not used). Does nothing for a model that is not a causal decoder."""
    layer = last_decoder_layer(model)
    if layer is None:
        yield
        return
    attention = getattr(layer, "self_attn", None) or getattr(layer, "attn")
    swaps = [(layer, "mlp")] + [(attention, name) for name in ("o_proj",) if isinstance(getattr(attention, name, None), torch.nn.Linear)]
    originals = [getattr(owner, name) for owner, name in swaps]
    for (owner, name), block in zip(swaps, originals):
        setattr(owner, name, _AtPositions(block, columns))
    try:
        yield
    finally:
        for (owner, name), block in zip(swaps, originals):
            setattr(owner, name, block)


def classifier_logits(model: Any, **inputs: Any) -> torch.Tensor:
    """A decoder or encoder classifier's logits (B, labels) on a batch, the decoder's last layer
    run only where it reads (:func:`read_only_at`)."""
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    pad_id = getattr(config, "pad_token_id", None)
    with read_only_at(model, read_positions(inputs["input_ids"], pad_id)):
        return model(**inputs).logits
