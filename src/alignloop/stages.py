"""Which function runs each config-driven command: one table for the CLI and the loop's recipes."""

from __future__ import annotations

from typing import Any, Callable


def stage_runner(stage: str) -> Callable[[Any], Any]:
    # Imported on use: `alignloop --help` should not pay for importing torch and transformers.
    if stage == "pretrain":
        from alignloop.train.pretrain import run_pretrain

        return run_pretrain
    if stage == "reward":
        from alignloop.train.reward import run_reward

        return run_reward
    if stage == "evaluate":
        from alignloop.evaluate.run import run_evaluate

        return run_evaluate
    if stage == "dpo":
        from alignloop.train.preference import run_dpo

        return run_dpo
    if stage == "kto":
        from alignloop.train.preference import run_kto

        return run_kto
    if stage in ("ppo", "grpo", "rloo", "reinforce"):
        from alignloop.train.rl import run_rl

        return run_rl
    if stage == "loop":
        from alignloop.loop.pipeline import run_loop

        return run_loop
    from alignloop.train.sft import run_sft

    return run_sft
