"""The one training-loop mechanism every stage shares: plain functions a loop calls, not a base
class with hooks.

* :func:`open_stage_run`, :func:`open_run` — the run folder (:class:`alignloop.runs.Run`: ``config.yaml``, ``metrics.jsonl``, ``checkpoints/``, ``final/``)
* :func:`make_accelerator`, :func:`make_optimizer`, :func:`make_scheduler` — one code path for
  1 process or DDP through accelerate; AdamW; warmup then a transformers schedule
* :func:`shard_model` (``train.strategy=fsdp``, torch FSDP2) and :mod:`alignloop.train.zero`
  (``zero2``/``zero3``, DeepSpeed) — sharded training behind the same session methods
* :func:`save_checkpoint`, :func:`resume` — exact resume: model, optimiser, scheduler, RNG states
  and the stage's own state (data position, controllers) in ``checkpoints/step-N``
* :class:`MetricsLog` — one JSON line per logged step; :class:`alignloop.runs.Progress` — a bar or log
  lines with ETA carrying the stage's own metrics (the ``progress`` column of :data:`alignloop.config.STAGES`)
* :func:`with_steps_resolved`, :func:`warmup_steps` — one rule for every stage's length and warm-up
* :class:`StopOnInterrupt` — Ctrl-C finishes the current step, checkpoints and exits cleanly
* :class:`TrainingSession` — all of the above around one loop, so a stage's loop shows its maths
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml

from alignloop.config import STAGES, TrainConfig, check_trackers, save_config, stage_name
from alignloop.runs import CHECKPOINT_PREFIX, STATE_FILE, Progress, Run
from alignloop.errors import ConfigError, TrainingInterrupted
from alignloop.models.cpu_linear import adopt_kernels, chosen_kernels
from alignloop.train.zero import (ZERO_STAGES, held_parameters, is_engine, load_zero, release_engine, save_zero, zero_engine,
                                  zero_full_weights, zero_step)

log = logging.getLogger("alignloop")

SHARDS_DIR = "shards"  # in a checkpoint of a sharded model: every process's shards (torch distributed checkpoint)
# Where each sharding strategy keeps every process's shards in a checkpoint (DeepSpeed: its own checkpoint format)
SHARDED_DIRS = {"fsdp": SHARDS_DIR, "zero2": "deepspeed-zero2", "zero3": "deepspeed-zero3"}
KERNELS_KEY = "cpu_kernels"  # in STATE_FILE: each rank's CPU kernel choices, by rank (models/cpu_linear.py)


def world_size() -> int:
    """Processes of this run: torchrun's ``WORLD_SIZE``, 1 without it. Known before the
    accelerator exists, so what is sized by it (steps, the reference pass) is the same in every process."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def with_steps_resolved(cfg: Any, num_examples: int) -> Any:
    """``cfg`` with ``train.max_steps`` resolved by the one rule of every stage, TRL's: a set
    ``max_steps`` wins; otherwise ``train.epochs`` passes over the data decide, an epoch being
    ``num_examples // (batch_size × grad_accum × processes)`` steps.

    Every stage calls this (through :func:`open_stage_run`) before opening its run folder, so the
    saved config holds the step count that was run.
    """
    t = cfg.train
    if t.max_steps is not None:
        if t.epochs is not None:
            log.info("train.max_steps=%d wins over train.epochs=%g (set train.max_steps=null to train by epochs)",
                     t.max_steps, t.epochs)
        return cfg
    per_epoch = max(1, num_examples // (t.batch_size * t.grad_accum * world_size()))
    steps = max(1, math.ceil(t.epochs * per_epoch))
    log.info("train.epochs=%g over %d examples: %d optimizer steps", t.epochs, num_examples, steps)
    return dataclasses.replace(cfg, train=dataclasses.replace(t, max_steps=steps))


def check_reference_tokenizer(ref_model: str | None, tokenizer: Any, key: str, why: str) -> None:
    """A reference model named apart from the policy (``key``) reads the policy's tokens: its
    tokenizer alone is compared, before any data or weights load."""
    if not ref_model:
        return
    from alignloop.config import ModelConfig
    from alignloop.models.load import load_tokenizer

    if load_tokenizer(ModelConfig(name_or_path=ref_model)).get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"{key} {ref_model!r} has another tokenizer than the policy; {why}")


