"""Reward sources: Python functions (by module or file), rules, weighted sums and the YAML that
builds them; every failure names the source and the row or the config key."""

from __future__ import annotations

import doctest
import importlib
import math
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from alignloop.errors import ConfigError
from alignloop.rollout.rewards import (
    FormatRule,
    FunctionReward,
    KeywordRule,
    LengthRule,
    ModelReward,
    RegexRule,
    RewardError,
    RewardSource,
    WeightedSum,
    build_reward,
    build_reward_source,
    check_rewards,
    combine,
    completion_text,
    load_reward_file,
    minmax,
    prompt_text,
    protocol,
    rules,
    zscore,
)

REWARD_CODE = textwrap.dedent(
    '''
    CALLS = []
    NOT_CALLABLE = 3


    def length(prompts, completions, **kwargs):
        CALLS.append(kwargs)
        return [float(len(c)) for c in completions]


    def exact(completions, answer):
        return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]


    def picky(completions, **kwargs):
        for c in completions:
            if "boom" in c:
                raise ValueError(f"cannot score {c!r}")
        return [1.0] * len(completions)


    def batch_only(completions, **kwargs):
        if len(completions) > 1:
            raise RuntimeError("needs one row at a time")
        return [1.0]


    def one_short(completions, **kwargs):
        return [1.0] * (len(completions) - 1)


    def nan_second(completions, **kwargs):
        return [0.0, float("nan")]


    def inf_second(completions, **kwargs):
        return [0.0, float("inf")]


    def words(completions, **kwargs):
        return ["high" for _ in completions]


    def skips(completions, **kwargs):
        return [1.0, None]
    '''
)
MODULE = "alignloop_test_rewards"


@pytest.fixture
def reward_file(tmp_path: Path) -> Path:
    """``my_rewards.py`` in a temp folder, holding the functions above."""
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARD_CODE)
    return path


@pytest.fixture
def reward_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The same functions importable as a module on ``sys.path``, freshly imported by each test."""
    folder = tmp_path / "modules"
    folder.mkdir()
    (folder / f"{MODULE}.py").write_text(REWARD_CODE)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    importlib.invalidate_caches()
    return MODULE


class Fixed:
    """A reward source returning given values, whatever the batch."""

    def __init__(self, name: str, values: Sequence[Any]) -> None:
        self.name = name
        self.values = values

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **fields: Sequence[Any]) -> Any:
        return list(self.values)


class FakeScorer:
    """Scores a row by the length of its completion text; counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def score(self, prompts: list[Any], completions: list[Any]) -> list[float]:
        self.calls += 1
        return [float(len(completion_text(c))) for c in completions]


@pytest.fixture
def fake_scorers(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int, FakeScorer]]:
    """Replace the reward-model loader; returns the (path, batch_size, max_length, scorer) loaded."""
    loaded: list[tuple[str, int, int, FakeScorer]] = []

    def load(path: str, batch_size: int, max_length: int) -> FakeScorer:
        scorer = FakeScorer()
        loaded.append((path, batch_size, max_length, scorer))
        return scorer

    monkeypatch.setattr("alignloop.rollout.rewards.model.load_scorer", load)
    return loaded


def from_yaml(text: str) -> RewardSource:
    return build_reward(yaml.safe_load(textwrap.dedent(text)))


def score(source: RewardSource, completions: list[Any], **fields: Sequence[Any]) -> list[float]:
    return source(["Q?"] * len(completions), completions, **fields)


# --- text -----------------------------------------------------------------------------------------
def test_text_of_strings_and_messages():
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    assert prompt_text("Hi?") == "Hi?"
    assert prompt_text(chat) == "Be brief.\nHi?"
    assert completion_text([{"role": "assistant", "content": "Hello."}]) == "Hello."
    with pytest.raises(TypeError, match="string or a list of messages"):
        completion_text(3)  # type: ignore[arg-type]


@pytest.mark.parametrize("module", [protocol, rules, combine])
def test_docstring_examples_hold(module):
    assert doctest.testmod(module).failed == 0


# --- Python functions -----------------------------------------------------------------------------
def test_function_by_module_gets_only_the_fields_it_names(reward_module):
    exact = FunctionReward(f"{reward_module}:exact")
    # `exact(completions, answer)` takes no prompts and no difficulty: passing them would raise.
    got = exact(["2+2?", "3+3?"], [" 4", "5"], answer=["4", "6"], difficulty=["easy", "easy"])
    assert got == [1.0, 0.0]
    assert exact.name == f"function:{reward_module}:exact"


