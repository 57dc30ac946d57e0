"""Typed configs for every stage: dataclasses with a help string per field, loaded from YAML and
overridden from the command line as ``--section.key=value``.

A stage config (``SFTConfig``) is a dataclass of sections (``run``, ``model``, ``data``,
``train``); each section is a dataclass of plain values. Precedence: defaults < YAML < CLI.
Unknown keys fail with the closest valid name; values are converted to the field's type or fail
naming the key. The resolved config (every default written out) is saved in the run folder as
``config.yaml`` and loads back to an equal object.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from alignloop.errors import ConfigError


def option(default: Any, help: str) -> Any:
    """A config field: its default and the one line shown by ``--help``."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def section(cls: type, help: str, **overrides: Any) -> Any:
    """A nested section, optionally with stage-specific defaults (``section(DataConfig, path=...)``)."""
    return field(default_factory=lambda: cls(**overrides), metadata={"help": help})


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------
@dataclass
class RunConfig:
    name: str = option("run", "run folder name: outputs go to <output_dir>/<name>/")
    output_dir: str = option("runs", "parent folder of run folders")
    report_to: list[str] = option([], "extra trackers through accelerate, e.g. [tensorboard] or [wandb] (must be installed)")

    def __post_init__(self) -> None:
        for name in self.report_to:
            if name not in TRACKERS:
                raise ConfigError(f"run.report_to: unknown tracker {name!r}; use {', '.join(TRACKERS)}")


def secret(value: Optional[str], key: str) -> Optional[str]:
    """A key a config gives as itself or as ``env:NAME``, read from ``$NAME`` when it is used so it
    stays out of config files, saved ``config.yaml`` and ``ps`` (``rollout.api_key``,
    ``upstream_key``); None when unset or the variable is empty."""
    if value is None or not value.startswith("env:"):
        return value
    name = value[4:].strip()
    if not name:
        raise ConfigError(f"{key}: env: needs a variable name (env:NAME)")
    return os.environ.get(name) or None


TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml"}  # name → module


def check_trackers(report_to: list[str]) -> None:
    """Each tracker of ``run.report_to`` is installed. :meth:`Stage.run` calls it before the stage
    reads any data (a missing tracker must not fail after minutes of loading); not the config
    itself, which stays a value that loads anywhere (a run's config.yaml on another machine)."""
    import importlib.util

    for name in report_to:
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ConfigError(f"run.report_to: {name} is not installed (pip install {TRACKERS[name]}), or leave it out of run.report_to")


@dataclass
class LoraConfig:
    r: int = option(0, "LoRA rank; 0 trains all weights (no LoRA)")
    alpha: int = option(16, "LoRA scaling numerator (effective scale alpha/r)")
    dropout: float = option(0.0, "dropout on the LoRA branch")
    target_modules: list[str] = option(["all-linear"], "module names to adapt, or [all-linear] for every linear layer but the output head")

    def __post_init__(self) -> None:
        if self.r < 0:
            raise ConfigError(f"model.lora.r must be ≥ 0 (got {self.r}); 0 disables LoRA")


@dataclass
class ModelConfig:
    name_or_path: str = option("tiny-5m", "a Hugging Face model id, a local HF folder, or a built-in tiny config (tiny-1m, tiny-5m, tiny-20m)")
    tokenizer: Optional[str] = option(None, "tokenizer id or folder; default: the model's own (built-ins: a BPE trained on the chitchat corpus)")
    dtype: Literal["float32", "bfloat16"] = option("float32", "dtype the weights are loaded and kept in")
    attn_implementation: str = option("sdpa", "transformers attention kernel: sdpa, eager, flash_attention_2")
    cpu_linear: Literal["auto", "onednn", "torch"] = option("auto", "fp32 linear layers on the CPU: oneDNN where it is faster than torch's default GEMM on this CPU, timed once per process and kept by checkpoints (auto), always (onednn) or never (torch)")
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    trust_remote_code: bool = option(False, "allow model code from the Hub (only for models you trust)")
    lora: LoraConfig = section(LoraConfig, "LoRA adapters through peft")


@dataclass
class DataConfig:
    path: str = option("builtin:chitchat-chat", "training data: .jsonl/.json/.csv/.parquet/.txt file, a `datasets` folder saved to disk, or builtin:NAME")
    eval_path: Optional[str] = option(None, "held-out data; default: a seeded eval_fraction of `path`")
    eval_fraction: float = option(0.05, "share of `path` held out for evaluation when eval_path is not set")
    max_length: Optional[int] = option(None, "tokens per training sequence (pretraining block size); default: the model's context length")
    overlong: Literal["truncate", "drop", "error"] = option("truncate", "what to do with a record longer than max_length")
    max_samples: Optional[int] = option(None, "use only the first N records (quick trials)")

    def __post_init__(self) -> None:
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction must be in [0, 1) (got {self.eval_fraction})")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"data.max_length must be ≥ 2 (got {self.max_length})")


@dataclass
class TrainConfig:
    seed: int = option(0, "seed for initialisation, data order and sampling")
    max_steps: Optional[int] = option(200, "optimizer steps to run; wins over `epochs` when both are set (TRL's rule); null: `epochs` decide")
    epochs: Optional[float] = option(None, "passes over the training data, used when max_steps is null (setting only epochs, in YAML or on the command line, replaces the stage's default max_steps)")
    batch_size: int = option(8, "sequences per micro-batch (per process)")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    lr: float = option(3e-4, "peak learning rate (AdamW)")
    lr_schedule: Literal["cosine", "linear", "constant", "constant_with_warmup"] = option("cosine", "learning-rate schedule after warmup (transformers' schedulers)")
    warmup_steps: Optional[int] = option(None, "linear warm-up steps; wins over warmup_ratio when set")
    warmup_ratio: float = option(0.05, "linear warm-up over this share of the run's steps, rounded up (transformers' warmup_ratio), when warmup_steps is null")
    weight_decay: float = option(0.0, "AdamW weight decay (not applied to biases and norms)")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    max_grad_norm: float = option(1.0, "clip the global gradient norm to this; 0 disables clipping")
    strategy: Literal["ddp", "fsdp", "zero2", "zero3"] = option("ddp", "how the processes of a torchrun launch share the work: ddp, each holds the whole model, gradients and optimiser state; fsdp, each holds 1/N of them (torch FSDP2) and gathers a decoder block's weights only while it computes; zero2, DeepSpeed ZeRO-2: whole weights, 1/N of the gradients and optimiser state; zero3, DeepSpeed ZeRO-3: 1/N of all three (zero2/zero3 need `pip install 'alignloop[deepspeed]'`). One process ignores it")
    precision: Literal["fp32", "bf16", "bf16-autocast"] = option("fp32", "fp32; bf16 (bf16 weights and activations, fp32 master weights and optimiser); or bf16-autocast (fp32 weights, autocast)")
    eval_every: int = option(50, "evaluate on held-out data every N steps (0: only at the end)")
    eval_batches: Optional[int] = option(16, "cap on held-out batches per evaluation (null: all)")
    log_every: int = option(1, "write a metrics.jsonl line every N steps")
    save_every: int = option(100, "checkpoint every N steps (0: only at the end and on Ctrl-C)")
    keep_checkpoints: int = option(2, "how many recent checkpoints to keep")
    resume: str = option("auto", "auto: continue from the newest checkpoint in the run folder; never: start over; or a checkpoint path")
    threads: Optional[int] = option(None, "torch CPU threads (null: torch's default)")
    time_budget_s: Optional[float] = option(None, "stop after the step that passes this many seconds of training (final model still written); null: no limit")
    share_prefixes: bool = option(True, "run a prefix that several rows of a batch share (a pair's prompt, an RL group's prompt) once, through a KV cache: same results, fewer positions computed (decoders; DPO, KTO, RL, reward models)")

    def __post_init__(self) -> None:
        if self.max_steps is None and self.epochs is None:
            raise ConfigError("train.max_steps and train.epochs are both null: set one (max_steps wins when both are set)")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps must be ≥ 1 (got {self.max_steps}), or null to train for train.epochs")
        for key in ("batch_size", "grad_accum", "log_every", "keep_checkpoints"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be ≥ 1 (got {getattr(self, key)})")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0 (got {self.lr})")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"train.epochs must be > 0 (got {self.epochs}); null uses max_steps")
        if (self.warmup_steps is not None and self.warmup_steps < 0) or self.eval_every < 0 or self.save_every < 0:
            raise ConfigError("train.warmup_steps, train.eval_every and train.save_every must be ≥ 0")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"train.warmup_ratio must be in [0, 1) (got {self.warmup_ratio})")


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------
@dataclass
class PretrainConfig:
    """Continued pretraining: next-token loss on every token of raw text packed into blocks."""

    run: RunConfig = section(RunConfig, "run folder and trackers", name="pretrain")
    model: ModelConfig = section(ModelConfig, "the model to train")
    data: DataConfig = section(DataConfig, "raw text records (field `text`) or .txt files", path="builtin:chitchat-text", max_length=256)
    train: TrainConfig = section(TrainConfig, "optimisation and checkpointing")


