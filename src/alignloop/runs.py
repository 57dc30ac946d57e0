"""A run folder, ``runs/<name>/``, and its ``metrics.jsonl``: what training writes and evaluation,
reports and the loop read. A leaf module, so that readers need not import the training loop."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

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
