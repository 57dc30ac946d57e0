"""fp32 linear layers through oneDNN on CPUs where torch's default fp32 GEMM is the slower one.

torch multiplies fp32 matrices on the CPU with MKL. MKL picks its fast kernels by CPU vendor: on
AMD CPUs it does not run its AVX-512 code, and there oneDNN (also inside every torch build, the
library torch already uses for bf16 matmuls and that inductor calls for CPU linears) is about
twice as fast at the same fp32 arithmetic. Measured on a 2-core AMD EPYC (Zen 5), 2 threads:

=====================================  =============  ==========
product (rows × in → out)              ``F.linear``   oneDNN
=====================================  =============  ==========
2048 × 512 → 1408, forward             194 GFLOP/s    430 GFLOP/s
8×256 × 512 → 1408, forward + backward 47.5 ms        27.1 ms
32 × 512 → 1408 (a decode step)        329 µs         188 µs
=====================================  =============  ==========

Results agree to float rounding (relative 1e-6; the order of the sums differs). So
:func:`use_onednn_linears` gives a model's CPU ``nn.Linear`` layers a forward (and, through
:class:`_OneDNNLinear`, a backward) on oneDNN, **when it is faster on this machine**: the choice
is made once per process, at the first product, by timing both on one product
(:func:`onednn_is_faster`). Where MKL is as fast (Intel CPUs) nothing changes. bf16 is left alone:
torch already sends it to oneDNN.

The choice changes the float rounding of a run, so it is part of the run's state: every
checkpoint records the choices each process made (:func:`chosen_kernels`, this one and the
rollout packing's per row count in ``rollout/packed.py``; under DDP by rank, as each rank times
for itself), and a resumed process adopts its rank's (:func:`adopt_kernels`) instead of timing
again. A layer consults the process's choice at each call, so adopting it after the models are
loaded still moves all of them (policy, reference, value and reward models) together. Without that, a CPU where the two libraries are within the
margin could time them differently in the resumed process and continue with other roundings.
To make the rounding independent of any timing, set ``model.cpu_linear`` to ``onednn`` or ``torch``.

The op is ``torch.ops.mkldnn._linear_pointwise``, private API, so the first use also checks that
it runs and gives ``F.linear``'s answer. A layer falls back to ``F.linear`` for any call the
kernel is not for: autocast on (``F.linear`` casts there), another device or dtype, a tensor
subclass (FSDP2's DTensor), an empty batch.
"""

from __future__ import annotations

import logging
import statistics
import time
import types
from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F

log = logging.getLogger("alignloop")


def use_onednn_linears(model: torch.nn.Module, kernel: str = "auto") -> int:
    """Give ``model``'s fp32 CPU ``nn.Linear`` layers oneDNN's forward and backward; returns how
    many. ``kernel``: ``auto`` (whenever this process's :func:`onednn_is_faster`), ``onednn``
    (whenever it works) or ``torch`` (never). Call it after the model is built (and after LoRA is
    added): layers added later keep ``F.linear``. The forward is an instance attribute bound to the
    layer, so a ``copy.deepcopy`` of the model (an RL reference) carries it to the copy's own weights."""
    layers = [module for module in model.modules() if type(module) is torch.nn.Linear and "forward" not in module.__dict__
              and module.weight.dtype == torch.float32 and module.weight.device.type == "cpu"]
    for module in layers:
        module.cpu_linear = kernel  # read at each call, and by the rollout packing (rollout/packed.py)
    if kernel == "torch" or not onednn_works():
        return 0
    for module in layers:
        module.forward = types.MethodType(_onednn_forward, module)
    return len(layers)


def runs_on_onednn(module: torch.nn.Module) -> bool:
    """Whether ``module``'s fp32 products go to oneDNN: :func:`use_onednn_linears` gave it its
    forward, and its ``cpu_linear`` is ``onednn`` or it is ``auto`` and this process chose oneDNN
    (rollout packing then packs its weight for oneDNN, not MKL)."""
    return has_onednn_forward(module) and (module.cpu_linear == "onednn" or onednn_is_faster())


def has_onednn_forward(module: torch.nn.Module) -> bool:
    """Whether :func:`use_onednn_linears` gave ``module`` its forward."""
    forward = module.__dict__.get("forward")
    return getattr(forward, "__func__", None) is _onednn_forward


def pinned_to_torch(module: torch.nn.Module) -> bool:
    """Whether ``model.cpu_linear: torch`` was set for ``module`` (then nothing moves it to oneDNN)."""
    return module.__dict__.get("cpu_linear") == "torch"


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed by oneDNN, differentiable in all three."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return _OneDNNLinear.apply(x, weight, bias)
    return _linear(x, weight, bias)