@dataclass
class SFTConfig:
    """Supervised fine-tuning: loss on completion tokens only (prompt, padding and template masked)."""

    run: RunConfig = section(RunConfig, "run folder and trackers", name="sft")
    model: ModelConfig = section(ModelConfig, "the model to train")
    data: DataConfig = section(DataConfig, "prompt→completion or chat (`messages`) records", max_length=256)
    train: TrainConfig = section(TrainConfig, "optimisation and checkpointing", lr=1e-4)


@dataclass
class RewardModelingConfig:
    """What the reward model learns from, by record kind (preference pairs, ratings or thumbs)."""

    margin_field: Optional[str] = option("margin", "preference field holding a required margin m in −log σ(r_c − r_r − m); rows without it use 0")
    tie_field: Optional[str] = option("tie", "preference field marking a tie (true): trained towards r_c = r_r instead of skipped")
    center_coef: float = option(0.0, "preferences: add c·mean((r_c + r_r)²) so rewards stay centred on 0 (TRL's center_rewards_coefficient; 0.01 is usual)")
    rating_scale: list[float] = option([1.0, 5.0], "[lowest, highest] rating; a rating outside it is an error naming the row")
    rating_head: Literal["regression", "ordinal"] = option("regression", "ratings: regression (MSE to the rating scaled to [-1, 1]) or ordinal (cumulative-logit thresholds)")
    normalize_per_user: bool = option(False, "ratings: z-score each user's ratings (field `user`) before training, so harsh and generous raters count alike")
    skip_invalid: bool = option(False, "count and skip invalid rows (equal chosen/rejected, rating off the scale) instead of stopping at the first")
    eval_batch_size: int = option(32, "pairs or rows per batch when scoring held-out data")
    batching: Literal["length", "prompt", "random"] = option("length", "which rows share a batch: length (similar lengths: less padding); prompt (pairs of one prompt packed to share responses, each distinct response scored once a step: several times faster where responses recur in many pairs, fewer distinct responses a step); random")
    encoder_text_pairs: bool = option(True, "encoders read [CLS] prompt [SEP] response [SEP] as a text pair; false: one segment [CLS] prompt response [SEP]")
    disable_dropout: bool = option(True, "switch the backbone's dropout off, so both responses of a pair are scored by the same network")
    length_groups: int = option(4, "forwards per batch, each over rows of similar length, padded only to their own longest (1: one padded batch)")

    def __post_init__(self) -> None:
        if len(self.rating_scale) != 2 or self.rating_scale[0] >= self.rating_scale[1]:
            raise ConfigError(f"reward.rating_scale must be [lowest, highest] with lowest < highest (got {self.rating_scale})")
        if self.eval_batch_size < 1 or self.length_groups < 1:
            raise ConfigError("reward.eval_batch_size and reward.length_groups must be ≥ 1")
        if not self.center_coef >= 0:
            raise ConfigError(f"reward.center_coef must be ≥ 0 (got {self.center_coef})")


@dataclass
class RewardConfig:
    """Reward model: Bradley–Terry on preference pairs, regression/ordinal on ratings, BCE on thumbs."""

    run: RunConfig = section(RunConfig, "run folder and trackers", name="reward")
    model: ModelConfig = section(ModelConfig, "the backbone: an encoder (default MiniLM-L6, shipped on PyPI) or a decoder LM", name_or_path="minilm-l6")
    data: DataConfig = section(DataConfig, "preference (prompt/chosen/rejected), rating or thumbs (label) records", path="builtin:chitchat-preference", max_length=256, eval_fraction=0.1)
    reward: RewardModelingConfig = section(RewardModelingConfig, "how the reward model learns")
    train: TrainConfig = section(TrainConfig, "optimisation and checkpointing", lr=5e-5, batch_size=16, max_steps=None, epochs=1.0, warmup_ratio=0.0, lr_schedule="linear", eval_every=0, save_every=200)


@dataclass
class ClassifierTrainingConfig:
    """What a sequence or token classifier learns, and from what (``alignloop classify``)."""

    task: Literal["auto", "classification", "ner"] = option("auto", "classification (one label per text: `text, label` records) or ner (a BIO tag per word: `tokens, tags` records, conll:FILE); auto: from the data's record kind")
    objective: Literal["supervised", "bandit"] = option("supervised", "supervised: cross-entropy on the given labels; bandit: learn from correct/wrong verdicts on shown predictions (`bandit` records)")
    class_weights: Literal["none", "balanced"] = option("none", "balanced: weight each class's loss by N / (K × count), so rare classes (and rare tags) count as much as common ones (scikit-learn's rule)")
    label_all_subtokens: bool = option(False, "ner: every sub-token of a word carries its tag (continuations as I-); false: only the first, as evaluation reads it")
    bandit_loss: Literal["banditnet", "clipped_ips", "doubly_robust"] = option("banditnet", "objective=bandit: the estimator (alignloop.losses.BANDIT_LOSSES): banditnet = λ-translated IPS (Joachims et al. 2018); clipped_ips = IPS with weights capped at `clip`; doubly_robust = the logging model's probabilities as the reward model, plus a clipped IPS correction (classification only)")
    translation: float = option(0.5, "objective=bandit: BanditNet's λ, the baseline subtracted from each reward (0..1): a confirmed output is pushed up with weight 1−λ, a rejected one down with weight λ; 0 ignores every 'wrong'")
    clip: float = option(10.0, "objective=bandit: the largest importance weight π_θ/p kept by clipped_ips and doubly_robust (an explored output has p = ε/K, so weights reach K/ε)")
    label_weight: float = option(1.0, "objective=bandit: weight β of the cross-entropy on rows where the user named the right label")
    supervised_path: Optional[str] = option(None, "objective=bandit: the original labelled set (`text, label` or `tokens, tags`), trained on beside the feedback with weight `alpha` (the worked example's L_CE + α·R)")
    alpha: float = option(0.0, "objective=bandit: weight of the cross-entropy on `supervised_path` (0: not used)")

    def __post_init__(self) -> None:
        if not 0 <= self.translation <= 1:
            raise ConfigError(f"classify.translation must be in [0, 1] (got {self.translation}); it is a baseline on rewards in [0, 1]")
        if self.clip <= 0:
            raise ConfigError(f"classify.clip must be > 0 (got {self.clip}); it caps the importance weights")
        if self.label_weight < 0:
            raise ConfigError(f"classify.label_weight must be ≥ 0 (got {self.label_weight})")
        if self.alpha < 0:
            raise ConfigError(f"classify.alpha must be ≥ 0 (got {self.alpha})")
        if self.alpha > 0 and not self.supervised_path:
            raise ConfigError(f"classify.alpha={self.alpha} weighs the original labelled set: set classify.supervised_path too, or alpha=0")


