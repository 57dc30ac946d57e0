"""Online RL: PPO, GRPO, RLOO and REINFORCE++ in one explicit loop.

One step, read top to bottom in :func:`fit_policy`: :func:`make_experience` (1–3) returns an
:class:`Experience`, :func:`update_policy` (4) trains on it, then the step is logged.

1. **Rollout.** ``train.batch_size`` prompts, each sampled ``rl.group_size`` times by the shared
   engine (:func:`alignloop.rollout.generate.generate`, KV cache, seeded per sample) or, with
   ``rollout.engine: openai``, by a server the weights are published to (:class:`ServerRollouts`),
   scored by the reward source (:mod:`alignloop.rollout.rewards`).
2. **Old and reference log-probs.** The policy before the update (π_old) and the reference
   (π_ref) score the sampled tokens without gradient. π_old comes for free: with top-k/top-p off,
   the engine's own sampling log-probs *are* π_old's, so no forward is run for it (PPO still runs
   one, for the critic's values). π_ref is a frozen copy of the starting policy, or with LoRA the
   same weights with the adapter switched off; with β = 0 there is no reference at all.
3. **Advantages**, per ``rl.algo``'s row of :data:`alignloop.advantages.ESTIMATORS`:

       grpo       A_i = (s_i − mean_group) / std_group           (one per completion)
       rloo       A_i = s_i − mean of the other completions of its prompt
       reinforce  r_t = −β·k1_t/L (+ s on the last token) → returns G_t → whitened over the batch
       ppo        r_t as for reinforce → GAE(γ, λ) with the critic's V_t → whitened

   where s is the reward, minus β·(mean per-token k1) for the sequence-level algorithms when the
   KL is in the reward, and for reinforce and ppo minus its prompt's mean when ``rl.group_size`` > 1. **How the KL penalty is scaled**: a completion's penalty is β times its
   *mean* per-token KL (k1 = log π_old − log π_ref), not the sum over its L tokens. Summed, the
   penalty grows with length and its noise across a prompt's samples (a sum of L noisy log-ratios)
   soon dwarfs the reward differences the advantage is made of, and the policy stops learning
   (TRL's RLOO with its default β does not learn the benchmark task at all). As a mean, β is "how
   many reward units one nat of per-token KL costs", the same for any length.
4. **Update.** ``rl.epochs`` passes over the experience in ``rl.minibatches`` minibatches, each one
   optimizer update of

       L = L_clip(ρ, A)  [+ vf_coef·L_V (ppo)]  [+ β·KL_loss (kl as a loss, k3)]  [+ α·L_CE (ptx)]

   with ρ = π/π_old (:func:`alignloop.losses.clipped_policy_loss`), the loss aggregated per
   ``rl.loss_aggregation``. The last update of the step advances the schedule and the step count.

PPO's critic is a **value head on the policy's trunk** (a linear layer on the last hidden state),
not a second model: one forward gives log-probs and values, and no second copy of the weights
sits in memory. The price is that value and policy gradients share the trunk; a small ``vf_coef``
keeps the value loss from steering it, while the head learns at its own ``rl.value_lr``. The head
is checkpointed with the policy and saved as ``final/value_head.pt``.

Exact resume: the session restores policy, value head, optimiser, schedule and RNG; the prompt
order is a function of the step (:class:`ShuffledBatches`), sampling noise a function of
(seed, step, sample) (the engine's per-row generators), and the KL controller rides in the
checkpoint's state.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from alignloop import advantages as adv
from alignloop.config import STAGES, RLConfig, SamplingConfig
from alignloop.data.batching import ShuffledBatches, collate, to_device
from alignloop.data.load import load_records
from alignloop.data.tokenize import Example
from alignloop.errors import ConfigError, DataError, TrainingDiverged
from alignloop.losses import (
    aggregate_token_loss,
    clipped_policy_loss,
    clipped_value_loss,
    completion_nll,
    count_loss_tokens,
    explained_variance,
    kl_estimate,
)
from alignloop.models.load import context_length, disable_dropout, inference_device, load_causal_lm, load_tokenizer
from alignloop.rollout.generate import SEED_STRIDE, Generation, encode_prompts, generate
from alignloop.rollout.rewards import build_reward_source, check_rewards
from alignloop.rollout.scoring import Batch, score_tokens
from alignloop.runs import Run
from alignloop.train.loop import TrainingSession, check_reference_tokenizer, full_weights, is_sharded, open_stage_run

log = logging.getLogger("alignloop")

VALUE_HEAD_FILE = "value_head.pt"
VALUE_LR_RATIO = 10.0  # the value head's default learning rate, as a multiple of the policy's
EVAL_BASELINE_FILE = "eval_baseline.json"


def run_rl(cfg: RLConfig) -> Run:
    """``alignloop ppo|grpo|rloo|reinforce``: load policy, prompts, reward (and reference), and train."""
    r = cfg.rl
    # Checked here, not in the config: the config (layer 0) cannot read the estimators' table.
    estimator = adv.ESTIMATORS.get(r.algo)
    if estimator is None:
        raise ConfigError(f"rl.algo: {r.algo!r} is not one of {', '.join(adv.ESTIMATORS)}; the command sets it "
                          f"(alignloop {'|'.join(adv.ESTIMATORS)})")
    if estimator.compares_group and r.group_size < 2:
        raise ConfigError(f"rl.group_size must be ≥ 2 for {r.algo}: it compares a prompt's completions with each other")
    if not cfg.data.path:
        raise ConfigError("data.path: name the prompts file (records with a `prompt` field)")
    if not r.reward:
        raise ConfigError("rl.reward: name the reward source (a reward-model folder, `file.py:fn`, or a YAML reward spec)")
    from alignloop.rollout.remote import server_engine

    engine = server_engine(cfg.rollout, cfg.sampling, cfg.run.name)  # the server must answer before anything heavy loads
    tokenizer = load_tokenizer(cfg.model)
    if r.kl_coef > 0 or r.kl_target is not None:  # otherwise no reference is loaded
        check_reference_tokenizer(r.ref_model, tokenizer, "rl.ref_model", "a per-token KL needs the same tokens "
                                  "(leave rl.ref_model unset to use the starting policy)")
    kinds = STAGES[r.algo].reads  # each algorithm is a command of the same name
    rows, _ = load_records(cfg.data.path, kinds, cfg.data.max_samples)
    eval_rows = load_records(r.eval_prompts, kinds, r.eval_max_prompts)[0] if r.eval_prompts else []
    reward = build_reward_source(r.reward)
    ptx = None
    if r.ptx_coef > 0:
        from alignloop.train.sft import sft_examples

        ptx_records = load_records(r.ptx_data, STAGES["sft"].reads, cfg.data.max_samples)
    model = load_causal_lm(cfg.model, tokenizer, cfg.train.seed)
    disable_dropout(model)  # π_old and the update must score tokens with the same function
    limit = prompt_limit(cfg, model)
    prompts = PromptSet.from_rows(rows, tokenizer, limit, cfg.data.overlong, cfg.data.path)
    eval_prompts = PromptSet.from_rows(eval_rows, tokenizer, limit, cfg.data.overlong, r.eval_prompts) if eval_rows else None
    if r.ptx_coef > 0:
        ptx = sft_examples(r.ptx_data, ptx_records, cfg.data, tokenizer, context_length(model) or 2048)
    reference = load_reference(cfg, model, tokenizer)
    return fit_policy(cfg, model, tokenizer, prompts, reward, reference, eval_prompts, ptx, engine)


def prompt_limit(cfg: RLConfig, model: Any) -> int:
    """Most prompt tokens: ``data.max_length``, and room for ``max_new_tokens`` in the context."""
    context = context_length(model)
    room = None if context is None else context - cfg.sampling.max_new_tokens
    if room is not None and room < 1:
        raise ConfigError(f"sampling.max_new_tokens={cfg.sampling.max_new_tokens} leaves no room for a prompt in the "
                          f"model's context of {context} tokens")
    limits = [x for x in (cfg.data.max_length, room) if x is not None]
    return min(limits) if limits else 10**9


@dataclass
class PromptSet:
    """Prompts (text or chat messages) and the extra fields each row carries for the reward."""

    prompts: list[Any]
    fields: list[dict[str, Any]]

    @classmethod
    def from_rows(cls, rows: Sequence[Any], tokenizer: Any, limit: int, overlong: str, source: str) -> "PromptSet":
        """Rows whose prompt fits ``limit`` tokens; a longer one is an error naming it
        (``data.overlong=error``) or is left out and counted (``truncate``/``drop``: cutting a
        prompt would change the question, so it is not truncated)."""
        lengths = [len(ids) for ids in encode_prompts(tokenizer, [row.fields["prompt"] for row in rows])]
        too_long = [(row, n) for row, n in zip(rows, lengths) if n > limit]
        if too_long and (overlong == "error" or len(too_long) == len(rows)):
            row, n = too_long[0]
            raise DataError(f"{row.where}: prompt of {n} tokens, longer than the {limit} allowed (data.max_length, or the "
                            f"model's context minus sampling.max_new_tokens); {len(too_long)} of {len(rows)} prompts are")
        if too_long:
            log.warning("%s: %d of %d prompts are longer than %d tokens and are left out (first: %s)",
                        source, len(too_long), len(rows), limit, too_long[0][0].where)
        kept = [row for row, n in zip(rows, lengths) if n <= limit]
        return cls([row.fields["prompt"] for row in kept],
                   [{k: v for k, v in row.fields.items() if k != "prompt"} for row in kept])

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, indices: Sequence[int], repeat: int) -> tuple[list[Any], dict[str, list[Any]]]:
        """The prompts at ``indices``, each ``repeat`` times in a row, and their fields as columns."""
        picked = [i for i in indices for _ in range(repeat)]
        names = sorted({k for i in picked for k in self.fields[i]})
        return [self.prompts[i] for i in picked], {k: [self.fields[i].get(k) for i in picked] for k in names}


class Reference:
    """π_ref's log-probs of given tokens: a frozen model, or the policy with its LoRA adapter off."""

    def __init__(self, model: Any | None, adapter_off: bool, share_prefixes: bool = True):
        self.model, self.adapter_off, self.share_prefixes = model, adapter_off, share_prefixes

    @torch.no_grad()
    def logprobs(self, policy: Any, batch: "Batch", temperature: float) -> torch.Tensor:
        if self.adapter_off:
            with policy.disable_adapter():
                return score_tokens(policy, batch, temperature, share_prefixes=self.share_prefixes)[0]
        return score_tokens(self.model, batch, temperature, share_prefixes=self.share_prefixes)[0]