def open_stage_run(cfg: Any, num_examples: int, title: str) -> tuple[Any, Run]:
    """What every stage does before training: its step count (:func:`with_steps_resolved`),
    then :func:`open_run`. Returns the resolved config and the run; a caller returns the run at
    once when :meth:`Run.is_complete` (logged here)."""
    cfg = with_steps_resolved(cfg, num_examples)
    run = open_run(cfg)
    if run.is_complete():
        log.info("%s: %s is already complete (model in %s); --train.resume=never trains it again", title, run.dir, run.final_dir)
    return cfg, run


def open_run(config: Any, is_main: bool = True) -> Run:
    """Create (or reopen) the run folder and write the resolved config to ``config.yaml``.

    An earlier run in the same folder is continued (``train.resume=auto``) from its newest
    checkpoint, with a warning naming any setting that changed; a completed run with unchanged
    settings is left as it is (:meth:`Run.is_complete`). It is started over, its checkpoints,
    metrics and final model cleared, with ``train.resume=never`` or when a completed run's settings
    changed.
    """
    run = Run(Path(config.run.output_dir) / config.run.name)
    if not is_main:
        return run
    run.dir.mkdir(parents=True, exist_ok=True)
    changed = []
    if run.config_path.is_file():
        changed = _changed_keys(yaml.safe_load(run.config_path.read_text()) or {}, asdict(config))
        changed = [k for k in changed if k != "train.resume"]
    if config.train.resume == "never" or (run.is_complete() and changed):
        shutil.rmtree(run.checkpoints_dir, ignore_errors=True)
        shutil.rmtree(run.final_dir, ignore_errors=True)
        run.metrics_path.unlink(missing_ok=True)
    elif changed and run.checkpoints():
        log.warning("resuming %s with changed settings: %s", run.dir, ", ".join(changed))
    save_config(config, run.config_path)
    return run


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(prefix + k)
    return keys


# ---------------------------------------------------------------------------------------------
# Accelerator, optimiser, schedule
# ---------------------------------------------------------------------------------------------
def make_accelerator(train: TrainConfig, report_to: list[str], run: Run) -> Any:
    """An ``Accelerator`` for this machine (CUDA when present, else CPU), seeded.

    The scheduler is stepped once per optimizer step (``step_scheduler_with_optimizer=False``)
    because ``max_steps`` counts optimizer steps whatever the number of processes. Mixed precision
    is the loop's own :class:`Precision`, not accelerate's: accelerate keeps it in a process-wide
    singleton, so two stages with different precisions could not run in one process.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if train.threads:
        torch.set_num_threads(train.threads)
    check_trackers(report_to)  # Stage.run checked already; a stage called from code (the demo) had no Stage.run
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        step_scheduler_with_optimizer=False,
        log_with=report_to or None,
        project_dir=str(run.dir),
    )
    if report_to:
        accelerator.init_trackers(run.dir.name)
    set_seed(train.seed)
    return accelerator


class Precision:
    """How a loop computes in ``train.precision``, behind one small interface the loops call.

    * ``fp32``: nothing to do.
    * ``bf16``: the model's trainable weights are cast to bf16, so forward and backward run in bf16
      with no per-operation casts; the optimiser updates fp32 *master* copies and the bf16 weights
      are refreshed from them after each step (as DeepSpeed's and Megatron's bf16 optimisers do).
      Without the fp32 copies an update smaller than bf16's resolution, about 1/256 of a weight,
      would round away: at lr 1e-5 almost every one. Buffers (rotary frequencies) stay fp32.
    * ``bf16-autocast``: fp32 weights, ``torch.autocast`` around forward passes (what TRL and HF
      Trainer do with ``bf16=True``): every matmul re-casts its fp32 weight, which is slower.

    A loop calls :attr:`params` (what the optimiser updates), :meth:`autocast` around forwards,
    :meth:`after_backward` before clipping, :meth:`after_step` after ``optimizer.step()``, and
    :meth:`fp32_weights_into` before saving. It is registered for checkpointing, so the master
    weights are part of an exact resume.
    """

    def __init__(self, model: torch.nn.Module, precision: str, sharded: bool = False):
        self.precision = precision
        self.model_params = [p for p in model.parameters() if p.requires_grad]
        # Sharded by FSDP, the model's own fp32 shards are the master weights and FSDP casts the
        # gathered copy to bf16 for compute (:func:`shard_model`): nothing left to do here.
        self.masters = precision == "bf16" and not sharded
        if self.masters:
            self.params = [p.detach().float().clone().requires_grad_(True) for p in self.model_params]
            self.cast_frozen(model)  # frozen weights too (LoRA's base): one dtype in every matmul
        else:
            self.params = self.model_params

    def autocast(self, device: torch.device) -> Any:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16-autocast")

    def cast_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """A frozen model that runs beside the trained one (RL's reference), in the trained one's
        dtype: in ``bf16`` its weights become bf16 as the policy's did, so its forwards run at bf16
        speed (an fp32 copy took 0.6 s of a 4.4 s RLOO step at 40M) and, before the first update,
        its log-probs equal the policy's exactly. Buffers stay fp32, as in the policy. The
        constructor casts the trained model's weights with it."""
        if self.precision == "bf16":
            for p in model.parameters():
                p.data = p.data.to(torch.bfloat16)
        return model

    @staticmethod
    def outside_session(precision: str, device: torch.device) -> Any:
        """Around a no-grad pass over the still-fp32 model before the session (DPO's reference
        log-probs): bf16 matmuls in either bf16 mode, so the pass computes as training's forwards
        will (the implicit reward starts at ~0, not at bf16's rounding) and as fast."""
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision != "fp32")

    def after_backward(self) -> None:
        """Move the model's bf16 gradients to the fp32 master weights."""
        if not self.masters:
            return
        for master, param in zip(self.params, self.model_params):
            master.grad = None if param.grad is None else param.grad.float()
            param.grad = None

    @torch.no_grad()
    def after_step(self) -> None:
        """Refresh the bf16 weights from the updated master weights."""
        if not self.masters:
            return
        for master, param in zip(self.params, self.model_params):
            param.copy_(master)

    @torch.no_grad()
    def fp32_weights_into(self, model: torch.nn.Module) -> None:
        """Make ``model`` fp32 with the master weights in it (to save it)."""
        if not self.masters:
            return
        model.float()
        for master, param in zip(self.params, self.model_params):
            param.data = master.detach()

    def state_dict(self) -> dict[str, Any]:
        return {"master": [p.detach() for p in self.params]} if self.masters else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.masters:
            with torch.no_grad():
                for master, saved in zip(self.params, state["master"]):
                    master.copy_(saved)
            self.after_step()