@dataclass
class ClassifyConfig:
    """Sequence classifiers (sentiment, emotion, intent) and token classifiers (NER) on any encoder or decoder backbone."""

    run: RunConfig = section(RunConfig, "run folder and trackers", name="classify")
    model: ModelConfig = section(ModelConfig, "the backbone: an AutoModelForSequenceClassification / AutoModelForTokenClassification id or folder (default MiniLM-L6, shipped on PyPI); a new head is added for the data's labels", name_or_path="minilm-l6")
    data: DataConfig = section(DataConfig, "`text, label` records (.jsonl, .csv, .tsv, tweeteval:DIR/SPLIT) or `tokens, tags` records (.jsonl, conll:FILE); max_length = sub-tokens per example (longer ones are cut and counted)", path="", max_length=128, eval_fraction=0.1)
    classify: ClassifierTrainingConfig = section(ClassifierTrainingConfig, "task, objective, class weights")
    train: TrainConfig = section(TrainConfig, "optimisation and checkpointing; batch_size = examples per micro-batch", lr=5e-5, batch_size=32, max_steps=None, epochs=3.0, warmup_ratio=0.1, lr_schedule="linear", weight_decay=0.01, eval_every=50, save_every=100)


@dataclass
class SamplingConfig:
    """How completions are sampled (:func:`alignloop.rollout.generate.generate`)."""

    max_new_tokens: int = option(64, "most tokens generated per prompt (a stop token may end it sooner)")
    temperature: float = option(1.0, "softmax temperature; 0 = greedy (argmax)")
    top_p: float = option(1.0, "nucleus sampling: keep the most likely tokens whose mass reaches top_p; 1 = off")
    top_k: int = option(0, "keep only the k most likely tokens; 0 = off")
    seed: int = option(0, "sampling seed: prompt i draws the same random numbers in every model, so differences come from the models")
    stop_at_eos: bool = option(True, "end a completion at the model's stop tokens; false: always generate max_new_tokens (fixed work, for benchmarks)")
    batch_size: int = option(16, "prompts generated together (evaluate --task classification|ner: examples classified together)")

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ConfigError(f"sampling.max_new_tokens must be ≥ 0 (got {self.max_new_tokens})")
        if not self.temperature >= 0:
            raise ConfigError(f"sampling.temperature must be ≥ 0 (got {self.temperature}); 0 is greedy decoding")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"sampling.top_p must be in (0, 1] (got {self.top_p}); 1 turns nucleus sampling off")
        if self.top_k < 0:
            raise ConfigError(f"sampling.top_k must be ≥ 0 (got {self.top_k}); 0 turns top-k off")
        if self.batch_size < 1:
            raise ConfigError(f"sampling.batch_size must be ≥ 1 (got {self.batch_size})")


@dataclass
class RolloutConfig:
    """Where completions are generated: the trainer's own engine, or an OpenAI-compatible server
    (``vllm serve``, SGLang, TGI, ``transformers serve``, ``alignloop serve``) that the policy's
    weights are published to (:mod:`alignloop.rollout.remote`; docs/scale-out.md)."""

    engine: Literal["local", "openai"] = option("local", "local: the trainer's own engine (alignloop.rollout.generate); openai: POST /v1/completions to the server at `url`")
    url: Optional[str] = option(None, "engine=openai: the server's base URL, ending in /v1 (e.g. http://127.0.0.1:8000/v1)")
    api_key: Optional[str] = option("env:ALIGNLOOP_ROLLOUT_KEY", "engine=openai: the key sent as `Authorization: Bearer`, or env:NAME to read it from $NAME (keeps it out of config.yaml); an unset variable sends none. weight_sync=deploy needs an admin's key")
    model: Optional[str] = option(None, "engine=openai: the model id requests name; null: set by weight_sync (deploy: `rollout-<run.name>`; model_path: each published folder; none: the server's only model)")
    weight_sync: Literal["deploy", "model_path", "none"] = option("deploy", "how new weights reach the server, written as a full HF folder RUN/rollout-weights/step-N/ after each update: deploy = alignloop serve's POST /admin/deploy; model_path = the folder's path as each request's `model` (transformers serve loads by name); none = never (the server keeps its weights: rollouts go off-policy)")
    old_logprobs: Literal["auto", "trainer"] = option("auto", "π_old: auto = the engine's sampling log-probs where they are exact (the server returned token ids and log-probs, T > 0, no top-k/top-p), else a trainer forward; trainer = always a forward (and rollout/logprob_gap logs |engine − trainer| per token)")
    concurrency: int = option(16, "engine=openai: requests in flight at once (a prompt's group_size samples are one request with n when the server honours n)")
    timeout_s: float = option(600.0, "engine=openai: seconds a request may take, 429/503 retries included")
    keep_weights: int = option(2, "engine=openai: how many RUN/rollout-weights/step-N folders to keep")

    def __post_init__(self) -> None:
        if self.url is not None:
            self.url = self.url.rstrip("/")
            if not self.url.startswith(("http://", "https://")) or not self.url.endswith("/v1"):
                raise ConfigError(f"rollout.url: {self.url!r} should be the server's base URL, http(s)://HOST:PORT/v1")
        if self.engine == "openai" and not self.url:
            raise ConfigError("rollout.url: rollout.engine=openai needs the server's base URL (e.g. http://127.0.0.1:8000/v1)")
        if self.api_key is not None and self.api_key.startswith("env:") and not self.api_key[4:].strip():
            raise ConfigError("rollout.api_key: env: needs a variable name (env:NAME)")
        if self.concurrency < 1 or self.keep_weights < 1:
            raise ConfigError(f"rollout.concurrency and rollout.keep_weights must be ≥ 1 (got {self.concurrency}, {self.keep_weights})")
        if not self.timeout_s > 0:
            raise ConfigError(f"rollout.timeout_s must be > 0 (got {self.timeout_s})")


@dataclass
class JudgeConfig:
    kind: Literal["reward", "function", "llm"] = option("reward", "who decides each candidate-vs-baseline pair: the reward (higher wins), a pairwise Python function, or an LLM asked to pick A or B")
    function: Optional[str] = option(None, "kind=function: `module:fn` or `file.py:fn`, called fn(prompts, completions_a, completions_b, **fields) -> numbers (>0: a wins, <0: b wins, 0: tie)")
    model: Optional[str] = option(None, "kind=llm: a causal LM id or folder that judges")
    epsilon: float = option(0.0, "a pair is a tie when the judge's two scores differ by at most this")
    ci: Literal["wilson", "bootstrap"] = option("wilson", "confidence interval of the win rate: Wilson score (ties count half) or percentile bootstrap over prompts")


