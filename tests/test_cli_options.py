"""The command line's one spelling: every option is kebab-case (``--admin-key``), config keys of
a section keep their YAML spelling (``--train.max_steps``); a top-level config key's underscore
spelling still works, unlisted; each option is listed once with one default; only the first rank
of a multi-process run writes the INFO lines."""

from __future__ import annotations

import argparse
import logging
import re

import pytest

from alignloop.cli import _log_level, build_parser, main


def subparsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every (command path, parser) below ``parser``: `serve`, `users add`, ..."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += [((*path, name), sub), *subparsers(sub, (*path, name))]
    return found


def listed_options(parser: argparse.ArgumentParser) -> list[str]:
    return [option for action in parser._actions if action.help != argparse.SUPPRESS for option in action.option_strings]


def test_every_listed_option_is_kebab_case_or_a_section_key() -> None:
    commands = subparsers(build_parser())
    assert {path[0] for path, _ in commands} >= {"serve", "loop", "deploy", "evaluate", "sft", "users", "demo"}
    offenders = [f"{' '.join(path)} {option}" for path, sub in commands for option in listed_options(sub)
                 if "." not in option and "_" in option]
    assert offenders == []


def test_no_option_is_listed_twice() -> None:
    for path, sub in subparsers(build_parser()):
        options = listed_options(sub)
        assert len(options) == len(set(options)), path


def test_serve_help_lists_db_once_with_one_default(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    entries = re.findall(r"^  (--db .*?)(?=^  -)", text, flags=re.S | re.M)
    assert len(entries) == 1
    entry = " ".join(entries[0].split())
    assert entry.startswith("--db str|null feedback store URL")
    assert entry.count("(default:") == 1 and "$ALIGNLOOP_DB or sqlite:///feedback.db" in entry


@pytest.mark.parametrize("argv, dest, value", [
    (["loop", "--admin-key", "al-1"], "admin_key", "al-1"),
    (["loop", "--admin_key", "al-1"], "admin_key", "al-1"),  # scripts written before the rename
    (["loop", "--base-model=runs/sft/final"], "base_model", "runs/sft/final"),
    (["loop", "--base_model=runs/sft/final"], "base_model", "runs/sft/final"),
    (["serve", "--max-batch", "4"], "max_batch", "4"),
    (["serve", "--max_batch", "4"], "max_batch", "4"),
    (["evaluate", "--max-prompts=2"], "max_prompts", "2"),
    (["evaluate", "--max_prompts=2"], "max_prompts", "2"),
    (["deploy", "v1", "--admin-key", "al-1"], "admin_key", "al-1"),
])
def test_both_spellings_of_a_config_key_set_it(argv: list[str], dest: str, value: str) -> None:
    args, extra = build_parser().parse_known_args(argv)
    assert extra == [] and getattr(args, dest) == value


def test_the_underscore_spelling_is_not_listed(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["loop", "--help"])
    text = capsys.readouterr().out
    assert "--admin-key" in text and "--admin_key" not in text
    assert "--rules.min_agreement" in text  # a section's key keeps its YAML spelling


@pytest.mark.parametrize("environ, level", [({}, logging.INFO), ({"RANK": "0"}, logging.INFO), ({"RANK": "1"}, logging.WARNING),
                                            ({"RANK": "3", "WORLD_SIZE": "4"}, logging.WARNING)])
def test_only_the_first_rank_writes_info_lines(environ: dict, level: int) -> None:
    assert _log_level(environ) == level