def test_function_with_kwargs_gets_every_field(reward_module):
    length = FunctionReward(f"{reward_module}:length")
    assert length(["a", "b"], ["xy", "xyz"], answer=["1", "2"], level=[3, 4]) == [2.0, 3.0]
    assert sys.modules[reward_module].CALLS == [{"answer": ["1", "2"], "level": [3, 4]}]


def test_function_by_file_path_absolute_and_relative(reward_file, monkeypatch):
    assert FunctionReward(f"{reward_file}:length")(["a"], ["four"]) == [4.0]
    monkeypatch.chdir(reward_file.parent)
    relative = FunctionReward("my_rewards.py:exact")
    assert relative(["q"], ["4"], answer=["4"]) == [1.0]
    assert relative.name == "function:my_rewards.py:exact"


def test_files_with_the_same_name_in_two_folders_stay_apart(tmp_path):
    for folder, value in (("a", 1.0), ("b", 2.0)):
        (tmp_path / folder).mkdir()
        code = f"def score(completions, **kw):\n    return [{value}] * len(completions)\n"
        (tmp_path / folder / "rewards.py").write_text(code)
    first = FunctionReward(f"{tmp_path}/a/rewards.py:score")
    second = FunctionReward(f"{tmp_path}/b/rewards.py:score")
    assert (first(["q"], ["c"]), second(["q"], ["c"])) == ([1.0], [2.0])


def test_function_that_raises_names_the_function_and_the_row(reward_file):
    picky = FunctionReward(f"{reward_file}:picky")
    prompts = ["Hi", "What is 2+2? Please show your working step by step.", "Bye"]
    with pytest.raises(RewardError) as caught:
        picky(prompts, ["fine", "boom here", "boom too"])
    assert str(caught.value) == (
        f"reward function {reward_file}:picky raised ValueError on row 1 "
        "(prompt 'What is 2+2? Please show your working s…'): cannot score 'boom here'"
    )


def test_function_that_fails_only_on_the_batch_says_so(reward_file):
    with pytest.raises(RewardError, match=r"batch_only raised RuntimeError on a batch of 2 rows, though each row"):
        FunctionReward(f"{reward_file}:batch_only")(["a", "b"], ["x", "y"])


def test_chat_prompt_in_an_error_shows_its_last_message(reward_file):
    chat = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Add 2 and 2."}]
    with pytest.raises(RewardError, match=r"on row 0 \(prompt 'Add 2 and 2.'\)"):
        FunctionReward(f"{reward_file}:picky")([chat], ["boom"])


@pytest.mark.parametrize(
    "function, message",
    [
        ("one_short", r"one_short returned 1 values for 2 completions$"),
        ("nan_second", r"nan_second returned nan for row 1; rewards must be finite$"),
        ("inf_second", r"inf_second returned inf for row 1; rewards must be finite$"),
        ("words", r"words returned 'high' \(str\) for row 0; expected a number$"),
        ("skips", r"skips returned None for row 1; every row needs a number$"),
    ],
)
def test_function_returning_bad_values_names_the_problem_and_row(reward_file, function, message):
    with pytest.raises(RewardError, match=message):
        FunctionReward(f"{reward_file}:{function}")(["a", "b"], ["x", "y"])


def test_function_missing_a_field_it_requires(reward_file):
    with pytest.raises(RewardError, match=r"exact needs field 'answer', which the batch lacks"):
        FunctionReward(f"{reward_file}:exact")(["a"], ["x"])


def test_misaligned_batch_is_a_bug_not_a_reward_error(reward_file):
    with pytest.raises(ValueError, match="1 answer for 2 completions"):
        FunctionReward(f"{reward_file}:length")(["a", "b"], ["x", "y"], answer=["1"])


