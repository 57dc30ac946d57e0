"""Bad input through the real ``alignloop`` entry point: exit code 2 and one line on stderr,
``alignloop: error: ...``, naming what is wrong and where; never a traceback.

Every case fails before the first optimizer step; ``--train.max_steps=1`` and tiny models keep a
case cheap if it did not.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from alignloop.cli import main
from alignloop.errors import ModelError

# A tqdm bar redraws itself with carriage returns on one stderr line: "Loading weights: 100%|...|".
PROGRESS_BAR = re.compile(r"^.*\d+%\|.*\|.*$")


def run_cli(capsys, tmp_path: Path, *args: str) -> tuple[int, str]:
    """Run ``alignloop sft`` on tiny settings; return the exit code and the stderr text."""
    argv = ["sft", "--model.name_or_path=tiny-1m", f"--run.output_dir={tmp_path / 'runs'}", "--train.max_steps=1",
            "--train.batch_size=2", *args]
    code = main(argv)
    return code, capsys.readouterr().err


def error_line(stderr: str, allow_progress_bars: bool = False) -> str:
    """The one ``alignloop: error:`` line of ``stderr``; fails if there is anything else."""
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    if allow_progress_bars:
        lines = [line for line in lines if not PROGRESS_BAR.match(line)]
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    assert lines[0].startswith("alignloop: error: ")
    return lines[0].removeprefix("alignloop: error: ")


def test_missing_data_file(capsys, tmp_path):
    path = tmp_path / "nope.jsonl"
    code, err = run_cli(capsys, tmp_path, f"--data.path={path}")
    assert code == 2
    assert error_line(err) == f"{path}: data file not found"


def test_malformed_json_line_names_file_and_line(capsys, tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "completion": " b"}, '{"prompt": "a", "completion"'])
    code, err = run_cli(capsys, tmp_path, f"--data.path={path}")
    assert code == 2
    assert error_line(err).startswith(f"{path}:2: not valid JSON")


def test_wrong_field_type_names_file_line_and_field(capsys, tmp_path, write_jsonl):
    rows = [{"prompt": "a", "completion": " b"}, {"prompt": "a", "completion": " b"}, {"prompt": ["a"], "completion": " b"}]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    code, err = run_cli(capsys, tmp_path, f"--data.path={path}")
    assert code == 2
    assert error_line(err).startswith(f"{path}:3: field 'prompt[0]' must be an object with 'role' and 'content'")


def test_missing_field_names_file_line_and_field(capsys, tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "completion": " b"}, {"prompt": "c"}])
    code, err = run_cli(capsys, tmp_path, f"--data.path={path}")
    assert code == 2
    assert error_line(err).startswith(f"{path}:2: field 'completion' missing; ")


def test_empty_dataset(capsys, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    code, err = run_cli(capsys, tmp_path, f"--data.path={path}")
    assert code == 2
    assert error_line(err) == f"{path}: no records (the dataset is empty)"


def test_max_length_beyond_the_models_context(capsys, tmp_path, sft_jsonl):
    code, err = run_cli(capsys, tmp_path, f"--data.path={sft_jsonl}", "--data.max_length=1024")
    assert code == 2
    message = error_line(err)
    assert "data.max_length=1024" in message and "context (512 tokens)" in message


def test_overlong_record_with_overlong_error(capsys, tmp_path, write_jsonl):
    rows = [{"prompt": "Hi.", "completion": " Yo."}] * 3 + [{"prompt": "word " * 40, "completion": " end"}]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    code, err = run_cli(capsys, tmp_path, f"--data.path={path}", "--data.max_length=16", "--data.overlong=error")
    assert code == 2
    message = error_line(err)
    assert message.startswith(f"{path}:4: ")
    assert "data.max_length=16" in message


def test_model_path_that_does_not_exist(capsys, tmp_path, sft_jsonl):
    missing = tmp_path / "no-such-model"
    code, err = run_cli(capsys, tmp_path, f"--data.path={sft_jsonl}", f"--model.name_or_path={missing}")
    assert code == 2
    message = error_line(err)
    assert message.startswith(f"model.name_or_path '{missing}': no such folder")


def test_hub_id_that_cannot_be_found_offline(capsys, tmp_path, sft_jsonl):
    code, err = run_cli(capsys, tmp_path, f"--data.path={sft_jsonl}", "--model.name_or_path=no-such-owner/no-such-model")
    assert code == 2
    assert error_line(err) == ("model.name_or_path 'no-such-owner/no-such-model': no such folder here, and no Hub model of that "
                               "name in the Hugging Face cache (HF_HUB_OFFLINE is set, so the Hub was not asked)")


STAGE_DATA = {  # valid records of what each stage reads, so only the model path can be wrong
    "pretrain": [{"text": "Hello there."}],
    "sft": [{"prompt": "Hi.", "completion": " Hello."}],
    "reward": [{"prompt": "Hi.", "chosen": " Hello.", "rejected": " Go."}],
    "dpo": [{"prompt": "Hi.", "chosen": " Hello.", "rejected": " Go."}],
    "kto": [{"prompt": "Hi.", "completion": " Hello.", "label": True}, {"prompt": "Hi.", "completion": " Go.", "label": False}],
    "classify": [{"text": "I am glad.", "label": "joy"}, {"text": "I am sad.", "label": "sadness"}],
}


@pytest.mark.parametrize("stage", [*STAGE_DATA, "evaluate"])
def test_a_local_looking_model_path_that_does_not_exist_is_named_as_missing(stage, capsys, tmp_path, monkeypatch, write_jsonl):
    """`runs/nope` beside a `runs/` folder is a mistyped path, not a Hub id: the error says so
    instead of blaming the (offline) Hub connection."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    if stage == "evaluate":
        prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hi."}] * 4)
        argv = ["evaluate", "--candidate=runs/nope", f"--prompts={prompts}"]
    else:
        data = write_jsonl(tmp_path / "data.jsonl", STAGE_DATA[stage] * 4)
        argv = [stage, "--model.name_or_path=runs/nope", f"--data.path={data}", "--train.max_steps=1"]
    code = main([*argv, f"--run.output_dir={tmp_path / 'out'}"])
    assert code == 2
    message = error_line(capsys.readouterr().err)
    where = "candidate: " if stage == "evaluate" else ""
    assert message.startswith(f"{where}model.name_or_path 'runs/nope': no such folder"), message
    assert f"({tmp_path}/runs/nope does not exist)" in message