def load_reference(cfg: RLConfig, model: Any, tokenizer: Any) -> Reference | None:
    """The KL reference, before training touches ``model``; None when no KL is asked for."""
    r = cfg.rl
    if r.kl_coef == 0 and r.kl_target is None:
        return None
    if r.ref_model:
        from alignloop.config import ModelConfig

        reference = load_causal_lm(ModelConfig(name_or_path=r.ref_model), tokenizer, cfg.train.seed)  # tokenizer: checked in run_rl
    elif cfg.model.lora.r > 0:
        return Reference(None, adapter_off=True, share_prefixes=cfg.train.share_prefixes)  # no second copy: the base weights are the reference
    else:
        reference = copy.deepcopy(model)
    disable_dropout(reference)
    reference.requires_grad_(False)
    return Reference(reference.eval(), adapter_off=False, share_prefixes=cfg.train.share_prefixes)


def uses_rollout_logprobs(sampling: SamplingConfig) -> bool:
    """Whether the engine's sampling log-probs equal π_old's (no top-k / top-p truncation, T > 0)."""
    return sampling.temperature > 0 and sampling.top_k == 0 and sampling.top_p >= 1.0


def padded(rows: Sequence[Sequence[float]], steps: int, device: torch.device) -> torch.Tensor:
    out = torch.zeros((len(rows), steps))
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
    return out.to(device)


