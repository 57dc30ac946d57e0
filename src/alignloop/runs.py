"""A run folder, ``runs/<name>/``, and its ``metrics.jsonl``: what training writes and evaluation,
reports and the loop read; and :class:`Progress`, the one progress display of long work (training
steps, evaluation's prompts). A leaf module, so that readers need not import the training loop."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("alignloop")

CHECKPOINT_PREFIX = "step-"
STATE_FILE = "trainer_state.json"


@dataclass
class Run:
    """``runs/<name>/``: what a person opens after a run."""

    dir: Path

    @property
    def config_path(self) -> Path:
        return self.dir / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.jsonl"

    @property
    def checkpoints_dir(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def final_dir(self) -> Path:
        return self.dir / "final"

    def is_complete(self) -> bool:
        """Training ran to the end and ``final/`` was written."""
        return (self.final_dir / STATE_FILE).is_file()

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = [p for p in self.checkpoints_dir.glob(CHECKPOINT_PREFIX + "*") if (p / STATE_FILE).is_file()]
        return sorted(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class Progress:
    """A tqdm bar on a terminal; otherwise a log line about every 5% with rate and ETA, so a log
    file gets whole lines, never a bar's carriage returns.

    ``shown`` are the metric keys a line carries, as ``metrics.jsonl`` names them (a stage's own:
    :attr:`alignloop.config.Stage.progress`); a key missing from an update is left out of its line.
    ``train/`` is dropped from the shown name (``loss``, ``eval/loss``).
    """

    total: int
    start: int
    desc: str
    enabled: bool = True
    shown: tuple[str, ...] = ("train/loss", "eval/loss", "train/lr")
    unit: str = "step"
    _bar: Any = field(default=None, init=False)
    _t0: float = field(default_factory=time.perf_counter, init=False)

    def __post_init__(self) -> None:
        if self.enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, initial=self.start, desc=self.desc, unit=self.unit, dynamic_ncols=True)

    def update(self, done: int, metrics: dict[str, float] | None = None) -> None:
        """``done`` of ``total`` finished; ``metrics`` the latest values (a step's record)."""
        if not self.enabled:
            return
        metrics = metrics or {}
        shown = {key.removeprefix("train/"): f"{metrics[key]:.4g}" for key in self.shown if key in metrics}
        if self._bar is not None:
            self._bar.update(done - self._bar.n)
            self._bar.set_postfix(shown, refresh=False)
            return
        every = max(1, self.total // 20)
        if done % every and done != self.total:
            return
        elapsed = time.perf_counter() - self._t0
        rate = (done - self.start) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else math.inf
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
        details = "".join(f" {k} {v}" for k, v in shown.items())
        log.info("%s %s %d/%d%s | %.2f %ss/s | ETA %s", self.desc, self.unit, done, self.total, details, rate, self.unit, eta_text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
