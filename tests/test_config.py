"""Stage configs: defaults < YAML < ``--section.key=value``; values converted to the field's type
or refused naming the key; unknown keys answered with the closest valid name."""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
from pathlib import Path

import pytest
import yaml

from alignloop.cli import main
from alignloop.config import (
    STAGES,
    DataConfig,
    LoopConfig,
    LoraConfig,
    PretrainConfig,
    RLConfig,
    SFTConfig,
    TrainConfig,
    describe,
    load_config,
    recipe_stages,
    save_config,
)
from alignloop.errors import ConfigError


def write_yaml(path: Path, mapping: dict) -> Path:
    path.write_text(yaml.safe_dump(mapping))
    return path


# --- defaults and precedence ---------------------------------------------------------------------
def test_no_yaml_and_no_overrides_gives_the_defaults():
    assert load_config(SFTConfig) == SFTConfig()
    assert load_config(PretrainConfig) == PretrainConfig()


def test_stage_sections_carry_stage_specific_defaults():
    sft, pretrain = SFTConfig(), PretrainConfig()
    assert (sft.run.name, sft.train.lr, sft.data.max_length) == ("sft", 1e-4, 256)
    assert (pretrain.run.name, pretrain.data.path) == ("pretrain", "builtin:chitchat-text")
    # The section class itself keeps the generic defaults.
    assert TrainConfig().lr == 3e-4


def test_yaml_overrides_defaults_and_cli_overrides_yaml(tmp_path):
    path = write_yaml(tmp_path / "sft.yaml", {"train": {"lr": 0.001, "max_steps": 5}, "run": {"name": "from-yaml"}})

    cfg = load_config(SFTConfig, path, {"train.lr": "3e-4"})

    assert cfg.train.lr == 3e-4  # CLI beats YAML
    assert cfg.train.max_steps == 5  # YAML beats default
    assert cfg.run.name == "from-yaml"
    assert cfg.train.batch_size == SFTConfig().train.batch_size  # untouched: default
    assert cfg.data == SFTConfig().data


def test_yaml_reaches_nested_sections(tmp_path):
    path = write_yaml(tmp_path / "lora.yaml", {"model": {"lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]}}})
    cfg = load_config(SFTConfig, path)
    assert cfg.model.lora == LoraConfig(r=8, target_modules=["q_proj", "v_proj"])


def test_empty_yaml_file_gives_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(SFTConfig, path) == SFTConfig()


# --- type conversion -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "text", "expected"),
    [
        ("train.lr", "3e-4", 3e-4),  # YAML 1.1 reads "3e-4" (no dot) as a string
        ("train.lr", "0.001", 0.001),
        ("train.lr", "1", 1.0),
        ("train.max_steps", "10", 10),
        ("train.max_steps", "10.0", 10),
        ("model.gradient_checkpointing", "true", True),
        ("model.gradient_checkpointing", "false", False),
        ("run.report_to", "[tensorboard, wandb]", ["tensorboard", "wandb"]),
        ("run.report_to", "tensorboard,wandb", ["tensorboard", "wandb"]),
        ("run.report_to", "tensorboard", ["tensorboard"]),
        ("run.report_to", "[]", []),
        ("data.max_samples", "null", None),
        ("data.max_samples", "32", 32),
        ("train.eval_batches", "none", None),
        ("model.tokenizer", "null", None),
        ("model.tokenizer", "gpt2", "gpt2"),
        ("model.dtype", "bfloat16", "bfloat16"),
        ("train.resume", "never", "never"),
        # Text fields keep what was typed, not what YAML would make of it.
        ("run.name", "no", "no"),
        ("run.name", "true", "true"),
        ("run.name", "0123", "0123"),
        ("model.name_or_path", "tiny-1m", "tiny-1m"),
    ],
)
def test_cli_values_are_converted_to_the_field_type(key, text, expected):
    cfg = load_config(SFTConfig, overrides={key: text})
    section, _, leaf = key.rpartition(".")
    owner = cfg
    for part in section.split("."):
        owner = getattr(owner, part)
    value = getattr(owner, leaf)
    assert value == expected
    assert type(value) is type(expected)


def test_typed_overrides_from_code_are_taken_as_they_are():
    # `alignloop demo` builds its configs this way.
    cfg = load_config(
        PretrainConfig,
        overrides={"train.max_steps": 5, "train.lr": 1e-3, "data.max_length": 128, "run.report_to": ["tensorboard"]},
    )
    assert (cfg.train.max_steps, cfg.train.lr, cfg.data.max_length) == (5, 1e-3, 128)
    assert cfg.run.report_to == ["tensorboard"]
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config(PretrainConfig, overrides={"train.max_steps": 2.5})


@pytest.mark.parametrize(
    ("key", "text"),
    [
        ("train.max_steps", "ten"),
        ("train.max_steps", "2.5"),
        ("train.max_steps", "null"),  # not Optional
        ("train.lr", "fast"),
        ("train.lr", "true"),  # not silently 1.0
        ("model.gradient_checkpointing", "2"),
        ("model.dtype", "float16"),
        ("train.lr_schedule", "cosine_annealing"),
        ("run.report_to", "{a: 1}"),
        ("run.name", ""),
    ],
)
def test_bad_cli_value_names_the_key(key, text):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(SFTConfig, overrides={key: text})


def test_bad_literal_value_lists_the_choices():
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, overrides={"model.dtype": "float16"})
    assert "float32" in str(e.value) and "bfloat16" in str(e.value)


def test_bad_yaml_value_names_the_key(tmp_path):
    path = write_yaml(tmp_path / "bad.yaml", {"train": {"batch_size": "eight"}})
    with pytest.raises(ConfigError, match=re.escape("train.batch_size")):
        load_config(SFTConfig, path)


# --- unknown keys --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "suggestion"),
    [
        ("train.lrate", "train.lr"),
        ("trian.lr", "train.lr"),
        ("data.maxlen", "data.max_length"),
        ("model.lora.rank", "model.lora.r"),
        ("optim.lr", "train.lr"),  # a wrong section still finds the leaf
    ],
)
def test_unknown_cli_key_suggests_the_closest_valid_key(key, suggestion):
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, overrides={key: "1"})
    message = str(e.value)
    assert f"'{key}'" in message
    assert f"did you mean '{suggestion}'?" in message