@dataclass
class EvaluateConfig:
    """Candidate vs baseline on held-out prompts: reward, win rate with a CI, KL, lengths, perplexity, and a gate.
    For classifiers (--task classification|ner): a classification report and confusion matrix per model."""

    run: RunConfig = section(RunConfig, "output folder (report.md, metrics.json, plots, samples.jsonl)", name="evaluate")
    task: Literal["generation", "classification", "ner"] = option("generation", "generation: language models on prompts; classification / ner: sequence / token classifiers on labelled data")
    candidate: str = option("", "the model to judge: an HF id or folder (e.g. runs/NAME/final)")
    baseline: Optional[str] = option(None, "the model to compare against (e.g. the deployed one); null: report the candidate alone")
    prompts: str = option("", "held-out prompts: records with `prompt` (text or chat messages) plus any fields the reward reads")
    max_prompts: Optional[int] = option(None, "use only the first N prompts (or labelled examples)")
    data: str = option("", "classification / ner: labelled examples: records with text, label (.jsonl, .csv, SST-2 .tsv, tsv:FILE) or tokens, tags (.jsonl, conll:FILE)")
    max_length: int = option(256, "classification / ner: tokens per example (longer ones are cut; NER words past it are predicted O and counted)")
    reward: Optional[str] = option(None, "reward source: a reward-model folder, `file.py:fn` / `module:fn`, or a YAML file with a reward spec (model/function/rule/sum)")
    perplexity_text: Optional[str] = option(None, "held-out text (.txt or text records) to measure each model's perplexity on")
    perplexity_block: int = option(256, "tokens per perplexity block")
    runs: list[str] = option([], "run folders whose training curves (metrics.jsonl) go into the report")
    gate: Optional[str] = option(None, "pass/fail thresholds, e.g. 'win_rate_lower>0.5,kl_per_token<0.1': exit 0 when all hold, 1 otherwise")
    sampling: SamplingConfig = section(SamplingConfig, "how completions are sampled (the same for both models)")
    rollout: RolloutConfig = section(RolloutConfig, "where the completions are generated: here, or on an OpenAI-compatible server (weight_sync publishes the candidate, then the baseline)")
    judge: JudgeConfig = section(JudgeConfig, "how a candidate/baseline pair is decided")


@dataclass
class PolicyOptimizationConfig:
    """The algorithm of an online RL stage; each command (ppo, grpo, rloo, reinforce) sets ``algo``."""

    algo: str = option("grpo", "set by the command; one of advantages.ESTIMATORS: ppo (critic + GAE), grpo (group-normalised), rloo (leave-one-out), reinforce (REINFORCE++: batch-normalised returns)")
    reward: str = option("", "reward source: a reward-model folder, `file.py:fn` / `module:fn`, or a YAML reward spec (model/function/rule/sum)")
    group_size: int = option(4, "completions sampled per prompt (grpo and rloo compare a prompt's completions with each other)")
    loss_aggregation: Literal["token", "sequence", "dr_grpo"] = option("token", "token: mean over every completion token of the batch (DAPO); sequence: mean of per-completion means (original GRPO); dr_grpo: sum / (completions × max_new_tokens)")
    scale_rewards: bool = option(True, "grpo: divide a group's advantages by its reward std (false: Dr. GRPO)")
    clip_eps: float = option(0.2, "PPO ratio clip ε (lower side)")
    clip_eps_high: Optional[float] = option(None, "upper clip ε (DAPO's clip-higher); null: clip_eps")
    epochs: int = option(1, "passes over each rollout (PPO epochs / GRPO num_iterations); 1 reuses the rollout log-probs as the old policy")
    minibatches: int = option(1, "optimizer updates per pass over a rollout")
    kl_coef: float = option(0.0, "β: weight of KL(π ‖ π_ref); 0 loads no reference model")
    kl_estimator: Literal["k1", "k2", "k3"] = option("k3", "per-token KL estimator for a KL loss term (k3: unbiased, ≥ 0, low variance); a KL in the reward always uses k1")
    kl_in_reward: Optional[bool] = option(None, "put −β·KL into the reward (per token) instead of the loss; null: the algorithm's default in advantages.ESTIMATORS (true for ppo, rloo, reinforce, false for grpo)")
    kl_target: Optional[float] = option(None, "adaptive KL (Ziegler et al.): steer β so the per-token KL approaches this; null: fixed β")
    kl_horizon: int = option(10000, "adaptive KL: steps over which β moves towards the target")
    kl_stop: Optional[float] = option(None, "stop (with a checkpoint) when the per-token KL to the reference exceeds this")
    gamma: float = option(1.0, "discount for returns and GAE")
    lam: float = option(1.0, "ppo: GAE λ; 1 = full returns minus the critic (a fresh critic cannot yet be trusted to bootstrap a 100-token completion: at 0.95 an end-of-sequence reward reaches the first tokens as 0.95^T ≈ 0)")
    vf_coef: float = option(0.01, "ppo: weight of the value loss in the trunk's gradient (the head's own pace is value_lr: Adam normalises the gradient scale away)")
    value_clip: float = option(0.2, "ppo: clip of the value update around the rollout's values")
    value_lr: Optional[float] = option(None, "ppo: learning rate of the value head; null: 10 × train.lr (a zero-initialised critic must learn faster than the policy moves)")
    ref_model: Optional[str] = option(None, "reference model (HF id or folder); default: the starting policy (frozen copy, or with LoRA the base with the adapter off)")
    ptx_data: Optional[str] = option(None, "supervised data (prompt→completion or chat) for the term L_CE with weight ptx_coef")
    ptx_coef: float = option(0.0, "α: weight of the supervised loss on ptx_data added to the RL loss")
    ptx_batch_size: int = option(4, "supervised sequences per step")
    eval_prompts: Optional[str] = option(None, "held-out prompts for periodic evaluation (reward and win rate against the starting policy)")
    eval_max_prompts: int = option(32, "held-out prompts used per evaluation")

    def __post_init__(self) -> None:
        if self.group_size < 1 or self.epochs < 1 or self.minibatches < 1 or self.ptx_batch_size < 1 or self.kl_horizon < 1:
            raise ConfigError("rl.group_size, rl.epochs, rl.minibatches, rl.ptx_batch_size and rl.kl_horizon must be ≥ 1")
        if self.kl_coef < 0 or self.ptx_coef < 0 or self.clip_eps <= 0:
            raise ConfigError("rl.kl_coef and rl.ptx_coef must be ≥ 0 and rl.clip_eps > 0")
        if self.value_lr is not None and self.value_lr <= 0:
            raise ConfigError(f"rl.value_lr must be > 0 (got {self.value_lr}); null: 10 × train.lr")
        if self.kl_target is not None and self.kl_target <= 0:
            raise ConfigError(f"rl.kl_target must be > 0 (got {self.kl_target}); null keeps β fixed")
        if self.ptx_coef > 0 and not self.ptx_data:
            raise ConfigError("rl.ptx_coef > 0 needs rl.ptx_data (the supervised set)")


@dataclass
class RLConfig:
    """Online RL: sample completions, score them, and optimise the policy with a KL penalty to a reference.
    One config for every algorithm; each command (ppo, grpo, rloo, reinforce) sets its own defaults in :data:`STAGES`."""

    run: RunConfig = section(RunConfig, "run folder and trackers", name="rl")
    model: ModelConfig = section(ModelConfig, "the policy to optimise (HF id or folder, e.g. runs/sft/final, or a built-in)")
    data: DataConfig = section(DataConfig, "prompts (field `prompt`, text or chat messages) plus any fields the reward reads; max_length caps prompt tokens (a longer prompt stops the run with overlong=error, else it is left out and counted)", path="", max_length=256)
    rl: PolicyOptimizationConfig = section(PolicyOptimizationConfig, "the algorithm, reward, KL penalty and supervised term")
    sampling: SamplingConfig = section(SamplingConfig, "rollout sampling", max_new_tokens=64, batch_size=64)
    rollout: RolloutConfig = section(RolloutConfig, "where rollouts are generated: the trainer's engine, or an OpenAI-compatible server the weights are published to")
    train: TrainConfig = section(TrainConfig, "optimisation and checkpointing; batch_size = prompts per step", lr=1e-5, batch_size=8, max_steps=200, warmup_ratio=0.0, lr_schedule="constant", eval_every=25, save_every=50)