def make_optimizer(params: list[torch.nn.Parameter], train: TrainConfig,
                   extra_params: list[torch.nn.Parameter] | None = None, extra_lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW over ``params``; weight decay only on matrices (not biases, norms or other vectors).

    ``extra_params`` (a reward head, PPO's value head) follow the same decay rule in groups of
    their own at ``extra_lr`` (default ``train.lr``); the schedule scales every group alike.
    The fused kernel (one pass per parameter, CPU and GPU) is used where torch has it: the default
    multi-tensor version allocates temporaries as large as the model on every step.
    """
    extra_params = extra_params or []
    groups = []
    for group, lr in ((params, train.lr), (extra_params, extra_lr or train.lr)):
        groups += [
            {"params": [p for p in group if p.ndim >= 2], "weight_decay": train.weight_decay, "lr": lr},
            {"params": [p for p in group if p.ndim < 2], "weight_decay": 0.0, "lr": lr},
        ]
    everything = [*params, *extra_params]
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16) for p in everything)
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=train.lr, betas=(train.adam_beta1, train.adam_beta2), fused=fused
    )


def warmup_steps(train: TrainConfig) -> int:
    """Linear warm-up steps, one rule for every stage: ``train.warmup_steps`` when set, else
    ``ceil(warmup_ratio × max_steps)`` (transformers' rule for ``warmup_ratio``), so a short run
    warms up for the same share of itself as a long one instead of spending itself in warm-up."""
    if train.warmup_steps is not None:
        if train.warmup_steps >= train.max_steps:
            log.warning("train.warmup_steps=%d is not shorter than the run's %d steps: the learning rate never reaches "
                        "train.lr (leave warmup_steps null to warm up for train.warmup_ratio of the run)",
                        train.warmup_steps, train.max_steps)
        return train.warmup_steps
    return math.ceil(train.warmup_ratio * train.max_steps)


def make_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> Any:
    """Linear warm-up over :func:`warmup_steps`, then ``train.lr_schedule`` to ``max_steps``."""
    from transformers import get_scheduler

    return get_scheduler(train.lr_schedule, optimizer, num_warmup_steps=warmup_steps(train), num_training_steps=train.max_steps)


# ---------------------------------------------------------------------------------------------
# Sharding (train.strategy=fsdp)
# ---------------------------------------------------------------------------------------------
def shard_model(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """Shard ``model`` across the run's processes with torch's FSDP2 (``fully_shard``), in place.

    Each decoder block (the classes the model lists in ``_no_split_modules``, as accelerate's and
    TRL's auto-wrap policies read them) becomes one unit, then the root takes what is left
    (embeddings, final norm, head; tied weights stay in one unit). Every parameter becomes a
    ``DTensor`` of which a process holds 1/N; a unit's weights are all-gathered just before it
    computes and freed after, and gradients are reduce-scattered, so each process keeps 1/N of the
    weights, gradients and AdamW state (ZeRO-3's memory at the cost of one all-gather per unit and
    pass). With ``bf16`` the fp32 shards are the master weights and FSDP casts the gathered copy to
    bf16 (``MixedPrecisionPolicy``), gradients reduced in fp32: :class:`Precision`'s scheme, done by FSDP.

    torch's own FSDP2 rather than accelerate's plugin: accelerate 1.16 on a CPU picks DDP whatever
    its FSDP settings say (measured: every rank held all parameters), so its plugin could not be
    tested on the machines CI has; ``fully_shard`` runs on gloo as on NCCL.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # Every process cuts its shard from its own copy: start them all from the main process's, as
    # DDP does when it wraps a model (a LoRA adapter's random init may differ between processes).
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            torch.distributed.broadcast(tensor.data, src=0)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" \
        else MixedPrecisionPolicy()
    for block in decoder_blocks(model):
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def decoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers model (through a peft wrapper): its ``_no_split_modules``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ConfigError(f"train.strategy=fsdp: {type(base).__name__} names no repeated blocks (_no_split_modules) to shard by; "
                          "use train.strategy=ddp")
    return blocks


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model``'s whole fp32 weights must be gathered from the processes (:func:`full_weights`):
    sharded by FSDP, or trained by DeepSpeed (ZeRO-3 shards the weights, both stages the fp32 masters)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule) or is_engine(model)


def full_weights(model: torch.nn.Module, everywhere: bool = True) -> dict[str, torch.Tensor]:
    """A sharded model's whole state dict, gathered (every process must call it): on every process,
    or with ``everywhere=False`` on the main process only (the others get ``{}``), in CPU memory."""
    if is_engine(model):
        return zero_full_weights(model, everywhere)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=not everywhere))


@torch.no_grad()
def unshard_for_good(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Put ``weights`` (:func:`full_weights`) back into a sharded ``model`` as plain parameters, so
    it saves, merges LoRA and generates as an unsharded model. Tied parameters stay tied. Only when
    the model will not train again: FSDP's hooks still expect shards."""
    replaced: dict[int, torch.nn.Parameter] = {}
    for name, param in list(model.named_parameters(remove_duplicate=False)):
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if id(param) not in replaced:
            replaced[id(param)] = torch.nn.Parameter(weights[name].clone(), requires_grad=param.requires_grad)
        owner._parameters[attr] = replaced[id(param)]
    return model


def _checkpointed(model: torch.nn.Module, extra_modules: list[torch.nn.Module]) -> torch.nn.Module:
    """One module holding the model and the modules trained beside it, so the optimiser's every
    parameter has a name for torch's distributed checkpoint."""
    return torch.nn.ModuleDict({"model": model, "extra": torch.nn.ModuleList(extra_modules)})


@dataclasses.dataclass
class Shards:
    """What each process of a sharded run checkpoints of its own: its shards of the model (a
    DeepSpeed engine under zero2/zero3), of the optimiser and of the modules trained beside it."""

    strategy: str  # a key of SHARDED_DIRS
    model: Any
    optimizer: Any
    extra_modules: list[torch.nn.Module]


def save_sharded(checkpoint: Path, shards: Shards) -> None:
    """Each process writes its shards of the weights and optimiser state into ``checkpoint``'s
    ``SHARDED_DIRS[strategy]``, on storage every process sees: DeepSpeed's checkpoint under ZeRO
    (:func:`save_zero`), else torch's distributed checkpoint (one file per process and a metadata file)."""
    folder = checkpoint / SHARDED_DIRS[shards.strategy]
    if shards.strategy in ZERO_STAGES:
        return save_zero(shards.model, checkpoint, folder.name)
    _save_fsdp(folder, shards.model, shards.optimizer, shards.extra_modules)


def load_sharded(checkpoint: Path, shards: Shards) -> None:
    """Read what :func:`save_sharded` wrote back into the same shards (same number of processes)."""
    folder = checkpoint / SHARDED_DIRS[shards.strategy]
    if shards.strategy in ZERO_STAGES:
        return load_zero(shards.model, checkpoint, folder.name)
    _load_fsdp(folder, shards.model, shards.optimizer, shards.extra_modules)


def _save_fsdp(folder: Path, model: torch.nn.Module, optimizer: Any, extra_modules: list[torch.nn.Module]) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optimizer_state = get_state_dict(_checkpointed(model, extra_modules), optimizer)
    dcp.save({"model": weights, "optimizer": optimizer_state}, checkpoint_id=str(folder))


def _load_fsdp(folder: Path, model: torch.nn.Module, optimizer: Any, extra_modules: list[torch.nn.Module]) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    holder = _checkpointed(model, extra_modules)
    weights, optimizer_state = get_state_dict(holder, optimizer)  # the shapes to read into
    state = {"model": weights, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(holder, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


# ---------------------------------------------------------------------------------------------
# Checkpoints and exact resume
# ---------------------------------------------------------------------------------------------
def save_checkpoint(accelerator: Any, run: Run, step: int, state: dict, keep: int, shards: Shards | None = None) -> Path:
    """Save everything needed to continue exactly after ``step`` optimizer steps.

    accelerate writes the prepared model, optimiser, scheduler and every RNG state; ``state`` is the
    stage's own (data position, controllers) as JSON, beside the CPU kernel choices each process
    made, by rank (``models/cpu_linear.py``: they fix the run's float rounding, and under DDP each
    rank times for itself). The folder is written under a temporary name and renamed, so a kill -9
    mid-save leaves the previous checkpoint as the newest. A sharded model (``shards``: model,
    optimiser, modules trained beside it) writes its weights and AdamW state from every process
    (:func:`save_sharded`) into ``SHARDED_DIRS[strategy]``.
    """
    final = run.checkpoints_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = run.checkpoints_dir / f".tmp-{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if shards is not None:
        save_sharded(tmp, shards)
    from accelerate.utils import gather_object

    kernels = gather_object([chosen_kernels()])  # by rank; one process: the list as it is
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, KERNELS_KEY: kernels, **state}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in run.checkpoints()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def save_final(accelerator: Any, run: Run, model: Any, tokenizer: Any, precision: Precision, optimizer: Any, step: int) -> None:
    """Write ``final/``: the fp32 weights as an HF folder, and the step that marks the run complete.

    The optimiser state is dropped first: training is over, and serialising the weights needs the
    memory it held. A sharded model's whole weights are gathered and put back into it on the main
    process, which may go on to use it (a stage's report) as an unsharded model.
    """
    optimizer.state.clear()
    weights = full_weights(model, everywhere=False) if is_sharded(model) else None
    if is_engine(model):
        model = release_engine(model)
    if accelerator.is_main_process:
        from alignloop.models.load import save_model

        unwrapped = accelerator.unwrap_model(model) if weights is None else unshard_for_good(model, weights)
        precision.fp32_weights_into(unwrapped)
        save_model(unwrapped, tokenizer, run.final_dir)
        (run.final_dir / STATE_FILE).write_text(json.dumps({"step": step}))
    accelerator.wait_for_everyone()


def resume(accelerator: Any, run: Run, resume_from: str, shards: Shards | None = None) -> dict | None:
    """Load the checkpoint ``train.resume`` points at; return the stage state saved with it (with
    ``step``), or None to start from scratch. ``shards`` as for :func:`save_checkpoint`."""
    if resume_from == "never":
        return None
    if resume_from == "auto":
        found = run.checkpoints()
        if not found:
            return None
        folder = found[-1]
    else:
        folder = Path(resume_from)
        if not (folder / STATE_FILE).is_file():
            raise ConfigError(f"train.resume: {resume_from!r} is not a checkpoint folder (no {STATE_FILE})")
    saved = next((strategy for strategy, name in SHARDED_DIRS.items() if (folder / name).is_dir()), None)
    if saved != (shards.strategy if shards else None):
        how = f"sharded by train.strategy={saved}" if saved else "with whole weights (train.strategy=ddp, or one process)"
        raise ConfigError(f"train.resume: {folder} was saved {how}; resume it with that strategy and as many processes")
    accelerator.load_state(str(folder))
    if shards is not None:
        load_sharded(folder, shards)
    state = json.loads((folder / STATE_FILE).read_text())
    # Before any product, so the resumed run keeps the killed one's rounding: each rank its own
    # rank's choices (rank 0's where the run now has more processes than it had).
    by_rank = state.pop(KERNELS_KEY, [])
    if by_rank:
        adopt_kernels(by_rank[accelerator.process_index if accelerator.process_index < len(by_rank) else 0])
    log.info("resumed from %s (step %d)", folder, state["step"])
    return state


# ---------------------------------------------------------------------------------------------
# Metrics and progress
# ---------------------------------------------------------------------------------------------
class MetricsLog:
    """``metrics.jsonl``: one JSON object per logged step, ``{"step": N, "name": value, ...}``.

    On resume, lines after the checkpoint's step are dropped, so the file reads as if the run had
    never stopped. Values also go to accelerate's trackers (TensorBoard, W&B) when configured.
    """

    def __init__(self, run: Run, accelerator: Any, resumed_step: int):
        self.accelerator = accelerator
        self.path = run.metrics_path
        if accelerator.is_main_process and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= resumed_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.accelerator.is_main_process:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.accelerator.trackers:
            self.accelerator.log(metrics, step=step)


class StopOnInterrupt:
    """Turn the first Ctrl-C into a request to stop at the next step boundary (where a checkpoint
    is consistent); a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> "StopOnInterrupt":
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            self._previous = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupt: finishing this step, then saving a checkpoint (Ctrl-C again to abort)")

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# ---------------------------------------------------------------------------------------------
# One training session: the mechanics around a stage's own maths
# ---------------------------------------------------------------------------------------------
class TrainingSession:
    """Everything around a loop's forward and loss, so each stage's loop shows only its own maths.

    A loop reads::

        with TrainingSession(cfg, model, run, title) as session:
            model = session.model                        # prepared by accelerate
            while session.running:
                started = time.perf_counter()
                ...forward, loss...; session.backward(loss)
                record = {...stage metrics..., **session.optimizer_step()}
                session.end_step(record, started, evaluate=lambda: {...held-out metrics...})
            session.save_final(tokenizer)

    It owns the accelerator, :class:`Precision`, AdamW, the schedule, exact resume (the stage's own
    state rides along in :attr:`state`), ``metrics.jsonl``, the progress bar, Ctrl-C and checkpoints.
    Under ``train.strategy`` ``fsdp`` the model is sharded in place; under ``zero2``/``zero3``
    :attr:`model` is DeepSpeed's engine (called as the model is). :meth:`backward`,
    :meth:`accumulating`, :meth:`optimizer_step`, :meth:`checkpoint`, :meth:`generation_model`
    and :meth:`save_final` do what the strategy needs, so a loop never asks which it runs under.
    """

    def __init__(self, cfg: Any, model: torch.nn.Module, run: Run, title: str, extra_modules: list | None = None,
                 extra_lr: float | None = None, generates: bool = False):
        t = cfg.train
        self.cfg, self.train, self.run, self.title = cfg, t, run, title
        self.stage = stage_name(cfg)
        self.accelerator = make_accelerator(t, cfg.run.report_to, run)
        # On the device before Precision copies the fp32 master weights: they must live beside the grads.
        model = model.to(self.accelerator.device)
        # One process computes as DDP whatever the strategy: there is nothing to split.
        self.strategy = t.strategy if self.accelerator.num_processes > 1 else "ddp"
        self.sharded = self.strategy != "ddp"
        # A stage that generates with its policy (RL) gets a whole copy to generate with when the
        # policy's weights are sharded: see generation_model().
        self._generation_copy = copy.deepcopy(model) if self.strategy in ("fsdp", "zero3") and generates else None
        self._generation_copy_step = -1
        if self.strategy == "fsdp":
            shard_model(model, t.precision)
            held, total = (sum(p.to_local().numel() for p in model.parameters()), sum(p.numel() for p in model.parameters()))
            log.info("FSDP: each of %d processes holds %s of the %s parameters", self.accelerator.num_processes,
                     f"{held:,}", f"{total:,}")
        self.precision = Precision(model, t.precision, sharded=self.sharded)
        if self.strategy in ZERO_STAGES and extra_modules:
            raise ConfigError(f"train.strategy={self.strategy} trains the model alone, in DeepSpeed's optimiser; this stage also "
                              "trains a module beside it (PPO's value head, the ordinal rating head): use train.strategy=fsdp or ddp")
        # Small modules outside the model (an ordinal head's thresholds) train with it, in fp32,
        # and are checkpointed with it.
        extra_modules = [m.to(self.accelerator.device) for m in extra_modules or []]
        self.extra_params = [p for m in extra_modules for p in m.parameters()]
        self.optimizer = make_optimizer(self.precision.params, t, self.extra_params, extra_lr)
        self.scheduler = make_scheduler(self.optimizer, t)
        self.extra_modules = extra_modules
        checkpointed = [self.precision, *extra_modules]
        if self.sharded:
            # Not through prepare(): on a CPU it would wrap the sharded model in DDP, and it saves the
            # optimiser from the main process alone, where each process holds its own shard of it.
            # DeepSpeed's engine takes the model and AdamW; the schedule stays alignloop's.
            self.model = zero_engine(model, self.optimizer, t, self.strategy) if self.strategy in ZERO_STAGES else model
            checkpointed.append(self.scheduler)
            if self.strategy == "zero3":
                held, total = held_parameters(self.model)
                log.info("ZeRO-3: each of %d processes holds %s of the %s parameters", self.accelerator.num_processes,
                         f"{held:,}", f"{total:,}")
        else:
            self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, self.optimizer, self.scheduler)
        for obj in checkpointed:
            self.accelerator.register_for_checkpointing(obj)
        self.state: dict = resume(self.accelerator, run, t.resume, self.shards) or {"step": 0}
        self.step: int = self.state.pop("step")
        self.metrics = MetricsLog(run, self.accelerator, resumed_step=self.step)
        # Each stage's own numbers on its progress lines (STAGES' `progress` column), one mechanism for all.
        self.progress = Progress(t.max_steps, self.step, title, enabled=self.accelerator.is_main_process,
                                 shown=STAGES[self.stage].progress)
        log.info("%s: %d steps, warm-up %d, %s schedule", title, t.max_steps, warmup_steps(t), t.lr_schedule)
        self._interrupt = StopOnInterrupt()
        self._started, self._budget_spent = time.perf_counter(), False

    def generation_model(self) -> torch.nn.Module:
        """The policy to generate with (and to score its samples without gradient): the trained
        model itself, or under sharding a whole, unsharded copy refreshed from the shards once per
        step. Generation cannot run on shards: each process decodes its own prompts for as many
        steps as they need, while every sharded forward is a collective that all processes must
        join. The copy costs one model's weights per process during rollouts, as a colocated vLLM
        engine does in TRL and OpenRLHF; the gradients and AdamW state, 3× the weights in fp32,
        stay sharded."""
        if self._generation_copy is None:
            return self.accelerator.unwrap_model(self.model)
        if self._generation_copy_step != self.step:
            self._generation_copy.load_state_dict(full_weights(self.model))
            self.precision.cast_frozen(self._generation_copy)
            self._generation_copy_step = self.step
        return self._generation_copy

    @property
    def shards(self) -> Shards | None:
        """What each process checkpoints of its own under sharding (:func:`save_sharded`), else None."""
        return Shards(self.strategy, self.model, self.optimizer, self.extra_modules) if self.sharded else None

    def checkpoint(self) -> Path:
        """Save a checkpoint of the step just finished (:func:`save_checkpoint`)."""
        return save_checkpoint(self.accelerator, self.run, self.step, self.state, keep=self.train.keep_checkpoints,
                               shards=self.shards)

    @property
    def running(self) -> bool:
        """Steps remain and the time budget (``train.time_budget_s``), if any, is not spent."""
        return self.step < self.train.max_steps and not self._budget_spent

    def __enter__(self) -> "TrainingSession":
        self._interrupt.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._interrupt.__exit__(*exc)
        self.progress.close()

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def autocast(self) -> Any:
        return self.precision.autocast(self.accelerator.device)

    def backward(self, loss: torch.Tensor) -> None:
        """Add ``loss``'s gradients to the step's (a loop scales each micro-batch's loss itself)."""
        if is_engine(self.model):
            self.model.backward(loss, scale_wrt_gas=False)
        else:
            self.accelerator.backward(loss)

    def accumulating(self, last: bool) -> Any:
        """Around a micro-batch's forward and backward when a step has several: under DDP all but
        the ``last`` skip the gradient all-reduce and only add to each process's gradients. FSDP and
        ZeRO reduce each micro-batch's gradients into their shards as backward makes them."""
        return contextlib.nullcontext() if last or self.sharded else self.accelerator.no_sync(self.model)

    def sum_over_processes(self, value: float) -> float:
        """``value`` summed over every process (itself with one process)."""
        if self.accelerator.num_processes == 1:
            return value
        tensor = torch.tensor(value, dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.reduce(tensor, reduction="sum"))

    def mean_over_processes_of(self, value: float) -> float:
        """One number averaged over the processes (:meth:`mean_over_processes`)."""
        return self.mean_over_processes({"value": value})["value"]

    def mean_over_processes(self, values: dict[str, float], summed: tuple[str, ...] = ()) -> dict[str, float]:
        """Each value averaged over the processes that have one (NaN: none), those named in
        ``summed`` added up, in one all-reduce: a logged metric describes the step's whole batch,
        not the main process's share of it, and every process reads the same number (RL's KL
        controller adapts to it)."""
        if self.accelerator.num_processes == 1:
            return values
        numbers = torch.tensor([[0.0, 0.0] if v != v else [v, 1.0] for v in values.values()], dtype=torch.float64,
                               device=self.accelerator.device)
        totals = self.accelerator.reduce(numbers, reduction="sum").tolist()
        return {k: total if k in summed else total / count if count else float("nan")
                for k, (total, count) in zip(values, totals)}

    def optimizer_step(self, advance: bool = True) -> dict[str, float]:
        """Clip, step, zero the gradients; with ``advance`` also step the schedule and count the step.

        Returns lr and grad norm. RL stages make several updates per step (PPO epochs ×
        minibatches over one rollout): all but the last pass ``advance=False``, so ``max_steps``,
        the schedule and checkpoints count rollouts, not updates.
        """
        t = self.train
        if is_engine(self.model):  # DeepSpeed clips (train.max_grad_norm), steps and zeroes in one call
            grad_norm = zero_step(self.model, clipping=t.max_grad_norm > 0)
        else:
            self.precision.after_backward()
            self._average_extra_gradients()
            params = self.precision.params + self.extra_params
            grad_norm = self.accelerator.clip_grad_norm_(params, t.max_grad_norm) if t.max_grad_norm > 0 else None
            if hasattr(grad_norm, "full_tensor"):  # a DTensor under sharding: each process holds its part of the norm
                grad_norm = grad_norm.full_tensor()
            self.optimizer.step()
            self.precision.after_step()
            self.optimizer.zero_grad(set_to_none=True)
        if advance:
            self.scheduler.step()
            self.step += 1
        record = {"train/lr": self.scheduler.get_last_lr()[0]}
        if grad_norm is not None:
            record["train/grad_norm"] = float(grad_norm)
        return record

    def _average_extra_gradients(self) -> None:
        """Average the gradients of the modules trained beside the model (a value head, an ordinal
        head) over the processes, as DDP or FSDP does for the model's own: they sit outside the
        wrapped model, so without this each process would step its copy with its own gradient."""
        if self.accelerator.num_processes == 1 or not self.extra_params:
            return
        for p in self.extra_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)  # gloo has no AVG
            p.grad /= self.accelerator.num_processes

    def end_step(self, record: dict[str, float], started: float, evaluate: Any = None) -> None:
        """Time the step, evaluate when due, log, and checkpoint when due or on Ctrl-C.

        ``record`` is the step's metrics; ``evaluate()`` returns held-out metrics (run every
        ``eval_every`` steps and at the last step). Raises :class:`TrainingInterrupted` after
        saving a checkpoint when Ctrl-C was pressed.
        """
        t, step = self.train, self.step
        seconds = time.perf_counter() - started
        record["perf/step_s"] = seconds
        if "train/tokens" in record:
            record["perf/tokens_per_s"] = record["train/tokens"] / seconds
        if t.time_budget_s is not None:  # every process must agree, or one would wait for the others forever
            over = float(time.perf_counter() - self._started >= t.time_budget_s)
            self._budget_spent = self.sum_over_processes(over) > 0
        last = step == t.max_steps or self._budget_spent
        evaluating = evaluate is not None and ((t.eval_every and step % t.eval_every == 0) or last)
        if evaluating:
            with self.autocast():
                held_out = evaluate()
            record.update(held_out)
            self.model.train()
        if step % t.log_every == 0 or evaluating or last:
            self.metrics.write(step, record)
        self.progress.update(step, record)

        stop = self.sum_over_processes(float(self._interrupt.requested)) > 0
        # No checkpoint at the last step: final/ holds the weights and marks the run complete.
        if stop or (t.save_every and step % t.save_every == 0 and not last):
            checkpoint = self.checkpoint()
            if stop:
                self.progress.close()
                raise TrainingInterrupted(f"stopped at step {step}; checkpoint saved in {checkpoint}; run the same command to continue")

    def save_final(self, tokenizer: Any) -> None:
        """Write ``final/`` (fp32 weights, HF folder, a model card) and end the accelerate session."""
        self.progress.close()
        save_final(self.accelerator, self.run, self.model, tokenizer, self.precision, self.optimizer, self.step)
        if self.accelerator.is_main_process:
            from alignloop.report.training import write_model_card

            write_model_card(self.run, self.cfg, self.stage)
        self.accelerator.end_training()