def test_check_rewards_takes_arrays_and_bools():
    assert check_rewards(np.array([1, 0.5]), 2, "r") == [1.0, 0.5]
    assert check_rewards([True, False], 2, "r") == [1.0, 0.0]
    with pytest.raises(RewardError, match="r returned a generator; expected a list of 1 numbers"):
        check_rewards((x for x in [1.0]), 1, "r")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_colon", "expected 'module:function' or 'path/to/file.py:function'"),
        (":score", "expected 'module:function'"),
        ("my_rewards.py:", "expected 'module:function'"),
        ("my_rewards.py:not-a-name", "'not-a-name' is not a function name"),
        ("missing.py:score", "file missing.py not found"),
        ("no_such_module_for_rewards:score", "module 'no_such_module_for_rewards' not found on sys.path"),
        ("my_rewards.py:absent", "my_rewards.py has no attribute 'absent'"),
        ("my_rewards.py:NOT_CALLABLE", "NOT_CALLABLE is not callable"),
    ],
)
def test_bad_function_specs_name_the_spec(reward_file, monkeypatch, spec, message):
    monkeypatch.chdir(reward_file.parent)
    with pytest.raises(ConfigError) as caught:
        FunctionReward(spec)
    assert str(caught.value).startswith(f"reward function '{spec}': ")
    assert message in str(caught.value)


def test_file_that_fails_to_run_is_a_config_error(tmp_path):
    (tmp_path / "broken.py").write_text("x = 1 / 0\n")
    with pytest.raises(ConfigError, match=r"broken.py:f': running .*broken.py raised ZeroDivisionError"):
        FunctionReward(f"{tmp_path}/broken.py:f")


def test_module_missing_a_dependency_names_the_dependency(tmp_path, monkeypatch):
    (tmp_path / "needs_dep_for_rewards.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "needs_dep_for_rewards", raising=False)
    with pytest.raises(ConfigError, match=r"raised ModuleNotFoundError: No module named 'no_such_dependency_xyz'"):
        FunctionReward("needs_dep_for_rewards:f")


# --- rules --------------------------------------------------------------------------------------
def test_regex_rule_from_yaml():
    rule = from_yaml(
        r"""
        rule: regex
        pattern: "^Answer: \\d+$"
        match: 2.0
        miss: -1.0
        """
    )
    assert rule.name == "rule:regex"
    chat = [{"role": "assistant", "content": "Answer: 7"}]
    got = score(rule, ["Answer: 42", "The Answer: 42", "Answer: forty", chat])
    assert got == [2.0, -1.0, -1.0, 2.0]


def test_regex_rule_flags_and_fullmatch():
    assert score(RegexRule("answer", flags="i"), ["ANSWER", "none"]) == [1.0, 0.0]
    assert score(RegexRule(r"\d+", search=False), ["42", "42 apples"]) == [1.0, 0.0]
    assert score(RegexRule(r"^b$", flags="m"), ["a\nb\nc"]) == [1.0]
    assert score(RegexRule(r"^b$"), ["a\nb\nc"]) == [0.0]


def test_regex_rule_refuses_bad_patterns_and_flags():
    with pytest.raises(ConfigError, match=r"^reward: regex pattern '\(' is not valid: missing \)"):
        from_yaml("{rule: regex, pattern: '('}")
    with pytest.raises(ConfigError, match="unknown flag 'q'; use letters from imsxa"):
        RegexRule("a", flags="iq")


def test_length_rule_falls_linearly_outside_the_window():
    rule = from_yaml("{rule: length, min: 3, max: 5, unit: words}")
    lengths = ["a b", "a b c", "a b c d e", "a b c d e f g", "a b c d e f g h i j"]
    # 2 words: 1 − 1/3; 7 words: 1 − 2/5; 10 words: 1 − 5/5 = 0
    assert score(rule, lengths) == pytest.approx([2 / 3, 1.0, 1.0, 0.6, 0.0])


def test_length_rule_in_chars_with_a_scale():
    rule = from_yaml("{rule: length, max: 10, unit: chars, scale: 5}")
    assert score(rule, ["0123456789", "0123456789ab", "0123456789abcdefghij"]) == pytest.approx([1.0, 0.6, 0.0])


@pytest.mark.parametrize(
    "spec, message",
    [
        ("{rule: length}", "length rule needs min, max or both"),
        ("{rule: length, min: 5, max: 3}", "min 5 is above max 3"),
        ("{rule: length, max: 5, unit: tokens}", "unit 'tokens' is not one of words, chars"),
        ("{rule: length, max: 5, scale: 0}", "scale must be > 0"),
        ("{rule: length, max: fifty}", r"^reward.max: expected an integer, got 'fifty'$"),
    ],
)
def test_length_rule_refuses_bad_settings(spec, message):
    with pytest.raises(ConfigError, match=message):
        from_yaml(spec)


def test_keyword_rule_modes():
    text = ["Paris is in France.", "I like paris", "Parisian food", "FRANCE!"]
    any_ = from_yaml("{rule: keywords, words: [paris, france]}")
    all_ = from_yaml("{rule: keywords, words: [paris, france], mode: all, reward: 2.0}")
    count = from_yaml("{rule: keywords, words: [paris, france], mode: count}")
    assert score(any_, text) == [1.0, 1.0, 0.0, 1.0]
    assert score(all_, text) == [2.0, 0.0, 0.0, 0.0]
    assert score(count, text) == [1.0, 0.5, 0.0, 0.5]


def test_keyword_rule_case_whole_words_and_forbidden():
    assert score(KeywordRule(["Paris"], case_sensitive=True), ["Paris", "paris"]) == [1.0, 0.0]
    assert score(KeywordRule(["cat"]), ["the cat.", "catalog", "bobcat", "cat_food"]) == [1.0, 0.0, 0.0, 0.0]
    assert score(KeywordRule(["c++"]), ["I write c++ daily", "abc++"]) == [1.0, 0.0]
    forbidden = from_yaml("{rule: keywords, words: [sorry, apologise], forbidden: true}")
    got = score(forbidden, ["Sorry, no.", "Sure."])
    assert got == [-1.0, 0.0]
    assert math.copysign(1.0, got[1]) == 1.0  # 0.0, not -0.0


def test_format_rule_kinds():
    json_rule = from_yaml("{rule: format, kind: json}")
    assert score(json_rule, ['{"a": 1}', '{"a": 1', "  [1, 2]\n", "yes"]) == [1.0, 0.0, 1.0, 0.0]
    starts = from_yaml("{rule: format, kind: starts_with, value: 'Answer:'}")
    assert score(starts, [" Answer: 4", "answer: 4"]) == [1.0, 0.0]
    ends = from_yaml("{rule: format, kind: ends_with, value: '.'}")
    assert score(ends, ["Done.\n", "Done!"]) == [1.0, 0.0]
    lines = from_yaml("{rule: format, kind: max_lines, value: 2}")
    assert score(lines, ["a\nb\n", "a\nb\nc", "one"]) == [1.0, 0.0, 1.0]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("{rule: format, kind: xml}", "kind 'xml' is not one of json, starts_with, ends_with, max_lines"),
        ("{rule: format, kind: json, value: 1}", "json takes no value"),
        ("{rule: format, kind: starts_with, value: 123}", "needs a non-empty string value .*quote it in YAML"),
        ("{rule: format, kind: max_lines, value: 0}", "max_lines needs an integer value ≥ 1"),
        ("{rule: format}", r"^reward.kind: missing; a format rule needs kind$"),
    ],
)
def test_format_rule_refuses_bad_settings(spec, message):
    with pytest.raises(ConfigError, match=message):
        from_yaml(spec)