@dataclass
class PreferenceOptimizationConfig:
    """How an offline preference stage turns pairs or thumbs into a better policy."""

    loss: str = option("sigmoid", "dpo: a row of losses.PAIR_LOSSES: sigmoid (DPO), ipo, robust (noise-robust DPO, needs label_smoothing), simpo (reference-free, length-normalised)")
    beta: float = option(0.1, "β: how far the policy may move from the reference (for ipo: τ; for simpo: the reward scale, e.g. 2.0)")
    label_smoothing: float = option(0.0, "ε: share of labels assumed flipped (sigmoid: conservative DPO; robust: unbiased correction, ε < 0.5)")
    simpo_gamma: float = option(0.5, "simpo: target reward margin γ")
    rpo_alpha: float = option(0.0, "weight of an NLL term on the chosen completion (RPO); 0: off")
    desirable_weight: float = option(1.0, "kto: λ_D, weight of thumbs-up examples")
    undesirable_weight: float = option(1.0, "kto: λ_U, weight of thumbs-down examples")
    ref_model: Optional[str] = option(None, "reference model (HF id or folder); default: the starting policy (with LoRA: the base with the adapter off)")
    ref_batch_size: int = option(16, "sequences per no-grad forward when the reference log-probs are computed (once, before training)")

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ConfigError(f"preference.beta must be > 0 (got {self.beta})")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"preference.label_smoothing must be in [0, 0.5) (got {self.label_smoothing})")
        if self.loss == "ipo" and self.label_smoothing > 0:
            raise ConfigError("preference.label_smoothing applies to sigmoid and robust, not ipo; set it to 0")
        if self.rpo_alpha < 0 or self.desirable_weight <= 0 or self.undesirable_weight <= 0 or self.ref_batch_size < 1:
            raise ConfigError("preference.rpo_alpha must be ≥ 0; desirable_weight, undesirable_weight and ref_batch_size > 0")


@dataclass
class DPOConfig:
    """DPO and variants on preference pairs (prompt, chosen, rejected); reference log-probs computed once."""

    run: RunConfig = section(RunConfig, "run folder and trackers", name="dpo")
    model: ModelConfig = section(ModelConfig, "the policy to train (start from an SFT model, e.g. runs/sft/final)")
    data: DataConfig = section(DataConfig, "preference records: prompt, chosen, rejected (text or chat)", path="builtin:chitchat-preference", max_length=256)
    preference: PreferenceOptimizationConfig = section(PreferenceOptimizationConfig, "loss, β, reference")
    train: TrainConfig = section(TrainConfig, "optimisation and checkpointing; batch_size = pairs per micro-batch", lr=5e-6, batch_size=8, max_steps=200, eval_every=50)


@dataclass
class KTOConfig:
    """KTO on unpaired thumbs (prompt, completion, label); reference log-probs computed once."""

    run: RunConfig = section(RunConfig, "run folder and trackers", name="kto")
    model: ModelConfig = section(ModelConfig, "the policy to train (start from an SFT model, e.g. runs/sft/final)")
    data: DataConfig = section(DataConfig, "thumbs records: prompt, completion, label (true = good)", path="builtin:chitchat-thumbs", max_length=256)
    preference: PreferenceOptimizationConfig = section(PreferenceOptimizationConfig, "β, desirable/undesirable weights, reference")
    train: TrainConfig = section(TrainConfig, "optimisation and checkpointing; batch_size = completions per micro-batch", lr=5e-6, batch_size=8, max_steps=200, eval_every=50)


@dataclass
class LoopRulesConfig:
    """How stored feedback becomes an iteration's training sets (:mod:`alignloop.feedback.datasets`)."""

    window: Literal["new", "since_promotion", "all"] = option("new", "new: only feedback given or changed since the previous iteration's export; since_promotion: since the export of the last iteration that promoted (feedback on a model the gate kept is still about the deployed one); all: every live vote")
    only_deployed: bool = option(False, "use only feedback on answers of the version deployed when the iteration starts")
    max_votes_per_user: Optional[int] = option(None, "keep each user's newest N votes per iteration (null: no cap)")
    min_agreement: float = option(0.5, "a pair several users judged is kept (in the majority's direction) only when the majority's share is at least this")
    sibling_thumbs: bool = option(True, "an up and a down on two answers to the same prompt also make a pair (up ≻ down)")
    both_bad_as_kto: bool = option(True, "pairwise both_bad → two thumbs-down records (else skipped)")
    dedupe: bool = option(True, "the same record once, its feedback ids merged")
    min_records: int = option(8, "a recipe stage whose dataset has fewer records is skipped this iteration")


@dataclass
class LoopEvaluateConfig:
    """The gate: the candidate against the deployed model on held-out prompts (``alignloop evaluate``)."""

    prompts: str = option("", "held-out prompts (records with `prompt`), never shown to users; default with a simulation: a held-out share of its prompts")
    max_prompts: Optional[int] = option(None, "use only the first N held-out prompts")
    reward: Optional[str] = option(None, "reward source the judge reads (model folder, `module:fn`, YAML spec); default with a simulation: the population's hidden utility")
    gate: Optional[str] = option(None, "promote only when every clause holds (metrics of `alignloop evaluate`); default: win_rate_lower>0.5,kl_per_token<0.5 for language models, macro_f1_delta_lower>0 for classifiers (NER: micro_f1_delta_lower>0)")
    data: str = option("", "classifier loops: held-out labelled records (text, label; tokens, tags; conll:FILE) the gate compares on; default with simulated labellers: a held-out share of their pool")
    sampling: SamplingConfig = section(SamplingConfig, "how both models complete the held-out prompts", max_new_tokens=32, batch_size=32)
    judge: JudgeConfig = section(JudgeConfig, "who decides each candidate-vs-deployed pair", epsilon=1e-6)


@dataclass
class SimulationConfig:
    """Simulated users (:mod:`alignloop.envs`): a population with a hidden preference chatting with
    the served model through the HTTP API before each iteration's export."""

    preference: Literal["none", "sentiment", "length", "topic", "mixture"] = option("none", "the population's hidden preference; none: no simulated users (real users give the feedback)")
    users: int = option(12, "simulated users")
    troll_share: float = option(0.0, "share of users who are trolls")
    troll_kind: Literal["random", "contrary"] = option("random", "trolls vote at random or against the preference")
    noise: float = option(0.05, "Bradley–Terry temperature of the users' votes (0: always the better answer)")
    turns_per_user: int = option(8, "chat turns (each with one piece of feedback) per user per iteration")
    prompts: str = option("builtin:chitchat-prompts", "what users ask: records with `prompt`")
    heldout_every: int = option(10, "every N-th prompt is held out for the gate and never asked by users")
    max_prompt_chars: int = option(200, "prompts longer than this are left out (people open a chat with a line, not an essay)")
    max_tokens: int = option(32, "max_tokens of the users' chat requests")
    temperature: float = option(1.0, "temperature of the users' chat requests")
    seed: int = option(0, "seed of the population and its choices")


@dataclass
class LabellerConfig:
    """Simulated labellers (:mod:`alignloop.envs.labellers`): people who know the true label of
    each text in a pool of unlabelled traffic, send it through the served classifier's
    ``/v1/classify`` with their own keys, and mark each prediction correct or wrong."""

    pool: str = option("chitchat-sentiment", "none (no simulated labellers: people give the feedback), or the traffic and its hidden truth: chitchat-sentiment (chitchat utterances, 3-class VADER sentiment), or a file of labelled (text, label) or tagged (tokens, tags) records")
    pool_size: Optional[int] = option(None, "use only the first N items of the pool (null: all)")
    users: int = option(8, "simulated labellers; the pool is dealt out among them")
    noise: float = option(0.05, "probability that a verdict (correct/wrong) is flipped: a slip, not a lie")
    name_label: float = option(0.0, "probability that a 'wrong' verdict also names the right label (NER: the entity's right type, or O for not an entity)")
    liar_share: float = option(0.0, "share of labellers who lie")
    liar_kind: Literal["random", "inverted"] = option("random", "random: verdicts are coin flips; inverted: the opposite of the truth")
    batch_size: int = option(16, "inputs per /v1/classify request")
    per_iteration: Optional[int] = option(None, "in a loop: pool items labelled per iteration (null: the pool shared evenly among the iterations)")
    seed: int = option(0, "seed of the population and its choices")

    def __post_init__(self) -> None:
        for name in ("noise", "name_label", "liar_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} is a probability: it must be in [0, 1] (got {getattr(self, name)})")
        if self.users < 1 or self.batch_size < 1:
            raise ConfigError(f"users and batch_size must be ≥ 1 (got {self.users}, {self.batch_size})")
        if self.pool_size is not None and self.pool_size < 1:
            raise ConfigError(f"pool_size must be ≥ 1 or null for the whole pool (got {self.pool_size})")