# ---------------------------------------------------------------------------------------------
# Make experience: one rollout, scored, with its advantages
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Experience:
    """Everything the update reads about one step's rollout (after OpenRLHF's ``Experience``).

    B completions (``train.batch_size`` prompts × ``rl.group_size``, a prompt's samples in a row),
    T completion tokens, left-aligned; 0 in ``mask`` on the padding after EOS. ``rows(index)`` is
    a minibatch of the same type.
    """

    # trajectory
    batch: Batch  # (B, L) prompt + completion ids; (B, T) completion tokens a_t, their positions and mask
    # policy
    old_logprobs: torch.Tensor  # (B, T) log π_old(a_t|s_t), the policy that sampled; 0 on padding
    ref_logprobs: torch.Tensor | None  # (B, T) log π_ref(a_t|s_t); None without a reference (β = 0)
    kl_coef: float  # β when the rollout was made: the KL's weight in the reward or the loss
    # outcome
    advantages: torch.Tensor  # (B,) A per completion (grpo, rloo) or (B, T) A_t per token, 0 on padding
    # value: algorithms with a critic only (advantages.ESTIMATORS' uses_critic)
    old_values: torch.Tensor | None  # (B, T) V_old(s_t), the value head at rollout time
    returns: torch.Tensor | None  # (B, T) R_t = A_t + V_old(s_t), the value head's target

    @property
    def mask(self) -> torch.Tensor:
        """(B, T) 1 on completion tokens, 0 on padding."""
        return self.batch.mask

    def rows(self, index: torch.Tensor) -> "Experience":
        """The completions at ``index`` (a minibatch), with the same β."""
        def pick(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[index]
        return Experience(self.batch.rows(index), self.old_logprobs[index], pick(self.ref_logprobs), self.kl_coef,
                          self.advantages[index], pick(self.old_values), pick(self.returns))


def make_experience(cfg: RLConfig, session: TrainingSession, policy: Any, value_head: torch.nn.Module | None,
                    tokenizer: Any, reward: Any, reference: Reference | None, prompts: list[Any], fields: dict[str, list[Any]],
                    step: int, kl_coef: float, rollout: Any = generate) -> tuple[Experience, dict[str, float]]:
    """Sample ``prompts`` with ``policy``, score the completions with ``reward``, take π_old (and the
    critic's values) and π_ref on the sampled tokens, and compute the advantages; see the module
    docstring. Returns the experience and what the rollout says (:func:`rollout_metrics`, the
    critic's explained variance, tokens, time).

    ``rollout`` is the engine: :func:`generate`, or :class:`ServerRollouts` (``rollout.engine:
    openai``). π_old is the engine's sampling log-probs only where they are exact for the sampled
    ids (:func:`uses_rollout_logprobs`, ``Generation.exact_logprobs``, ``rollout.old_logprobs:
    auto``); otherwise a forward pass recomputes it, and where the engine gave exact ids with
    log-probs their mean and largest |engine − trainer| per token are logged as
    ``rollout/logprob_gap`` and ``rollout/logprob_gap_max`` (numerics: another engine's kernels
    or dtype)."""
    r, t, s = cfg.rl, cfg.train, cfg.sampling
    started = time.perf_counter()
    accelerator, device = session.accelerator, session.device
    # Sample ids are a function of (step, row), so a resumed run draws the same samples.
    first_id = (step * accelerator.num_processes + accelerator.process_index) * t.batch_size * r.group_size
    sample_ids = [(first_id + i) % SEED_STRIDE for i in range(len(prompts))]
    generation = rollout(policy, tokenizer, prompts, s, sample_ids=sample_ids)
    rollout_s = time.perf_counter() - started
    scores = torch.tensor(check_rewards(reward(prompts, generation.completions, **fields), len(prompts),
                                        f"rl.reward {r.reward}"), device=device)
    batch = Batch.build(generation.prompt_ids, generation.completion_ids, pad_token_id(tokenizer), device)
    mask = batch.mask

    old_values, gap = None, {}
    engine_exact = generation.exact_logprobs and uses_rollout_logprobs(s)
    with torch.no_grad(), session.autocast():
        if value_head is not None or not engine_exact or cfg.rollout.old_logprobs == "trainer":
            old_logprobs, old_values, _ = score_tokens(policy, batch, s.temperature, value_head,
                                                       share_prefixes=t.share_prefixes)
            if engine_exact and rollout is not generate:
                gap = logprob_gap(padded(generation.logprobs, mask.size(1), device), old_logprobs, mask)
        else:
            old_logprobs = padded(generation.logprobs, mask.size(1), device)
        ref_logprobs = reference.logprobs(policy, batch, s.temperature) if reference is not None else None
    rollout_kl = (old_logprobs - ref_logprobs) * mask if ref_logprobs is not None else None
    advantages, returns = adv.compute_advantages(r, scores, mask, rollout_kl, kl_coef, old_values)

    record = rollout_metrics(cfg, scores, mask, generation, rollout_kl, kl_coef)
    if returns is not None:
        record["train/explained_variance"] = explained_variance(old_values, returns, mask)
    record.update({"train/tokens": float(mask.sum()), "perf/rollout_s": rollout_s, **gap})
    return Experience(batch, old_logprobs, ref_logprobs, kl_coef, advantages, old_values, returns), record


def logprob_gap(engine: torch.Tensor, trainer: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Mean and largest |log π_engine − log π_trainer| over the (B, T) completion tokens in ``mask``."""
    diff = (engine - trainer).abs()[mask.bool()]
    if diff.numel() == 0:
        return {}
    return {"rollout/logprob_gap": float(diff.mean()), "rollout/logprob_gap_max": float(diff.max())}


def pad_token_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def rollout_metrics(cfg: RLConfig, scores: torch.Tensor, mask: torch.Tensor, generation: Generation,
                    rollout_kl: torch.Tensor | None, kl_coef: float) -> dict[str, float]:
    """What the rollout says: reward, KL to the reference, lengths, share of groups with nothing to learn."""
    lengths = mask.sum(1)
    record = {
        "train/reward": float(scores.mean()),
        "train/reward_std": float(scores.std()) if scores.numel() > 1 else 0.0,
        "train/length": float(lengths.mean()),
        "train/finished": sum(generation.finished) / len(generation.finished),
        "train/kl_coef": kl_coef,
    }
    if rollout_kl is not None:
        record["train/kl"] = float(rollout_kl.sum() / mask.sum().clamp_min(1))  # nats per token, k1
        record["train/kl_seq"] = float(rollout_kl.sum(1).mean())
    if cfg.rl.group_size > 1:
        record["train/zero_std_groups"] = adv.fraction_zero_std_groups(scores, cfg.rl.group_size)
    return record


# ---------------------------------------------------------------------------------------------
# Update: epochs × minibatches over the experience
# ---------------------------------------------------------------------------------------------
@dataclass
class SupervisedTerm:
    """The term α·L_CE of the update's loss: supervised examples (``rl.ptx_data``), a batch of them per update."""

    examples: list[Example]
    batches: ShuffledBatches  # the order they are drawn in: a function of the draw, so a resumed run draws the same
    pad_id: int

    def loss(self, model: Any, draw: int, device: torch.device) -> torch.Tensor:
        """Cross-entropy on the completion tokens of the ``draw``-th batch."""
        batch = to_device(collate([self.examples[i] for i in self.batches.indices(draw)], self.pad_id), device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return completion_nll(logits, batch["labels"], max(1, count_loss_tokens(batch["labels"])))[0]


def update_policy(cfg: RLConfig, session: TrainingSession, value_head: torch.nn.Module | None, experience: Experience,
                  step: int, ptx: SupervisedTerm | None) -> dict[str, float]:
    """``rl.epochs`` passes over ``experience`` in ``rl.minibatches`` minibatches, one optimizer
    update each; the last one advances the schedule and the step count. Returns the updates'
    numbers averaged over them (lr and grad norm: the last update's)."""
    r, t, s = cfg.rl, cfg.train, cfg.sampling
    model, device = session.model, session.device
    updates = r.epochs * r.minibatches
    stats: dict[str, list[float]] = {}
    model.train()
    for u in range(updates):
        if u % r.minibatches == 0:
            order = torch.randperm(len(experience.mask), generator=torch.Generator().manual_seed(t.seed + step * 7919 + u))
        mb = experience.rows(order.chunk(r.minibatches)[u % r.minibatches].to(device))
        with session.autocast():
            logprobs, values, entropy = score_tokens(model, mb.batch, s.temperature, value_head, with_entropy=u == 0,
                                                    share_prefixes=t.share_prefixes)
            loss, mb_stats = policy_objective(cfg, mb, logprobs, values)
            if ptx is not None:
                ptx_loss = ptx.loss(model, step * updates + u, device)
                loss = loss + r.ptx_coef * ptx_loss
                mb_stats["ptx_loss"] = float(ptx_loss.detach())
        if entropy is not None:
            mb_stats["entropy"] = float(entropy[mb.mask.bool()].mean())
        session.backward(loss)
        update = session.optimizer_step(advance=u == updates - 1)
        for k, v in {**mb_stats, **update}.items():
            stats.setdefault(k, []).append(v)
    return {(k if k.startswith("train/") else f"train/{k}"): (v[-1] if k.startswith("train/") else sum(v) / len(v))
            for k, v in stats.items()}


def policy_objective(cfg: RLConfig, mb: Experience, logprobs: torch.Tensor,
                     values: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
    """The RL part of one update's loss on minibatch ``mb``, given this forward's log-probs (and
    values) of its tokens: clipped policy loss, PPO's value loss, and a KL loss term when the KL is
    not in the reward."""
    r = cfg.rl
    loss, stats = clipped_policy_loss(logprobs, mb.old_logprobs, mb.advantages, mb.mask, r.clip_eps, r.clip_eps_high,
                                      r.loss_aggregation, cfg.sampling.max_new_tokens)
    out = {"policy_loss": float(loss.detach()), **stats}
    if values is not None:
        value_loss, value_stats = clipped_value_loss(values, mb.old_values, mb.returns, mb.mask, r.value_clip)
        loss = loss + r.vf_coef * value_loss
        out.update({"value_loss": float(value_loss.detach()), **value_stats})
    if mb.ref_logprobs is not None and not adv.kl_in_reward(r) and mb.kl_coef > 0:
        kl_loss = aggregate_token_loss(kl_estimate(logprobs, mb.ref_logprobs, r.kl_estimator), mb.mask, r.loss_aggregation,
                                       cfg.sampling.max_new_tokens)
        loss = loss + mb.kl_coef * kl_loss
        out["kl_loss"] = float(kl_loss.detach())
    return loss, out


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
def fit_policy(cfg: RLConfig, model: Any, tokenizer: Any, prompts: PromptSet, reward: Any, reference: Reference | None,
               eval_prompts: PromptSet | None = None, ptx: list[Example] | None = None, engine: Any = None) -> Run:
    """Optimise ``model`` against ``reward`` on ``prompts``; see the module docstring for one step.
    ``engine``: a checked :class:`~alignloop.rollout.remote.ServerEngine` for ``rollout.engine:
    openai`` (rollouts on a server, the weights published to it before each); None: the local engine."""
    estimator = adv.ESTIMATORS[cfg.rl.algo]
    title = estimator.title
    cfg, run = open_stage_run(cfg, len(prompts), title)  # an epoch: every prompt once
    if run.is_complete():
        return run
    r, t, s = cfg.rl, cfg.train, cfg.sampling
    value_head = None
    if estimator.uses_critic:
        hidden = model.config.get_text_config().hidden_size
        value_head = torch.nn.Linear(hidden, 1)
        torch.nn.init.zeros_(value_head.weight)  # V = 0 at the start: GAE begins as plain returns
        torch.nn.init.zeros_(value_head.bias)
    controller = adv.AdaptiveKLController(r.kl_coef or 0.01, r.kl_target, r.kl_horizon) if r.kl_target \
        else adv.FixedKLController(r.kl_coef)
    # The starting policy's held-out completions: before the session, which may load a checkpoint into the model.
    baseline = eval_baseline(run, model.to(inference_device()), tokenizer, eval_prompts, reward, s) if eval_prompts else None
    # Adam moves each weight by about lr a step whatever the loss scale, so a zero-initialised head
    # at the policy's lr would take hundreds of steps to predict returns; GAE is blind until it does.
    value_lr = r.value_lr if r.value_lr is not None else VALUE_LR_RATIO * t.lr
    with TrainingSession(cfg, model, run, title, extra_modules=[value_head] if value_head is not None else None,
                         extra_lr=value_lr, generates=True) as session:
        accelerator = session.accelerator
        if reference is not None and reference.model is not None:
            session.precision.cast_frozen(reference.model.to(session.device))
        if "kl_controller" in session.state:
            controller.load_state_dict(session.state["kl_controller"])
        prompt_batches = ShuffledBatches(len(prompts), t.batch_size, t.seed, accelerator.process_index, accelerator.num_processes)
        supervised = SupervisedTerm(ptx, ShuffledBatches(len(ptx), r.ptx_batch_size, t.seed + 1), pad_token_id(tokenizer)) \
            if ptx else None
        rollout_engine = ServerRollouts(cfg, session, tokenizer, engine) if engine is not None else generate
        log.info("%s: %d prompts × %d samples per step, %d steps, reward %s, β=%g%s, run folder %s", title, t.batch_size,
                 r.group_size, t.max_steps, r.reward, controller.value, " (adaptive)" if r.kl_target else "", run.dir)
        while session.running:
            started = time.perf_counter()
            step = session.step
            # 1. Make experience: roll out the step's prompts, score, KL and advantages.
            batch_prompts, fields = prompts.take(prompt_batches.indices(step), r.group_size)
            policy = session.generation_model()
            experience, rollout = make_experience(cfg, session, policy, value_head, tokenizer, reward, reference,
                                                  batch_prompts, fields, step, controller.value, rollout_engine)

            # 2. Update: epochs × minibatches over the experience; the last update ends the step.
            train_started = time.perf_counter()
            # The whole step's numbers on every process, not each one's share (the KL controller reads them).
            record = session.mean_over_processes({**update_policy(cfg, session, value_head, experience, step, supervised),
                                                  **rollout}, summed=("train/tokens",))
            train_s = time.perf_counter() - train_started

            # 3. Diagnostics, KL control, evaluation, checkpoint.
            tokens = record["train/tokens"]
            record.update({"perf/train_s": train_s,
                           "perf/rollout_tokens_per_s": tokens / max(rollout["perf/rollout_s"], 1e-9),
                           "perf/train_tokens_per_s": tokens * r.epochs / max(train_s, 1e-9)})
            kl_now = record.get("train/kl")
            if kl_now is not None:
                controller.update(kl_now, 1)
            session.state["kl_controller"] = controller.state_dict()
            evaluate = (lambda: evaluate_policy(session.generation_model(), tokenizer, eval_prompts, reward, s, baseline)) \
                if baseline else None
            session.end_step(record, started, evaluate)
            if r.kl_stop is not None and kl_now is not None and kl_now > r.kl_stop:
                checkpoint = session.checkpoint()
                raise TrainingDiverged(f"{title}: KL to the reference is {kl_now:.3g} nats per token at step {session.step}, past "
                                       f"rl.kl_stop={r.kl_stop:g}; checkpoint saved in {checkpoint}. Lower train.lr or raise rl.kl_coef")
            if r.kl_stop is not None and kl_now is not None and kl_now > r.kl_stop / 2:
                log.warning("%s: KL to the reference %.3g per token is past half of rl.kl_stop=%g", title, kl_now, r.kl_stop)
        session.save_final(tokenizer)
        if value_head is not None and accelerator.is_main_process:
            torch.save(value_head.state_dict(), run.final_dir / VALUE_HEAD_FILE)
    if accelerator.is_main_process:
        from alignloop.report.training import write_training_report

        write_training_report(run, title, curves=RL_CURVES, ylabel="reward / KL")
    log.info("%s done: model in %s, report in %s", title, run.final_dir, run.dir / "report.md")
    return run


# ---------------------------------------------------------------------------------------------
# Rollouts on an OpenAI-compatible server: the policy's weights published before each rollout
# ---------------------------------------------------------------------------------------------
ROLLOUT_WEIGHTS = "rollout-weights"
PUBLISHED_FILE = "rollout.json"


class ServerRollouts:
    """The engine of ``rollout.engine: openai``, called as :func:`generate` is. Before the first
    rollout, and before each one after an update, the policy's weights are written to
    ``RUN/rollout-weights/step-N/`` (:func:`write_policy_weights`; the last ``rollout.keep_weights``
    kept) and published by the main process (:meth:`ServerEngine.publish`, per
    ``rollout.weight_sync``), which records in the folder's ``rollout.json`` what the server must
    answer with; the other processes wait, read it, and check every answer against it as the main
    one does. Under several nodes the run folder must be shared storage."""

    def __init__(self, cfg: RLConfig, session: TrainingSession, tokenizer: Any, engine: Any) -> None:
        self.cfg, self.session, self.tokenizer, self.engine = cfg, session, tokenizer, engine
        self.published_step: int | None = None
        if cfg.rollout.weight_sync == "none":
            log.warning("rollout.weight_sync=none: %s keeps its weights, so every rollout after the first update is "
                        "off-policy", cfg.rollout.url)

    def __call__(self, model: Any, tokenizer: Any, prompts: Sequence[Any], sampling: SamplingConfig,
                 sample_ids: Sequence[int] | None = None) -> Generation:
        if self.published_step != self.session.step and self.cfg.rollout.weight_sync != "none":
            self.publish()
        return self.engine.generate(model, tokenizer, prompts, sampling, sample_ids=sample_ids)

    def publish(self) -> None:
        session, step = self.session, self.session.step
        accelerator = session.accelerator
        root = session.run.dir / ROLLOUT_WEIGHTS
        folder = root / f"step-{step}"
        write_policy_weights(session, self.tokenizer, folder)  # every process: a sharded policy is gathered
        if accelerator.is_main_process:
            published = self.engine.publish(folder, f"rollout-{session.run.dir.name}")
            (folder / PUBLISHED_FILE).write_text(json.dumps(published))
            kept = sorted((p for p in root.glob("step-*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))
            for old in kept[: -self.cfg.rollout.keep_weights]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        self.engine.expect(json.loads((folder / PUBLISHED_FILE).read_text()))
        self.published_step = step


@torch.no_grad()
def write_policy_weights(session: TrainingSession, tokenizer: Any, folder: Path) -> None:
    """The policy's weights now as an HF folder a server loads: fp32, the master copies under
    ``train.precision=bf16`` (not their bf16 rounding), a LoRA adapter merged into a copy of its
    base. Nothing of the training state changes: the weights are read, not cast or merged in
    place. Every process calls it (a sharded policy is gathered); the main process writes."""
    model, precision, accelerator = session.model, session.precision, session.accelerator
    weights = full_weights(model, everywhere=False) if is_sharded(model) else None
    if not accelerator.is_main_process:
        return
    policy = accelerator.unwrap_model(model)
    if weights is None:
        weights = dict(policy.state_dict())
        if precision.masters:
            names = {id(p): name for name, p in policy.named_parameters()}
            for master, param in zip(precision.params, precision.model_params):
                weights[names[id(param)]] = master
    weights = {k: (v.float() if v.is_floating_point() else v).detach().cpu() for k, v in weights.items()}
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(policy, "merge_and_unload"):  # peft: merge into a copy, so the trained adapter stays apart
        from alignloop.models.load import save_model

        merged = copy.deepcopy(policy).float().cpu()
        merged.load_state_dict(weights)
        save_model(merged, tokenizer, folder)
        return
    policy.save_pretrained(str(folder), state_dict=weights)
    tokenizer.save_pretrained(str(folder))


RL_CURVES = (("train/reward", "reward"), ("eval/reward", "held-out reward"), ("train/kl", "KL per token"))


# ---------------------------------------------------------------------------------------------
# Periodic evaluation: reward and win rate against the starting policy on held-out prompts
# ---------------------------------------------------------------------------------------------
def eval_sampling(s: SamplingConfig) -> SamplingConfig:
    """Held-out sampling: the rollout's settings with a fixed seed of its own, so every evaluation
    and the starting policy's baseline draw the same random numbers per prompt."""
    return dataclasses.replace(s, seed=s.seed + 104729)


def heldout_rewards(policy: Any, tokenizer: Any, prompts: PromptSet, reward: Any, s: SamplingConfig) -> tuple[Generation, list[float]]:
    """The policy's completions of the held-out prompts (:func:`eval_sampling`) and their rewards."""
    texts, fields = prompts.take(range(len(prompts)), 1)
    generation = generate(policy, tokenizer, texts, eval_sampling(s))
    return generation, check_rewards(reward(texts, generation.completions, **fields), len(texts), "rl.reward")


def eval_baseline(run: Run, policy: Any, tokenizer: Any, prompts: PromptSet, reward: Any, s: SamplingConfig) -> dict:
    """The starting policy's held-out completions and rewards, computed once and kept in the run
    folder (a resumed run's policy is no longer the starting one)."""
    path = run.dir / EVAL_BASELINE_FILE
    if path.is_file():
        return json.loads(path.read_text())
    generation, rewards = heldout_rewards(policy, tokenizer, prompts, reward, s)
    baseline = {"completions": generation.completions, "rewards": rewards}
    path.write_text(json.dumps(baseline))
    return baseline


def evaluate_policy(policy: Any, tokenizer: Any, prompts: PromptSet, reward: Any, s: SamplingConfig, baseline: dict) -> dict:
    """Held-out reward and win rate (Wilson 95%, ties apart) of the current policy vs the starting one."""
    from alignloop.report.stats import judge_outcomes, win_rate

    generation, rewards = heldout_rewards(policy, tokenizer, prompts, reward, s)
    win = win_rate(judge_outcomes(rewards, baseline["rewards"], 0.0))
    return {
        "eval/reward": sum(rewards) / len(rewards),
        "eval/start_reward": sum(baseline["rewards"]) / len(baseline["rewards"]),
        "eval/win_rate": win["win_rate"],
        "eval/win_rate_lower": win["win_rate_lower"],
        "eval/win_rate_upper": win["win_rate_upper"],
        "eval/length": sum(len(ids) for ids in generation.completion_ids) / len(prompts),
    }
