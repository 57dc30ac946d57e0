"""DeepSpeed ZeRO behind :class:`alignloop.train.loop.TrainingSession` (``train.strategy=zero2|zero3``).

The session calls these few functions where the FSDP path calls its own; a stage's loop sees the
same ``session.backward`` / ``session.optimizer_step`` whatever the strategy.

* :func:`zero_engine` — wrap the model and alignloop's own AdamW in a DeepSpeed engine
* :func:`zero_step` — the optimizer step (DeepSpeed clips), returning the gradient norm
* :func:`zero_full_weights` — the whole fp32 weights, gathered from the processes
* :func:`save_zero`, :func:`load_zero` — every process's shards of a checkpoint
* :func:`release_engine` — after training: DeepSpeed's hooks off, the module a plain one again

DeepSpeed directly rather than accelerate's plugin: accelerate 1.16 on a CPU runs DDP whatever its
DeepSpeed settings say, so the plugin could not be tested on the machines CI has; DeepSpeed itself
runs ZeRO on gloo (``DS_ACCELERATOR=cpu``, no compiled ops) as it does on NCCL.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from alignloop.config import TrainConfig
from alignloop.errors import ConfigError

ZERO_STAGES = {"zero2": 2, "zero3": 3}


def is_engine(model: Any) -> bool:
    """Whether ``model`` is a DeepSpeed engine (without importing DeepSpeed: none exists until it is)."""
    deepspeed = sys.modules.get("deepspeed")
    return deepspeed is not None and isinstance(model, deepspeed.DeepSpeedEngine)


def import_deepspeed(strategy: str) -> Any:
    """DeepSpeed, on CUDA when there is one and else on the CPU (its accelerator is chosen when it
    is first imported); a :class:`ConfigError` naming ``train.strategy`` when it is not installed."""
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"train.strategy={strategy} runs on DeepSpeed, which is not installed: "
                          "pip install 'alignloop[deepspeed]' (DS_BUILD_OPS=0 on a machine without CUDA), "
                          "or use train.strategy=fsdp")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines repeat its whole config per process
    # DeepSpeed calls collectives torch 2.13 deprecates, and torch warns on every call: one line per
    # gradient bucket and step (300 kB of log in a 30-step test run), enough to fill a pipe and stall.
    warnings.filterwarnings("ignore", r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
                            FutureWarning)
    return deepspeed


def zero_config(train: TrainConfig, stage: int, hidden_size: int | None = None) -> dict[str, Any]:
    """DeepSpeed's config for ``train``: only what alignloop decides; DeepSpeed's defaults otherwise.

    * The loops scale each micro-batch's loss themselves and call ``backward`` ``grad_accum``
      times before one ``optimizer_step``, so the caller owns the accumulation boundary
      (``managed_gradient_accumulation: false``): every ``engine.step()`` is an optimizer step, and
      each backward adds its gradients, reduced, into this process's shard of them (ZeRO-2 and -3
      reduce as backward runs, so there is nothing to skip on the micro-batches before the last).
    * ``gradient_clipping`` is ``train.max_grad_norm`` (0: none), on the global norm, as
      ``torch.nn.utils.clip_grad_norm_`` clips in one process.
    * ``bf16``: DeepSpeed keeps bf16 weights and gradients and an fp32 master copy in the optimiser
      (:class:`alignloop.train.loop.Precision`'s scheme, done by DeepSpeed); buffers stay fp32.
      Gradients are reduced and accumulated in fp32, as FSDP's ``reduce_dtype`` does here.
    * The micro-batch size is only DeepSpeed's bookkeeping (samples counted): the loops batch.
    * Buffers sized by the model's ``hidden_size`` h, as transformers' and TRL's ``"auto"`` values
      size them: gradients reduced in buckets of h² numbers, ZeRO-3 keeping weights under 10·h whole. DeepSpeed's fixed defaults (5·10⁸-number buckets) are made for
      billions of parameters; on the 40M benchmark model (2 CPU processes, SFT) ZeRO-3's peak
      memory per process was 2.95 GB with them, about 2.4 GB with these (DDP: 2.3 GB).
    * ZeRO-3 frees a gathered weight once its block has computed, as FSDP does: at most h² numbers
      stay gathered (``stage3_max_live_parameters``, ``stage3_max_reuse_distance``). DeepSpeed's
      defaults (10⁹) keep every weight of a model under a billion parameters gathered through the
      step, which on the 40M model made ZeRO-3's peak within a step DDP's (1.55 GB a process,
      malloc-trimmed); with these it is 1.39 GB (FSDP: 1.25 GB). Prefetching is off: with so few
      live weights DeepSpeed 0.19.8 fails ("Cannot partition a param in flight") on a held-out
      pass, and on gloo a prefetch overlaps nothing anyway.
    """
    bf16 = train.precision == "bf16"
    sized = {} if hidden_size is None else {"reduce_bucket_size": hidden_size**2, "allgather_bucket_size": hidden_size**2,
                                            "stage3_prefetch_bucket_size": 0,
                                            "stage3_param_persistence_threshold": 10 * hidden_size,
                                            "stage3_max_live_parameters": hidden_size**2, "stage3_max_reuse_distance": hidden_size**2}
    return {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": {"stage": stage, **sized},
        "bf16": {"enabled": bf16},
        **({"communication_data_type": "fp32", "data_types": {"grad_accum_dtype": "fp32"}} if bf16 else {}),
        "steps_per_print": sys.maxsize,  # alignloop logs the steps
        "wall_clock_breakdown": False,
    }


def zero_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, train: TrainConfig, strategy: str) -> Any:
    """``model`` and ``optimizer`` (alignloop's AdamW and its parameter groups: no decay on vectors)
    in a DeepSpeed engine for ZeRO stage 2 or 3. Every process calls it, on the process group
    accelerate has started. DeepSpeed starts every process from the main process's weights (as DDP
    does); ZeRO-3 then keeps 1/N of each weight per process (those under 10·hidden_size numbers
    whole), ZeRO-2 whole weights with 1/N of the gradients and AdamW state.

    The schedule stays alignloop's, stepped by the session: it sets the learning rate in the
    optimizer's groups, which DeepSpeed's ZeRO optimizer steps with.
    """
    deepspeed = import_deepspeed(strategy)
    config = getattr(model, "config", None)
    hidden = getattr(config.get_text_config(), "hidden_size", None) if config is not None else None
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=zero_config(train, ZERO_STAGES[strategy], hidden))
    return engine


def held_parameters(engine: Any) -> tuple[int, int]:
    """(numbers this process holds, numbers in the model): ZeRO-3 keeps a shard (``ds_tensor``) of each weight."""
    params = list(engine.module.parameters())
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    total = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params)
    return held, total


def zero_step(engine: Any, clipping: bool) -> float | None:
    """The optimizer step over the gradients the backward passes since the last one accumulated
    (clipped first when ``clipping``), the gradients then zeroed; returns the global gradient
    norm before clipping, None without clipping (as one process logs it)."""
    engine.step()
    norm = engine.get_global_grad_norm() if clipping else None
    return None if norm is None else float(norm)


@torch.no_grad()
def zero_full_weights(engine: Any, everywhere: bool = True) -> dict[str, torch.Tensor]:
    """The engine's model's whole state dict in fp32 (every process must call it): the fp32 master
    weights under bf16, not their bf16 rounding; frozen weights (a LoRA base) as they are, in fp32.
    On every process, or with ``everywhere=False`` on the main process only (the others get ``{}``),
    in CPU memory. Under ZeRO-3 every weight is gathered from the shards for the moment; ZeRO-2's
    weights are whole already, and the masters of both are gathered one weight at a time."""
    from deepspeed import zero
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    keep = everywhere or torch.distributed.get_rank() == 0
    masters: dict[int, torch.Tensor] = {}  # by parameter: a tied weight has one, under each of its names
    if engine.bfloat16_enabled():
        for param in module.parameters():
            if param.requires_grad:
                master = safe_get_full_fp32_param(param)  # a collective: every process, in the same order
                if keep:
                    masters[id(param)] = master.cpu()
    with zero.GatheredParameters(list(module.parameters())):
        if not keep:
            return {}
        return {name: (masters.get(id(tensor), tensor).detach().float() if tensor.is_floating_point() else tensor.detach()).cpu().clone()
                for name, tensor in module.state_dict(keep_vars=True).items()}


def save_zero(engine: Any, folder: Path, tag: str) -> None:
    """Each process writes its shards of the weights and optimiser state (fp32 masters, AdamW's
    moments) to ``folder/tag`` with DeepSpeed's checkpointing, on storage every process sees."""
    engine.save_checkpoint(str(folder), tag=tag, save_latest=False)


def load_zero(engine: Any, folder: Path, tag: str) -> None:
    """Read what :func:`save_zero` wrote back into the same shards (same number of processes).
    The schedule is alignloop's and comes back with accelerate's part of the checkpoint."""
    path, _ = engine.load_checkpoint(str(folder), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise ConfigError(f"train.resume: {folder / tag} holds no DeepSpeed checkpoint DeepSpeed can read")


def release_engine(engine: Any) -> torch.nn.Module:
    """The engine's module once training is over, with DeepSpeed's hooks removed (ZeRO-3's
    gathering of each block's weights, the gradient reduction), so it computes as a plain module
    once whole weights are put back into it (:func:`alignloop.train.loop.unshard_for_good`)."""
    engine.destroy()
    for hook in ("module_forward_pre_hook", "module_forward_post_hook"):
        handle = getattr(engine, hook, None)
        if handle is not None:
            handle.remove()
    return engine.module
