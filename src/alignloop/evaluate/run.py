"""``alignloop evaluate``: is the candidate better than the baseline, by how much, at what cost?

1. Both models complete the same held-out prompts with the same sampling settings and the same
   per-prompt random numbers (:func:`alignloop.rollout.generate.generate`), written to
   ``samples.jsonl``.
2. The reward source scores every completion; the judge decides each candidate/baseline pair
   (the reward itself, a pairwise Python function, or an LLM asked "A or B?" with the positions
   shuffled and logged); the win rate gets a confidence interval, ties counted apart.
3. KL(candidate ‖ baseline) on the candidate's own samples (both models score the same tokens;
   needs one tokenizer), lengths, distinct-n, repetition, reward–length correlation, and the
   perplexity of each model on a held-out text.
4. ``report.md``, ``metrics.json``, plots; the gate's verdict is the exit code (0 pass, 1 fail).
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import torch

from alignloop.config import EvaluateConfig, ModelConfig, save_config
from alignloop.data.load import load_records
from alignloop.errors import ConfigError, ModelError
from alignloop.rollout.rewards import build_reward_source

log = logging.getLogger("alignloop")

SAMPLES_IN_REPORT = 6
JUDGE_TEMPLATE = (
    "Which response answers the prompt better?\n\nPrompt: {prompt}\n\nResponse A: {a}\n\nResponse B: {b}\n\n"
    "Answer with the letter of the better response.\nAnswer:"
)


def run_evaluate(cfg: EvaluateConfig) -> int:
    """Run the comparison described by ``cfg``; return 0 when the gate passes (or there is none), 1 when it fails."""
    from alignloop.evaluate import compare
    from alignloop.evaluate.gates import check_gate, parse_gate
    from alignloop.report.stats import win_rate
    from alignloop.rollout.generate import generate
    from alignloop.rollout.scoring import token_logprobs

    if cfg.task != "generation":
        from alignloop.evaluate.classifier import run_classifier_evaluate

        return run_classifier_evaluate(cfg)
    if not cfg.candidate:
        raise ConfigError("candidate: name the model to evaluate (--candidate PATH)")
    if not cfg.prompts:
        raise ConfigError("prompts: name the held-out prompts file (--prompts FILE)")
    # A typo in the gate (syntax or metric name) fails before any generation.
    gate = parse_gate(cfg.gate, known=compare.METRIC_KEYS) if cfg.gate else None
    engine = rollout_engine(cfg)
    rows, _ = load_records(cfg.prompts, ("prompt",), cfg.max_prompts)
    prompts = [row.fields["prompt"] for row in rows]
    fields = {key: [row.fields.get(key) for row in rows] for key in rows[0].fields if key != "prompt"}
    reward = build_reward_source(cfg.reward) if cfg.reward else None
    out = Path(cfg.run.output_dir) / cfg.run.name
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")

    s = cfg.sampling
    names = ["candidate"] + (["baseline"] if cfg.baseline else [])
    paths = {"candidate": cfg.candidate, "baseline": cfg.baseline}
    models, tokenizers, generations = {}, {}, {}
    for name in names:
        models[name], tokenizers[name] = load_policy(paths[name], name)
        log.info("evaluate: %s %s completes %d prompts%s", name, paths[name], len(prompts),
                 f" on {cfg.rollout.url}" if engine is not None else "")
        if engine is None:
            generations[name] = generate(models[name], tokenizers[name], prompts, s, progress=True)
            continue
        if cfg.rollout.weight_sync != "none":
            engine.expect(engine.publish(paths[name], f"rollout-{cfg.run.name}"))
        generations[name] = engine.generate(models[name], tokenizers[name], prompts, s)

    scores: dict[str, list[float]] = {}
    lengths = {name: [len(ids) for ids in generations[name].completion_ids] for name in names}
    if reward is not None:
        for name in names:
            scores[name] = reward(prompts, generations[name].completions, **fields)
    ppl = {name: None for name in names}
    if cfg.perplexity_text:
        for name in names:
            ppl[name] = perplexity(models[name], tokenizers[name], cfg.perplexity_text, cfg.perplexity_block, s.batch_size)
    sides = {name: compare.completion_metrics(scores.get(name), lengths[name], generations[name].completions, ppl[name])
             for name in names}

    judge_log: list[dict] = []
    win, kl = None, None
    if cfg.baseline:
        outcomes, judge_log = judge_pairs(cfg, prompts, generations["candidate"].completions,
                                          generations["baseline"].completions, scores, fields)
        if outcomes is not None:
            win = win_rate(outcomes, ci=cfg.judge.ci, seed=s.seed)
        kl = kl_metrics(models, tokenizers, generations["candidate"], s.batch_size, token_logprobs)
    metrics = compare.flatten_metrics(sides["candidate"], sides.get("baseline", {}), win, kl)
    metrics.setdefault("prompts", len(prompts))

    write_samples(out / "samples.jsonl", prompts, generations, scores, judge_log)
    plots = make_plots(out, cfg, scores, lengths, win)
    gate_result = check_gate(gate, metrics) if gate else None
    samples = sample_rows(prompts, generations, scores, SAMPLES_IN_REPORT)
    title = f"{cfg.candidate} vs {cfg.baseline}" if cfg.baseline else str(cfg.candidate)
    report = compare.write_comparison_report(out, metrics, plots, gate_result, samples, title)
    log.info("evaluate: report in %s", report)
    if gate_result is None:
        return 0
    passed, reasons = gate_result
    for reason in reasons:
        log.info("gate: %s", reason)
    print(f"gate {'passed' if passed else 'FAILED'}: " + "; ".join(reasons))
    return 0 if passed else 1


# ---------------------------------------------------------------------------------------------
# Models and sources
# ---------------------------------------------------------------------------------------------
def rollout_engine(cfg: EvaluateConfig) -> Any:
    """``rollout.engine: openai``: the server, checked before any model loads, that completes the
    prompts, each model published to it in turn (``rollout.weight_sync``); None: the local engine."""
    from alignloop.rollout.remote import server_engine

    if cfg.rollout.engine == "openai" and cfg.baseline and cfg.rollout.weight_sync == "none":
        raise ConfigError("rollout.weight_sync=none serves one model, so it cannot complete both candidate and baseline; "
                          "use deploy (alignloop serve) or model_path (transformers serve), or drop the baseline")
    return server_engine(cfg.rollout, cfg.sampling, cfg.run.name)


def load_policy(path: str, role: str) -> tuple[Any, Any]:
    """A causal LM and its tokenizer for evaluation (eval mode, no grad needed)."""
    from alignloop.models.load import inference_device, load_causal_lm, load_tokenizer

    cfg = ModelConfig(name_or_path=path)
    try:
        tokenizer = load_tokenizer(cfg)
        model = load_causal_lm(cfg, tokenizer, seed=0)
    except ModelError as e:
        raise ModelError(f"{role}: {e}") from None
    return model.to(inference_device()).eval(), tokenizer


def judge_pairs(cfg: EvaluateConfig, prompts: list, candidate: list[str], baseline: list[str],
                scores: dict[str, list[float]], fields: dict[str, list]) -> tuple[list[int] | None, list[dict]]:
    """+1 / 0 / −1 per prompt (candidate wins / tie / loses), and what the judge saw."""
    from alignloop.report.stats import judge_outcomes

    judge = cfg.judge
    if judge.kind == "reward":
        if not scores:
            log.warning("evaluate: no reward source, so the reward judge has nothing to compare; set reward or judge.kind")
            return None, []
        outcomes = judge_outcomes(scores["candidate"], scores["baseline"], judge.epsilon)
        return outcomes, [{"judge": "reward"} for _ in outcomes]
    if judge.kind == "function":
        from alignloop.rollout.rewards import check_rewards, load_function

        if not judge.function:
            raise ConfigError("judge.function: name the pairwise function (`file.py:fn` or `module:fn`) for judge.kind=function")
        fn = load_function(judge.function)
        values = check_rewards(fn(prompts, candidate, baseline, **fields), len(prompts), f"judge function {judge.function}")
        outcomes = [0 if abs(v) <= judge.epsilon else (1 if v > 0 else -1) for v in values]
        return outcomes, [{"judge": judge.function, "value": v} for v in values]
    if not judge.model:
        raise ConfigError("judge.model: name the causal LM that judges for judge.kind=llm")
    return llm_judge(judge.model, prompts, candidate, baseline, judge.epsilon, cfg.sampling.seed)


@torch.no_grad()
def llm_judge(model_path: str, prompts: list, candidate: list[str], baseline: list[str],
              epsilon: float, seed: int) -> tuple[list[int], list[dict]]:
    """Ask a causal LM which of two responses is better, reading the log-probabilities of " A" and
    " B" as its next token. The candidate is shown first or second at random (seeded, logged), so
    a judge's preference for a position cannot pass for a preference for a model."""
    from alignloop.rollout.rewards import prompt_text

    model, tokenizer = load_policy(model_path, "judge.model")
    device = next(model.parameters()).device
    letters = [tokenizer(" A", add_special_tokens=False)["input_ids"][-1], tokenizer(" B", add_special_tokens=False)["input_ids"][-1]]
    rng = random.Random(seed)
    outcomes, log_rows = [], []
    for prompt, c, b in zip(prompts, candidate, baseline):
        candidate_first = rng.random() < 0.5
        a_text, b_text = (c, b) if candidate_first else (b, c)
        text = JUDGE_TEMPLATE.format(prompt=prompt_text(prompt), a=a_text, b=b_text)
        ids = tokenizer(text, return_tensors="pt").to(device)
        logprobs = torch.log_softmax(model(**ids).logits[0, -1].float(), -1)
        margin = float(logprobs[letters[0]] - logprobs[letters[1]])  # > 0: the judge prefers A
        first_wins = 0 if abs(margin) <= epsilon else (1 if margin > 0 else -1)
        outcomes.append(first_wins if candidate_first else -first_wins)
        log_rows.append({"judge": model_path, "candidate_position": "A" if candidate_first else "B", "logp_A_minus_B": margin})
    return outcomes, log_rows


