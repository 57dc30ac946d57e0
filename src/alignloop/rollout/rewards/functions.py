"""Plain Python functions as reward sources, named ``module:function`` or ``path/to/file.py:function``."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from alignloop.errors import ConfigError
from alignloop.rollout.rewards.protocol import (
    Completion,
    Prompt,
    RewardError,
    check_batch,
    check_rewards,
    shorten,
)


class FunctionReward:
    """A plain Python function as a reward, named ``module:function`` or ``path/to/file.py:function``.

    The function is called TRL's way, ``fn(prompts=..., completions=..., **fields)``, and returns
    one number per completion. A function with ``**kwargs`` gets every field; any other gets only
    the fields it names, so ``def exact(completions, answer)`` works. Files are loaded by path
    (relative to the current folder); modules are imported from ``sys.path``. Bad specs raise
    ConfigError here; a call that raises is re-run row by row to name the first failing row.
    """

    def __init__(self, spec: str, name: str | None = None) -> None:
        self.spec = spec
        self.name = name or f"function:{spec}"
        self.fn = load_function(spec)
        self._who = f"reward function {spec}"
        self._accepted, self._required = _keyword_parameters(self.fn)

    def __call__(
        self, prompts: Sequence[Prompt], completions: Sequence[Completion], **fields: Sequence[Any]
    ) -> list[float]:
        check_batch(prompts, completions, fields)
        kwargs = self._kwargs(prompts, completions, fields)
        try:
            values = self.fn(**kwargs)
        except Exception as error:
            raise self._row_error(prompts, completions, fields, error) from error
        return check_rewards(values, len(completions), self._who)

    def _kwargs(
        self, prompts: Sequence[Prompt], completions: Sequence[Completion], fields: Mapping[str, Sequence[Any]]
    ) -> dict[str, Any]:
        offered = {"prompts": prompts, "completions": completions, **fields}
        missing = sorted(self._required - offered.keys())
        if missing:
            raise RewardError(
                f"{self._who} needs field '{missing[0]}', which the batch lacks (it has {', '.join(offered)}); "
                "add the column to the prompt dataset"
            )
        if self._accepted is None:
            return offered
        return {key: value for key, value in offered.items() if key in self._accepted}

    def _row_error(
        self,
        prompts: Sequence[Prompt],
        completions: Sequence[Completion],
        fields: Mapping[str, Sequence[Any]],
        error: Exception,
    ) -> RewardError:
        """Re-call the function on one row at a time and name the first row that fails alone."""
        for row in range(len(completions)):
            one_row = {column: [values[row]] for column, values in fields.items()}
            try:
                self.fn(**self._kwargs([prompts[row]], [completions[row]], one_row))
            except Exception as row_error:  # noqa: BLE001 -- whatever it raises is what the user must see
                return RewardError(
                    f"{self._who} raised {type(row_error).__name__} on row {row} "
                    f"(prompt {_preview(prompts[row])}): {row_error}"
                )
        return RewardError(
            f"{self._who} raised {type(error).__name__} on a batch of {len(completions)} rows, "
            f"though each row alone scores: {error}"
        )


def load_function(spec: str) -> Callable[..., Any]:
    """The callable named by ``module:function`` or ``path/to/file.py:function`` (a dotted
    ``Class.method`` works too), or a ConfigError naming ``spec``."""
    # The last colon splits, so a Windows path (C:\\rewards.py:score) keeps its drive.
    target, colon, attribute = spec.rpartition(":")
    if not colon or not target or not attribute:
        raise ConfigError(f"reward function '{spec}': expected 'module:function' or 'path/to/file.py:function'")
    if not all(part.isidentifier() for part in attribute.split(".")):
        raise ConfigError(f"reward function '{spec}': '{attribute}' is not a function name")
    is_path = target.endswith(".py") or "/" in target or "\\" in target
    found: Any = _load_file(spec, target) if is_path else _import_module(spec, target)
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise ConfigError(f"reward function '{spec}': {target} has no attribute '{part}'")
        found = getattr(found, part)
    if not callable(found):
        kind = type(found).__name__
        raise ConfigError(f"reward function '{spec}': {attribute} is not callable (it is a {kind} value)")
    return found


def _load_file(spec: str, target: str) -> ModuleType:
    path = Path(target).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"reward function '{spec}': file {target} not found (relative paths start at {Path.cwd()})")
    # One name per file: two rewards.py in different folders must not replace each other.
    stem = re.sub(r"\W", "_", path.stem)
    module_name = f"_alignloop_reward_{stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"reward function '{spec}': {target} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    # Registered before running, as `import` does: dataclasses and pickle look a module up by name.
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        raise ConfigError(
            f"reward function '{spec}': running {target} raised {type(error).__name__}: {error}"
        ) from error
    return module


def _import_module(spec: str, target: str) -> ModuleType:
    try:
        return importlib.import_module(target)
    except Exception as error:
        # The module itself missing, not a module it imports: then the spec is what to fix.
        missing = error.name if isinstance(error, ModuleNotFoundError) else None
        if missing is not None and (target == missing or target.startswith(missing + ".")):
            raise ConfigError(
                f"reward function '{spec}': module '{target}' not found on sys.path "
                f"(for a file in this folder write {target.replace('.', '/')}.py:{spec.rpartition(':')[2]})"
            ) from None
        raise ConfigError(
            f"reward function '{spec}': importing {target} raised {type(error).__name__}: {error}"
        ) from error


def _keyword_parameters(fn: Callable[..., Any]) -> tuple[frozenset[str] | None, frozenset[str]]:
    """(the keyword names ``fn`` accepts, None when it takes ``**kwargs``; the names it requires)."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # some builtins have no signature: offer everything
        return None, frozenset()
    named = [p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    required = frozenset(p.name for p in named if p.default is p.empty)
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None, required
    return frozenset(p.name for p in named), required


def _preview(prompt: Prompt) -> str:
    # The last message, not the whole chat: a shared system prompt would make every row look alike.
    text = prompt if isinstance(prompt, str) else prompt[-1]["content"] if prompt else ""
    return f"'{shorten(text)}'"