@dataclass
class LoopConfig:
    """The closed loop, N iterations: collect feedback → datasets → train the recipe → evaluate
    against the deployed model → promote if the gate passes → redeploy. Every step is recorded in
    the run folder, so an interrupted loop continues where it stopped."""

    run: RunConfig = section(RunConfig, "the loop's folder: iter-N/ per iteration, report.md, state", name="loop")
    server: Optional[str] = option(None, "URL of a running `alignloop serve` (needs admin_key); null: start one here on `db`, serving base_model")
    admin_key: Optional[str] = option(None, "an admin's API key for the running server (default: $ALIGNLOOP_ADMIN_KEY)")
    db: Optional[str] = option(None, "the server's feedback store URL (default: $ALIGNLOOP_DB or sqlite:///feedback.db)")
    model_name: str = option("policy", "the served model name the loop improves")
    base_model: str = option("", "when the loop starts the server: the first deployed model (an HF id or folder)")
    port: int = option(0, "when the loop starts the server: its port (0: any free one)")
    iterations: int = option(3, "loop iterations to run")
    recipe: list[str] = option(["dpo"], "training stages in order, each on its dataset: sft (corrections), dpo (pairs), kto (thumbs), reward (pairs) then ppo|grpo|rloo|reinforce (the users' prompts, that reward)")
    stage_options: list[str] = option([], "settings for a recipe stage as STAGE.KEY=VALUE, e.g. dpo.train.lr=1e-4 or dpo.preference.beta=0.2")
    rules: LoopRulesConfig = section(LoopRulesConfig, "feedback → datasets")
    evaluate: LoopEvaluateConfig = section(LoopEvaluateConfig, "the gate against the deployed model")
    simulation: SimulationConfig = section(SimulationConfig, "simulated users (none by default)")
    labellers: LabellerConfig = section(LabellerConfig, "simulated labellers for a classifier loop (recipe [classify]); none by default", pool="none")

    def __post_init__(self) -> None:
        known = recipe_stages()
        for stage in self.recipe:
            if stage not in known:
                raise ConfigError(f"recipe: unknown stage {stage!r}; choose from {', '.join(known)}")
        bandit = [stage for stage in self.recipe if STAGES[stage].loop_data == "bandit"]
        if bandit and len(bandit) != len(self.recipe):
            raise ConfigError(f"recipe: {', '.join(bandit)} trains a classifier; it cannot share a recipe with language-model stages")
        for i, stage in enumerate(self.recipe):
            if STAGES[stage].loop_data == "prompts" and not any(STAGES[s].makes == "reward" for s in self.recipe[:i]):
                raise ConfigError(f"recipe: {stage} needs a reward stage before it (e.g. recipe: [reward, {stage}])")
        if self.iterations < 1:
            raise ConfigError(f"iterations must be ≥ 1 (got {self.iterations})")
        for stage in known:
            self.options_for(stage)  # a malformed entry fails here, before any iteration

    @property
    def trains_classifier(self) -> bool:
        """A classifier loop: its recipe learns from verdicts on predictions (``bandit`` records)."""
        return any(STAGES[name].loop_data == "bandit" for name in self.recipe)

    def options_for(self, stage: str) -> dict[str, str]:
        """``stage_options`` of ``stage`` as config overrides {KEY: VALUE}."""
        known = recipe_stages()
        options = {}
        for option_text in self.stage_options:
            name, dot, rest = option_text.partition(".")
            key, equals, value = rest.partition("=")
            if not dot or not equals or not key.strip() or name not in known:
                raise ConfigError(f"stage_options: {option_text!r} should be STAGE.KEY=VALUE with STAGE one of {', '.join(known)}")
            if name == stage:
                options[key.strip()] = value.strip()
        return options