def test_every_source_is_a_reward_source(reward_file):
    sources = [
        RegexRule("a"),
        LengthRule(max=1),
        KeywordRule(["a"]),
        FormatRule("json"),
        FunctionReward(f"{reward_file}:length"),
        ModelReward("somewhere", scorer=FakeScorer()),
        WeightedSum([(RegexRule("a"), 1.0, "none")]),
    ]
    assert all(isinstance(source, RewardSource) for source in sources)


# --- weighted sums --------------------------------------------------------------------------------
def test_weighted_sum_without_normalisation():
    total = WeightedSum([(Fixed("a", [1, 2, 3]), 2.0, "none"), (Fixed("b", [10, 0, -10]), 0.5, "none")])
    assert total(["q"] * 3, ["x"] * 3) == [7.0, 4.0, 1.0]
    assert total.last_parts == {"a": [1.0, 2.0, 3.0], "b": [10.0, 0.0, -10.0]}


def test_weighted_sum_with_zscore_and_minmax():
    total = WeightedSum([(Fixed("a", [1, 2, 3]), 1.0, "zscore"), (Fixed("b", [10, 10, 40]), 0.5, "minmax")])
    z = 1 / math.sqrt(2 / 3)  # (3 − 2) / population std of [1, 2, 3]
    assert total(["q"] * 3, ["x"] * 3) == pytest.approx([-z, 0.0, z + 0.5])
    assert total.last_parts == {"a": [1.0, 2.0, 3.0], "b": [10.0, 10.0, 40.0]}


