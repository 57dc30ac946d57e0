"""Rules every training stage shares (issue 31): one step-count rule (``train.max_steps`` wins over
``train.epochs``, as in TRL), a warm-up that ends inside a short run, progress lines that carry the
stage's own metrics, checks that fail before any data is read, and a model card in every ``final/``.

Each stage runs for two steps on the word-level tiny Llama (conftest's ``word_model_dir``)."""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path

import pytest
import torch
import yaml

from alignloop.cli import main
from alignloop.config import STAGES, TrainConfig, load_config
from alignloop.errors import ConfigError
from alignloop.runs import read_metrics
from conftest import GOOD, WORDS, write_word_task

TRAINING_STAGES = [name for name, stage in STAGES.items() if stage.progress]
RL = ("ppo", "grpo", "rloo", "reinforce")
# What a person must see on each stage's progress lines (names as the lines show them).
MUST_SHOW = {
    "pretrain": ("loss", "eval/loss"), "sft": ("loss", "eval/loss"),
    "reward": ("accuracy", "eval/accuracy"),
    "dpo": ("rewards/accuracy", "rewards/margin", "eval/rewards/accuracy"),
    "kto": ("rewards/margin", "eval/loss"),
    "ppo": ("reward", "kl", "value_loss", "eval/reward"),
    "grpo": ("reward", "kl", "eval/reward"), "rloo": ("reward", "kl", "eval/reward"), "reinforce": ("reward", "kl", "eval/reward"),
    "classify": ("loss", "accuracy", "eval/accuracy", "eval/macro_f1"),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small file of each record kind the stages read, in the word model's vocabulary."""
    folder = tmp_path_factory.mktemp("stage-rules")
    rng = random.Random(0)

    def words(k: int, pool: list[str] = WORDS) -> str:
        return " ".join(rng.choices(pool, k=k))

    rows = {
        "text": [{"text": words(40)} for _ in range(40)],
        "sft": [{"prompt": words(4), "completion": words(6)} for _ in range(48)],
        "pairs": [{"prompt": words(4), "chosen": words(6, GOOD), "rejected": words(6, WORDS[100:])} for _ in range(48)],
        "thumbs": [{"prompt": words(4), "completion": words(6, GOOD if i % 2 else WORDS[100:]), "label": bool(i % 2)}
                   for i in range(48)],
        "prompts": [{"prompt": words(4)} for _ in range(48)],
        "labelled": [{"text": words(5), "label": "good" if i % 2 else "bad"} for i in range(48)],
    }
    return write_word_task(folder, rows)


def stage_args(stage: str, model: Path, data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """``stage`` for two steps (max_steps=2 beside epochs=3, which alone would be more), evaluated at the end."""
    common = [stage, f"--model.name_or_path={model}", f"--run.output_dir={out}", "--train.max_steps=2", "--train.epochs=3",
              "--train.batch_size=4", "--train.save_every=0", "--train.eval_every=0", "--train.threads=1"]
    per_stage = {
        "pretrain": [f"--data.path={data['text']}", "--data.max_length=16"],
        "sft": [f"--data.path={data['sft']}", "--data.max_length=32"],
        "reward": [f"--data.path={data['pairs']}", "--data.max_length=32"],
        "dpo": [f"--data.path={data['pairs']}", "--data.max_length=32"],
        "kto": [f"--data.path={data['thumbs']}", "--data.max_length=32"],
        "classify": [f"--data.path={data['labelled']}", "--data.max_length=16"],
    }
    for algo in RL:
        per_stage[algo] = [f"--data.path={data['prompts']}", f"--rl.reward={data['rewards']}:good_share",
                           f"--rl.eval_prompts={data['prompts']}", "--rl.eval_max_prompts=4", "--sampling.max_new_tokens=4",
                           "--rl.kl_coef=0.05", *(["--rl.group_size=2"] if algo in ("grpo", "rloo") else [])]
    return [*common, *per_stage[stage], *extra]


def progress_lines(text: str, title_steps: str) -> list[str]:
    return [line for line in text.splitlines() if title_steps in line and "ETA" in line]


@pytest.mark.parametrize("stage", TRAINING_STAGES)
def test_every_stage_trains_max_steps_over_epochs_shows_its_metrics_and_writes_a_model_card(
        stage: str, word_model_dir: Path, data: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="alignloop"):
        assert main(stage_args(stage, word_model_dir, data, tmp_path)) == 0
    run = tmp_path / STAGES[stage].load().run.name

    # One step-count rule: max_steps=2 wins over epochs=3 (which would be several times more steps).
    assert [m["step"] for m in read_metrics(run / "metrics.jsonl")] == [1, 2]

    # Progress lines carry the stage's own numbers, the held-out ones on the evaluated last step.
    lines = progress_lines(caplog.text, "step 2/2")
    assert lines, caplog.text
    for name in MUST_SHOW[stage]:
        assert re.search(rf"(^|\s){re.escape(name)} -?(\d|nan|inf)", lines[-1]), (name, lines[-1])

    # A model card like TRL's: the HF header, the base, the final metrics, the config, how to load it.
    card = (run / "final" / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert header == {"base_model": str(word_model_dir), "library_name": "transformers", "tags": ["alignloop", stage]}
    last = read_metrics(run / "metrics.jsonl")[-1]
    for key in STAGES[stage].progress:  # every number the last progress line showed is in the card
        if key in last:
            assert f"| {key} | {last[key]:.4g} |" in card, key
    headline = "eval/reward" if stage in RL else "eval/loss"  # the card leads with it; held-out: the last step was evaluated
    assert f"final {headline} {last[headline]:.4g}" in card
    auto = "AutoModelForSequenceClassification" if stage in ("reward", "classify") else "AutoModelForCausalLM"
    assert f'{auto}.from_pretrained("{run / "final"}")' in card
    config = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert config["train"]["max_steps"] == 2 and config["model"]["name_or_path"] == str(word_model_dir)


def test_epochs_decide_when_max_steps_is_null_for_each_stage() -> None:
    """The resolved length: epochs alone replace a stage's default max_steps; both given, max_steps wins."""
    for stage in TRAINING_STAGES:
        alone = STAGES[stage].load(overrides={"train.epochs": "2"}).train
        both = STAGES[stage].load(overrides={"train.epochs": "2", "train.max_steps": "7"}).train
        steps = STAGES[stage].load(overrides={"train.max_steps": "7"}).train
        assert (alone.max_steps, alone.epochs) == (None, 2.0), stage
        assert both.max_steps == 7 and steps.max_steps == 7, stage
    with pytest.raises(ConfigError, match="both null"):
        STAGES["reward"].load(overrides={"train.epochs": "null"})
    with pytest.raises(ConfigError, match="max_steps must be ≥ 1"):
        STAGES["sft"].load(overrides={"train.max_steps": "0"})


def test_warm_up_of_a_short_run_ends_within_it_and_an_explicit_one_still_wins() -> None:
    from alignloop.train.loop import make_scheduler, warmup_steps

    def lrs(train: TrainConfig) -> list[float]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=train.lr)
        scheduler = make_scheduler(optimizer, train)
        seen = []
        for _ in range(train.max_steps):
            seen.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return seen

    short = load_config(type(STAGES["dpo"].load()), overrides={"train.max_steps": "3", "train.lr_schedule": "constant_with_warmup"}).train
    assert warmup_steps(short) == 1  # ceil(0.05 × 3), not the 10 steps that once swallowed a 3-step run
    assert lrs(short)[1:] == [short.lr, short.lr]  # the run reaches train.lr at its second step
    long = dataclass_replace(short, max_steps=200)
    assert warmup_steps(long) == 10
    explicit = dataclass_replace(short, warmup_steps=2)
    assert warmup_steps(explicit) == 2 and lrs(explicit)[2] == short.lr
    assert warmup_steps(STAGES["classify"].load(overrides={"train.max_steps": "300"}).train) == 30
    assert warmup_steps(STAGES["grpo"].load().train) == 0


def dataclass_replace(train: TrainConfig, **changes: object) -> TrainConfig:
    import dataclasses

    return dataclasses.replace(train, **changes)


# --- checks that come before any data is read --------------------------------------------------------------
@pytest.fixture
def no_data_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every training stage's record reader fails the test if called."""
    import importlib

    def no_data(*args: object, **kwargs: object) -> None:
        raise AssertionError("data was read before the config was checked")

    for module in ("sft", "reward", "preference", "rl", "classify"):
        monkeypatch.setattr(importlib.import_module(f"alignloop.train.{module}"), "load_records", no_data)


def test_a_reference_with_another_tokenizer_fails_before_any_data_is_read(
        word_model_dir: Path, tiny_model_dir: Path, data: dict[str, Path], tmp_path: Path, no_data_reads: None,
        capsys: pytest.CaptureFixture) -> None:
    for stage, option in (("dpo", "preference.ref_model"), ("grpo", "rl.ref_model")):
        assert main(stage_args(stage, word_model_dir, data, tmp_path, f"--{option}={tiny_model_dir}")) == 2
        assert f"{option} '{tiny_model_dir}' has another tokenizer than the policy" in capsys.readouterr().err


def test_a_missing_tracker_fails_before_any_data_is_read(word_model_dir: Path, data: dict[str, Path], tmp_path: Path,
                                                         no_data_reads: None, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real_find_spec(name, *a))
    for stage in ("sft", "reward", "dpo", "grpo", "classify"):
        code = main(stage_args(stage, word_model_dir, data, tmp_path, "--run.report_to=[tensorboard]"))
        assert code != 0
        assert "run.report_to: tensorboard is not installed (pip install tensorboard)" in capsys.readouterr().err


def test_an_unknown_tracker_is_refused_by_the_config() -> None:
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbord'"):
        STAGES["sft"].load(overrides={"run.report_to": "[tensorbord]"})