def test_every_model_loader_names_a_missing_folder(tmp_path, monkeypatch, builtin_tok):
    from alignloop.config import ModelConfig
    from alignloop.models.classifier import classifier_task, load_classifier
    from alignloop.models.load import load_causal_lm, load_tokenizer, model_family
    from alignloop.models.reward import load_reward_model
    from alignloop.train.classify import load_classifier_backbone, logging_label_names

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    missing = ModelConfig(name_or_path="runs/nope")
    loaders = {
        "model.tokenizer": lambda: load_tokenizer(ModelConfig(name_or_path="tiny-1m", tokenizer="runs/nope")),
        "model.name_or_path": lambda: load_tokenizer(missing),
        "causal lm": lambda: load_causal_lm(missing, builtin_tok, seed=0),
        "reward model": lambda: load_reward_model(missing, builtin_tok, seed=0),
        "classifier backbone": lambda: load_classifier_backbone(missing, "classification", ["a", "b"], seed=0),
        "logging classifier": lambda: logging_label_names(missing, "classification"),
        "served classifier": lambda: load_classifier("runs/nope", None, "classifier"),
        "classifier task": lambda: classifier_task("runs/nope"),
        "model family": lambda: model_family("runs/nope", "model 'm' at"),
    }
    for what, load in loaders.items():
        with pytest.raises(ModelError, match=re.escape(f"'runs/nope': no such folder ({tmp_path}/runs/nope does not exist)")):
            load()
            pytest.fail(f"{what}: loaded")


def test_a_folder_written_with_a_tilde_is_named_with_its_full_path(tmp_path, monkeypatch):
    from alignloop.models.load import _check_reachable

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "model").mkdir()
    with pytest.raises(ModelError, match=re.escape(f"model.name_or_path '~/model': write the folder as '{tmp_path}/model'")):
        _check_reachable("~/model", "model.name_or_path")