def kl_metrics(models: dict, tokenizers: dict, candidate_generation: Any, batch_size: int, token_logprobs: Any) -> dict:
    """KL(candidate ‖ baseline) on the candidate's samples; reported as not computable when the two
    tokenizers differ (the same text would be different token sequences)."""
    from alignloop.evaluate import compare

    if tokenizers["candidate"].get_vocab() != tokenizers["baseline"].get_vocab():
        log.warning("evaluate: candidate and baseline tokenizers differ; KL is not computable and is not reported")
        return {"kl_note": "not computable: candidate and baseline use different tokenizers"}
    g = candidate_generation
    candidate_lp = token_logprobs(models["candidate"], g.prompt_ids, g.completion_ids, batch_size)
    baseline_lp = token_logprobs(models["baseline"], g.prompt_ids, g.completion_ids, batch_size)
    return compare.kl_summary(candidate_lp, baseline_lp)


def perplexity(model: Any, tokenizer: Any, path: str, block: int, batch_size: int) -> float:
    """exp(mean next-token NLL) of ``model`` on the text at ``path``, packed into ``block``-token blocks."""
    from alignloop.data.tokenize import pack_texts
    from alignloop.rollout.scoring import heldout_loss

    texts = [row.fields["text"] for row in load_records(path, ("text",))[0]]
    examples = pack_texts(texts, tokenizer, block)
    return heldout_loss(model, examples, batch_size, tokenizer.pad_token_id, limit=None)["eval/ppl"]


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------
def write_samples(path: Path, prompts: list, generations: dict, scores: dict, judge_log: list[dict]) -> None:
    """Every prompt with each model's completion, reward and the judge's view: ``samples.jsonl``."""
    with path.open("w", encoding="utf-8") as f:
        for i, prompt in enumerate(prompts):
            row: dict[str, Any] = {"index": i, "prompt": prompt}
            for name, g in generations.items():
                row[name] = g.completions[i]
                row[f"{name}_tokens"] = len(g.completion_ids[i])
                row[f"{name}_finished"] = g.finished[i]
                if name in scores:
                    row[f"{name}_reward"] = scores[name][i]
            if judge_log:
                row["judge"] = judge_log[i]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def sample_rows(prompts: list, generations: dict, scores: dict, count: int) -> list[dict]:
    from alignloop.rollout.rewards import prompt_text

    rows = []
    for i in range(min(count, len(prompts))):
        row = {"prompt": prompt_text(prompts[i])}
        for name, g in generations.items():
            row[name] = g.completions[i]
            if name in scores:
                row[f"{name}_reward"] = round(scores[name][i], 4)
        rows.append(row)
    return rows


def make_plots(out: Path, cfg: EvaluateConfig, scores: dict, lengths: dict, win: dict | None) -> dict[str, Path]:
    from alignloop.evaluate import compare
    from alignloop.report.plots import plot_length_vs_reward, plot_reward_distributions, plot_run_curves
    from alignloop.runs import read_metrics

    plots: dict[str, Path] = {}
    if "candidate" in scores and "baseline" in scores:
        plots["reward distributions"] = plot_reward_distributions(scores["candidate"], scores["baseline"], out / "rewards.png")
        plots["length vs reward"] = plot_length_vs_reward(
            {side: (lengths[side], scores[side]) for side in ("baseline", "candidate")}, out / "length_vs_reward.png",
            "candidate vs baseline")
    if win is not None:
        plots["win / tie / loss"] = compare.plot_win_rate(win, out / "win_rate.png")
    for run_dir in cfg.runs:
        rows = read_metrics(Path(run_dir) / "metrics.jsonl")
        if not rows:
            log.warning("evaluate: %s has no metrics.jsonl; its curves are left out", run_dir)
            continue
        name = Path(run_dir).name
        plots[f"training curves: {name}"] = plot_run_curves(rows, out / f"curves-{name}.png", title=name)
    return plots

