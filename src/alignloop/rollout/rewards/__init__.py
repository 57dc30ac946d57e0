"""Reward sources: what every optimiser calls to score a batch of completions.

A reward source is a callable ``(prompts, completions, **fields) -> list[float]`` with a ``name``
(TRL's reward-function convention): one float per row, in row order. A prompt or a completion is a
string or a list of chat messages (``{"role": ..., "content": ...}``); ``fields`` are the prompt
dataset's other columns (``answer``, ...), one value per row.

| source                  | YAML                              | computes                                        |
| ----------------------- | --------------------------------- | ----------------------------------------------- |
| :class:`ModelReward`    | ``model: runs/rm/final``          | a trained reward model's score                  |
| :class:`FunctionReward` | ``function: my_rewards.py:score`` | a Python function's numbers                     |
| :class:`RegexRule`      | ``rule: regex``                   | ``match`` if the pattern occurs, else ``miss``  |
| :class:`LengthRule`     | ``rule: length``                  | 1 inside [min, max], falling linearly to 0      |
| :class:`KeywordRule`    | ``rule: keywords``                | ``reward`` for any / all / the share of keywords |
| :class:`FormatRule`     | ``rule: format``                  | 1 if JSON / starts with / ends with / ≤ N lines |
| :class:`WeightedSum`    | ``sum: {name: source, ...}``      | Σ_i w_i · normalize_i(r_i)                      |

A reward file (:func:`load_reward_file`) holds one spec; :func:`build_reward` builds it::

    sum:
      helpful: {model: runs/rm/final, weight: 1.0, normalize: zscore}
      short:   {rule: length, max: 50, unit: words, weight: 0.5}
      exact:   {function: my_rewards.py:exact_match, weight: 2.0}

A stage's ``reward`` field names a reward-model folder, a YAML file or a function, and
:func:`build_reward_source` builds what it names.

Relative paths (model folders, function files) start at the current folder. What a model or a
function returns is checked by :func:`check_rewards`: one finite number per row, or a
:class:`RewardError` naming the source and the row (rows are numbered from 0, as in the batch).

| module         | holds                                                                      |
| -------------- | -------------------------------------------------------------------------- |
| ``protocol``   | :class:`RewardSource`, the text of prompts and completions, the row checks |
| ``functions``  | Python functions as sources, :func:`load_function`                         |
| ``model``      | a trained reward model as a source                                         |
| ``rules``      | regex, length, keyword and format rules                                    |
| ``combine``    | weighted sums and the batch normalisers                                    |
| ``spec``       | building any of them from YAML or a ``reward`` string                      |
"""

from alignloop.rollout.rewards.combine import WeightedSum, minmax, zscore
from alignloop.rollout.rewards.functions import FunctionReward, load_function
from alignloop.rollout.rewards.model import ModelReward
from alignloop.rollout.rewards.protocol import (
    RewardError,
    RewardSource,
    check_rewards,
    completion_text,
    prompt_text,
)
from alignloop.rollout.rewards.rules import FormatRule, KeywordRule, LengthRule, RegexRule
from alignloop.rollout.rewards.spec import build_reward, build_reward_source, load_reward_file

__all__ = [
    "FormatRule",
    "FunctionReward",
    "KeywordRule",
    "LengthRule",
    "ModelReward",
    "RegexRule",
    "RewardError",
    "RewardSource",
    "WeightedSum",
    "build_reward",
    "build_reward_source",
    "check_rewards",
    "completion_text",
    "load_function",
    "load_reward_file",
    "minmax",
    "prompt_text",
    "zscore",
]
