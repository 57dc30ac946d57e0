"""Decoding on the CPU with weights packed once for its matmul kernels.

A decode step multiplies a handful of rows (one token per sequence) by every weight matrix. For
such small products the CPU kernels spend much of each call re-laying out the weight: oneDNN
(bf16, AMX/AVX-512) and MKL (fp32) want their own blocked formats and build them on every call
of a plain ``F.linear``. Packing each weight once before the decode loop and calling the kernels
on the packed copy is what ``torch.compile``'s CPU freezing pass (and Intel's extension) do for
inference; here it is done without a compile, around one rollout, because the policy's weights
change after every update and frozen graphs would have to be rebuilt.

Measured on a 2-core Xeon with AMX (8 rows, 40M model's shapes): a bf16 product of 8×512 by
512×1408 took 88 µs plain and 52 µs packed, with bit-identical results; fp32 through MKL's packed
GEMM 99 against 70 µs, equal to within float rounding (~5e-5). On AMD CPUs MKL is the slower
library for fp32 and oneDNN packs better: 8×512 by 512×1408 took 143 µs through MKL's packed GEMM
and 46 µs through oneDNN's on a 2-core Zen 5, 157 against 88 µs on a Zen 4. So an fp32 layer is
packed for oneDNN when it already runs on oneDNN (``models/cpu_linear.py``), for MKL when
``model.cpu_linear: torch`` pins it, and otherwise for whichever of the two a one-off timing of a
decode-sized product finds faster (:func:`decode_library`). The timing is not training's: on that
Zen 4 oneDNN was 12% faster at a training step's 256 rows, too little to switch training, and
1.8× faster at a decode step's 8.

Only plain ``torch.nn.Linear`` layers with an ordinary 2-D CPU weight in bf16 or fp32 are packed
(a LoRA layer's pieces are plain ``Linear`` too); a layer whose forward something else already
wraps (accelerate's offloading hooks), a sharded or meta weight, another device, or a torch
built without these kernels decodes as before. The packed copies cost one more copy of those
weights for the length of the block. The ops are torch's own (``torch.ops.mkldnn._linear_pointwise``,
``torch.ops.mkl._mkl_linear``, the ones inductor emits), private API, so the first use checks that
they run and give ``F.linear``'s answer, and packing stays off where they do not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache

import torch

from alignloop.models.cpu_linear import (
    has_onednn_forward,
    kernel_choice,
    onednn_linear,
    pinned_to_torch,
    runs_on_onednn,
    seconds_per_call,
)

log = logging.getLogger("alignloop")


@contextmanager
def packed_linears(model: torch.nn.Module, rows: int) -> Iterator[None]:
    """Inside the block, ``model``'s CPU ``nn.Linear`` layers multiply with packed weights. Use it
    under ``torch.inference_mode`` with weights that do not change inside the block; ``rows`` is
    the number of rows a call will multiply (the kernels choose their layout for it). Under
    autocast nothing is packed: ``F.linear`` computes in the autocast dtype there, and so it stays."""
    swapped = []
    try:
        for module in model.modules() if not torch.is_autocast_enabled("cpu") else ():
            forward = _packed_forward(module, rows)
            if forward is not None:
                swapped.append((module, module.__dict__.get("forward")))
                module.forward = forward  # an instance attribute shadows Linear.forward until restored
        yield
    finally:
        for module, before in swapped:
            if before is None:
                module.__dict__.pop("forward", None)  # not `del`: a block nested on the same model may have removed it
            else:
                module.forward = before


def _packed_forward(module: torch.nn.Module, rows: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if type(module) is not torch.nn.Linear:
        return None
    if "forward" in module.__dict__ and not has_onednn_forward(module):
        return None
    weight, bias = module.weight.detach(), None if module.bias is None else module.bias.detach()
    if type(module.weight.data) is not torch.Tensor or weight.device.type != "cpu" or weight.dim() != 2:
        return None
    if bias is not None and bias.dtype != weight.dtype:
        return None
    library = decode_library(module, rows)
    return _pack(weight, bias, rows, library) if _kernels_work(weight.dtype, library) else None


def decode_library(module: torch.nn.Linear, rows: int) -> str:
    """Which library multiplies ``module``'s packed weight: oneDNN for bf16 (torch's own choice) and
    for a layer already on oneDNN; MKL for a layer pinned to torch's kernel (``model.cpu_linear:
    torch``); otherwise the faster of the two at ``rows`` rows on this CPU (:func:`onednn_packs_faster`)."""
    if module.weight.dtype == torch.bfloat16 or runs_on_onednn(module):
        return "onednn"
    if pinned_to_torch(module) or not _kernels_work(torch.float32, "onednn"):
        return "mkl"
    return "onednn" if onednn_packs_faster(rows) else "mkl"


def onednn_packs_faster(rows: int) -> bool:
    """This process's choice for fp32 decode products of ``rows`` rows (recorded in checkpoints like
    training's, :func:`~alignloop.models.cpu_linear.kernel_choice`): made at the first ask by timing
    products of ``rows`` rows by a packed 512 → 1408 weight (the 40M benchmark model's MLP) in MKL
    and in oneDNN with :func:`~alignloop.models.cpu_linear.seconds_per_call`; oneDNN wins when it
    is at least 20% faster. A few milliseconds, once per row count."""
    return kernel_choice(f"decode_{rows}_rows", lambda: _time_decode_products(rows))


def _time_decode_products(rows: int) -> bool:
    if not _kernels_work(torch.float32, "mkl"):
        return True
    x, weight = torch.randn(rows, 512), torch.randn(1408, 512)
    mkl, onednn = _pack(weight, None, rows, "mkl"), _pack(weight, None, rows, "onednn")
    with torch.inference_mode():
        mkl_s, onednn_s = seconds_per_call(lambda: mkl(x), lambda: onednn(x), calls=5)
    faster = onednn_s * 1.2 < mkl_s
    log.info("packed fp32 decode products of %d rows on this CPU: MKL %.0f µs, oneDNN %.0f µs: %s", rows,
             mkl_s * 1e6, onednn_s * 1e6, "oneDNN" if faster else "MKL")
    return faster


def _pack(weight: torch.Tensor, bias: torch.Tensor | None, rows: int, library: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x ↦ F.linear(x, weight, bias)`` on ``weight`` packed once for oneDNN or MKL."""
    if library == "onednn":
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
        return lambda x: onednn_linear(x, packed, bias)
    packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)
    return lambda x: torch.ops.mkl._mkl_linear(x, packed, weight, bias, rows)


@cache
def _kernels_work(dtype: torch.dtype, library: str) -> bool:
    """Whether this torch has the packed kernels for ``dtype`` in ``library`` and they agree with ``F.linear``."""
    try:
        if library == "onednn":
            available = torch.backends.mkldnn.is_available() and (
                dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())
            )
        else:
            available = dtype == torch.float32 and torch.backends.mkl.is_available()
        if not available:
            return False
        x, weight, bias = (t.to(dtype) for t in (torch.randn(3, 2, 64), torch.randn(48, 64), torch.randn(48)))
        with torch.inference_mode():
            out, expected = _pack(weight, bias, 6, library)(x), torch.nn.functional.linear(x, weight, bias)
        return out.shape == expected.shape and torch.allclose(out.float(), expected.float(), rtol=2e-2, atol=2e-2)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