def test_normalisers_on_degenerate_batches():
    assert zscore([5.0]) == [0.0]
    assert zscore([2.0, 2.0]) == [0.0, 0.0]
    assert minmax([3.0]) == [0.5]
    assert minmax([1.0, 1.0]) == [0.5, 0.5]
    assert minmax([0.0, 5.0, 10.0]) == [0.0, 0.5, 1.0]


def test_weighted_sum_checks_each_part():
    total = WeightedSum([(Fixed("a", [1.0]), 1.0, "none")])
    with pytest.raises(RewardError, match=r"^reward 'a' returned 1 values for 2 completions$"):
        total(["q", "q"], ["x", "y"])


@pytest.mark.parametrize(
    "parts, message",
    [
        ([], "needs at least one source"),
        ([(Fixed("a", []), 1.0, "none"), (Fixed("a", []), 1.0, "none")], "two sources named 'a'"),
        ([(Fixed("a", []), True, "none")], "weight of 'a' must be a finite number"),
        ([(Fixed("a", []), 1.0, "rank")], "normalize of 'a' is 'rank'; expected one of none, zscore, minmax"),
    ],
)
def test_weighted_sum_refuses_bad_parts(parts, message):
    with pytest.raises(ConfigError, match=message):
        WeightedSum(parts)


# --- reward models --------------------------------------------------------------------------------
def test_model_reward_loads_lazily_once(tmp_path, fake_scorers):
    model = from_yaml(f"{{model: {tmp_path}, batch_size: 4, max_length: 128}}")
    assert model.name == f"model:{tmp_path}"
    assert fake_scorers == []  # building a config loads nothing
    assert score(model, ["ab", "abcd"]) == [2.0, 4.0]
    assert score(model, ["abc"]) == [3.0]
    [(path, batch_size, max_length, scorer)] = fake_scorers
    assert (path, batch_size, max_length, scorer.calls) == (str(tmp_path), 4, 128, 2)


def test_model_reward_defaults_and_bad_settings(tmp_path, fake_scorers):
    score(from_yaml(f"{{model: {tmp_path}}}"), ["a"])
    assert fake_scorers[0][1:3] == (32, None)  # None: the length the model was trained with
    with pytest.raises(ConfigError, match=r"^reward.model: 'runs/no-such-rm' not found"):
        from_yaml("{model: runs/no-such-rm}")
    with pytest.raises(ConfigError, match=r"^reward.batch_size: expected an integer ≥ 1, got 0$"):
        from_yaml(f"{{model: {tmp_path}, batch_size: 0}}")


def test_model_reward_checks_the_scorer():
    class Broken:
        def score(self, prompts: list[Any], completions: list[Any]) -> list[float]:
            return [float("nan")] * len(completions)

    with pytest.raises(RewardError, match=r"^reward model rm returned nan for row 0"):
        score(ModelReward("rm", scorer=Broken()), ["x"])


# --- building from YAML ---------------------------------------------------------------------------
def test_function_spec_from_yaml(reward_file, monkeypatch):
    monkeypatch.chdir(reward_file.parent)
    source = from_yaml("function: my_rewards.py:exact")
    assert source.name == "function:my_rewards.py:exact"
    assert score(source, ["4", "5"], answer=["4", "4"]) == [1.0, 0.0]


def test_weighted_sum_from_yaml(tmp_path, reward_file, monkeypatch, fake_scorers):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rm").mkdir()
    total = from_yaml(
        """
        sum:
          helpful: {model: rm, weight: 1.0, normalize: zscore}
          short:   {rule: length, max: 2, unit: words, weight: 0.5}
          exact:   {function: my_rewards.py:exact, weight: 2.0}
        """
    )
    assert isinstance(total, WeightedSum) and total.name == "sum"
    assert [source.name for source, _, _ in total.parts] == ["helpful", "short", "exact"]
    completions = ["4", "it is 4"]
    got = score(total, completions, answer=["4", "4"])
    # helpful: lengths [1, 7] z-scored → [−1, 1]; short: [1, 0.5] × 0.5; exact: [1, 0] × 2
    assert got == pytest.approx([-1 + 0.5 + 2.0, 1 + 0.25 + 0.0])
    assert total.last_parts == {"helpful": [1.0, 7.0], "short": [1.0, 0.5], "exact": [1.0, 0.0]}


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError) as caught:
        from_yaml("sum: {short: {rule: length, maxx: 50, unit: words}}")
    assert str(caught.value) == "reward.sum.short.maxx: unknown key — did you mean 'max'?"