def _onednn_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight, bias = self.weight, self.bias
    if (
        x.dtype != torch.float32
        or weight.dtype != torch.float32
        or x.device.type != "cpu"
        or weight.device.type != "cpu"
        or type(weight) not in (torch.nn.Parameter, torch.Tensor)
        or type(x) not in (torch.nn.Parameter, torch.Tensor)
        or x.numel() == 0
        or torch.is_autocast_enabled("cpu")
        or (self.cpu_linear == "auto" and not onednn_is_faster())
    ):
        return F.linear(x, weight, bias)
    return onednn_linear(x, weight, bias)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """y = x Wᵀ + b, and its backward as two more oneDNN products:
    ∂L/∂x = ∂L/∂y · W,   ∂L/∂W = (∂L/∂y)ᵀ · x  (rows of every leading dim flattened),   ∂L/∂b = Σ_rows ∂L/∂y.
    Products whose gradient nobody needs (a frozen weight: LoRA's base, a reference) are skipped."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # noqa: ANN001, ANN205 (autograd's signature)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        rows = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = _linear(grad_out, weight.t(), None)
        if ctx.needs_input_grad[1]:
            grad_weight = _linear(rows.t(), x.reshape(-1, x.shape[-1]).t(), None)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = rows.sum(0)
        return grad_x, grad_weight, grad_bias


@cache
def onednn_works() -> bool:
    """Whether this torch has the oneDNN linear and it gives ``F.linear``'s forward and backward."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        generator = torch.Generator().manual_seed(0)
        x, weight, bias = (torch.randn(*shape, generator=generator, requires_grad=True) for shape in ((3, 5, 64), (48, 64), (48,)))
        grad = torch.randn(3, 5, 48, generator=generator)
        ours = _OneDNNLinear.apply(x, weight, bias)
        expected = F.linear(x, weight, bias)
        got = torch.autograd.grad(ours, (x, weight, bias), grad)
        want = torch.autograd.grad(expected, (x, weight, bias), grad)
        return all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip((ours, *got), (expected, *want)))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def onednn_is_faster() -> bool:
    """This process's choice for ``cpu_linear: auto`` training products: made at the first call by
    timing ``F.linear`` against oneDNN on a training-sized fp32 product (256 rows, 512 → 1408, the
    40M benchmark model's MLP) with :func:`seconds_per_call` (oneDNN wins when it is at least 20%
    faster; a few milliseconds), or adopted from a checkpoint (:func:`adopt_kernels`)."""
    return kernel_choice("training", _time_training_products)


def _time_training_products() -> bool:
    if not onednn_works():
        return False
    x, weight = torch.randn(256, 512), torch.randn(1408, 512)
    with torch.inference_mode():
        aten, onednn = seconds_per_call(lambda: F.linear(x, weight), lambda: _linear(x, weight, None), calls=3)
    faster = onednn * 1.2 < aten
    log.info("fp32 linear layers on this CPU: F.linear %.2f ms, oneDNN %.2f ms: %s", aten * 1e3, onednn * 1e3,
             "oneDNN" if faster else "F.linear")
    return faster


_choices: dict[str, bool] = {}  # this process's kernel choices by name, timed or adopted


def kernel_choice(name: str, time_it: Callable[[], bool]) -> bool:
    """Whether oneDNN is the faster library for the products named ``name``: this process's choice,
    made by ``time_it()`` at the first ask unless adopted from a checkpoint, then kept."""
    if name not in _choices:
        _choices[name] = time_it()
    return _choices[name]


def chosen_kernels() -> dict[str, bool]:
    """The kernel choices this process has made so far, to record in a checkpoint."""
    return dict(_choices)


def adopt_kernels(choices: dict[str, bool]) -> None:
    """Take a checkpoint's kernel choices as this process's own, so a resumed run keeps its rounding.
    A choice the checkpoint does not hold is still timed at its first use."""
    changed = {name: chosen for name, chosen in choices.items() if _choices.get(name, chosen) != chosen}
    if changed:
        log.info("kernel choices from the checkpoint replace this process's timing: %s", changed)
    _choices.update({name: bool(chosen) for name, chosen in choices.items()})


def seconds_per_call(first: Callable[[], object], second: Callable[[], object], calls: int) -> tuple[float, float]:
    """Seconds a call of each of two kernels takes: both warmed up, then timed alternately,
    ``calls`` calls a timing, median of 5 timings each (alternating, so a machine whose speed
    drifts slows both alike)."""

    def seconds(fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) / calls

    seconds(first), seconds(second)
    timings = [(seconds(first), seconds(second)) for _ in range(5)]
    return statistics.median(t[0] for t in timings), statistics.median(t[1] for t in timings)
