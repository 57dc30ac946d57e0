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
GEMM 99 against 70 µs, equal to within float rounding (~5e-5). Where fp32 layers run on oneDNN
(``models/cpu_linear.py``: CPUs on which MKL is the slower library, AMD's) their weights are packed
for oneDNN instead: on a 2-core AMD EPYC (Zen 5), 8×512 by 512×1408 took 143 µs through MKL's
packed GEMM and 46 µs through oneDNN's.

Only plain ``torch.nn.Linear`` layers with an ordinary 2-D CPU weight in bf16 or fp32 are packed
(a LoRA layer's pieces are plain ``Linear`` too); a layer whose forward something else already
wraps (accelerate's offloading hooks), a sharded or meta weight, another device, or a torch
built without these kernels decodes as before. The packed copies cost one more copy of those
weights for the length of the block. The ops are torch's own (``torch.ops.mkldnn._linear_pointwise``,
``torch.ops.mkl._mkl_linear``, the ones inductor emits), private API, so the first use checks that
they run and give ``F.linear``'s answer, and packing stays off where they do not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache

import torch

from alignloop.models.cpu_linear import has_onednn_forward, onednn_linear


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
    onednn = has_onednn_forward(module)  # fp32 on oneDNN (models/cpu_linear.py): pack for it, not for MKL
    if "forward" in module.__dict__ and not onednn:
        return None
    weight, bias = module.weight.detach(), None if module.bias is None else module.bias.detach()
    if type(module.weight.data) is not torch.Tensor or weight.device.type != "cpu" or weight.dim() != 2:
        return None
    if bias is not None and bias.dtype != weight.dtype:
        return None
    library = "onednn" if onednn or weight.dtype == torch.bfloat16 else "mkl"
    return _pack(weight, bias, rows, library) if _kernels_work(weight.dtype, library) else None


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
