"""The errors alignloop reports to a person: one line naming what is wrong and where.

The CLI prints ``str(error)`` and exits with code 2 for any :class:`AlignloopError`; anything
else is a bug and keeps its traceback.
"""


class AlignloopError(Exception):
    """Base class for errors caused by the user's input (config, data, paths), not by a bug."""


class ConfigError(AlignloopError):
    """A config key or value is wrong: names the key and, where possible, the fix."""


class DataError(AlignloopError):
    """A data file is wrong: names the file, the line (or row) and the field."""


class ModelError(AlignloopError):
    """A model or tokenizer cannot be loaded or lacks what the stage needs."""


class TrainingInterrupted(AlignloopError):
    """Ctrl-C stopped training after a checkpoint was written; the CLI exits with 130."""


class TrainingDiverged(AlignloopError):
    """Training stopped because a watched quantity (the KL to the reference) passed its limit; a
    checkpoint was written first."""