# ---------------------------------------------------------------------------------------------
# The table of stages
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    """One config-driven command of ``alignloop``: a row of :data:`STAGES`, the one list of stages
    that the CLI (commands, ``--help``), config loading, the closed loop and its recipes read."""

    config: type  # the typed config class
    runner: str  # "module:function", imported when the stage runs: `alignloop --help` must not import torch
    help: str  # its line in `alignloop --help`
    reads: tuple[str, ...]  # the record kinds (data/records.py) of its data.path
    defaults: dict[str, Any] = field(default_factory=dict)  # this command's defaults over its config class's
    about: str = ""  # the description of `alignloop NAME --help`; empty: the config class's docstring
    loop_data: Optional[str] = None  # what a loop recipe trains it on: an exported dataset (sft, pairs, kto) or
    #                                  "prompts" (the users' prompts, scored by the recipe's reward model); None: not in recipes
    makes: Optional[str] = None  # what it hands the recipe's next stages: "policy" or "reward"
    loop_options: dict[str, Any] = field(default_factory=dict)  # settings a loop recipe always gives it (before stage_options)
    progress: tuple[str, ...] = ()  # the metrics.jsonl keys its progress lines show, where a step has them

    def load(self, path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Any:
        """Its config: the class defaults, this command's defaults, the YAML at ``path``, then ``overrides``."""
        return load_config(self.config, path, overrides, defaults=self.defaults)

    def options(self) -> list[tuple[str, str, Any, str]]:
        """(dotted key, type name, default, help) of every setting, with this command's defaults."""
        return describe(self.config, self.defaults)

    def run(self, config: Any) -> Any:
        """Check what the config alone cannot (the machine has its trackers), then run the stage."""
        if hasattr(config, "run"):
            check_trackers(config.run.report_to)
        module, _, function = self.runner.partition(":")
        return getattr(importlib.import_module(module), function)(config)


RL_RUNNER = "alignloop.train.rl:run_rl"
# What each training stage's progress lines show: its own measure of progress, not only the loss.
LM_PROGRESS = ("train/loss", "eval/loss", "train/lr")
RL_PROGRESS = ("train/reward", "train/kl", "train/length", "eval/reward", "eval/win_rate", "train/lr")

STAGES: dict[str, Stage] = {
    "pretrain": Stage(PretrainConfig, "alignloop.train.pretrain:run_pretrain", reads=("text",),
                      progress=LM_PROGRESS, help="continued pretraining on raw text (loss on every token)"),
    "sft": Stage(SFTConfig, "alignloop.train.sft:run_sft", reads=("prompt_completion", "chat"), loop_data="sft", makes="policy",
                 progress=LM_PROGRESS,
                 help="supervised fine-tuning on prompt→completion or chat data (loss on completions only)"),
    "reward": Stage(RewardConfig, "alignloop.train.reward:run_reward", reads=("preference", "rating", "binary"),
                    loop_data="pairs", makes="reward", help="train a reward model from preference pairs, ratings or thumbs",
                    progress=("train/loss", "train/accuracy", "train/mae", "eval/loss", "eval/accuracy", "eval/mae", "train/lr")),
    "dpo": Stage(DPOConfig, "alignloop.train.preference:run_dpo", reads=("preference",), loop_data="pairs", makes="policy",
                 progress=("train/loss", "train/rewards/accuracy", "train/rewards/margin", "eval/loss", "eval/rewards/accuracy",
                           "eval/rewards/margin", "train/lr"),
                 help="offline preference optimisation on pairs: DPO, IPO, robust DPO, SimPO (reference log-probs computed once)"),
    "kto": Stage(KTOConfig, "alignloop.train.preference:run_kto", reads=("binary",), loop_data="kto", makes="policy",
                 # unpaired thumbs have no pair to be right about: the margin between the classes' implicit rewards instead
                 progress=("train/loss", "train/rewards/margin", "train/kl", "eval/loss", "eval/rewards/margin", "train/lr"),
                 help="KTO on unpaired thumbs up/down (reference log-probs computed once)"),
    "ppo": Stage(RLConfig, RL_RUNNER, reads=("prompt",), loop_data="prompts", makes="policy",
                 progress=(*RL_PROGRESS[:3], "train/value_loss", *RL_PROGRESS[3:]),
                 defaults={"run.name": "ppo", "rl.algo": "ppo", "rl.group_size": 1, "rl.kl_coef": 0.05, "rl.epochs": 2, "rl.minibatches": 2},
                 help="online RL: PPO with a value head, GAE, clipped losses, KL to the reference",
                 about="PPO: a value head on the policy trunk, GAE, clipped policy and value losses, KL to the reference in the reward."),
    "grpo": Stage(RLConfig, RL_RUNNER, reads=("prompt",), loop_data="prompts", makes="policy", progress=RL_PROGRESS,
                  defaults={"run.name": "grpo", "rl.algo": "grpo"},
                  help="online RL: GRPO, advantages normalised within each prompt's group of samples",
                  about="GRPO: several completions per prompt, advantages normalised within each group, no critic."),
    "rloo": Stage(RLConfig, RL_RUNNER, reads=("prompt",), loop_data="prompts", makes="policy", progress=RL_PROGRESS,
                  defaults={"run.name": "rloo", "rl.algo": "rloo", "rl.kl_coef": 0.05},
                  help="online RL: RLOO, each sample baselined by the other samples of its prompt",
                  about="RLOO: several completions per prompt, each baselined by the mean reward of the others."),
    "reinforce": Stage(RLConfig, RL_RUNNER, reads=("prompt",), loop_data="prompts", makes="policy", progress=RL_PROGRESS,
                       defaults={"run.name": "reinforce", "rl.algo": "reinforce", "rl.group_size": 1, "rl.kl_coef": 0.05},
                       help="online RL: REINFORCE++, per-token KL in the reward, batch-normalised returns",
                       about="REINFORCE++: per-token KL in the reward, returns normalised over the batch, no critic."),
    "classify": Stage(ClassifyConfig, "alignloop.train.classify:run_classify", reads=("labelled", "tagged", "bandit"),
                      loop_data="bandit", makes="policy", loop_options={"classify.objective": "bandit"},
                      progress=("train/loss", "train/accuracy", "eval/loss", "eval/accuracy", "eval/macro_f1", "eval/micro_f1",
                                "train/lr"),
                      help="train a sequence classifier (text → label) or a token classifier (NER: word → BIO tag)"),
    "evaluate": Stage(EvaluateConfig, "alignloop.evaluate.run:run_evaluate", reads=("prompt", "labelled", "tagged"),
                      help="candidate vs baseline on held-out prompts: reward, win rate with CI, KL, lengths, perplexity, gate"),
    "loop": Stage(LoopConfig, "alignloop.loop.pipeline:run_loop", reads=("prompt",),
                  help="the closed loop: feedback → datasets → train → gate against the deployed model → promote → redeploy, N times"),
}


def stage_name(cfg: Any) -> str:
    """The row of :data:`STAGES` a stage config belongs to: its class's one row, or for online RL
    (one config class, four commands) the command ``rl.algo`` names."""
    if isinstance(cfg, RLConfig):
        return cfg.rl.algo
    names = [name for name, stage in STAGES.items() if stage.config is type(cfg)]
    if len(names) != 1:
        raise ValueError(f"{type(cfg).__name__} is the config of {len(names)} stages, not one")
    return names[0]


def recipe_stages() -> tuple[str, ...]:
    """The stages a closed-loop recipe may name: those the loop has a dataset for."""
    return tuple(name for name, stage in STAGES.items() if stage.loop_data is not None)


@dataclass
class ServeConfig:
    """Serve models over an OpenAI-compatible API with a chat page, storing every completion and
    every piece of feedback with who gave it on which model version."""

    models: list[str] = option([], "models to serve: PATH or NAME=PATH (an HF id or folder, e.g. runs/sft/final); the name defaults to the folder's name (runs/X/final → X)")
    classifiers: list[str] = option([], "classifiers to serve on /v1/classify: NAME=PATH or PATH (a sequence or token classifier folder); beside models or alone")
    exploration: str = option("epsilon:0.1", "how a classifier picks the label it shows: greedy, epsilon:E or temperature:T; the default shows the best label 90% of the time and keeps every label ≥ ε/K, so feedback on it trains off-policy with weights ≤ K/ε")
    classify_max_tokens: Optional[int] = option(None, "longest classifier input in sub-tokens; a longer text is read from its start and the answer counts the words cut (default: the model's own limit)")
    max_classify_inputs: int = option(64, "most texts (or word lists) per /v1/classify request")
    db: Optional[str] = option(None, "feedback store URL: sqlite:///FILE or postgresql+psycopg://USER@HOST/DB (default: $ALIGNLOOP_DB or sqlite:///feedback.db)")
    db_durability: Literal["normal", "full"] = option("normal", "SQLite: normal = an acknowledged write survives a kill -9 of the server; full = fsync per commit, survives a power cut or OS crash too (PostgreSQL always flushes its commits)")
    host: str = option("127.0.0.1", "interface to listen on")
    port: int = option(8000, "port to listen on")
    auth: bool = option(True, "require an API key (`alignloop users add NAME`); false only for local demos: every request is the user 'anonymous'")
    device: Optional[str] = option(None, "where the models run (default: the GPU when there is one)")
    dtype: Literal["float32", "bfloat16"] = option("float32", "weights' dtype")
    max_batch: int = option(32, "most rows (completions) decoded together per model; more wait their turn")
    stream_interval: int = option(2, "decode steps between stream updates: tokens go out in chunks of up to N (a request's first token and its end at once); 1 = every token, at more event-loop work per token")
    default_max_tokens: int = option(256, "max_tokens when a request gives none")
    max_tokens_limit: int = option(1024, "largest max_tokens a request may ask for")
    max_prompt_tokens: Optional[int] = option(None, "longest prompt after the chat template (default: the model's context minus max_tokens)")
    max_n: int = option(8, "largest n (completions per request)")
    max_body_bytes: int = option(1_000_000, "largest request body; bigger ones get 413")
    rate_limit_per_minute: float = option(600.0, "requests per minute per user (token bucket); over it: 429 with Retry-After; 0 = unlimited")
    rate_burst: int = option(60, "requests a user may make at once before the per-minute rate applies")
    tokens_per_minute: float = option(200_000.0, "tokens a user may ask for a minute, counted as n × max_tokens + prompt tokens when the request arrives (a minute's worth at once); over it: 429 with Retry-After; 0 = unlimited")
    max_queued_rows_per_user: int = option(64, "completions (n counts each) a user may have waiting for a model's batch; more: 429")
    max_prompt_chars: Optional[int] = option(None, "longest prompt in characters (chat: all messages' text), refused before templating and tokenising (default: 32 per token of max_prompt_tokens or the model's context)")
    auth_failures_per_minute: float = option(10.0, "failed logins (unknown API keys) an address may make a minute after its burst; over it: 429 for that address; 0 = unlimited")
    auth_failure_burst: int = option(20, "failed logins an address may make at once before the per-minute rate applies")
    cors_origins: list[str] = option([], "origins allowed to call the API from a browser (CORS); empty = same origin only")
    limits: Literal["memory", "database"] = option("memory", "where the rate limits, token budgets and failed-login counts live: memory = this process only (one server); database = the PostgreSQL --db, shared by every replica on it (several servers behind one load balancer: a user's budget spent on one is spent on all)")
    registry_poll_seconds: float = option(1.0, "how often the server reads the registry's deployed versions: a deploy or rollback made through another replica on the same --db, or by `alignloop deploy`, is loaded here within this time; 0 = never (serve what was deployed here)")
    upstream: Optional[str] = option(None, "a feedback gateway: the base URL (http(s)://HOST:PORT/v1) of an OpenAI-compatible server (vllm serve, SGLang, TGI, transformers serve) that generates the chat and text completions; this server keeps the page, auth, limits, feedback and store. Excludes --model")
    upstream_models: list[str] = option([], "with upstream: the models to serve, [NAME=]ID (ID: the upstream's model id, e.g. a folder transformers serve loads or a vLLM LoRA adapter name; NAME defaults as for --model); none: every id the upstream lists on GET /models, under its own name")
    upstream_key: Optional[str] = option("env:ALIGNLOOP_UPSTREAM_KEY", "with upstream: the key this server sends it as `Authorization: Bearer`, or env:NAME to read it from $NAME (keeps it out of files and `ps`); an unset variable sends none. Users never see it")
    upstream_timeout_s: float = option(600.0, "with upstream: the longest wait for the upstream's next bytes (a model loading counts); then the request fails with 502")

    def __post_init__(self) -> None:
        for name in ("max_batch", "stream_interval", "default_max_tokens", "max_tokens_limit", "max_n", "max_body_bytes", "rate_burst",
                     "max_classify_inputs", "auth_failure_burst", "max_queued_rows_per_user"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be ≥ 1 (got {getattr(self, name)})")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ConfigError(f"default_max_tokens ({self.default_max_tokens}) is above max_tokens_limit ({self.max_tokens_limit})")
        if self.max_prompt_chars is not None and self.max_prompt_chars < 1:
            raise ConfigError(f"max_prompt_chars must be ≥ 1 (got {self.max_prompt_chars}); leave it out for the default")
        if self.classify_max_tokens is not None and self.classify_max_tokens < 3:
            raise ConfigError(f"classify_max_tokens must be ≥ 3 (two special tokens and a word; got {self.classify_max_tokens})")
        for name in ("rate_limit_per_minute", "auth_failures_per_minute", "tokens_per_minute"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be ≥ 0 (got {getattr(self, name)}); 0 turns the limit off")
        if self.registry_poll_seconds < 0:
            raise ConfigError(f"registry_poll_seconds must be ≥ 0 (got {self.registry_poll_seconds}); 0 turns following the registry off")
        if self.upstream is not None:
            self.upstream = self.upstream.rstrip("/")
            if not self.upstream.startswith(("http://", "https://")):
                raise ConfigError(f"upstream: {self.upstream!r} should be the server's base URL, http(s)://HOST:PORT/v1")
            if self.models:
                raise ConfigError("upstream: a gateway forwards to the upstream's models; name them with --upstream-model "
                                  f"[NAME=]ID, not --model ({self.models})")
        elif self.upstream_models:
            raise ConfigError("upstream_models: give --upstream URL, the server these models are on")
        if not self.upstream_timeout_s > 0:
            raise ConfigError(f"upstream_timeout_s must be > 0 (got {self.upstream_timeout_s})")


# ---------------------------------------------------------------------------------------------
# Loading, overriding, saving
# ---------------------------------------------------------------------------------------------
def load_config(cls: type, path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                defaults: dict[str, Any] | None = None) -> Any:
    """Build ``cls`` from its defaults, a command's dotted ``defaults`` (a :class:`Stage`'s), then the
    YAML file at ``path``, then dotted CLI ``overrides``.

    CLI values are strings; text fields keep them as typed, others are parsed as YAML
    scalars/lists. Values already typed (from code, like the demo's) are taken as they are. All
    are converted to the field's type. Raises :class:`ConfigError` naming the key for unknown
    keys and bad values.
    """
    values: dict[str, Any] = {}
    if path is not None:
        values.update(_flatten(_read_yaml(Path(path))))
    type_names = {key: type_name for key, type_name, *_ in describe(cls)}
    for key, text in (overrides or {}).items():
        # Text fields keep the text as typed: YAML would read `no` as false and `0123` as 83.
        as_typed = text and type_names.get(key) in ("str", "str|null")
        values[key] = text if as_typed else _parse_cli_value(text)
    known = set(type_names)
    for key in values:
        if key not in known:
            raise ConfigError(_unknown_key_message(key, known))
    if values.get("train.epochs") is not None and "train.max_steps" not in values:
        # A run's length is given once: epochs alone replace the stage's default max_steps, which
        # would otherwise win (TrainConfig: max_steps wins when both are set, as in TRL).
        values["train.max_steps"] = None
    base = _build(cls, defaults, prefix="") if defaults else None
    return _build(cls, values, prefix="", base=base)


def save_config(config: Any, path: Path) -> None:
    """Write every value of ``config`` (defaults included) as YAML that ``load_config`` reads back."""
    path.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False, allow_unicode=True))


def describe(cls: type, defaults: dict[str, Any] | None = None) -> list[tuple[str, str, Any, str]]:
    """(dotted key, type name, default, help) for every leaf field of a stage config class, with a
    command's dotted ``defaults`` applied."""
    return _describe_instance(_build(cls, defaults, prefix="") if defaults else cls(), prefix="")


def _describe_instance(instance: Any, prefix: str) -> list[tuple[str, str, Any, str]]:
    # Sections carry stage-specific defaults, so read defaults from the instance, not the class.
    rows = []
    hints = typing.get_type_hints(type(instance))
    for f in dataclasses.fields(instance):
        key = prefix + f.name
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            rows += _describe_instance(value, key + ".")
        else:
            rows.append((key, _type_name(hints[f.name]), value, f.metadata.get("help", "")))
    return rows


def read_yaml(path: Path, what: str = "config file") -> Any:
    """The YAML document at ``path``; a missing file or bad YAML is a ConfigError naming the line."""
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    data = read_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections (run:, model:, data:, train:)")
    return data


def _flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _parse_cli_value(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _unknown_key_message(key: str, known: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.5)
    if not close:
        # A misspelt section hides the leaf name; match on the last part alone.
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in sorted(known) if k.rsplit(".", 1)[-1] == leaf][:1]
    hint = f" — did you mean '{close[0]}'?" if close else ""
    return f"unknown key '{key}'{hint}"


def _build(cls: type, values: dict[str, Any], prefix: str, base: Any = None) -> Any:
    base = base if base is not None else cls()
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _build(hint, values, key + ".", base=getattr(base, f.name))
        elif key in values:
            kwargs[f.name] = coerce(values[key], hint, key)
        else:
            kwargs[f.name] = getattr(base, f.name)
    return cls(**kwargs)


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert ``value`` to the type ``hint`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [coerce(v, args[0], key) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, bool):  # float(True) is 1.0: a typo must not become a learning rate
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        try:  # YAML reads "3e-4" (no dot) as a string
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if hint is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"config field {key} has an unsupported type {hint!r}")


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return _type_name([a for a in args if a is not type(None)][0]) + "|null"
    if origin is Literal:
        return "|".join(map(str, args))
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    return getattr(hint, "__name__", str(hint))