def test_unknown_key_with_nothing_close_gets_no_suggestion():
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, overrides={"zzz.qqq": "1"})
    assert "'zzz.qqq'" in str(e.value)
    assert "did you mean" not in str(e.value)


def test_unknown_yaml_key_suggests_the_closest_valid_key(tmp_path):
    path = write_yaml(tmp_path / "typo.yaml", {"train": {"lrate": 0.1}})
    with pytest.raises(ConfigError, match=re.escape("did you mean 'train.lr'?")):
        load_config(SFTConfig, path)


# --- config files --------------------------------------------------------------------------------
def test_missing_config_file_is_named(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=re.escape(f"{path}: config file not found")):
        load_config(SFTConfig, path)


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  lr: 0.1\n  max_steps: [1, 2\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}:") + r"\d+: not valid YAML"):
        load_config(SFTConfig, path)


def test_yaml_that_is_not_a_mapping_is_refused(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(SFTConfig, path)


@pytest.mark.parametrize("stage", [SFTConfig, PretrainConfig])
def test_saved_config_loads_back_equal(tmp_path, stage):
    cfg = load_config(
        stage,
        overrides={
            "run.name": "roundtrip",
            "run.report_to": "[tensorboard]",
            "model.name_or_path": "tiny-1m",
            "model.tokenizer": "some/tokenizer",
            "model.dtype": "bfloat16",
            "model.lora.r": "4",
            "model.lora.target_modules": "[q_proj, v_proj]",
            "data.max_samples": "7",
            "data.eval_fraction": "0.25",
            "data.overlong": "drop",
            "train.lr": "3e-5",
            "train.eval_batches": "null",
            "train.threads": "2",
        },
    )
    path = tmp_path / "config.yaml"

    save_config(cfg, path)

    assert load_config(stage, path) == cfg
    assert load_config(stage, path) != stage()  # the overrides really were saved


# --- __post_init__ ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "text"),
    [
        ("model.lora.r", "-1"),
        ("data.eval_fraction", "1.0"),
        ("data.eval_fraction", "-0.1"),
        ("data.max_length", "1"),
        ("train.max_steps", "0"),
        ("train.batch_size", "0"),
        ("train.grad_accum", "0"),
        ("train.log_every", "0"),
        ("train.keep_checkpoints", "0"),
        ("train.lr", "0"),
        ("train.lr", "-1e-4"),
        ("train.warmup_steps", "-1"),
        ("train.eval_every", "-1"),
        ("train.save_every", "-1"),
    ],
)
def test_impossible_values_are_refused_naming_the_key(key, text):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(SFTConfig, overrides={key: text})


def test_sections_refuse_bad_values_when_built_directly():
    with pytest.raises(ConfigError, match="model.lora.r"):
        LoraConfig(r=-2)
    with pytest.raises(ConfigError, match="data.eval_fraction"):
        DataConfig(eval_fraction=1.5)
    with pytest.raises(ConfigError, match="train.batch_size"):
        TrainConfig(batch_size=0)


def test_boundary_values_are_accepted():
    cfg = load_config(
        SFTConfig,
        overrides={"data.eval_fraction": "0", "data.max_length": "2", "train.warmup_steps": "0", "model.lora.r": "0"},
    )
    assert (cfg.data.eval_fraction, cfg.data.max_length, cfg.train.warmup_steps, cfg.model.lora.r) == (0.0, 2, 0, 0)


# --- describe and --help ---------------------------------------------------------------------------
def test_describe_lists_every_leaf_with_its_stage_default():
    rows = {key: (type_name, default, help_text) for key, type_name, default, help_text in describe(SFTConfig)}
    cfg = SFTConfig()
    leaves = {
        f"{section.name}.{f.name}"
        for section in dataclasses.fields(cfg)
        for f in dataclasses.fields(getattr(cfg, section.name))
        if not dataclasses.is_dataclass(getattr(getattr(cfg, section.name), f.name))
    } | {f"model.lora.{f.name}" for f in dataclasses.fields(cfg.model.lora)}
    assert set(rows) == leaves
    assert rows["train.lr"][:2] == ("float", 1e-4)
    assert rows["data.max_samples"][0] == "int|null"
    assert all(help_text for _, _, help_text in rows.values())