def test_weight_outside_a_sum_is_an_unknown_key():
    with pytest.raises(ConfigError, match=r"^reward.weight: unknown key; valid keys here: rule, min, max, unit, scale"):
        from_yaml("{rule: length, max: 5, weight: 2}")


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "sum: {short: {max: 50, weight: 1}}",
            r"^reward.sum.short: no reward source; give one of model, function, rule, sum \(found: max\)$",
        ),
        ("{rules: length, max: 5}", r"^reward: no reward source; .* — did you mean 'rule' for 'rules'\?$"),
        ("{rule: length, function: 'a.py:f'}", r"^reward: has both 'function' and 'rule'"),
        ("{rule: regexp, pattern: a}", r"^reward.rule: unknown rule 'regexp' — did you mean 'regex'\?"),
        ("sum: {}", r"^reward.sum: empty"),
        ("sum: [a, b]", r"^reward.sum: expected a mapping, got \['a', 'b'\]$"),
        ("sum: {a: [rule, regex]}", r"^reward.sum.a: expected a mapping with one of model, function, rule, sum"),
        ("[model, rm]", r"^reward: expected a mapping"),
        ("sum: {a: {rule: regex, pattern: x, weight: heavy}}", r"^reward.sum.a.weight: expected a number, got 'heavy'"),
        (
            "sum: {a: {rule: regex, pattern: x, normalize: z-score}}",
            r"^reward.sum.a.normalize: 'z-score' is not one of .* did you mean 'zscore'\?$",
        ),
        ("{rule: regex, pattern: x, search: 'yes'}", r"^reward.search: expected true or false, got 'yes'$"),
        ("{rule: keywords, words: paris}", r"^reward.words: expected a non-empty list of strings, got 'paris'$"),
        ("{function: nocolon}", r"^reward: reward function 'nocolon': expected 'module:function'"),
        ("sum: {exact: {function: nocolon}}", r"^reward.sum.exact: reward function 'nocolon'"),
        ("sum: {a: {sum: {b: {rule: length, maxx: 1}}}}", r"^reward.sum.a.sum.b.maxx: unknown key — did you mean"),
    ],
)
def test_bad_specs_name_the_dotted_path(text, message):
    with pytest.raises(ConfigError, match=message):
        from_yaml(text)


def test_numbers_in_specs_read_as_in_config_files():
    # YAML reads "5e-1" (no dot) as a string; a config file takes it as a number, and so does a spec.
    total = from_yaml("sum: {short: {rule: length, max: 2, weight: '5e-1'}}")
    assert score(total, ["a b c"]) == [0.25]
    with pytest.raises(ConfigError, match=r"^reward.sum.short.weight: expected a finite number, got nan$"):
        from_yaml("sum: {short: {rule: length, max: 2, weight: .nan}}")


def test_reward_source_string_names_a_folder_a_yaml_file_or_a_function(tmp_path, reward_file, fake_scorers):
    assert isinstance(build_reward_source(str(tmp_path)), ModelReward)
    spec = tmp_path / "reward.yaml"
    spec.write_text("rule: length\nmax: 2\n")
    assert isinstance(build_reward_source(str(spec)), LengthRule)
    assert build_reward_source(f"{reward_file}:length").name == f"function:{reward_file}:length"
    with pytest.raises(ConfigError, match=r"^reward: 'runs/rm' is not a reward-model folder, a YAML reward spec"):
        build_reward_source("runs/rm")


def test_load_reward_file_builds_and_names_the_file_in_errors(tmp_path):
    good = tmp_path / "rewards.yaml"
    good.write_text("sum:\n  fmt: {rule: format, kind: json}\n  kw: {rule: keywords, words: [ok], weight: 3}\n")
    assert score(load_reward_file(good), ['"ok"', "not json"]) == [4.0, 0.0]

    bad = tmp_path / "bad.yaml"
    bad.write_text("rule: length\nmaxx: 5\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: reward.maxx: unknown key — did you mean 'max'\?$"):
        load_reward_file(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("rule: regex\npattern: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"^{broken}:\d+: not valid YAML"):
        load_reward_file(broken)
    with pytest.raises(ConfigError, match="reward file not found"):
        load_reward_file(tmp_path / "absent.yaml")