@pytest.mark.parametrize("name, offline, missing", [
    ("./nope", False, "no such folder"),
    ("~/surely-no-such-folder-here", False, "no such folder"),
    ("/surely/no/such/folder", False, "no such folder"),
    ("a/b/c", False, "no such folder"),
    ("¹", True, "no such folder"),  # not a Hub id by the Hub's own rules (a fuzzer's path for /admin/deploy)
    ("other..repo..id", True, "no such folder"),
    ("runs/nope", False, "no such folder"),  # runs/ is a folder here
    ("no-such-owner/no-such-model", True, "not in the Hugging Face cache"),
    ("no-such-owner/no-such-model", False, None),  # online: a Hub id, for from_pretrained to fetch
    ("Qwen/Qwen2-0.5B", False, None),
    ("gpt2", False, None),
])
def test_which_names_are_folders_and_which_hub_ids(name, offline, missing, tmp_path, monkeypatch):
    from alignloop.models import load

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    monkeypatch.setattr(load, "_hub_offline", lambda: offline)
    if missing is None:
        load._check_reachable(name, "model.name_or_path")
        return
    with pytest.raises(ModelError) as refused:
        load._check_reachable(name, "model.name_or_path")
    assert str(refused.value).startswith(f"model.name_or_path {name!r}: ")
    assert (missing if missing != "not in the Hugging Face cache" else "no Hub model of that name in the Hugging Face cache") in str(refused.value)


def test_chat_data_with_a_model_whose_tokenizer_has_no_chat_template(capsys, tmp_path, chat_jsonl, no_chat_template_model_dir):
    code, err = run_cli(capsys, tmp_path, f"--data.path={chat_jsonl}", f"--model.name_or_path={no_chat_template_model_dir}")
    assert code == 2
    # Loading a model folder draws transformers' "Loading weights" bar before the error.
    message = error_line(err, allow_progress_bars=True)
    assert str(no_chat_template_model_dir) in message
    assert "no chat template" in message


def test_chat_data_with_a_tokenizer_without_chat_template(capsys, tmp_path, chat_jsonl, no_chat_template_model_dir):
    code, err = run_cli(capsys, tmp_path, f"--data.path={chat_jsonl}", f"--model.tokenizer={no_chat_template_model_dir}")
    assert code == 2
    message = error_line(err)
    assert "no chat template" in message and "model.tokenizer" in message


def test_unknown_key_suggests_the_valid_one(capsys, tmp_path):
    code, err = run_cli(capsys, tmp_path, "--train.lrate=1")
    assert code == 2
    assert error_line(err) == "unknown key 'train.lrate' — did you mean 'train.lr'?"


def test_bad_value_names_the_key(capsys, tmp_path):
    code, err = run_cli(capsys, tmp_path, "--train.batch_size=many")
    assert code == 2
    assert error_line(err) == "train.batch_size: expected an integer, got 'many'"


def test_missing_config_file(capsys, tmp_path):
    path = tmp_path / "nope.yaml"
    code, err = run_cli(capsys, tmp_path, f"--config={path}")
    assert code == 2
    assert error_line(err) == f"{path}: config file not found"


def test_stray_argument_is_refused(capsys, tmp_path):
    code, err = run_cli(capsys, tmp_path, "data.jsonl")
    assert code == 2
    assert "unexpected argument 'data.jsonl'" in error_line(err)


def test_nothing_is_written_when_the_input_is_bad(capsys, tmp_path):
    code, _ = run_cli(capsys, tmp_path, f"--data.path={tmp_path / 'nope.jsonl'}")
    assert code == 2
    assert not (tmp_path / "runs").exists()


def test_an_unknown_preference_loss_is_named_before_any_data_is_read(capsys, tmp_path):
    missing = tmp_path / "nope.jsonl"  # were the data read first, the error would name this file
    code = main(["dpo", "--model.name_or_path=tiny-1m", f"--run.output_dir={tmp_path / 'runs'}", f"--data.path={missing}",
                 "--preference.loss=hinge"])
    assert code == 2
    assert error_line(capsys.readouterr().err) == "preference.loss: 'hinge' is not one of sigmoid, robust, ipo, simpo"


def test_every_command_prints_its_help(capsys):
    """argparse formats help strings with %: an option's text saying "90%" once broke `serve --help`."""
    import pytest

    from alignloop.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, sub in commands.choices.items():
        actions = [a for a in sub._actions if a.__class__.__name__ == "_SubParsersAction"]
        for argv in ([name, "--help"], *([name, action, "--help"] for a in actions for action in a.choices)):
            with pytest.raises(SystemExit) as done:
                main(argv)
            assert done.value.code == 0, argv
            assert "usage:" in capsys.readouterr().out