def test_sft_help_lists_every_key_with_its_default(capsys):
    with pytest.raises(SystemExit) as e:
        main(["sft", "--help"])
    assert e.value.code == 0
    # argparse puts each option on a line starting "  --name", its wrapped help on indented lines.
    entries: dict[str, str] = {}
    current = None
    for line in capsys.readouterr().out.split("\n"):
        start = re.match(r"  (--\S+)", line)
        if start:
            current = start.group(1)
            entries[current] = line
        elif current and line.startswith("   "):
            entries[current] += " " + line.strip()
        else:
            current = None

    for key, _, default, _ in describe(SFTConfig):
        assert f"--{key}" in entries, f"--{key} missing from `alignloop sft --help`"
        # Compare without whitespace: argparse also wraps inside words at hyphens ("all-|linear").
        entry = "".join(entries[f"--{key}"].split())
        shown = "".join(f"(default: {json.dumps(default)})".split())
        assert shown in entry, f"--{key}: default {default!r} not shown in {entries[f'--{key}']!r}"


# --- the table of stages ---------------------------------------------------------------------------
def test_every_command_of_the_table_is_a_cli_command_with_its_help_line(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    listing = "".join(capsys.readouterr().out.split())  # argparse wraps help lines, at hyphens too
    for name, stage in STAGES.items():
        assert name + "".join(stage.help.split()) in listing


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_runner_of_the_table_is_importable(name):
    module, _, function = STAGES[name].runner.partition(":")
    assert callable(getattr(importlib.import_module(module), function))


@pytest.mark.parametrize(("name", "expected"), [
    ("ppo", {"run.name": "ppo", "rl.algo": "ppo", "rl.group_size": 1, "rl.kl_coef": 0.05, "rl.epochs": 2, "rl.minibatches": 2}),
    ("grpo", {"run.name": "grpo", "rl.algo": "grpo", "rl.group_size": 4, "rl.kl_coef": 0.0, "rl.epochs": 1}),
    ("rloo", {"run.name": "rloo", "rl.algo": "rloo", "rl.group_size": 4, "rl.kl_coef": 0.05}),
    ("reinforce", {"run.name": "reinforce", "rl.algo": "reinforce", "rl.group_size": 1, "rl.kl_coef": 0.05}),
])
def test_each_rl_command_is_one_config_with_its_own_defaults(name, expected):
    stage = STAGES[name]
    assert stage.config is RLConfig
    cfg = stage.load()
    for key, value in expected.items():
        section, field = key.split(".")
        assert getattr(getattr(cfg, section), field) == value, key
    shown = {key: default for key, _, default, _ in stage.options()}
    assert {key: shown[key] for key in expected} == expected  # `alignloop NAME --help` shows the command's defaults


def test_yaml_and_cli_override_a_commands_defaults(tmp_path):
    path = write_yaml(tmp_path / "ppo.yaml", {"rl": {"group_size": 3}})
    cfg = STAGES["ppo"].load(path, {"rl.kl_coef": "0.2"})
    assert (cfg.rl.algo, cfg.rl.group_size, cfg.rl.kl_coef, cfg.rl.epochs) == ("ppo", 3, 0.2, 2)


def test_a_saved_rl_config_loads_back_equal_through_its_command(tmp_path):
    cfg = STAGES["ppo"].load(overrides={"rl.epochs": "3"})
    save_config(cfg, tmp_path / "config.yaml")
    assert STAGES["ppo"].load(tmp_path / "config.yaml") == cfg
    assert load_config(RLConfig, tmp_path / "config.yaml") == cfg  # every value is written out


def test_loop_recipes_are_the_stages_the_table_gives_a_dataset():
    assert set(recipe_stages()) == {name for name, stage in STAGES.items() if stage.loop_data}
    assert {STAGES[name].loop_data for name in recipe_stages()} <= {"sft", "pairs", "kto", "prompts", "bandit"}
    assert all(STAGES[name].makes in ("policy", "reward") for name in recipe_stages())
    with pytest.raises(ConfigError, match="recipe: unknown stage 'pretrain'"):
        load_config(LoopConfig, overrides={"recipe": "pretrain"})
    with pytest.raises(ConfigError, match="recipe: rloo needs a reward stage before it"):
        load_config(LoopConfig, overrides={"recipe": "[sft, rloo, reward]"})
    assert load_config(LoopConfig, overrides={"recipe": "[reward, sft, rloo]"}).recipe == ["reward", "sft", "rloo"]
    # a classifier's recipe learns from verdicts on predictions; it cannot mix with language-model stages
    assert load_config(LoopConfig, overrides={"recipe": "[classify]"}).trains_classifier
    with pytest.raises(ConfigError, match="recipe: classify trains a classifier; it cannot share a recipe"):
        load_config(LoopConfig, overrides={"recipe": "[sft, classify]"})
